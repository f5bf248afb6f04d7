"""Fuzzing of the data-plane wire format: ``dvla.transport.frames`` and ``codec``.

A receiver reads bytes from a peer it does not trust, so the whole receive path
(``FrameDecoder`` -> ``Frame.decode`` -> ``codec.validate`` -> ``*_from_body``) must turn
every malformed input into a :class:`FrameError` (the connection closes with its code)
and never into any other exception, a hang or an unbounded allocation.

* ``test_mutation_fuzz`` is a deterministic mutation fuzzer (fixed seed, default test
  run): it feeds more than 100,000 random and mutated frames through the receive path,
  allows only ``FrameError`` to escape, checks that each stage is actually reached, and
  checks with ``tracemalloc`` that memory stays bounded although length fields claim up
  to 4 GiB.
* The hypothesis properties (skipped when hypothesis is not installed) check the round
  trip of random bodies split at arbitrary offsets, and that arbitrary bytes only ever
  raise ``FrameError``.
* ``test_decoded_arrays_view_the_blob_buffer`` checks that received tensors are views of
  the frame's blob buffer, not copies.
* ``test_0d_big_endian_array_keeps_its_shape``: byte-order conversion keeps 0-d arrays 0-d.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from dvla.data import ActionBatch
from dvla.testing import make_group, make_obs
from dvla.transport import codec
from dvla.transport.frames import (
    BLOB_ALIGN,
    DTYPES,
    EXT_TENSOR,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_NDIM,
    VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    MsgType,
    frame_bytes,
    parse_header,
)

SEED = 0xD71A
#: Inputs (each one or more frames' worth of bytes) the mutation fuzzer feeds.
FUZZ_INPUTS = 100_000
#: The fuzz decoders' frame limit: no frame they accept may be larger.
FUZZ_MAX_FRAME = 1 << 20
FUZZ_BATCH = 2_000
#: Trace every Nth batch under tracemalloc, which slows the receive path ~6x; 2 halves
#: this test's run time (the untraced batches are still checked for exceptions).
FUZZ_TRACE_EVERY = 1
#: Peak traced memory allowed during the fuzz loop (length fields claim up to 4 GiB).
FUZZ_PEAK_LIMIT = 64 << 20
#: Bytes of an offending input printed in a failure message.
HEX_LIMIT = 512

CONVERTERS: dict[MsgType, Callable[[dict[str, Any]], Any]] = {
    MsgType.OBS_BATCH: codec.obs_from_body,
    MsgType.ACTION_BATCH: codec.action_from_body,
    MsgType.TRAJ_CHUNK: codec.group_from_body,
    MsgType.BATCH: codec.batch_from_body,
}
_DTYPE_NAMES = list(DTYPES)
_FIELD_NAMES = sorted(
    {"role", "peer", "nonce", "host", "proof", "unix", "producer", "seq", "req", "images"}
    | {"proprio", "instructions", "actions", "tokens", "logprobs", "version", "group"}
    | {"trajectories", "t", "code", "message", "reason", "group_id", "task_id"}
    | {"init_state_id", "instruction", "versions", "rewards", "success", "cam", "stats"}
    | {"type", "items"}
)


# ------------------------------------------------------------------- receive path
def consume(frame: Frame, stats: Counter[str]) -> None:
    """Do with a received frame what a connection does: decode, validate, convert."""
    body = frame.decode()
    stats["decoded"] += 1
    body = codec.validate(frame.type, body)
    stats[f"valid:{frame.type.name}"] += 1
    convert = CONVERTERS.get(frame.type)
    if convert is not None:
        convert(body)
        stats[f"converted:{frame.type.name}"] += 1


def feed_chunks(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


def describe(stream: bytes, chunks: list[int]) -> str:
    shown = stream[:HEX_LIMIT].hex()
    more = f" ... ({len(stream) - HEX_LIMIT} more bytes)" if len(stream) > HEX_LIMIT else ""
    return f"{len(stream)} bytes fed in chunks of {chunks[:32]}: {shown}{more}"


def header(mtype: int, meta_len: int, blob_len: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, mtype, flags, meta_len, blob_len)


def wrap(mtype: int, meta: bytes, blobs: bytes = b"") -> bytes:
    return header(mtype, len(meta), len(blobs)) + meta + blobs


@contextlib.contextmanager
def traced_peak() -> Iterator[Callable[[], int]]:
    """Trace allocations; yield a function giving the peak traced bytes since entry."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield lambda: tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()


