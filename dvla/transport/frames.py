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
import sys
import threading
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
# Native-order dtype objects -> wire name, for the encoder's fast path (no byte-order work).
_NAME_OF_DTYPE: dict[np.dtype[Any], str] = {dt: name for name, dt in DTYPES.items()}
#: Frames up to this size are joined into one buffer: per-buffer cost dominates them.
SMALL_FRAME = 4096
_EMPTY = memoryview(b"")
#: Small blob sections are carved from shared arenas of this size instead of each
#: getting its own allocation.
_ARENA = 1024 * 1024
#: Large receive buffers kept for reuse per decoder.
_POOL = 4


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
    BATCH = 10
    CONTROL = 11


#: Message types a BATCH frame may carry: the high-rate ones, never control messages.
BATCHABLE = frozenset({MsgType.ACK, MsgType.OBS_BATCH, MsgType.ACTION_BATCH, MsgType.TRAJ_CHUNK})


_TYPES = frozenset(int(t) for t in MsgType)
_TYPE_OF = {int(t): t for t in MsgType}


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
    if type(obj) is np.ndarray and obj.flags.c_contiguous and obj.dtype in _NAME_OF_DTYPE:
        return obj  # the common case: already what the wire wants
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


class _Encoder(threading.local):
    """Per-thread msgpack packers (building one per frame would cost more than packing)."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.blob_len = 0
        self.ref = msgpack.Packer(use_bin_type=True)
        self.body = msgpack.Packer(default=self._default, use_bin_type=True)

    def _default(self, obj: Any) -> Any:
        arr = _as_wire_array(obj)
        if arr is None:
            if isinstance(obj, np.generic):
                return obj.item()
            raise FrameError("encode", f"cannot send a value of type {type(obj).__name__}")
        offset = self.blob_len
        self.arrays.append(arr)
        nbytes = arr.nbytes
        self.blob_len += nbytes + (-nbytes % BLOB_ALIGN)
        name = _NAME_OF_DTYPE.get(arr.dtype) or _NAME_OF[arr.dtype.newbyteorder("<").str]
        return msgpack.ExtType(EXT_TENSOR, self.ref.pack([name, list(arr.shape), offset, nbytes]))


_ENCODER = _Encoder()


def encode_frame(msg_type: MsgType, body: Any, flags: int = 0) -> list[memoryview | bytes]:
    """The buffers of one frame, ready for ``writelines``.

    Tensors are not copied: the returned list holds views of their memory, so they must
    not be modified until the frame is written.
    """
    return encode_frame_sized(msg_type, body, flags)[0]


def encode_frame_sized(
    msg_type: MsgType, body: Any, flags: int = 0
) -> tuple[list[memoryview | bytes], int]:
    """:func:`encode_frame` and the frame's size in bytes.

    A frame of at most ``SMALL_FRAME`` bytes comes back as one joined buffer (copying a
    few bytes is cheaper than handing the transport many buffers).
    """
    enc = _ENCODER
    arrays: list[np.ndarray] = []
    enc.arrays = arrays
    enc.blob_len = 0
    try:
        meta = enc.body.pack(body)
    except BaseException:
        enc.body.reset()  # a failed pack leaves partial output behind
        raise
    finally:
        enc.arrays = []
    blob_len = enc.blob_len
    out: list[memoryview | bytes] = [
        HEADER.pack(MAGIC, VERSION, int(msg_type), flags, len(meta), blob_len),
        meta,
    ]
    # Large tensors go out as views of their own memory (zero copy); runs of small ones
    # are copied into one buffer, since the transport's cost per buffer exceeds the copy.
    small = bytearray()
    for arr in arrays:
        nbytes = arr.nbytes
        if nbytes >= SMALL_FRAME:
            if small:
                out.append(bytes(small))
                small.clear()
            out.append(arr.reshape(-1).view(np.uint8).data)
            pad = -nbytes % BLOB_ALIGN
            if pad:
                out.append(_PAD[:pad])
        else:
            small += arr.reshape(-1).view(np.uint8).data
            small += _PAD[: -nbytes % BLOB_ALIGN]
    if small:
        out.append(bytes(small))
    size = HEADER_SIZE + len(meta) + blob_len
    if size <= SMALL_FRAME and len(out) > 1:
        return [b"".join(out)], size
    return out, size


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
    return _TYPE_OF[mtype], flags, meta_len, blob_len


def _parse_ref(data: bytes) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """Validate a tensor reference (all but its bounds, which depend on the frame)."""
    ref = msgpack.unpackb(data, use_list=True, raw=False)
    if not (isinstance(ref, list) and len(ref) == 4):
        raise FrameError("tensor", "tensor reference is not [dtype, shape, offset, nbytes]")
    name, shape, offset, nbytes = ref
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise FrameError("tensor", f"unknown tensor dtype {name!r}")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise FrameError("tensor", f"bad tensor shape {shape!r}")
    for d in shape:
        if type(d) is not int or d < 0:
            raise FrameError("tensor", f"bad tensor shape {shape!r}")
    if type(offset) is not int or type(nbytes) is not int:
        raise FrameError("tensor", "tensor offset and size must be integers")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise FrameError("tensor", f"tensor of shape {shape} {name} cannot be {nbytes} bytes")
    if offset < 0 or offset % BLOB_ALIGN:
        raise FrameError("tensor", "tensor lies outside the blob section")
    return dtype, tuple(shape), offset, nbytes


#: Validated tensor references by their encoded bytes. A stream repeats the same layouts
#: (same dtypes, shapes and offsets frame after frame), so most lookups hit.
_REFS: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int, int]] = {}
_REFS_MAX = 8192


def _tensor_hook(blobs: memoryview) -> Any:
    size = len(blobs)

    def hook(code: int, data: bytes) -> Any:
        if code != EXT_TENSOR:
            raise FrameError("body", f"unknown msgpack extension type {code}")
        ref = _REFS.get(data)
        if ref is None:
            ref = _parse_ref(data)
            if len(_REFS) >= _REFS_MAX:
                _REFS.clear()
            _REFS[data] = ref
        dtype, shape, offset, nbytes = ref
        if offset + nbytes > size:
            raise FrameError("tensor", "tensor lies outside the blob section")
        if not nbytes:
            return np.empty(shape, dtype)
        return np.ndarray(shape, dtype, buffer=blobs, offset=offset)

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
        self._blobs: memoryview = _EMPTY
        self._blobs_got = 0
        self.bytes_in = 0
        self._arena: memoryview = _EMPTY
        self._arena_pos = 0
        self._pool: list[np.ndarray] = []
        self.large_allocations = 0

    def _large_blobs(self, n: int) -> memoryview:
        """A buffer for a large blob section, reusing one nothing refers to any more.

        Fresh multi-megabyte buffers cost page faults (the kernel zeroes every page);
        reusing a released one makes a stream of big frames allocate nothing.
        """
        for raw in self._pool:
            # Referenced by the pool, the loop variable and getrefcount's argument only:
            # no frame or array views it any more.
            if raw.nbytes >= n + BLOB_ALIGN and sys.getrefcount(raw) <= 3:
                skip = -raw.ctypes.data % BLOB_ALIGN
                return raw.data[skip : skip + n]
        raw = np.empty(n + BLOB_ALIGN, np.uint8)
        self.large_allocations += 1
        self._pool.append(raw)
        if len(self._pool) > _POOL:
            self._pool.pop(0)
        skip = -raw.ctypes.data % BLOB_ALIGN
        return raw.data[skip : skip + n]

    def _small_blobs(self, n: int) -> memoryview:
        """A blob buffer for a small frame, carved from the current arena."""
        if not n:
            return _EMPTY
        if self._arena_pos + n > len(self._arena):
            # The old arena lives on as long as frames still view it.
            self._arena, self._arena_pos = aligned_buffer(_ARENA), 0
        view = self._arena[self._arena_pos : self._arena_pos + n]
        self._arena_pos += n  # n is a multiple of 64: the next start stays aligned
        return view

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
                frame = Frame(mtype, flags, bytes(self._meta), self._blobs)
                self._head, self._blobs = None, _EMPTY  # the frame owns its buffer now
                return [frame]
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
                if blob_len <= _ARENA // 16:
                    blobs = self._small_blobs(blob_len)
                else:
                    blobs = aligned_buffer(blob_len)
                if blob_len:
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
        self._blobs = self._large_blobs(blob_len)
        k = min(len(got), meta_len)
        self._meta[:k] = got[:k]
        self._meta_got = k
        rest = got[k:]
        if len(rest):
            self._blobs[: len(rest)] = rest
        self._blobs_got = len(rest)


def join_frames(frames: Sequence[list[memoryview | bytes]]) -> bytes:
    """Concatenate encoded frames (tests and raw peers)."""
    return b"".join(bytes(b) for f in frames for b in f)
