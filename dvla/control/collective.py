"""Collective backends of the weight plane: gloo through torch.distributed, NCCL through CuPy.

A group is built for one membership (a *group id*) and reused while the membership holds;
any failure discards it, and the publisher builds the next one from the survivors. Both
move a flat buffer bucket by bucket, so the cost is set by bytes, not by tensor count.
The publisher is always rank 0.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch

from dvla.control.buckets import Layout, WeightSyncError


class Collective(Protocol):
    """A broadcast group with a fixed membership; rank 0 is the publisher."""

    gid: str

    def broadcast(
        self,
        buf: torch.Tensor,
        layout: Layout,
        deadline: float,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        """Broadcast ``buf`` from rank 0, bucket by bucket, finishing by ``deadline``.

        ``ready(i)``, where given (rank 0), fills bucket ``i`` just before it is sent, so
        packing a version overlaps sending its earlier buckets.
        """

    def close(self) -> None:
        """Release the group; it is never used again."""


def nccl_available() -> bool:
    """Whether CuPy's NCCL and a CUDA device are usable here (imports cupy lazily)."""
    if not torch.cuda.is_available():
        return False
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
        return bool(nccl.available)
    except Exception:
        return False


def gpu_identity(device: torch.device) -> str:
    """A GPU's identity across processes: NCCL refuses two ranks on one GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else f"{props.name}/{device.index or 0}"


class GlooGroup:
    """torch.distributed's gloo broadcast over a TCPStore hosted by the publisher.

    gloo's own connections are not authenticated: use it on trusted cluster networks
    (the tcp backend authenticates every link).
    """

    def __init__(self, info: dict[str, Any], timeout_s: float, store: Any = None) -> None:
        import torch.distributed as dist

        self.gid = str(info["group"])
        self.rank, self.size = int(info["rank"]), int(info["size"])
        if store is None:
            host, _, port = str(info["store"]).rpartition(":")
            store = dist.TCPStore(  # type: ignore[attr-defined]
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        name = f"dvla-weights/{self.gid}"
        prefix = dist.PrefixStore(name, store)  # type: ignore[attr-defined]
        try:
            self.pg = dist.ProcessGroupGloo(
                prefix, self.rank, self.size, timedelta(seconds=timeout_s)
            )
        except RuntimeError as err:
            raise WeightSyncError(f"gloo group {self.gid} could not form: {err}") from None

    def broadcast(
        self,
        buf: torch.Tensor,
        layout: Layout,
        deadline: float,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        bcast = self.pg.broadcast  # type: ignore[attr-defined]
        works = []
        for i, (a, n) in enumerate(layout.buckets):
            if ready is not None:
                ready(i)
            works.append(bcast([buf[a : a + n]], opts))
        try:
            for w in works:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("weight-plane deadline passed")
                w.wait(timedelta(seconds=remaining))
        except RuntimeError as err:
            raise WeightSyncError(f"gloo broadcast failed: {err}") from None

    def close(self) -> None:
        self.pg = None  # type: ignore[assignment]


def new_gloo_store(host: str, timeout_s: float) -> tuple[Any, str]:
    """A TCPStore served by the publisher for gloo rendezvous, and its ``host:port``."""
    import torch.distributed as dist

    store = dist.TCPStore(  # type: ignore[attr-defined]
        host, 0, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return store, f"{host}:{store.port}"


def new_group_id() -> str:
    """A fresh id: receivers cache a group by it, so a rebuilt group never reuses one."""
    return secrets.token_hex(6)


class NcclGroup:
    """NCCL through CuPy: bucket broadcasts on a dedicated stream, aborted at the deadline."""

    def __init__(self, info: dict[str, Any], timeout_s: float, device: torch.device) -> None:
        from cupy.cuda import nccl

        self.gid = str(info["group"])
        self.rank, self.size = int(info["rank"]), int(info["size"])
        self.device = device
        raw = bytes(b & 0xFF for b in info["uid"])
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            try:
                try:
                    self.comm = nccl.NcclCommunicator(self.size, raw, self.rank)
                except TypeError:
                    # CuPy before 14 takes the id as a tuple of signed chars.
                    signed = tuple(b - 256 if b > 127 else b for b in raw)
                    self.comm = nccl.NcclCommunicator(self.size, signed, self.rank)
            except nccl.NcclError as err:
                raise WeightSyncError(f"NCCL group {self.gid} could not form: {err}") from None

    @staticmethod
    def unique_id() -> list[int]:
        """A fresh NCCL unique id as unsigned bytes (msgpack-able)."""
        from cupy.cuda import nccl

        uid = nccl.get_unique_id()
        return list(uid) if isinstance(uid, bytes | bytearray) else [b & 0xFF for b in uid]

    def broadcast(
        self,
        buf: torch.Tensor,
        layout: Layout,
        deadline: float,
        ready: Callable[[int], None] | None = None,
    ) -> None:
        from cupy.cuda import nccl

        if not buf.is_cuda:
            raise WeightSyncError("NCCL needs the weight buffer on a GPU")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        base = buf.data_ptr()
        try:
            for i, (a, n) in enumerate(layout.buckets):
                if ready is not None:
                    ready(i)
                self.comm.bcast(base + a, n, nccl.NCCL_UINT8, 0, self.stream.cuda_stream)
        except nccl.NcclError as err:
            raise WeightSyncError(f"NCCL broadcast failed: {err}") from None
        while not self.stream.query():
            if time.monotonic() > deadline:
                self.comm.abort()
                raise WeightSyncError("NCCL broadcast missed its deadline; communicator aborted")
            time.sleep(0.0005)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.comm.destroy()
