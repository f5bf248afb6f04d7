"""Plane isolation: data-plane latency while a large weight broadcast is in flight.

A weight broadcast moves hundreds of MB through the same processes and cores that serve
the data plane's small, latency-bound action requests. This benchmark measures how
much a broadcast slows those requests, with the set-up of a real run on one host:

* process A (this one) is the learner/coordinator: a ``DataPlaneServer`` on a uvloop
  event loop in a thread of its own, whose request handler answers each ObsBatch with
  an ActionBatch (tiny work, like the infer lane's bookkeeping), and a
  ``WeightPublisher`` whose threads pack and send the weights;
* process B is a sampler: a ``DataPlaneClient`` on uvloop sends one small request (one
  observation: a 128x128x3 uint8 image, 8 float32 proprio values, an instruction)
  every ``--period-ms`` (2 ms) and times each round trip; it also runs a
  ``WeightReceiver`` (like an inference replica inside a sampler process), placed first
  in the tcp chain so it relays every byte it receives (the heaviest position);
* two more receivers run in processes of their own (``dvla.testing.weights``).

B sends requests all along. A marks windows on the shared monotonic clock: idle
windows of ``--idle-s`` with no weight traffic, and busy windows from ``publish`` of a
new version (``--size-mb``, default 512 MiB) until ``wait_delivered`` says all three
receivers committed it. Only requests *sent* inside a window count for it (how many is
reported); the receivers' digest checks after each version fall outside every window.
Two untimed versions first allocate the buffers that a long run keeps reusing. Figures
are round-trip p50/p99 over all idle and all busy requests of ``--broadcasts`` rounds,
and the ratio p99_busy / p99_idle (target <= 2.0). The whole measurement runs with
``weight_plane.low_priority`` on and again off, to show what the setting buys.

    python benchmarks/plane_isolation.py [--size-mb 512] [--broadcasts 3] [--idle-s 2]
        [--low-priority both|on|off] [--backend tcp|gloo] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _weights_common import (
    MIB,
    Receivers,
    close_publisher,
    free_memory,
    machine,
    make_state,
    median,
    next_version,
    percentile,
)

from dvla import logs
from dvla.config import DataPlaneConfig, WeightPlaneConfig
from dvla.data import ActionBatch, ObsBatch, TrajectoryGroup
from dvla.testing import weights as peers
from dvla.transport.auth import Secret
from dvla.transport.channel import DataPlaneClient, DataPlaneServer

TARGET_RATIO = 2.0
IMAGE = (128, 128, 3)
PROPRIO, ACTION_DIM = 8, 7
TIMEOUT_S = 120.0
WARMUP_VERSIONS = 2
WARMUP_REQUESTS = 200
#: The tcp chain is ordered by receiver name: these put the sampler's replica first
#: (it receives and relays every byte) or last (it only receives).
SAMPLER_RECEIVER = {"first": "a-sampler0", "last": "z-sampler0"}
OTHER_RECEIVERS = ("r1", "r2")


def make_obs() -> ObsBatch:
    rng = np.random.default_rng(0)
    return ObsBatch(
        images={"agentview": rng.integers(0, 256, (1, *IMAGE), dtype=np.uint8)},
        proprio=rng.standard_normal((1, PROPRIO), dtype=np.float32),
        instructions=["put the red block in the top drawer and close it"],
    )


# ----------------------------------------------------------------- process B: the sampler
def sampler_main(pipe: Any, doc: dict[str, Any]) -> None:
    """Process B's entry point (multiprocessing ``spawn``): requests plus a weight receiver."""
    import uvloop

    logs.configure("error")
    torch.set_num_threads(1)
    try:
        uvloop.run(_sampler(pipe, doc))
    except BaseException as err:
        pipe.send({"error": f"{type(err).__name__}: {err}"})
        raise