# ------------------------------------------------------------------- valid corpus
def corpus_bodies() -> list[tuple[MsgType, dict[str, Any]]]:
    """One or more valid bodies of every message type."""
    act = ActionBatch(
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        np.arange(6, dtype=np.int64).reshape(3, 2),
        np.full((3, 2), -2.0, np.float32),
        version=5,
    )
    two_cams = make_obs(2, image_size=4)
    two_cams.images["wrist"] = np.full((2, 3, 5, 3), 9, np.uint8)
    return [
        (MsgType.HELLO, {"role": "sample", "peer": "s0", "nonce": bytes(16), "host": "h"}),
        (
            MsgType.HELLO,
            {"role": "x", "peer": "p", "nonce": b"n", "host": "", "unix": "/run/s"},
        ),
        (MsgType.AUTH, {"proof": bytes(range(32))}),
        (MsgType.ACK, {"producer": "shard-0", "seq": 41}),
        (MsgType.OBS_BATCH, codec.obs_body(7, make_obs(2, image_size=4))),
        (MsgType.OBS_BATCH, codec.obs_body(8, two_cams)),
        (MsgType.OBS_BATCH, codec.obs_body(9, make_obs(1, image_size=12, seed=3))),
        (MsgType.ACTION_BATCH, codec.action_body(7, act)),
        (MsgType.ACTION_BATCH, codec.action_body(8, act.slice(0, 1))),
        (MsgType.TRAJ_CHUNK, codec.chunk_body("shard-0", 3, make_group([1.0, 0.0], length=[2, 1]))),
        (
            MsgType.TRAJ_CHUNK,
            codec.chunk_body("p", 4, make_group([0.5], length=1, group_id=9, task_id=1)),
        ),
        (MsgType.HEARTBEAT, {"t": 12.5}),
        (MsgType.HEARTBEAT, {"t": 3}),
        (MsgType.ERROR, {"code": "schema", "message": "bad"}),
        (MsgType.CLOSE, {"reason": "bye"}),
        (MsgType.CONTROL, {"op": "revoke", "data": {"slot": 1}}),
        (
            MsgType.BATCH,
            codec.batch_body(
                MsgType.ACTION_BATCH,
                [codec.action_body(i, act.slice(i, i + 1)) for i in range(3)],
            ),
        ),
        (
            MsgType.BATCH,
            codec.batch_body(MsgType.ACK, [{"producer": "p", "seq": i} for i in range(1, 4)]),
        ),
    ]


def test_corpus_is_valid() -> None:
    """Every corpus frame passes the whole receive path, so mutants start from valid."""
    stats: Counter[str] = Counter()
    for mtype, body in corpus_bodies():
        (frame,) = FrameDecoder(FUZZ_MAX_FRAME).feed(frame_bytes(mtype, body))
        assert frame.type is mtype
        consume(frame, stats)
    assert {t.name for t in MsgType} == {k.split(":")[1] for k in stats if k.startswith("valid")}


