"""The data-plane wire format: a fixed binary header, a msgpack body, raw tensor bytes.

A frame is ``header | meta | blobs``. The 16-byte header says how long ``meta`` (msgpack)
and ``blobs`` (raw tensor bytes) are, so a receiver checks both against its limits before
it allocates or reads anything, and reads the blob section straight into a fresh aligned
buffer: received arrays are views of that buffer, never copies. Tensors inside ``meta``
are msgpack extension objects naming their dtype, shape and place in the blob section.
``docs/protocol.md`` is the normative description; this module is its implementation.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np

from dvla.errors import DvlaError

MAGIC = b"DVLA"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")  # magic, version, type, flags, meta_len, blob_len
HEADER_SIZE = HEADER.size
#: Each tensor's bytes start at a multiple of this in the blob section (and in memory).
BLOB_ALIGN = 64
#: msgpack extension code of a tensor reference.
EXT_TENSOR = 1
MAX_NDIM = 8
#: Largest frame accepted before the peer has authenticated.
PRE_AUTH_MAX_FRAME = 4096
#: Largest msgpack section. Bulk data travels in the blob section; this caps the Python
#: objects a body can unpack into (msgpack inflates up to ~64x: 1 MiB stays < 64 MiB).
MAX_META = 1024 * 1024
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
_PAD = bytes(BLOB_ALIGN)

#: Wire dtype names; all multi-byte types are little-endian.
DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}
_NAME_OF = {dt.str: name for name, dt in DTYPES.items()}


class MsgType(IntEnum):
    """Message types; the number is the header's type byte."""

    HELLO = 1
    AUTH = 2
    ACK = 3
    OBS_BATCH = 4
    ACTION_BATCH = 5
    TRAJ_CHUNK = 6
    HEARTBEAT = 7
    ERROR = 8
    CLOSE = 9


_TYPES = frozenset(int(t) for t in MsgType)


