"""Weight-sync throughput: dvla's weight plane against raw sockets moving the same bytes.

A model-shaped state dict (``--sizes``, default 100 MiB and 1 GiB: four big float32
matrices plus a few small tensors of other dtypes) goes from this process to three
receivers, each in a process of its own (``dvla.testing.weights``), over loopback:

* dvla, once per backend (``--backends``, default tcp and gloo): a ``WeightPublisher``
  in this process; three receiver processes join it. The time of a version runs from
  ``publish(v, state)`` until ``wait_delivered(v, count=3)`` says every receiver has
  committed it, so it includes packing the state into the flat buffer and its
  checksums, the transfer, each receiver's checksum check and the commit. The round's
  own ``seconds`` (transfer to commit, without packing) is reported beside it. Before
  the next version, every receiver reports the digest of what it committed, which must
  equal the digest of the published state (the benchmark fails loudly otherwise); that
  check is not timed.
* raw, the baseline, in the same run: this process sends the same number of bytes (the
  flat buffer's size, packed from the same state) to three receiver processes over
  plain blocking TCP sockets (default socket options), concurrently, one thread per
  receiver, ``sendall`` from one preallocated buffer; each receiver ``recv_into`` a
  preallocated buffer and answers one byte when it has them all. The time runs until
  all three have answered.

Each case first runs ``--warmup`` untimed versions (the first allocates and faults in
buffers, forms the gloo group and sends the layout; the second allocates the second of
the buffers that publisher and receivers then alternate between), then ``--repeats``
timed ones; figures are medians. GiB/s is model bytes per second, the rate at which a
model reaches all three receivers (``aggregate`` counts each of the three copies).
Target: raw_time / dvla_time >= 0.70 for each backend and size.

Memory: the 1 GiB case holds the state and two flat buffers here and up to three
buffers in each receiver (about 12 GiB in all); each case's processes exit and its
buffers are freed before the next starts.

    python benchmarks/weight_sync.py [--sizes 100,1024] [--backends tcp,gloo] [--quick]
        [--repeats N] [--warmup N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _weights_common import (
    GIB,
    MIB,
    Receivers,
    close_publisher,
    free_memory,
    machine,
    make_state,
    median,
    next_version,
    reap,
    spawn_raw_receiver,
    state_bytes,
)

from dvla import logs
from dvla.config import WeightPlaneConfig
from dvla.control.buckets import Layout, empty_buffer, host_view, pack
from dvla.control.publisher import RoundReport, WeightPublisher
from dvla.testing import weights as peers
from dvla.transport.auth import Secret

RECEIVERS = 3
TARGET_RATIO = 0.70
TIMEOUT_S = 300.0


# ----------------------------------------------------------------- raw baseline
def _raw_send(sock: socket.socket, view: memoryview, errors: list[BaseException]) -> None:
    try:
        sock.sendall(view)
        if sock.recv(1) != b"\x01":
            raise ConnectionError("raw receiver closed before acknowledging")
    except BaseException as err:
        errors.append(err)


def measure_raw(flat: memoryview, warmup: int, repeats: int) -> dict[str, Any]:
    """Send ``flat`` to three receiver processes at once, ``warmup + repeats`` times."""
    size = len(flat)
    listener = socket.create_server(("127.0.0.1", 0), backlog=RECEIVERS)
    listener.settimeout(60.0)
    host, port = listener.getsockname()[:2]
    procs: list[subprocess.Popen[bytes]] = []
    socks: list[socket.socket] = []
    try:
        procs.extend(spawn_raw_receiver(host, port, size, i) for i in range(RECEIVERS))
        for _ in procs:
            conn, _addr = listener.accept()
            conn.settimeout(TIMEOUT_S)
            conn.recv(1)  # the receiver's index: it is connected and ready
            socks.append(conn)
        seconds = []
        for i in range(warmup + repeats):
            errors: list[BaseException] = []
            threads = [
                threading.Thread(target=_raw_send, args=(s, flat, errors), daemon=True)
                for s in socks
            ]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            if errors or any(t.is_alive() for t in threads):
                raise RuntimeError(f"raw baseline failed: {errors or 'timed out'}")
            if i >= warmup:
                seconds.append(elapsed)
    finally:
        for s in socks:
            s.close()  # the receivers see the end of the stream and exit
        listener.close()
        reap(procs, 10.0)
    return _figures(seconds, size)


def _figures(seconds: list[float], size: int) -> dict[str, Any]:
    med = median(seconds)
    return {
        "seconds": seconds,
        "median_s": med,
        "gib_per_s": size / med / GIB,
        "aggregate_gib_per_s": RECEIVERS * size / med / GIB,
    }


# ----------------------------------------------------------------- dvla
def _report_for(pub: WeightPublisher, version: int, timeout: float) -> list[RoundReport]:
    """The rounds that carried ``version`` (the report lands just after the commit)."""
    deadline = time.monotonic() + timeout
    while True:
        reps = [r for r in list(pub.reports) if r.version == version]
        if any(r.ok for r in reps) or time.monotonic() > deadline:
            return reps
        time.sleep(0.005)


def measure_dvla(
    state: dict[str, torch.Tensor],
    backend: str,
    warmup: int,
    repeats: int,
    secret: Secret,
    low_priority: bool = False,
) -> dict[str, Any]:
    """Publish ``warmup + repeats`` versions of ``state`` to three receiver processes."""
    cfg = WeightPlaneConfig.model_validate({"backend": backend, "low_priority": low_priority})
    pub = WeightPublisher(cfg, secret)
    recs = Receivers()
    seconds: list[float] = []
    rounds: list[float] = []
    reports: list[dict[str, Any]] = []
    size = 0
    try:
        recs.spawn(pub.start(), [f"r{i}" for i in range(RECEIVERS)], secret.value, cfg)
        for v in range(1, warmup + repeats + 1):
            want = peers.digest(next_version(state, v))
            t0 = time.perf_counter()
            pub.publish(v, state)
            if not pub.wait_delivered(v, TIMEOUT_S, count=RECEIVERS):
                raise RuntimeError(f"{backend}: version {v} not delivered: {pub.members()}")
            elapsed = time.perf_counter() - t0
            reps = _report_for(pub, v, 10.0)
            good = [r for r in reps if r.ok]
            if not good:
                raise RuntimeError(f"{backend}: no successful round for version {v}: {reps}")
            recs.expect(v, want, TIMEOUT_S)  # every receiver holds exactly this version
            size = good[-1].bytes
            reports.extend({**r.as_dict(), "ok": r.ok} for r in reps)
            if v > warmup:
                seconds.append(elapsed)
                rounds.append(good[-1].seconds)
        retries = sum(1 for r in reports if not r["ok"])
    finally:
        close_publisher(pub)
        recs.close()
        del pub
        free_memory()
    out = _figures(seconds, size)
    round_med = median(rounds)
    out.update(
        {
            "backend": backend,
            "round_seconds": rounds,
            "round_median_s": round_med,
            "round_gib_per_s": size / round_med / GIB,
            # publish -> delivered beyond the round: packing, checksums, thread hand-offs.
            "outside_round_median_s": median([s - r for s, r in zip(seconds, rounds, strict=True)]),
            "failed_rounds": retries,
            "reports": reports,
        }
    )
    return out


# ----------------------------------------------------------------- orchestration
def run_size(
    mib: float,
    backends: list[str],
    warmup: int,
    repeats: int,
    secret: Secret,
    low_priority: bool = False,
) -> list[dict[str, Any]]:
    state = make_state(int(mib * MIB), seed=int(mib))
    layout = Layout.of(state, WeightPlaneConfig.model_validate({}).bucket_bytes)
    flat = empty_buffer(layout)
    pack(state, layout, flat)
    raw = measure_raw(host_view(flat), warmup, repeats)
    del flat
    free_memory()
    label = f"{mib:g}MiB"
    entries = []
    for backend in backends:
        dv = measure_dvla(state, backend, warmup, repeats, secret, low_priority)
        ratio = raw["median_s"] / dv["median_s"]
        entries.append(
            {
                "size": label,
                "bytes": layout.total,
                "state_bytes": state_bytes(state),
                "tensors": len(state),
                "backend": backend,
                "raw": raw,
                "dvla": dv,
                "ratio": ratio,
                "round_ratio": raw["median_s"] / dv["round_median_s"],
                "pass": ratio >= TARGET_RATIO,
            }
        )
        _row(entries[-1])
    del state
    free_memory()
    return entries


def _header() -> None:
    sys.stdout.write(
        f"{'size':>9} {'backend':<7} {'raw s':>7} {'raw GiB/s':>9} {'dvla s':>7} "
        f"{'dvla GiB/s':>10} {'round s':>8} {'round GiB/s':>11} {'ratio':>6}  target\n"
    )
    sys.stdout.flush()


def _row(e: dict[str, Any]) -> None:
    raw, dv = e["raw"], e["dvla"]
    verdict = "PASS" if e["pass"] else "FAIL"
    sys.stdout.write(
        f"{e['size']:>9} {e['backend']:<7} {raw['median_s']:>7.3f} {raw['gib_per_s']:>9.3f} "
        f"{dv['median_s']:>7.3f} {dv['gib_per_s']:>10.3f} {dv['round_median_s']:>8.3f} "
        f"{dv['round_gib_per_s']:>11.3f} {e['ratio']:>6.2f}  >={TARGET_RATIO:.2f} {verdict}\n"
    )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=None, help="Model sizes in MiB, comma-separated (default 100,1024)."
    )
    parser.add_argument(
        "--backends", default="tcp,gloo", help="Weight-plane backends (default tcp,gloo)."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Timed versions (default 3).")
    parser.add_argument(
        "--warmup", type=int, default=None, help="Untimed versions first (default 2)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="100 MiB, one warm-up and one timed version."
    )
    parser.add_argument(
        "--low-priority",
        choices=("on", "off"),
        default="off",
        help="weight_plane.low_priority (default off, as configured by default). With "
        "'on' its threads yield to every other busy process, so on a loaded machine it "
        "measures the load as much as dvla.",
    )
    parser.add_argument("--json", metavar="FILE", help="Write every figure as JSON.")
    args = parser.parse_args(argv)
    low_priority = args.low_priority == "on"
    sizes = [float(s) for s in (args.sizes or ("100" if args.quick else "100,1024")).split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    logs.configure("error")
    torch.set_num_threads(1)
    secret = Secret.generate()
    started = time.perf_counter()
    before = machine()
    print(
        f"weight sync over loopback, {RECEIVERS} receiver processes; cpus: {before['cpus']}, "
        f"load: {before['loadavg_1min']:.2f}; warm-up {warmup}, repeats {repeats} (medians); "
        f"low_priority {args.low_priority}"
    )
    _header()
    results: list[dict[str, Any]] = []
    for mib in sizes:
        results.extend(run_size(mib, backends, warmup, repeats, secret, low_priority))
    print("GiB/s: model bytes per second until all receivers hold it; ratio: raw s / dvla s")
    print("dvla s: publish -> delivered (packing included); round s: the round alone")
    for e in results:
        print(f"ratio {e['size']} {e['backend']}: {e['ratio']:.2f}")
    out = {
        "parameters": {
            "sizes_mib": sizes,
            "backends": backends,
            "receivers": RECEIVERS,
            "warmup": warmup,
            "repeats": repeats,
            "quick": args.quick,
            "bucket_mb": WeightPlaneConfig.model_validate({}).bucket_mb,
            "low_priority": low_priority,
            "machine_start": before,
            "machine_end": machine(),
            "total_s": time.perf_counter() - started,
        },
        "target": {"ratio": TARGET_RATIO},
        "results": results,
        "all_pass": all(e["pass"] for e in results),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