# ------------------------------------------------------------------- mutation fuzzer
class Fuzzer:
    """Random values, tensor references and mutants, reproducible from one seed.

    Raw bytes and arrays come from numpy's ``default_rng``; the many scalar choices come
    from a ``random.Random`` seeded from it, which is much cheaper per call.
    """

    def __init__(self, seed: int) -> None:
        self.np = np.random.default_rng(seed)
        self.r = random.Random(int(self.np.integers(2**63)))
        self.bodies = corpus_bodies()
        self.frames = [frame_bytes(t, b) for t, b in self.bodies]
        big = make_obs(2, image_size=40, seed=5)  # 9.6 KB: also direct mode with 4 KiB scratch
        self.frames.append(frame_bytes(MsgType.OBS_BATCH, codec.obs_body(1, big)))
        self.array_bodies = [(t, b) for t, b in self.bodies if t in CONVERTERS]
        self.mutators: list[tuple[Callable[[], bytes], int]] = [
            (self.valid, 3),
            (self.bit_flips, 12),
            (self.byte_subs, 12),
            (self.truncate, 6),
            (self.length_fields, 10),
            (self.garbage, 8),
            (self.splice, 8),
            (self.random_msgpack, 12),
            (self.huge_msgpack_lengths, 8),
            (self.bad_tensor_refs, 11),
            (self.schema_mutants, 10),
        ]

    # ---- primitives
    def bytes(self, n: int) -> bytes:
        return self.np.bytes(n)

    def frame(self) -> bytes:
        return self.r.choice(self.frames)

    def mtype(self) -> int:
        return self.r.choice(list(MsgType)) if self.r.random() < 0.9 else self.r.randrange(256)

    def u32(self) -> int:
        r = self.r
        return r.choice(
            [
                0,
                1,
                63,
                64,
                0xFFFFFFFF,
                0x80000000,
                0x7FFFFFFF,
                FUZZ_MAX_FRAME - HEADER_SIZE,
                FUZZ_MAX_FRAME - HEADER_SIZE - 64,
                FUZZ_MAX_FRAME,
                r.randrange(2**32),
                r.randrange(1 << 21) & ~63,
                r.randrange(4096),
            ]
        )

    def random_int(self) -> int:
        r = self.r
        return r.choice(
            [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, r.randrange(-1000, 1000), r.getrandbits(64)]
        )

    def random_str(self) -> str:
        r = self.r
        if r.random() < 0.3:
            return r.choice(_FIELD_NAMES)
        return "".join(r.choice("ab_z\u00e9\u4e2d\U0001f600\0") for _ in range(r.randrange(8)))

    def random_array(self) -> np.ndarray:
        r = self.r
        dtype = DTYPES[r.choice(_DTYPE_NAMES)]
        if r.random() < 0.2:
            dtype = dtype.newbyteorder(">")
        shape = tuple(r.choice((0, 1, 2, 3)) for _ in range(r.randrange(4)))
        n = math.prod(shape)
        arr = np.frombuffer(self.bytes(n * dtype.itemsize), dtype).reshape(shape)
        if arr.ndim and r.random() < 0.2:
            arr = arr[::-1]
        return arr

    def random_value(self, depth: int = 0) -> Any:
        r = self.r
        k = r.randrange(14 if depth < 3 else 9)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k == 2:
            return self.random_int()
        if k == 3:
            return r.choice([0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, r.random()])
        if k == 4:
            return self.random_str()
        if k == 5:
            return self.bytes(r.randrange(12))
        if k == 6:
            # (msgpack-python packs codes 0..127 only; huge_msgpack_item writes negative ones)
            code = r.choice([EXT_TENSOR, EXT_TENSOR, 0, 2, 127, r.randrange(128)])
            return msgpack.ExtType(code, self.bytes(r.choice([0, 1, 4, 8, 12, r.randrange(20)])))
        if k == 7:
            return self.random_array()
        if k == 8:
            return np.float32(r.random()) if r.random() < 0.5 else np.int64(self.random_int() >> 1)
        if k in (9, 10):
            return [self.random_value(depth + 1) for _ in range(r.randrange(5))]
        out: dict[Any, Any] = {}
        for _ in range(r.randrange(5)):
            key: Any = self.random_str()
            if r.random() < 0.05:
                key = r.choice([b"k", 3, None, 1.5])  # only str/bytes keys are allowed
            out[key] = self.random_value(depth + 1)
        return out

    def bad_ref(self, ref: list[Any], blob_len: int) -> bytes:
        """A broken ``[dtype, shape, offset, nbytes]`` tensor reference (ext payload)."""
        r = self.r
        ref = list(ref)
        k = r.randrange(9)
        if k == 0:
            ref[0] = r.choice(
                [
                    *("float128", "complex64", "object", "<f4", "f4", "", "U8", "bool_"),
                    *(4, None, b"float32", ["uint8"], True),
                ]
            )
        elif k == 1:
            ref[1] = r.choice(
                [
                    [-1],
                    [1.0],
                    [True],
                    [None],
                    [[2]],
                    [1] * (MAX_NDIM + 1),
                    [2**63],
                    [2**64 - 1, 2**64 - 1],
                    [0, 2**64 - 1],
                    [0] * MAX_NDIM + [2**63],
                    [0, 2**40, 2**40],
                    3,
                    "3",
                    {"0": 1},
                    None,
                ]
            )
        elif k == 2:
            ref[2] = r.choice(
                [-64, -1, 1, 63, blob_len, blob_len + 64, 2**32, 2**63, 2**64 - 1, 0.0, None, True]
            )
        elif k == 3:
            ref[3] = r.choice([ref[3] + 1, ref[3] - 1, -1, 0, 2**63, 2**64 - 1, 1.0, None, False])
        elif k == 4:  # consistent shape and size, but outside the blob section
            ref[1], ref[3] = [blob_len + 64], blob_len + 64
        elif k == 5:
            ref = r.choice([ref[:3], [*ref, 0], [], [ref]])
        elif k == 6:
            return msgpack.packb(r.choice([{"dtype": ref[0]}, 1, "x", None, b"ref"]))
        elif k == 7:
            return msgpack.packb(ref) + self.bytes(r.randrange(1, 4))
        else:
            return self.bytes(r.randrange(24))
        for i in range(min(len(ref), 4)):
            if r.random() < 0.1:
                ref[i] = self.random_value(2)  # anything at all, even an array or ext
        return msgpack.packb(ref, default=lambda o: self.random_int() & 0xFF)

    def encode(
        self, body: Any, bad_ref_p: float = 0.0, bin_type: bool = True
    ) -> tuple[bytes, bytes]:
        """``(meta, blobs)`` of ``body``, each tensor reference broken with ``bad_ref_p``."""
        parts: list[bytes] = []
        blob_len = 0
        broken: list[list[Any]] = []

        def default(obj: Any) -> Any:
            nonlocal blob_len
            if isinstance(obj, np.generic):
                return obj.item()
            if not isinstance(obj, np.ndarray):
                raise TypeError(type(obj).__name__)
            arr = np.ascontiguousarray(obj, obj.dtype.newbyteorder("<"))
            ref = [
                next(n for n, d in DTYPES.items() if d == arr.dtype),
                list(arr.shape),
                blob_len,
                arr.nbytes,
            ]
            data = arr.tobytes()
            data += bytes(-len(data) % BLOB_ALIGN)
            parts.append(data)
            blob_len += len(data)
            if self.r.random() < bad_ref_p:
                broken.append(ref)
                return msgpack.ExtType(EXT_TENSOR, b"")  # payload patched below
            return msgpack.ExtType(EXT_TENSOR, msgpack.packb(ref))

        meta = msgpack.packb(body, default=default, use_bin_type=bin_type)
        for ref in broken:  # each placeholder (c7 00 01: ext8, 0 bytes, code 1) in turn
            payload = self.bad_ref(ref, blob_len)
            ext = msgpack.packb(msgpack.ExtType(EXT_TENSOR, payload))
            meta = meta.replace(b"\xc7\x00\x01", ext, 1)
        return meta, b"".join(parts)

    # ---- mutators: each returns the bytes of one input
    def valid(self) -> bytes:
        return self.frame()

    def bit_flips(self) -> bytes:
        data = bytearray(self.frame())
        top = HEADER_SIZE if self.r.random() < 0.3 else len(data)
        for _ in range(self.r.randrange(1, 9)):
            i = self.r.randrange(top)
            data[i] ^= 1 << self.r.randrange(8)
        return bytes(data)

    def byte_subs(self) -> bytes:
        r = self.r
        out = bytearray(self.frame())
        top = HEADER_SIZE if r.random() < 0.4 else len(out)
        for _ in range(r.randrange(1, 5)):
            value = r.choice([0, 0xFF, 0x7F, 0x80, 0xC1, 0xDD, 0xDF, 0xC7, r.randrange(256)])
            out[r.randrange(top)] = value
        return bytes(out)

    def truncate(self) -> bytes:
        data = self.frame()
        return data[: self.r.randrange(len(data))]

    def length_fields(self) -> bytes:
        r = self.r
        data = bytearray(self.frame())
        meta_len, blob_len = struct.unpack_from("<II", data, 8)
        if r.random() < 0.6:
            meta_len = r.choice([self.u32(), max(0, meta_len + r.randrange(-3, 4))])
        if r.random() < 0.6:
            blob_len = r.choice([self.u32(), max(0, blob_len + r.choice([-64, 64, 1, 128]))])
        struct.pack_into("<II", data, 8, meta_len & 0xFFFFFFFF, blob_len & 0xFFFFFFFF)
        if r.random() < 0.2:
            data += self.frame()
        return bytes(data)

    def garbage(self) -> bytes:
        r = self.r
        tail = self.bytes(r.choice([r.randrange(64), r.randrange(4096)]))
        k = r.randrange(3)
        if k == 0:
            return tail
        if k == 1:
            return MAGIC + tail
        cut = r.randrange(len(tail) + 1)
        blob = cut - cut % BLOB_ALIGN if r.random() < 0.8 else cut
        return header(self.mtype(), len(tail) - blob, blob) + tail

    def splice(self) -> bytes:
        r = self.r
        a, b = self.frame(), self.frame()
        k = r.randrange(4)
        if k == 0:
            return a + b
        if k == 1:
            return a[: r.randrange(len(a) + 1)] + b[r.randrange(len(b) + 1) :]
        if k == 2:  # a stretch of a repeated
            i = r.randrange(len(a))
            j = r.randrange(i, min(len(a), i + 200) + 1)
            return a[:j] + a[i:j] * r.randrange(1, 4) + a[j:]
        i = r.randrange(len(a) + 1)
        return a[:i] + b + a[i:]

    def random_msgpack(self) -> bytes:
        r = self.r
        body = self.random_value() if r.random() < 0.3 else self.random_value(-1)
        if r.random() < 0.7 and not isinstance(body, dict):
            body = {self.random_str(): body}
        meta, blobs = self.encode(body, bad_ref_p=0.2, bin_type=r.random() < 0.9)
        if r.random() < 0.3:
            blobs += bytes(BLOB_ALIGN * r.randrange(3))
        return wrap(self.mtype(), meta, blobs)

    def huge_msgpack_item(self) -> bytes:
        r = self.r
        code, fmt, ext = r.choice(
            [
                (0xDC, ">H", False),  # array16
                (0xDD, ">I", False),  # array32
                (0xDE, ">H", False),  # map16
                (0xDF, ">I", False),  # map32
                (0xD9, ">B", False),  # str8
                (0xDA, ">H", False),  # str16
                (0xDB, ">I", False),  # str32
                (0xC4, ">B", False),  # bin8
                (0xC5, ">H", False),  # bin16
                (0xC6, ">I", False),  # bin32
                (0xC7, ">B", True),  # ext8
                (0xC8, ">H", True),  # ext16
                (0xC9, ">I", True),  # ext32
            ]
        )
        if r.random() < 0.25:  # fixext 1..16 with any type code, -1 (timestamp) included
            code, size = r.choice([(0xD4, 1), (0xD5, 2), (0xD6, 4), (0xD7, 8), (0xD8, 16)])
            kind = r.choice([EXT_TENSOR, 0xFF, 0x80, r.randrange(256)])
            return bytes([code, kind]) + self.bytes(r.choice([size, r.randrange(size + 1)]))
        top = 256 ** struct.calcsize(fmt) - 1
        n = r.choice([top, top, top - 1, r.randrange(top + 1), 0, 1, 16])
        item = bytes([code]) + struct.pack(fmt, n)
        if ext:
            item += bytes([r.choice([EXT_TENSOR, 0xFF, r.randrange(256)])])
        return item + self.bytes(r.randrange(24))

    def huge_msgpack_lengths(self) -> bytes:
        """Declared lengths far beyond the body, at the top or in place of a field."""
        r = self.r
        item = self.huge_msgpack_item()
        mtype, body = r.choice(self.bodies)
        if r.random() < 0.3:
            return wrap(self.mtype(), item)
        target = r.choice(list(body))
        meta = bytes([0x80 | len(body)])
        parts: list[bytes] = []
        blobs = b""
        for key, value in body.items():
            m, b = self.encode(value)
            if b:  # shift this value's tensors past the ones already placed
                m = self._relocate(m, len(blobs))
            parts.append(msgpack.packb(key) + (item if key == target else m))
            blobs += b
        return wrap(mtype, meta + b"".join(parts), blobs)

    def _relocate(self, meta: bytes, shift: int) -> bytes:
        def hook(code: int, data: bytes) -> Any:
            ref = msgpack.unpackb(data)
            ref[2] += shift
            return msgpack.ExtType(code, msgpack.packb(ref))

        obj = msgpack.unpackb(meta, ext_hook=hook, raw=False, strict_map_key=False)
        return msgpack.packb(obj, use_bin_type=True)

    def bad_tensor_refs(self) -> bytes:
        mtype, body = self.r.choice(self.array_bodies)
        meta, blobs = self.encode(body, bad_ref_p=self.r.choice([0.1, 0.3, 1.0]))
        return wrap(mtype, meta, blobs)

    def schema_mutants(self) -> bytes:
        """A valid body with one field deleted, added, retyped or reshaped."""
        r = self.r
        mtype, body = r.choice(self.bodies)
        body = _copy_tree(body)
        for _ in range(r.choice([1, 1, 1, 2, 3])):
            slots = list(_slots(body))
            if not slots:  # a previous round emptied the body
                break
            parent, key = r.choice(slots)
            value = parent[key]
            k = r.randrange(6)
            if k == 0 and len(parent) > 0:
                del parent[key]
            elif k == 1 and isinstance(parent, dict):
                parent[r.choice([self.random_str(), "proprio", "tokens"])] = self.random_value(1)
            elif k == 2 and isinstance(value, np.ndarray):
                parent[key] = self._reshape(value)
            elif k == 3:
                parent[key] = self.random_value(1)
            elif k == 4 and isinstance(parent, dict):
                parent[self.random_str()] = parent.pop(key)
            else:
                parent[key] = r.choice([[value], {"x": value}, None, True, 0, -1, "", b""])
        mtype = mtype if r.random() < 0.9 else MsgType(r.choice(list(MsgType)))
        meta, blobs = self.encode(body)
        return wrap(mtype, meta, blobs)

    def _reshape(self, arr: np.ndarray) -> Any:
        r = self.r
        k = r.randrange(7)
        if (arr.ndim == 0 or not len(arr)) and k < 3:
            return arr.reshape(-1)
        if k == 0:
            return arr[:0]
        if k == 1:
            return arr[:1]
        if k == 2:
            return arr[0] if arr.ndim > 1 else np.asarray(arr[0])  # one row fewer dims
        if k == 3:
            return arr.astype(DTYPES[r.choice(_DTYPE_NAMES)])
        if k == 4:
            return arr.reshape(-1)
        if k == 5:
            return arr[None]
        return self.random_array()

    # ---- one input
    def next_input(self) -> tuple[str, bytes]:
        """The name of a randomly chosen mutator and the input it made."""
        mutator = self.r.choices(
            [m for m, _ in self.mutators], weights=[w for _, w in self.mutators]
        )[0]
        return mutator.__name__, mutator()

    def chunks(self, data: bytes) -> list[bytes]:
        """``data`` whole, split at random offsets, or (rarely) one byte at a time."""
        r = self.r
        x = r.random()
        if x < 0.75 or not data:
            return [data]
        if x < 0.99 or len(data) > 160:
            cuts = sorted(r.randrange(len(data) + 1) for _ in range(r.randrange(1, 6)))
            return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        return [data[i : i + 1] for i in range(len(data))]