async def _sampler(pipe: Any, doc: dict[str, Any]) -> None:
    from dvla.control.receiver import WeightReceiver

    secret = Secret(bytes.fromhex(doc["secret"]))
    client = DataPlaneClient(
        doc["url"],
        DataPlaneConfig.model_validate({"transport": doc["transport"]}),
        secret,
        "sampler0",
    )
    await client.start()
    wcfg = WeightPlaneConfig.model_validate(doc["weights"])
    name = SAMPLER_RECEIVER.get(doc["position"])
    rec: WeightReceiver | None = None
    try:
        if name is not None:
            rec = WeightReceiver(wcfg, secret, doc["publisher"], name)
            await asyncio.to_thread(rec.start, 30.0)
        obs = make_obs()
        for _ in range(WARMUP_REQUESTS):
            await client.request(obs, TIMEOUT_S)
        pipe.send({"ready": True})
        period = float(doc["period_s"])
        sent: list[float] = []
        rtt: list[float] = []
        clock = time.monotonic
        due = clock()
        while not pipe.poll():
            wait = due - clock()
            if wait > 0:
                await asyncio.sleep(wait)
            t0 = clock()
            await client.request(obs, TIMEOUT_S)
            t1 = clock()
            sent.append(t0)
            rtt.append(t1 - t0)
            # Paced, never bursting to catch up: a sampler steps again once it has actions.
            due = max(due + period, t1)
        pipe.recv()
        got = rec.take_newer(-1, 0.0) if rec is not None else None
        held = {"version": got[0], "digest": peers.digest(got[1])} if got else None
        pipe.send({"sent": sent, "rtt": rtt, "held": held})
    finally:
        if rec is not None:
            await asyncio.to_thread(rec.close)
        await client.close()


# ----------------------------------------------------------------- process A: the server
class ServerThread:
    """A DataPlaneServer on a uvloop event loop in a thread of its own (the coordinator's)."""

    def __init__(self, cfg: DataPlaneConfig, secret: Secret) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="data-plane")
        answer = ActionBatch(
            actions=np.zeros((1, ACTION_DIM), np.float32),
            tokens=np.zeros((1, ACTION_DIM), np.int64),
            logprobs=np.zeros((1, ACTION_DIM), np.float32),
            version=0,
        )

        async def on_obs(obs: ObsBatch) -> ActionBatch:
            return answer if len(obs) == 1 else ActionBatch(*_zeros(len(obs)), version=0)

        async def on_group(group: TrajectoryGroup, producer: str, stats: dict[str, Any]) -> None:
            return None

        self.server = DataPlaneServer(cfg, secret, on_obs, on_group)

    def start(self) -> str:
        self.thread.start()
        fut: Future[str] = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        return fut.result(30.0)

    def close(self) -> None:
        if self.thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
            try:
                fut.result(10.0)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10.0)
        if not self.thread.is_alive():
            self.loop.close()


def _zeros(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((n, ACTION_DIM), np.float32),
        np.zeros((n, ACTION_DIM), np.int64),
        np.zeros((n, ACTION_DIM), np.float32),
    )


