"""A worker's sampler processes: start them, watch them, restart the ones that crash.

Each sampler process runs one slot's simulator shards and talks to the coordinator's data
plane itself; the worker only supervises. A process counts the episodes it starts in a
small file the worker owns (an 8-byte counter it maps), so when it dies the worker can say
exactly how many episodes it had started: the coordinator subtracts those it received,
and the rest were broken by the crash. Sampler processes ask the kernel to kill them when
their worker dies (``PR_SET_PDEATHSIG``), so a worker killed with SIGKILL leaves no
sampler behind to keep producing for a slot placed elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvla import logs

log = logs.get(__name__)

COUNTER = struct.Struct("<q")


@dataclass
class SamplerProc:
    """One running (or exited) sampler process of a slot."""

    slot: int
    generation: int
    restarts: int
    producer: str
    proc: asyncio.subprocess.Process
    counter: Path
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    def started(self) -> int:
        """Episodes this process has started (read from its counter file)."""
        try:
            with self.counter.open("rb") as fh:
                raw = fh.read(COUNTER.size)
        except OSError:
            return 0
        return COUNTER.unpack(raw)[0] if len(raw) == COUNTER.size else 0

    def tail(self) -> str:
        """The last line of the process's log, for error reports."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""


class Supervisor:
    """Starts and stops sampler processes for the slots assigned to this worker."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.procs: dict[int, SamplerProc] = {}

    def log_path(self, slot: int) -> Path:
        return self.log_dir / f"sampler{slot}.log"

    async def start(
        self, slot: int, generation: int, restarts: int, producer: str, doc: dict[str, Any]
    ) -> SamplerProc:
        """Spawn the sampler process of ``slot`` with its assignment document."""
        counter = self.log_dir / f".sampler{slot}.count"
        counter.write_bytes(COUNTER.pack(0))
        doc = {**doc, "producer": producer, "counter": str(counter), "parent_pid": os.getpid()}
        path = self.log_path(slot)
        with path.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dvla.pipeline.sampler_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env=self.env,
            )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(doc).encode())
        try:
            await asyncio.wait_for(proc.stdin.drain(), 10)
        except (TimeoutError, ConnectionError):
            log.warning("sampler process did not read its assignment", slot=slot, pid=proc.pid)
        proc.stdin.close()
        sp = SamplerProc(slot, generation, restarts, producer, proc, counter, path)
        self.procs[slot] = sp
        log.info("sampler process started", slot=slot, producer=producer, pid=proc.pid)
        return sp

    def exited(self) -> list[SamplerProc]:
        """Processes that have exited since the last call (removed from the table)."""
        gone = [sp for sp in self.procs.values() if sp.proc.returncode is not None]
        for sp in gone:
            del self.procs[sp.slot]
        return gone

    async def stop(self, slot: int, timeout: float) -> SamplerProc | None:
        """Stop one slot's process: SIGTERM, then SIGKILL after ``timeout``."""
        sp = self.procs.pop(slot, None)
        if sp is not None:
            await _end(sp.proc, timeout)
        return sp

    async def stop_all(self, timeout: float, graceful: bool = False) -> list[SamplerProc]:
        """Stop every process; ``graceful`` first waits for them to leave on their own."""
        sps = list(self.procs.values())
        self.procs.clear()
        if graceful:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(sp.proc.wait() for sp in sps)), timeout / 2)
        await asyncio.gather(*(_end(sp.proc, timeout / 2) for sp in sps))
        return sps

    def kill_all(self) -> None:
        """Last resort when the event loop is going away."""
        for sp in self.procs.values():
            if sp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    sp.proc.kill()


async def _end(proc: asyncio.subprocess.Process, timeout: float) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("sampler process ignored SIGTERM; killing it", pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
