"""A coordinator and workers as real processes on 127.0.0.1, for tests and demos.

Each daemon is started through its console entry point's module, so the processes are
exactly what a user runs; the harness only picks free ports, shares a secret through
the environment, reads ``/status`` and delivers signals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SECRET = "dvla-test-secret-0123456789"

_COORDINATOR = "import sys; from dvla.daemons import coordinator_main; sys.exit(coordinator_main())"
_WORKER = "import sys; from dvla.daemons import worker_main; sys.exit(worker_main())"


def free_port() -> int:
    """A port nothing listens on right now (the usual small race is acceptable in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One coordinator process and any number of worker processes."""

    def __init__(self, workdir: Path, config: Path, sets: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.config = config
        self.sets = list(sets)
        self.port = free_port()
        self.http_port = free_port()
        self.run_dir = workdir / "run"
        self.env = {**os.environ, "DVLA_SECRET": SECRET}
        self.coordinator: subprocess.Popen[str] | None = None
        self.workers: dict[str, subprocess.Popen[str]] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_coordinator(self, *extra: str) -> subprocess.Popen[str]:
        args = [
            sys.executable, "-c", _COORDINATOR,
            "--config", str(self.config), "--run-dir", str(self.run_dir),
            "--listen", self.address, "--http", f"127.0.0.1:{self.http_port}",
            *[a for s in self.sets for a in ("--set", s)], *extra,
        ]  # fmt: skip
        with (
            (self.workdir / "coordinator.out").open("a") as out,
            (self.workdir / "coordinator.err").open("a") as err,
        ):
            self.coordinator = subprocess.Popen(
                args, stdout=out, stderr=err, text=True, env=self.env, cwd=self.workdir
            )
        return self.coordinator

    def start_worker(self, name: str, *extra: str, env: dict[str, str] | None = None) -> Any:
        args = [
            sys.executable, "-c", _WORKER, "--coordinator", self.address, "--name", name,
            "--log-dir", str(self.workdir / f"worker-{name}"), "--give-up-s", "60", *extra,
        ]  # fmt: skip
        with (self.workdir / f"worker-{name}.out").open("a") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env or self.env,
                cwd=self.workdir,
            )
        self.workers[name] = proc
        return proc

    def http(self, path: str, method: str = "GET", token: str | None = None) -> Any:
        """One HTTP request to the API: (status code, decoded JSON or text)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = resp.read().decode()
                code = resp.status
        except urllib.error.HTTPError as err:
            body, code = err.read().decode(), err.code
        try:
            return code, json.loads(body)
        except ValueError:
            return code, body

    def status(self) -> dict[str, Any] | None:
        """``/status``, or None while the coordinator is not answering."""
        try:
            code, body = self.http("/status")
        except (OSError, urllib.error.URLError):
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def wait_status(
        self, cond: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll ``/status`` until ``cond`` holds for it."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            st = self.status()
            if st is not None:
                last = st
                if cond(st):
                    return st
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise AssertionError(f"coordinator exited ({self.coordinator.returncode}): "
                                     f"{self.tail('coordinator.err')}")  # fmt: skip
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status: {json.dumps(last)}")

    def signal_worker(self, name: str, sig: int) -> None:
        os.kill(self.workers[name].pid, sig)

    def tail(self, name: str, lines: int = 5) -> str:
        try:
            text = (self.workdir / name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "summary.json").read_text())
        return data

    def close(self) -> None:
        """Kill whatever is still running (a failed test must not leave daemons behind)."""
        procs = [*self.workers.values()]
        if self.coordinator is not None:
            procs.append(self.coordinator)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