class FrameError(DvlaError):
    """A peer broke the protocol; the connection that carried it is closed.

    Attributes:
        code: the short machine-readable reason sent in the ERROR frame.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Frame:
    """One received frame, not yet decoded.

    Attributes:
        type: the message type.
        flags: header flags (zero in protocol version 1).
        meta: the msgpack body.
        blobs: the blob section; decoded tensors are views of it.
    """

    type: MsgType
    flags: int
    meta: bytes
    blobs: memoryview

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.meta) + len(self.blobs)

    def decode(self) -> Any:
        """The body with tensors as numpy arrays viewing the blob section."""
        return decode_body(self.meta, self.blobs)


def aligned_buffer(n: int) -> memoryview:
    """A writable, uninitialised ``n``-byte buffer whose start is ``BLOB_ALIGN``-aligned."""
    raw = np.empty(n + BLOB_ALIGN, np.uint8)
    skip = -raw.ctypes.data % BLOB_ALIGN
    return raw.data[skip : skip + n]


def _as_wire_array(obj: Any) -> np.ndarray | None:
    """A C-contiguous little-endian numpy view of an array or CPU tensor, else None."""
    if isinstance(obj, np.ndarray):
        arr = obj
    elif type(obj).__module__.startswith("torch") and hasattr(obj, "numpy"):
        if getattr(obj, "device", None) is not None and obj.device.type != "cpu":
            raise FrameError("tensor", f"tensors must be on the CPU to travel (got {obj.device})")
        try:
            arr = obj.detach().numpy()
        except TypeError as err:
            raise FrameError("tensor", f"tensor dtype {obj.dtype} cannot travel: {err}") from None
    else:
        return None
    if arr.dtype.newbyteorder("<").str not in _NAME_OF:
        raise FrameError("tensor", f"dtype {arr.dtype} cannot travel on the data plane")
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
    return arr


def encode_frame(msg_type: MsgType, body: Any, flags: int = 0) -> list[memoryview | bytes]:
    """The buffers of one frame, ready for ``writelines``.

    Tensors are not copied: the returned list holds views of their memory, so they must
    not be modified until the frame is written.
    """
    arrays: list[np.ndarray] = []
    blob_len = 0

    def default(obj: Any) -> Any:
        nonlocal blob_len
        arr = _as_wire_array(obj)
        if arr is None:
            if isinstance(obj, np.generic):
                return obj.item()
            raise FrameError("encode", f"cannot send a value of type {type(obj).__name__}")
        offset = blob_len
        arrays.append(arr)
        blob_len += arr.nbytes + (-arr.nbytes % BLOB_ALIGN)
        ref = msgpack.packb(
            [_NAME_OF[arr.dtype.newbyteorder("<").str], list(arr.shape), offset, arr.nbytes]
        )
        return msgpack.ExtType(EXT_TENSOR, ref)

    meta = msgpack.packb(body, default=default, use_bin_type=True)
    out: list[memoryview | bytes] = [
        HEADER.pack(MAGIC, VERSION, int(msg_type), flags, len(meta), blob_len),
        meta,
    ]
    for arr in arrays:
        if arr.nbytes:
            out.append(arr.reshape(-1).view(np.uint8).data)
        pad = -arr.nbytes % BLOB_ALIGN
        if pad:
            out.append(_PAD[:pad])
    return out


def frame_bytes(msg_type: MsgType, body: Any, flags: int = 0) -> bytes:
    """One frame as a single bytes object (tests, small control messages)."""
    return b"".join(bytes(b) for b in encode_frame(msg_type, body, flags))


def parse_header(header: bytes | memoryview, max_frame: int) -> tuple[MsgType, int, int, int]:
    """Check a header against the protocol and ``max_frame``; return type, flags, lengths.

    Raises:
        FrameError: wrong magic, another protocol version, unknown type, flags set, or a
            frame larger than ``max_frame``.
    """
    magic, version, mtype, flags, meta_len, blob_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError("magic", f"not a dvla frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise FrameError(
            "version", f"peer speaks protocol version {version}; this peer speaks {VERSION}"
        )
    if mtype not in _TYPES:
        raise FrameError("type", f"unknown message type {mtype}")
    if flags:
        raise FrameError("flags", f"flags {flags:#x} are not defined in protocol version 1")
    size = HEADER_SIZE + meta_len + blob_len
    if meta_len > MAX_META:
        raise FrameError("too-large", f"msgpack section of {meta_len} bytes exceeds {MAX_META}")
    if size > max_frame:
        raise FrameError("too-large", f"frame of {size} bytes exceeds the limit of {max_frame}")
    if blob_len % BLOB_ALIGN:
        raise FrameError("blob", f"blob section of {blob_len} bytes is not padded to 64")
    return MsgType(mtype), flags, meta_len, blob_len


def _tensor_hook(blobs: memoryview) -> Any:
    def hook(code: int, data: bytes) -> Any:
        if code != EXT_TENSOR:
            raise FrameError("body", f"unknown msgpack extension type {code}")
        ref = msgpack.unpackb(data, use_list=True, raw=False)
        if not (isinstance(ref, list) and len(ref) == 4):
            raise FrameError("tensor", "tensor reference is not [dtype, shape, offset, nbytes]")
        name, shape, offset, nbytes = ref
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise FrameError("tensor", f"unknown tensor dtype {name!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            raise FrameError("tensor", f"bad tensor shape {shape!r}")
        if type(offset) is not int or type(nbytes) is not int:
            raise FrameError("tensor", "tensor offset and size must be integers")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise FrameError("tensor", f"tensor of shape {shape} {name} cannot be {nbytes} bytes")
        if offset < 0 or offset % BLOB_ALIGN or offset + nbytes > len(blobs):
            raise FrameError("tensor", "tensor lies outside the blob section")
        arr = np.frombuffer(blobs, dtype, count=nbytes // dtype.itemsize, offset=offset)
        return arr.reshape(shape)

    return hook


def decode_body(meta: bytes, blobs: memoryview) -> Any:
    """Decode a msgpack body, resolving tensor references into views of ``blobs``.

    Raises:
        FrameError: the body is not valid msgpack or a tensor reference is invalid.
    """
    try:
        return msgpack.unpackb(
            meta,
            ext_hook=_tensor_hook(blobs),
            raw=False,
            strict_map_key=True,
            use_list=True,
        )
    except FrameError:
        raise
    except Exception as err:  # msgpack raises many types on malformed input
        raise FrameError("body", f"malformed msgpack body: {type(err).__name__}: {err}") from None


class FrameDecoder:
    """Incremental frame parser shaped like :class:`asyncio.BufferedProtocol`.

    The transport asks :meth:`get_buffer` where to put the next bytes, then reports how
    many arrived with :meth:`buffer_updated`. Small frames are parsed out of one scratch
    buffer, many per read; once a large frame's header is known, the rest of its body is
    read directly into its own buffers, so big tensors cross exactly one copy (the
    kernel's). Bytes may arrive split at any offset.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, scratch: int = 256 * 1024) -> None:
        if scratch < HEADER_SIZE:
            raise ValueError(f"scratch buffer of {scratch} bytes cannot hold a header")
        self.max_frame = max_frame
        self._scratch = bytearray(scratch)
        self._sview = memoryview(self._scratch)
        self._have = 0  # valid bytes in scratch
        # Direct mode: the frame being read straight into its own buffers.
        self._head: tuple[MsgType, int] | None = None
        self._meta = bytearray()
        self._meta_got = 0
        self._blobs: memoryview = memoryview(b"")
        self._blobs_got = 0
        self.bytes_in = 0

    @property
    def mid_frame(self) -> bool:
        """Whether a frame has started but not finished (EOF now means truncation)."""
        return self._head is not None or self._have > 0

    def get_buffer(self) -> memoryview:
        if self._head is not None:
            if self._meta_got < len(self._meta):
                return memoryview(self._meta)[self._meta_got :]
            return self._blobs[self._blobs_got :]
        return self._sview[self._have :]

    def buffer_updated(self, n: int) -> list[Frame]:
        """Account ``n`` new bytes written into the last buffer; return complete frames.

        Raises:
            FrameError: the stream broke the protocol; the connection must close.
        """
        self.bytes_in += n
        if self._head is not None:
            if self._meta_got < len(self._meta):
                self._meta_got += n
            else:
                self._blobs_got += n
            if self._meta_got == len(self._meta) and self._blobs_got == len(self._blobs):
                mtype, flags = self._head
                self._head = None
                return [Frame(mtype, flags, bytes(self._meta), self._blobs)]
            return []
        self._have += n
        return self._parse_scratch()

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Push bytes in (for callers without a buffered transport, and tests)."""
        frames: list[Frame] = []
        view = memoryview(data)
        while len(view):
            buf = self.get_buffer()
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            view = view[k:]
            frames.extend(self.buffer_updated(k))
        return frames

    def _parse_scratch(self) -> list[Frame]:
        frames: list[Frame] = []
        pos, have, sv = 0, self._have, self._sview
        while have - pos >= HEADER_SIZE:
            mtype, flags, meta_len, blob_len = parse_header(
                sv[pos : pos + HEADER_SIZE], self.max_frame
            )
            total = HEADER_SIZE + meta_len + blob_len
            if have - pos >= total:
                start = pos + HEADER_SIZE
                meta = bytes(sv[start : start + meta_len])
                blobs = aligned_buffer(blob_len)
                blobs[:] = sv[start + meta_len : pos + total]
                frames.append(Frame(mtype, flags, meta, blobs))
                pos += total
                continue
            if total <= len(self._scratch) // 4:
                break  # small: wait for the rest in scratch
            self._start_direct(mtype, flags, meta_len, blob_len, sv[pos + HEADER_SIZE : have])
            self._have = 0
            return frames
        rest = have - pos
        if rest and pos:
            self._scratch[:rest] = sv[pos:have]
        self._have = rest
        return frames

    def _start_direct(
        self, mtype: MsgType, flags: int, meta_len: int, blob_len: int, got: memoryview
    ) -> None:
        self._head = (mtype, flags)
        self._meta = bytearray(meta_len)
        self._blobs = aligned_buffer(blob_len)
        k = min(len(got), meta_len)
        self._meta[:k] = got[:k]
        self._meta_got = k
        rest = got[k:]
        self._blobs[: len(rest)] = rest
        self._blobs_got = len(rest)


def join_frames(frames: Sequence[list[memoryview | bytes]]) -> bytes:
    """Concatenate encoded frames (tests and raw peers)."""
    return b"".join(bytes(b) for f in frames for b in f)