def _copy_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v) for v in obj]
    return obj  # arrays are never modified in place


def _slots(obj: Any) -> Iterable[tuple[Any, Any]]:
    """``(container, key)`` of every value nested in ``obj``."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in list(items):
        yield obj, key
        if isinstance(value, dict | list) and value:
            yield from _slots(value)


def test_mutation_fuzz() -> None:
    """More than 100,000 mutated frames: only FrameError escapes, memory stays bounded.

    Inputs are made in batches outside ``tracemalloc`` (which slows every allocation),
    and each batch goes through fresh decoders with tracing on, so the traced peak is
    what the receive path itself holds at once.
    """
    fuzz = Fuzzer(SEED)
    stats: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    peak = 0
    traced = 0.0
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, FUZZ_INPUTS, FUZZ_BATCH):
        batch = [fuzz.next_input() for _ in range(FUZZ_BATCH)]
        batch_chunks = [fuzz.chunks(data) for _, data in batch]
        scratches = [fuzz.r.choice([64, 1024, 4096, 256 * 1024]) for _ in batch]
        drops = [fuzz.r.random() < 0.5 for _ in batch]
        decoder: FrameDecoder | None = None
        history: list[bytes] = []  # everything fed to the current decoder, for the report
        sizes: list[int] = []
        traced_from = time.perf_counter()
        tracing = first // FUZZ_BATCH % FUZZ_TRACE_EVERY == 0
        with traced_peak() if tracing else contextlib.nullcontext(lambda: 0) as batch_peak:
            for i, ((kind, data), chunks) in enumerate(zip(batch, batch_chunks, strict=True)):
                if decoder is None or len(history) >= 8:
                    scratch = scratches[i]
                    decoder = FrameDecoder(FUZZ_MAX_FRAME, scratch=scratch)
                    stats[f"decoders (scratch {scratch})"] += 1
                    history, sizes = [], []
                fresh = not decoder.mid_frame
                stats["inputs"] += 1
                history.append(data)
                sizes.extend(len(c) for c in chunks)
                frames: list[Frame] = []
                try:
                    frames = feed_chunks(decoder, chunks)
                    stats["frames"] += len(frames)
                    for frame in frames:
                        assert frame.size <= FUZZ_MAX_FRAME
                        consume(frame, stats)
                except FrameError as err:
                    assert isinstance(err.code, str) and err.code, err
                    assert not (kind == "valid" and fresh), f"{err!r}: {describe(data, sizes)}"
                    codes[err.code] += 1
                    decoder = None  # the connection closes; the next input starts a new one
                except Exception as err:
                    tb = "".join(traceback.format_exception(err))
                    pytest.fail(
                        f"input {first + i} ({kind}): {type(err).__name__} escaped (only "
                        f"FrameError may) after {describe(b''.join(history), sizes)}\n"
                        f"(this input: {len(data)} bytes; FrameDecoder(max_frame="
                        f"{FUZZ_MAX_FRAME}, scratch={scratch}))\n{tb}",
                        pytrace=False,
                    )
                else:
                    if kind == "valid" and fresh:
                        stats["valid inputs"] += 1
                        assert len(frames) == 1 and not decoder.mid_frame, describe(data, sizes)
                    if decoder.mid_frame and drops[i]:
                        decoder = None  # EOF mid-frame: the connection is dropped
            decoder = None
            peak = max(peak, batch_peak())
        traced += time.perf_counter() - traced_from
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        f"\n{FUZZ_INPUTS} inputs in {elapsed:.1f} s (CPU {cpu:.1f} s; {traced:.1f} s in the "
        f"receive path, traced batches under tracemalloc), "
        f"peak traced memory {peak / 2**20:.1f} MiB"
    )
    print(f"stages reached: {dict(sorted(stats.items()))}")
    print(f"FrameError codes: {dict(codes.most_common())}")

    assert stats["inputs"] >= 100_000
    assert peak < FUZZ_PEAK_LIMIT, f"peak traced memory {peak} bytes"
    # tracemalloc does see the decoders' numpy buffers (headers claiming almost max_frame
    # got one), so the bound above is not met by tracing nothing.
    assert peak > FUZZ_MAX_FRAME // 2
    # The fuzzer reaches every stage of the receive path and every kind of rejection.
    assert stats["valid inputs"] > 1000
    for mtype in MsgType:
        assert stats[f"valid:{mtype.name}"] > 100, mtype
    for mtype in CONVERTERS:
        assert stats[f"converted:{mtype.name}"] > 100, mtype
    expected = {"magic", "version", "type", "flags", "too-large", "blob", "body", "tensor"}
    assert expected | {"schema"} <= set(codes), codes


# ------------------------------------------------------------------- views
@pytest.mark.parametrize("scratch", [256 * 1024, 64], ids=["scratch", "direct"])
def test_decoded_arrays_view_the_blob_buffer(scratch: int) -> None:
    """Received tensors are aligned views of the frame's blob section, never copies."""
    group = make_group([1.0], length=2)
    body = codec.obs_body(1, make_obs(3, image_size=8))
    body["traj"] = codec.traj_to_dict(group.trajectories[0])
    raw = frame_bytes(MsgType.OBS_BATCH, body)
    decoder = FrameDecoder(scratch=scratch)
    (frame,) = decoder.feed(raw)
    blob = np.frombuffer(frame.blobs, np.uint8)
    got = frame.decode()
    traj = got.pop("traj")
    arrays = [got["proprio"], *got["images"].values(), *traj["images"].values()]
    arrays += [v for v in traj.values() if isinstance(v, np.ndarray)]
    _, obs = codec.obs_from_body(codec.validate(frame.type, got))
    assert obs.proprio is got["proprio"]
    lo, hi = blob.ctypes.data, blob.ctypes.data + blob.nbytes
    assert len(arrays) == 8
    for arr in arrays:
        assert np.shares_memory(arr, blob)
        assert not arr.flags.owndata
        assert lo <= arr.ctypes.data and arr.ctypes.data + arr.nbytes <= hi
        assert arr.ctypes.data % BLOB_ALIGN == 0
        # The chain of bases ends in the receive buffer itself (a frame's own buffer or
        # the decoder's arena for small frames), never in a copy.
        base = arr
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        owner = np.frombuffer(base, np.uint8) if isinstance(base, memoryview) else base
        assert owner.ctypes.data <= lo and hi <= owner.ctypes.data + owner.nbytes
    blob[:] = 7  # a write into the blob section shows through every decoded array
    assert (obs.images["cam"] == 7).all()
    for arr in arrays:
        assert (arr.reshape(-1).view(np.uint8) == 7).all()


