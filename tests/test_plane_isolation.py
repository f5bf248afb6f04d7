"""A weight broadcast must not stall the data plane, and the weight benchmarks must run.

Both benchmarks start processes of their own (multiprocessing ``spawn``, receiver
processes), so they run here as scripts, in a session of their own that is killed as a
whole if they overrun. Speed targets (the 0.70 ratio of ``weight_sync.py``, the 2x of
``plane_isolation.py``) are the benchmarks' business, never a timed test's: the
isolation test holds the property to a generous bound that a shared, noisy machine
still meets, and the smoke test only checks that the figures are there.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run_benchmark(script: str, args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` with ``--json out``; its JSON, or fail with its output."""
    proc = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can kill its receivers too
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        raise AssertionError(
            f"{script} ran over {timeout:g} s:\n{stdout}\n{stderr[-3000:]}"
        ) from None
    assert proc.returncode == 0, f"{script} failed:\n{stdout}\n{stderr[-3000:]}"
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _bound_ms(idle_p99: float) -> float:
    return max(5.0 * idle_p99, idle_p99 + 25.0)


def _isolation(out: Path) -> dict[str, Any]:
    doc = run_benchmark(
        "plane_isolation.py",
        [
            "--size-mb",
            "200",
            "--broadcasts",
            "2",
            "--idle-s",
            "1",
            "--low-priority",
            "on",
        ],
        out,
        timeout=150,
    )
    result: dict[str, Any] = doc["results"]["low_priority"]
    return result


def test_a_weight_broadcast_leaves_data_plane_latency_within_bounds(tmp_path: Path) -> None:
    """p99 of requests sent during 200 MB broadcasts stays within 5x (or +25 ms) of idle.

    One remeasurement is allowed: the bound is about the design (weight threads never
    starving the event loops), and a single burst of load from elsewhere on a shared
    machine can spoil a short window; a real regression fails both runs.
    """
    runs = [_isolation(tmp_path / "first.json")]
    r = runs[0]
    if r["busy"]["p99_ms"] > _bound_ms(r["idle"]["p99_ms"]):
        runs.append(_isolation(tmp_path / "second.json"))
        r = runs[-1]
    summary = [(x["idle"]["p99_ms"], x["busy"]["p99_ms"], x["busy"]["requests"]) for x in runs]
    assert r["idle"]["requests"] >= 200, summary
    # Only requests sent while a round was in flight count as busy: there must be some.
    assert r["busy"]["requests"] >= 20, summary
    assert all(x["bytes"] >= 200 * 1024 * 1024 for x in r["rounds"]), r["rounds"]
    assert r["busy"]["p99_ms"] <= _bound_ms(r["idle"]["p99_ms"]), summary


def test_weight_sync_benchmark_quick_run_reports_every_figure(tmp_path: Path) -> None:
    doc = run_benchmark("weight_sync.py", ["--quick"], tmp_path / "sync.json", timeout=240)
    params = doc["parameters"]
    assert params["quick"] is True and params["receivers"] == 3
    assert params["sizes_mib"] == [100.0] and params["repeats"] == 1
    assert doc["target"]["ratio"] == 0.70 and isinstance(doc["all_pass"], bool)
    entries = {e["backend"]: e for e in doc["results"]}
    assert set(entries) == {"tcp", "gloo"}
    for backend, e in entries.items():
        assert e["size"] == "100MiB" and e["bytes"] >= 100 * 1024 * 1024
        for side in ("raw", "dvla"):
            fig = e[side]
            assert len(fig["seconds"]) == 1 and fig["median_s"] > 0
            assert math.isfinite(fig["gib_per_s"]) and fig["gib_per_s"] > 0
            assert fig["aggregate_gib_per_s"] > fig["gib_per_s"]
        dv = e["dvla"]
        assert dv["backend"] == backend and 0 < dv["round_median_s"] <= dv["median_s"]
        assert dv["round_gib_per_s"] > 0 and len(dv["round_seconds"]) == 1
        assert {r["backend"] for r in dv["reports"]} == {backend}
        assert any(r["ok"] and len(r["delivered"]) == 3 for r in dv["reports"])
        assert e["ratio"] > 0 and e["round_ratio"] > 0 and isinstance(e["pass"], bool)
