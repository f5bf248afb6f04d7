"""Weights as one flat byte buffer cut into fixed-size buckets.

Moving a state dict tensor by tensor makes the cost of a sync grow with the number of
tensors (hundreds of small layer norms and biases each pay a round trip). Packing every
tensor into one 64-byte-aligned buffer makes it grow with bytes only: the wire sees a few
large transfers, and a receiver's tensors are views of the buffer it received into. Each
bucket carries a checksum, so a receiver can tell a whole version from a damaged one
before anything reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from dvla.errors import DvlaError

ALIGN = 64
CHECKSUM_CPU = "xxh3_64"
CHECKSUM_DEVICE = "fletcher64"

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class WeightSyncError(DvlaError):
    """Weights could not be moved or did not arrive whole."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """The flat buffer's map: tensor slots and the byte ranges of its buckets."""

    slots: tuple[Slot, ...]
    buckets: tuple[tuple[int, int], ...]
    total: int

    @staticmethod
    def of(state: Mapping[str, torch.Tensor], bucket_bytes: int) -> Layout:
        """The layout for ``state`` with buckets of at most ``bucket_bytes``."""
        if bucket_bytes < ALIGN or bucket_bytes % ALIGN:
            raise ValueError(f"bucket_bytes must be a positive multiple of {ALIGN}")
        slots, offset = [], 0
        for name, t in state.items():
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise WeightSyncError(f"weight {name!r} has unsupported dtype {dtype}")
            nbytes = t.numel() * t.element_size()
            slots.append(Slot(name, dtype, tuple(t.shape), offset, nbytes))
            offset = _align(offset + nbytes)
        total = max(offset, ALIGN)
        buckets = tuple(
            (start, min(bucket_bytes, total - start)) for start in range(0, total, bucket_bytes)
        )
        return Layout(tuple(slots), buckets, total)

    def matches(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` has exactly this layout's names, dtypes and shapes."""
        if len(state) != len(self.slots):
            return False
        for s in self.slots:
            t = state.get(s.name)
            if t is None or tuple(t.shape) != s.shape or str(t.dtype)[6:] != s.dtype:
                return False
        return True

    def signature(self) -> str:
        """Names, dtypes and shapes: equal signatures mean the same architecture."""
        h = hashlib.sha256()
        for s in self.slots:
            h.update(f"{s.name}|{s.dtype}|{s.shape}\n".encode())
        return h.hexdigest()[:16]

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able description (no pickle anywhere)."""
        return {
            "slots": [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in self.slots],
            "buckets": [list(b) for b in self.buckets],
            "total": self.total,
        }

    @staticmethod
    def from_wire(doc: Any) -> Layout:
        """Parse and check a layout from a peer; anything inconsistent is rejected."""
        try:
            total = int(doc["total"])
            slots = []
            for name, dtype, shape, offset, nbytes in doc["slots"]:
                if dtype not in _DTYPES:
                    raise ValueError(f"dtype {dtype!r}")
                dims = tuple(int(d) for d in shape)
                want = _DTYPES[dtype].itemsize
                for d in dims:
                    want *= d
                if want != nbytes or offset % ALIGN or offset < 0 or offset + nbytes > total:
                    raise ValueError(f"slot {name!r} does not fit")
                slots.append(Slot(str(name), dtype, dims, int(offset), int(nbytes)))
            buckets = tuple((int(a), int(n)) for a, n in doc["buckets"])
            pos = 0
            for a, n in buckets:
                if a != pos or n <= 0:
                    raise ValueError("buckets must tile the buffer")
                pos += n
            if pos != total:
                raise ValueError("buckets must tile the buffer")
        except (KeyError, TypeError, ValueError) as err:
            raise WeightSyncError(f"malformed weight layout from peer: {err}") from None
        return Layout(tuple(slots), buckets, total)


def empty_buffer(layout: Layout, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised flat uint8 buffer for ``layout`` (pinned host memory if CUDA exists)."""
    dev = torch.device(device)
    pin = dev.type == "cpu" and torch.cuda.is_available()
    return torch.empty(layout.total, dtype=torch.uint8, device=dev, pin_memory=pin)


def _source(state: Mapping[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The tensor for ``slot``, refused if it no longer matches the layout."""
    t = state[slot.name]
    if str(t.dtype).removeprefix("torch.") != slot.dtype or tuple(t.shape) != slot.shape:
        raise WeightSyncError(f"weight {slot.name!r} changed dtype or shape since the layout")
    return t


def pack(state: Mapping[str, torch.Tensor], layout: Layout, out: torch.Tensor) -> None:
    """Copy ``state`` into ``out`` (a flat uint8 buffer) at the layout's offsets."""
    if out.numel() < layout.total:
        raise ValueError("buffer smaller than layout")
    devices: set[torch.device] = set()
    for s in layout.slots:
        t = _source(state, s)
        if s.nbytes:
            view = out[s.offset : s.offset + s.nbytes].view(_DTYPES[s.dtype]).view(s.shape)
            view.copy_(t.detach(), non_blocking=True)
            if t.is_cuda:
                devices.add(t.device)
    if out.is_cuda:
        devices.add(out.device)
    # Copies between a GPU and pinned host memory are asynchronous: wait for them before
    # anyone hashes or sends the buffer.
    for dev in devices:
        torch.cuda.current_stream(dev).synchronize()


def pack_range(
    state: Mapping[str, torch.Tensor], layout: Layout, out: torch.Tensor, lo: int, hi: int
) -> None:
    """Copy the bytes of ``state`` that belong in ``out[lo:hi]`` (a flat host buffer).

    Copies are blocking, so the bytes are in place on return whatever the tensors' device.
    Pass contiguous tensors: a piece of a strided one makes a whole contiguous copy of it,
    once per piece.
    """
    for s in layout.slots:
        a, b = max(lo, s.offset), min(hi, s.offset + s.nbytes)
        if a >= b:
            continue
        src = _source(state, s).detach()
        if a > s.offset or b < s.offset + s.nbytes:  # part of a tensor: its flat bytes
            part = src.contiguous().reshape(-1).view(torch.uint8)[a - s.offset : b - s.offset]
            out[a:b].copy_(part)
        else:
            out[a:b].view(_DTYPES[s.dtype]).view(s.shape).copy_(src)


def pack_bucket(
    state: Mapping[str, torch.Tensor],
    layout: Layout,
    out: torch.Tensor,
    index: int,
    piece_bytes: int,
    advance: Callable[[int], None],
) -> int:
    """Pack bucket ``index`` of a host buffer piece by piece; return its checksum.

    ``advance(end)`` follows every piece, so a sender can forward it while the next one is
    packed. The checksum is hashed along the way and equals :func:`bucket_checksum`.
    """
    a, n = layout.buckets[index]
    h = xxhash.xxh3_64()
    for lo in range(a, a + n, piece_bytes):
        hi = min(a + n, lo + piece_bytes)
        pack_range(state, layout, out, lo, hi)
        h.update(host_view(out[lo:hi]))
        advance(hi)
    return int(h.intdigest())


def unpack(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Tensors that view ``buf``: no copy, so they live only as long as it is not reused."""
    out = {}
    for s in layout.slots:
        if s.nbytes:
            out[s.name] = buf[s.offset : s.offset + s.nbytes].view(_DTYPES[s.dtype]).view(s.shape)
        else:
            out[s.name] = torch.empty(s.shape, dtype=_DTYPES[s.dtype], device=buf.device)
    return out


def host_view(buf: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, for sockets and hashes (no copy)."""
    return memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]


def bucket_checksum(part: torch.Tensor) -> int:
    """Checksum of one bucket: xxh3 on host memory, a Fletcher-style sum on a GPU.

    xxh3 runs at several GB/s per core, well above a socket's rate; on a GPU the bytes
    never come to the host, so a position-weighted sum of 32-bit words stands in: it
    catches missing, truncated and misplaced blocks, which is what a partly received
    version looks like.
    """
    if not part.is_cuda:
        return int(xxhash.xxh3_64_intdigest(host_view(part)))
    n = part.numel()
    words = part[: n - n % 4].view(torch.int32).to(torch.int64)
    tail = part[n - n % 4 :].to(torch.int64).sum()
    rows = words[: words.numel() - words.numel() % 256].view(-1, 256).sum(dim=1)
    weights = torch.arange(1, rows.numel() + 1, device=part.device, dtype=torch.int64)
    rest = words[rows.numel() * 256 :].sum()
    total = (rows * weights).sum() + rows.sum() * 65521 + rest * 7 + tail
    return int(total.item()) & 0xFFFFFFFFFFFFFFFF


def checksums(buf: torch.Tensor, layout: Layout) -> list[int]:
    """One checksum per bucket, in bucket order."""
    return [bucket_checksum(buf[a : a + n]) for a, n in layout.buckets]


def first_bad_bucket(buf: torch.Tensor, layout: Layout, expected: Sequence[int]) -> int | None:
    """Index of the first bucket whose checksum differs from ``expected``, else None."""
    if len(expected) != len(layout.buckets):
        return 0
    for i, ((a, n), want) in enumerate(zip(layout.buckets, expected, strict=True)):
        if bucket_checksum(buf[a : a + n]) != int(want):
            return i
    return None