# ------------------------------------------------------------------- edge cases
def test_size_limit_is_checked_before_allocation() -> None:
    """A header claiming ~4 GiB is refused from its 16 bytes, before any allocation."""
    with traced_peak() as peak:
        for meta_len, blob_len in [(0xFFFFFFFF, 0), (0, 0xFFFFFFC0), (0xFFFFFFFF, 0xFFFFFFC0)]:
            for max_frame in (4096, FUZZ_MAX_FRAME, 256 << 20):
                decoder = FrameDecoder(max_frame)
                with pytest.raises(FrameError) as info:
                    decoder.feed(header(MsgType.ACK, meta_len, blob_len))
                assert info.value.code == "too-large"
        assert peak() < 8 << 20
    with pytest.raises(FrameError) as info:
        parse_header(header(MsgType.ACK, 0xFFFFFFFF, 0xFFFFFFC0), 256 << 20)
    assert info.value.code == "too-large"


def test_frame_at_exactly_max_frame() -> None:
    raw = frame_bytes(MsgType.ACK, {"producer": "p", "seq": 1, "pad": np.zeros(100, np.uint8)})
    (frame,) = FrameDecoder(len(raw)).feed(raw)
    assert frame.size == len(raw)
    with pytest.raises(FrameError) as info:
        FrameDecoder(len(raw) - 1).feed(raw)
    assert info.value.code == "too-large"


