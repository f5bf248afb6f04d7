"""Weight-plane receivers in their own processes, for tests and benchmarks.

``python -m dvla.testing.weights`` joins a publisher, and prints one JSON line per
committed version: the version and an xxh3 digest of every tensor, so the parent can
check that each receiver holds exactly what was published. The secret comes from the
environment; options come as one JSON argument (never pickle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
import xxhash

from dvla.control.buckets import host_view

SECRET_ENV = "DVLA_WEIGHTS_TEST_SECRET"


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's names and bytes (order-independent of dict order)."""
    h = xxhash.xxh3_64()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(host_view(t.reshape(-1).view(torch.uint8)) if t.numel() else b"")
    return h.hexdigest()


def spawn(
    publisher: str,
    name: str,
    secret: bytes,
    cfg: Mapping[str, Any],
    node: str | None = None,
    check: bool = True,
) -> subprocess.Popen[str]:
    """Start a receiver process; read its JSON lines from ``proc.stdout``.

    ``check=False`` skips the digest (an empty string is reported), for timing runs
    where hashing every version would compete with the next round for the cores.
    """
    doc = {"publisher": publisher, "name": name, "cfg": dict(cfg), "node": node, "check": check}
    env = {**os.environ, SECRET_ENV: secret.decode()}
    return subprocess.Popen(
        [sys.executable, "-m", "dvla.testing.weights", json.dumps(doc)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line from a receiver process, or TimeoutError."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"receiver said nothing within {timeout} s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        raise EOFError(f"receiver exited with code {proc.wait(5)}")
    out: dict[str, Any] = json.loads(line)
    return out


def main() -> int:
    """Receive and report versions until the publisher says goodbye."""
    from dvla import logs
    from dvla.config import WeightPlaneConfig
    from dvla.control.buckets import WeightSyncError
    from dvla.control.receiver import WeightReceiver
    from dvla.transport.auth import Secret

    logs.configure("warning")
    torch.set_num_threads(1)
    doc = json.loads(sys.argv[1])
    cfg = WeightPlaneConfig.model_validate(doc["cfg"])
    rec = WeightReceiver(
        cfg, Secret(os.environ[SECRET_ENV].encode()), doc["publisher"], doc["name"], doc["node"]
    )
    rec.start()
    sys.stdout.write(json.dumps({"joined": doc["name"]}) + "\n")
    sys.stdout.flush()
    version = -1
    try:
        while True:
            try:
                got = rec.take_newer(version, 1.0)
            except WeightSyncError:
                return 1
            if got is None:
                if rec._closed.is_set():
                    return 0
                continue
            version, state = got
            check = doc.get("check", True)
            line = {"version": version, "digest": digest(state) if check else "", "t": time.time()}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
    finally:
        rec.close()


if __name__ == "__main__":
    sys.exit(main())