def _recv(pipe: Any, proc: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not proc.is_alive() and not pipe.poll(0.5):
            raise RuntimeError(f"sampler process exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"sampler process said nothing within {timeout:g} s")
    msg: dict[str, Any] = pipe.recv()
    if "error" in msg:
        raise RuntimeError(f"sampler process failed: {msg['error']}")
    return msg


def measure(
    size_mib: float,
    broadcasts: int,
    idle_s: float,
    low_priority: bool,
    backend: str,
    period_s: float,
    transport: str,
    position: str = "first",
    settle_s: float = 0.3,
) -> dict[str, Any]:
    """One full set-up (A, B, two receivers); idle and busy round trips of B's requests."""
    from dvla.control.publisher import WeightPublisher

    secret = Secret.generate()
    wcfg = WeightPlaneConfig.model_validate({"backend": backend, "low_priority": low_priority})
    dcfg = DataPlaneConfig.model_validate({"transport": transport})
    server = ServerThread(dcfg, secret)
    pub = WeightPublisher(wcfg, secret)
    recs = Receivers()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc: Any = None
    idle: list[tuple[float, float]] = []
    busy: list[tuple[float, float]] = []
    rounds: list[dict[str, Any]] = []
    got: dict[str, Any] = {}
    try:
        url = server.start()
        addr = pub.start()
        doc = {
            "url": url,
            "publisher": addr,
            "secret": secret.value.hex(),
            "weights": wcfg.model_dump(mode="json"),
            "transport": transport,
            "period_s": period_s,
            "position": position,
        }
        proc = ctx.Process(target=sampler_main, args=(child, doc), daemon=True)
        proc.start()
        others = OTHER_RECEIVERS + (("r3",) if position == "none" else ())
        recs.spawn(addr, others, secret.value, wcfg)
        _recv(parent, proc, 60.0)  # B is connected, joined, and warmed up
        state = make_state(int(size_mib * MIB), seed=1)
        version, want = 0, ""
        for k in range(WARMUP_VERSIONS + broadcasts):
            if k >= WARMUP_VERSIONS:
                t_idle = time.monotonic()
                time.sleep(idle_s)
                idle.append((t_idle, time.monotonic()))
            version += 1
            want = peers.digest(next_version(state, version))
            t0 = time.monotonic()
            pub.publish(version, state)
            if not pub.wait_delivered(version, TIMEOUT_S, count=3):
                raise RuntimeError(f"version {version} not delivered: {pub.members()}")
            t1 = time.monotonic()
            recs.expect(version, want, TIMEOUT_S)
            if k >= WARMUP_VERSIONS:
                busy.append((t0, t1))
                rep = [r for r in list(pub.reports) if r.version == version and r.ok]
                rounds.append(
                    {"version": version, "window_s": t1 - t0}
                    | ({"round_s": rep[-1].seconds, "bytes": rep[-1].bytes} if rep else {})
                )
            time.sleep(settle_s)  # the receivers' digests and page-cache work settle
        parent.send("stop")
        got = _recv(parent, proc, 60.0)
        held = got["held"] or {}
        if position != "none" and (held.get("version"), held.get("digest")) != (version, want):
            raise RuntimeError(
                f"the sampler's receiver holds {got['held']}, want version {version} ({want})"
            )
        del state
    finally:
        close_publisher(pub)
        recs.close()
        parent.close()  # B, if still sending, sees the end of the pipe and stops
        if proc is not None:
            proc.join(15.0)
            if proc.is_alive():
                proc.kill()
                proc.join(10.0)
        server.close()
        del pub
        free_memory()
    return summarise(got["sent"], got["rtt"], idle, busy) | {
        "low_priority": low_priority,
        "position": position,
        "rounds": rounds,
    }


def _within(sent: list[float], rtt: list[float], windows: list[tuple[float, float]]) -> list[float]:
    return [r for t, r in zip(sent, rtt, strict=True) if any(a <= t <= b for a, b in windows)]


def summarise(
    sent: list[float],
    rtt: list[float],
    idle: list[tuple[float, float]],
    busy: list[tuple[float, float]],
) -> dict[str, Any]:
    """Round-trip percentiles (ms) of the requests sent in idle and in busy windows."""
    out: dict[str, Any] = {}
    for name, windows in (("idle", idle), ("busy", busy)):
        xs = [r * 1e3 for r in _within(sent, rtt, windows)]
        out[name] = {
            "requests": len(xs),
            "window_s": sum(b - a for a, b in windows),
            "p50_ms": percentile(xs, 50),
            "p90_ms": percentile(xs, 90),
            "p99_ms": percentile(xs, 99),
            "max_ms": max(xs) if xs else float("nan"),
            "mean_ms": float(np.mean(xs)) if xs else float("nan"),
        }
    out["ratio_p99"] = out["busy"]["p99_ms"] / out["idle"]["p99_ms"]
    out["ratio_p50"] = out["busy"]["p50_ms"] / out["idle"]["p50_ms"]
    out["pass"] = out["ratio_p99"] <= TARGET_RATIO
    return out


def _row(r: dict[str, Any]) -> None:
    i, b = r["idle"], r["busy"]
    round_s = median([x["round_s"] for x in r["rounds"] if "round_s" in x])
    verdict = "PASS" if r["pass"] else "FAIL"
    sys.stdout.write(
        f"{'on' if r['low_priority'] else 'off':<12} {i['requests']:>6} {i['p50_ms']:>8.3f} "
        f"{i['p99_ms']:>8.3f} {b['requests']:>6} {b['p50_ms']:>8.3f} {b['p99_ms']:>8.3f} "
        f"{round_s:>8.3f} {r['ratio_p99']:>6.2f}  <={TARGET_RATIO:.1f} {verdict}\n"
    )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-mb", type=float, default=512.0, help="Broadcast size in MiB (default 512)."
    )
    parser.add_argument("--broadcasts", type=int, default=None, help="Timed broadcasts (3).")
    parser.add_argument("--idle-s", type=float, default=None, help="Idle window each (2 s).")
    parser.add_argument("--period-ms", type=float, default=2.0, help="Request period (2 ms).")
    parser.add_argument(
        "--low-priority",
        choices=("both", "on", "off"),
        default="both",
        help="weight_plane.low_priority setting(s) to measure (default both).",
    )
    parser.add_argument("--backend", choices=("tcp", "gloo"), default="tcp")
    parser.add_argument(
        "--transport",
        choices=("auto", "tcp", "unix"),
        default="auto",
        help="Data-plane transport (auto: a Unix socket on one host, as in a real run).",
    )
    parser.add_argument(
        "--position",
        choices=("first", "last", "none"),
        default="first",
        help="The sampler's weight receiver: first in the tcp chain (it relays; default), "
        "last (it only receives), or none (a third receiver process instead).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="One broadcast and 1 s idle per setting."
    )
    parser.add_argument("--json", metavar="FILE", help="Write every figure as JSON.")
    args = parser.parse_args(argv)
    broadcasts = args.broadcasts if args.broadcasts is not None else (1 if args.quick else 3)
    idle_s = args.idle_s if args.idle_s is not None else (1.0 if args.quick else 2.0)
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.low_priority]
    logs.configure("error")
    torch.set_num_threads(1)
    started = time.perf_counter()
    before = machine()
    print(
        f"plane isolation: {args.size_mb:g} MiB broadcasts "
        f"({args.backend}), a request every {args.period_ms:g} ms; cpus: {before['cpus']}, "
        f"load: {before['loadavg_1min']:.2f}"
    )
    sys.stdout.write(
        f"{'low_priority':<12} {'idle n':>6} {'p50 ms':>8} {'p99 ms':>8} {'busy n':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'round s':>8} {'ratio':>6}  target (p99 busy/idle)\n"
    )
    results = []
    for lp in settings:
        results.append(
            measure(
                args.size_mb,
                broadcasts,
                idle_s,
                lp,
                args.backend,
                args.period_ms / 1e3,
                args.transport,
                args.position,
            )
        )
        _row(results[-1])
    out = {
        "parameters": {
            "size_mib": args.size_mb,
            "broadcasts": broadcasts,
            "idle_s": idle_s,
            "period_ms": args.period_ms,
            "backend": args.backend,
            "transport": args.transport,
            "receivers": 1 + len(OTHER_RECEIVERS),
            "sampler_receiver": args.position,
            "quick": args.quick,
            "machine_start": before,
            "machine_end": machine(),
            "total_s": time.perf_counter() - started,
        },
        "target": {"ratio_p99": TARGET_RATIO},
        "results": {
            ("low_priority" if r["low_priority"] else "normal_priority"): r for r in results
        },
    }
    for r in results:
        print(
            f"low_priority {'on' if r['low_priority'] else 'off'}: p99 busy/idle "
            f"{r['ratio_p99']:.2f} (p50 {r['ratio_p50']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