def test_0d_big_endian_array_keeps_its_shape() -> None:
    (frame,) = FrameDecoder().feed(frame_bytes(MsgType.ACK, {"x": np.array(7, ">u2")}))
    got = frame.decode()["x"]
    assert got.dtype == np.dtype("<u2") and got.shape == () and got == 7


# ------------------------------------------------------------------- hypothesis
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True


def assert_same(got: Any, want: Any, path: str = "body") -> None:
    """``got`` is what decoding the encoding of ``want`` must give."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), path
        wire = want.dtype.newbyteorder("<")
        assert got.dtype == wire and got.dtype.str == wire.str, (path, got.dtype, want.dtype)
        assert got.shape == want.shape, path
        assert got.flags.c_contiguous, path
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), path
        assert got.tobytes() == np.ascontiguousarray(want, wire).tobytes(), path  # bit-exact
    elif isinstance(want, np.generic):
        assert_same(got, want.item(), path)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for key, value in want.items():
            assert_same(got[key], value, f"{path}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert type(got) is float, path
        assert (math.isnan(got) and math.isnan(want)) or (
            got == want and math.copysign(1, got) == math.copysign(1, want)
        ), (path, got, want)
    else:
        assert type(got) is type(want) and got == want, (path, got, want)


if HAVE_HYPOTHESIS:
    _SETTINGS = settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    _WIRE_DTYPES = list(DTYPES.values()) + [
        d.newbyteorder(">") for d in DTYPES.values() if d.itemsize > 1
    ]

    def _layout(arr: np.ndarray, how: str) -> np.ndarray:
        if arr.ndim == 0 or how == "as-is":
            return arr
        if how == "transposed":
            return arr.T
        if how == "strided":
            return arr[::2]
        return arr[::-1]

    _arrays = st.builds(
        _layout,
        st.sampled_from(_WIRE_DTYPES).flatmap(
            lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0))
        ),
        st.sampled_from(["as-is", "transposed", "strided", "reversed"]),
    )
    _scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.builds(np.float32, st.floats(width=32)),
        st.builds(np.int16, st.integers(-(2**15), 2**15 - 1)),
    )
    _values = st.recursive(
        st.one_of(_scalars, _arrays),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=6), children, max_size=4),
        ),
        max_leaves=12,
    )
    _bodies = st.dictionaries(st.text(max_size=8), _values, max_size=6)
    _scratch = st.sampled_from([16, 64, 1024, 256 * 1024])

    @_SETTINGS
    @given(body=_bodies, mtype=st.sampled_from(list(MsgType)), scratch=_scratch, data=st.data())
    def test_round_trip_split_anywhere(
        body: dict[str, Any], mtype: MsgType, scratch: int, data: Any
    ) -> None:
        raw = frame_bytes(mtype, body)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts"))
        splits = [[raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]]
        if len(raw) <= 2048:
            splits.append([raw[i : i + 1] for i in range(len(raw))])
        for chunks in splits:
            decoder = FrameDecoder(len(raw), scratch=scratch)  # exactly at the limit
            (frame,) = feed_chunks(decoder, chunks)
            assert not decoder.mid_frame and decoder.bytes_in == len(raw)
            assert frame.type is mtype and frame.flags == 0 and frame.size == len(raw)
            assert_same(frame.decode(), body)

    def _with_header(draw: Any) -> bytes:
        tail = draw(st.binary(max_size=600))
        meta_len = draw(st.one_of(st.integers(0, len(tail)), st.integers(0, 2**32 - 1)))
        blob_len = draw(
            st.one_of(
                st.just((len(tail) - meta_len) // 64 * 64 if meta_len <= len(tail) else 0),
                st.integers(0, 2**32 - 1),
            )
        )
        mtype = draw(st.one_of(st.sampled_from(list(MsgType)), st.integers(0, 255)))
        flags = draw(st.sampled_from([0, 0, 0, 1, 0x8000]))
        return header(mtype, meta_len, blob_len, flags) + tail

    def _with_body(draw: Any) -> bytes:
        keys = st.one_of(st.sampled_from(_FIELD_NAMES), st.text(max_size=4))
        leaves = st.one_of(
            _scalars,
            st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
            st.builds(
                lambda *ref: msgpack.ExtType(EXT_TENSOR, msgpack.packb(list(ref))),
                st.sampled_from([*_DTYPE_NAMES, "float128", ""]),
                st.lists(st.integers(-1, 4), max_size=MAX_NDIM + 1),
                st.integers(-64, 512),
                st.integers(-1, 512),
            ),
        )
        values = st.recursive(
            leaves,
            lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=4)),
            max_leaves=10,
        )
        body = draw(st.dictionaries(keys, values, max_size=6))
        meta = msgpack.packb(body, default=lambda o: o.item(), use_bin_type=True)
        blobs = draw(st.binary(max_size=4 * BLOB_ALIGN))
        blobs += bytes(-len(blobs) % BLOB_ALIGN)
        return wrap(draw(st.sampled_from(list(MsgType))), meta, blobs)

    @_SETTINGS
    @given(
        raw=st.one_of(
            st.binary(max_size=2048),
            st.composite(_with_header)(),
            st.composite(_with_body)(),
            st.composite(_with_body)().map(lambda b: b + b[: len(b) // 2]),
        ),
        scratch=_scratch,
        data=st.data(),
    )
    def test_arbitrary_bytes_only_raise_frame_error(raw: bytes, scratch: int, data: Any) -> None:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6), label="cuts"))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        decoder = FrameDecoder(64 * 1024, scratch=scratch)
        stats: Counter[str] = Counter()
        try:
            for frame in feed_chunks(decoder, chunks):
                consume(frame, stats)
        except FrameError as err:
            assert isinstance(err.code, str) and err.code
        except Exception as err:  # pragma: no cover - reported with the input
            raise AssertionError(
                f"{type(err).__name__} escaped: {describe(raw, [len(c) for c in chunks])}"
            ) from err

else:

    def test_round_trip_split_anywhere() -> None:
        pytest.importorskip("hypothesis")

    def test_arbitrary_bytes_only_raise_frame_error() -> None:
        pytest.importorskip("hypothesis")
