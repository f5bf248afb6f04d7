"""Helpers shared by the weight-plane benchmarks (``weight_sync.py``, ``plane_isolation.py``).

They build model-shaped state dicts of a chosen size, run receivers in processes of their
own (``dvla.testing.weights``) and check what each one committed, and run the raw-socket
baseline's receivers. Everything that waits has a timeout, and every process started here
is killed and reaped by :class:`Receivers` or :func:`reap`, so a failed benchmark leaves
nothing running.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dvla.config import WeightPlaneConfig
from dvla.testing import weights as peers

MIB = 1024 * 1024
GIB = 1024**3
#: Big float32 matrices per state dict: "a few" tensors, each large.
BIG_TENSORS = 4


# ----------------------------------------------------------------- state dicts
def make_state(total_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """At least ``total_bytes`` (within 64 KiB) of big float32 matrices and small tensors.

    The big ones hold random values (not zeros, so no copy along the way can take a
    shortcut on zero pages); the small ones stand for biases, norms, an embedding in
    bfloat16 and a step counter, so the layout has odd sizes and several dtypes.
    """
    g = torch.Generator().manual_seed(seed)
    small: dict[str, torch.Tensor] = {
        "norm.weight": torch.ones(4096),
        "norm.bias": torch.zeros(4096),
        "head.bias": torch.randn(1000, generator=g),
        "embed.bf16": torch.randn(257, 96, generator=g).to(torch.bfloat16),
        "step": torch.tensor(0, dtype=torch.int64),
    }
    small_bytes = sum(t.numel() * t.element_size() for t in small.values())
    cols = 4096
    per_row = 4 * cols * BIG_TENSORS
    rows = max(1, -(-(total_bytes - small_bytes) // per_row))  # at least total_bytes
    state: dict[str, torch.Tensor] = {}
    for i in range(BIG_TENSORS):
        t = torch.empty(rows, cols)
        # uniform_ on a generator is several times faster than randn for a GiB.
        t.uniform_(-1.0, 1.0, generator=g)
        state[f"layers.{i}.weight"] = t
    state.update(small)
    return state


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def next_version(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Make ``state`` version ``version``: a new step counter and changed bytes in place.

    Cheaper than new random GiBs, and enough for digests to tell versions apart. Only
    call it once the previous version was delivered (a published state must not change
    until the publisher has packed it).
    """
    state["step"] = torch.tensor(version, dtype=torch.int64)
    for i in range(BIG_TENSORS):
        flat = state[f"layers.{i}.weight"].view(-1)
        flat[:: max(1, flat.numel() // 64)] = float(version)
    return state


# ----------------------------------------------------------------- receiver processes
class Receivers:
    """Weight receivers in processes of their own, read through their JSON lines."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def spawn(
        self,
        publisher: str,
        names: Sequence[str],
        secret: bytes,
        cfg: WeightPlaneConfig,
        timeout: float = 60.0,
    ) -> None:
        """Start one process per name and wait until each has joined the publisher."""
        doc = cfg.model_dump(mode="json")
        for name in names:
            self.procs[name] = peers.spawn(publisher, name, secret, doc)
        for name in names:
            line = peers.read_line(self.procs[name], timeout)
            if line.get("joined") != name:
                raise RuntimeError(f"receiver {name} said {line} instead of joining")

    def expect(self, version: int, digest: str, timeout: float) -> dict[str, float]:
        """Wait for every receiver to report ``version``; fail loudly on a wrong digest.

        Returns each receiver's wall-clock time of applying it (``time.time()``).
        """
        deadline = time.monotonic() + timeout
        seen: dict[str, float] = {}
        for name, proc in self.procs.items():
            while True:
                line = peers.read_line(proc, max(0.1, deadline - time.monotonic()))
                got = int(line.get("version", -1))
                if got < version:
                    continue  # an older version it applied before this one arrived
                if got != version:
                    raise RuntimeError(f"receiver {name} reports version {got}, want {version}")
                if line["digest"] != digest:
                    raise RuntimeError(
                        f"receiver {name} holds version {version} with digest "
                        f"{line['digest']}, but {digest} was published"
                    )
                seen[name] = float(line["t"])
                break
        return seen

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the processes to leave (the publisher said bye), else kill them."""
        reap(list(self.procs.values()), timeout)
        self.procs.clear()


def reap(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    """Wait up to ``timeout`` s in all for ``procs`` to exit; kill the rest; close pipes."""
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def close_publisher(pub: Any) -> None:
    """``pub.close()``, without its 5 s wait for the accept thread.

    ``WeightPublisher.close`` closes its listening socket, which does not wake a thread
    blocked in ``accept()`` on Linux, so it joins that thread for its full 5 s timeout.
    Shutting the listener down first wakes it (harmless once dvla does it itself).
    """
    listener = getattr(pub, "_listener", None)
    if listener is not None:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
    pub.close()


def free_memory() -> None:
    """Return freed GiB buffers to the OS before the next case allocates its own."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------- raw baseline peer
#: The raw baseline's receiver, a stdlib-only program (``python -c``), so it starts in
#: milliseconds with nothing of torch or dvla loaded: it connects, says its index,
#: ``recv_into`` one preallocated buffer until it holds ``size`` bytes, answers one byte,
#: and serves repeats until the sender closes the connection.
RAW_RECEIVER = """
import socket, sys
host, port, size, index = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sock = socket.create_connection((host, port), timeout=60.0)
sock.settimeout(300.0)
sock.sendall(bytes([index]))
view = memoryview(bytearray(size))
with sock:
    while True:
        got = 0
        while got < size:
            k = sock.recv_into(view[got:], size - got)
            if not k:
                sys.exit(0)
            got += k
        sock.sendall(b"\\x01")
"""


def spawn_raw_receiver(host: str, port: int, size: int, index: int) -> subprocess.Popen[bytes]:
    """Start one raw-baseline receiver process (see :data:`RAW_RECEIVER`)."""
    return subprocess.Popen(
        [sys.executable, "-c", RAW_RECEIVER, host, str(port), str(size), str(index)],
        stdout=subprocess.DEVNULL,
    )


# ----------------------------------------------------------------- figures
def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; nan when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    """What the figures were measured on (load matters: these machines are shared)."""
    return {"cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "torch": torch.__version__}
