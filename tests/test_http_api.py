"""The coordinator's HTTP API, served for real on loopback and queried with aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from dvla.cluster import http as http_api
from dvla.cluster.http import ApiServer, render_metrics
from dvla.errors import DvlaError
from dvla.testing.aio import run

SECRET = b"test-secret-0123456789abcdef"
AUTH = {"Authorization": "Bearer " + SECRET.decode()}
TIMEOUT = aiohttp.ClientTimeout(total=5)

STATUS: dict[str, Any] = {
    "name": "toy",
    "state": "running",
    "uptime_s": 12.3,
    "iteration": 40,
    "policy_version": 39,
    "throughput": {"env_steps": 12345, "env_steps_per_s": 900.0, "trajectories_per_s": 110.0},
    "success_rate": 0.5,
    "lanes": {
        "sample": {"busy_s": 3.2, "share": 0.8},
        "infer": {"busy_s": 1.5, "share": 0.4},
        "learn": {"busy_s": 2.25, "share": 0.625},
        "sync": {"busy_s": 0.1, "share": 0.02},
    },
    "accounting": {
        "produced": 100,
        "consumed": 80,
        "dropped_stale": 5,
        "discarded": 3,
        "discarded_dead_worker": 2,
        "episodes_lost": 4,
        "in_flight": 10,
    },
    "workers": [
        {
            "id": "w1",
            "name": "node-a",
            "state": "healthy",
            "host": "node-a",
            "resources": {"cpus": 8, "memory_gb": 31.2, "gpus": 0},
            "slots": [0, 1],
            "last_heartbeat_s": 0.4,
            "sampler_restarts": 2,
        },
        {
            "id": "w2",
            "name": "node-b",
            "state": "healthy",
            "host": "node-b",
            "resources": {"cpus": 4, "memory_gb": 15.0, "gpus": 1},
            "slots": [2],
            "last_heartbeat_s": 0.1,
            "sampler_restarts": 1,
        },
        {"id": "w3", "name": "node-c", "state": "dead", "host": "node-c", "slots": []},
    ],
    "slots": {"total": 3, "placed": 3, "pending": 0},
    "checkpoint": {"last_iteration": 30, "path": "/runs/toy/ckpt/30"},
}


class FakeRun:
    """A StatusSource that returns a fixed snapshot and records stop requests."""

    def __init__(self, status: dict[str, Any] | None = None) -> None:
        self.snapshot = copy.deepcopy(STATUS if status is None else status)
        self.broken = False
        self.stops: list[str] = []

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("snapshot exploded")
        return self.snapshot

    def request_stop(self, reason: str) -> None:
        self.stops.append(reason)


@contextlib.asynccontextmanager
async def serving(
    source: FakeRun, **kwargs: Any
) -> AsyncIterator[tuple[ApiServer, str, aiohttp.ClientSession]]:
    server = ApiServer(source, SECRET, **kwargs)
    url = await server.start()
    try:
        async with aiohttp.ClientSession(base_url=url, timeout=TIMEOUT) as session:
            yield server, url, session
    finally:
        await server.close()


def samples_of(
    text: str,
) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type, as a scraper sees them."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values, types


# --------------------------------------------------------------------------- reading


def test_healthz_status_and_metrics_over_http() -> None:
    async def main() -> None:
        run_ = FakeRun()
        async with serving(run_) as (_, _, s):
            async with s.get("/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"ok": True, "state": "running"}
            async with s.get("/status") as r:
                assert r.status == 200
                assert await r.json() == STATUS
            async with s.get("/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                values, _ = samples_of(await r.text())
            assert values[("dvla_lane_busy_share", (("lane", "learn"),))] == 0.625
            assert values[("dvla_iteration", ())] == 40

            run_.snapshot["state"] = "failed"
            async with s.get("/healthz") as r:
                assert r.status == 503
                assert await r.json() == {"ok": False, "state": "failed"}

            run_.broken = True
            async with s.get("/healthz") as r:
                assert r.status == 503
                body = await r.json()
                assert body["ok"] is False and "snapshot exploded" in body["error"]
            async with s.get("/status") as r:
                assert r.status == 503
                assert "snapshot exploded" in (await r.json())["error"]
            async with s.get("/metrics") as r:
                assert r.status == 503

            # The server is still up and answering once the source recovers.
            run_.broken = False
            run_.snapshot["state"] = "draining"
            async with s.get("/healthz") as r:
                assert r.status == 200
                assert await r.json() == {"ok": True, "state": "draining"}

            async with s.get("/nope") as r:
                assert r.status == 404
            async with s.get("/stop") as r:
                assert r.status == 405
            async with s.post("/status") as r:
                assert r.status == 405

    run(main(), timeout=10)


def test_metrics_match_the_status_snapshot() -> None:
    values, types = samples_of(render_metrics(STATUS))
    assert values[("dvla_up", ())] == 1
    assert values[("dvla_iteration", ())] == 40
    assert values[("dvla_policy_version", ())] == 39
    assert values[("dvla_env_steps_total", ())] == 12345
    assert values[("dvla_env_steps_per_second", ())] == 900.0
    assert values[("dvla_success_rate", ())] == 0.5
    for lane, stats in STATUS["lanes"].items():
        assert values[("dvla_lane_busy_seconds_total", (("lane", lane),))] == stats["busy_s"]
        assert values[("dvla_lane_busy_share", (("lane", lane),))] == stats["share"]
    for fate in ("produced", "consumed", "dropped_stale", "discarded", "discarded_dead_worker"):
        got = values[("dvla_trajectories_total", (("fate", fate),))]
        assert got == STATUS["accounting"][fate]
    assert values[("dvla_episodes_lost_total", ())] == 4
    assert values[("dvla_trajectories_in_flight", ())] == 10
    workers = {k[1][0][1]: v for k, v in values.items() if k[0] == "dvla_workers"}
    assert workers == {"healthy": 2, "late": 0, "dead": 1, "left": 0}
    assert values[("dvla_sampler_restarts_total", ())] == 3
    assert values[("dvla_slots", (("state", "placed"),))] == 3
    assert values[("dvla_slots", (("state", "pending"),))] == 0
    assert values[("dvla_checkpoint_iteration", ())] == 30
    # Counters are exposed as such (the parser strips their `_total` suffix).
    assert types["dvla_env_steps"] == "counter"
    assert types["dvla_trajectories"] == "counter"
    assert types["dvla_lane_busy_seconds"] == "counter"
    assert types["dvla_workers"] == "gauge"


def test_metrics_tolerate_missing_and_odd_values() -> None:
    values, _ = samples_of(render_metrics({}))
    assert values[("dvla_up", ())] == 1
    assert values[("dvla_workers", (("state", "dead"),))] == 0
    assert ("dvla_iteration", ()) not in values
    assert ("dvla_checkpoint_iteration", ()) not in values

    odd = {
        "iteration": "forty",  # not a number: left out, not exported as 0
        "success_rate": float("nan"),
        "throughput": None,
        "lanes": {"learn": {"share": 1.0}, "broken": "x"},
        "accounting": {"produced": 7},
        "workers": [{"state": "late", "sampler_restarts": "?"}, "not-a-worker"],
        "checkpoint": {"path": "/x"},
    }
    values, _ = samples_of(render_metrics(odd))
    assert ("dvla_iteration", ()) not in values
    assert math.isnan(values[("dvla_success_rate", ())])
    assert values[("dvla_lane_busy_share", (("lane", "learn"),))] == 1.0
    assert ("dvla_lane_busy_seconds_total", (("lane", "learn"),)) not in values
    assert values[("dvla_trajectories_total", (("fate", "produced"),))] == 7
    assert ("dvla_trajectories_total", (("fate", "consumed"),)) not in values
    assert values[("dvla_workers", (("state", "late"),))] == 1
    assert values[("dvla_sampler_restarts_total", ())] == 0
    assert ("dvla_checkpoint_iteration", ()) not in values


def test_metric_label_values_are_escaped() -> None:
    lane = 'le"arn\nlane\\x'
    state = 'we"ird\nstate'
    status = {
        "lanes": {lane: {"busy_s": 1.0, "share": 0.5}},
        "workers": [{"state": state}, {"state": state}],
    }
    text = render_metrics(status)
    assert '\\"' in text and "\\n" in text
    values, _ = samples_of(text)
    assert values[("dvla_lane_busy_share", (("lane", lane),))] == 0.5
    assert values[("dvla_workers", (("state", state),))] == 2
    assert values[("dvla_workers", (("state", "healthy"),))] == 0


# ---------------------------------------------------------------------------- stopping


def test_stop_needs_the_secret() -> None:
    async def main() -> None:
        run_ = FakeRun()
        async with serving(run_) as (_, _, s):
            with capture_logs() as logged:
                async with s.post("/stop") as r:
                    assert r.status == 401
                    assert "Authorization" in (await r.json())["error"]
                wrong = {"Authorization": "Bearer not-the-secret"}
                async with s.post("/stop", headers=wrong) as r:
                    assert r.status == 401
                    assert (await r.json())["error"] == "wrong secret"
                basic = {"Authorization": "Basic " + SECRET.decode()}
                async with s.post("/stop", headers=basic) as r:
                    assert r.status == 401
                # A prefix of the secret is not the secret.
                prefix = {"Authorization": "Bearer " + SECRET.decode()[:-1]}
                async with s.post("/stop", headers=prefix) as r:
                    assert r.status == 401
            assert run_.stops == []
            refusals = [e for e in logged if e["event"] == "refused http stop request"]
            assert len(refusals) == 4
            assert all(e["log_level"] == "warning" and e["peer"] == "127.0.0.1" for e in refusals)
            assert SECRET.decode()[:-1] not in repr(logged)
            assert "not-the-secret" not in repr(logged)

            # Still serving after the refusals.
            async with s.get("/healthz") as r:
                assert r.status == 200
            async with s.post("/stop", headers=AUTH) as r:
                assert r.status == 202
                assert await r.json() == {"stopping": True}
            assert run_.stops == ["http"]

    run(main(), timeout=10)


def test_stop_reason_from_the_body() -> None:
    async def main() -> None:
        run_ = FakeRun()
        async with serving(run_) as (_, _, s):
            async with s.post("/stop", headers=AUTH, json={"reason": "node maintenance"}) as r:
                assert r.status == 202
            assert run_.stops == ["http: node maintenance"]

            bad_bodies: list[bytes] = [
                b"{not json",
                b"[1, 2]",
                json.dumps({"reason": 5}).encode(),
                json.dumps({"reason": "x" * 201}).encode(),
                json.dumps({"reason": "two\nlines"}).encode(),
                b"[" * 30000,
            ]
            for body in bad_bodies:
                headers = {**AUTH, "Content-Type": "application/json"}
                async with s.post("/stop", headers=headers, data=body) as r:
                    assert r.status == 400, body[:40]
                    assert (await r.json())["error"]
            assert run_.stops == ["http: node maintenance"]

            async with s.post("/stop", headers=AUTH, json={"reason": "y" * 200}) as r:
                assert r.status == 202
            async with s.post("/stop", headers=AUTH, json={}) as r:
                assert r.status == 202
            assert run_.stops[1:] == ["http: " + "y" * 200, "http"]

    run(main(), timeout=10)


# ------------------------------------------------------------------------------ limits


def test_oversized_body_and_headers_are_refused_and_the_server_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        run_ = FakeRun()
        async with serving(run_, max_body_bytes=1024) as (_, url, s):
            big = json.dumps({"reason": "x", "pad": "p" * 4096}).encode()
            async with s.post("/stop", headers=AUTH, data=big) as r:
                assert r.status == 413
            assert run_.stops == []

            # Header and request-line limits are enforced by aiohttp's parser; each refusal
            # closes that connection, so use a fresh session for each.
            with capture_logs() as logged:
                for kwargs in (
                    {"url": url + "/healthz", "headers": {"X-Big": "a" * 9000}},
                    {"url": url + "/healthz?q=" + "a" * 9000},
                ):
                    async with (
                        aiohttp.ClientSession(timeout=TIMEOUT) as fresh,
                        fresh.get(**kwargs) as r,
                    ):
                        assert 400 <= r.status < 500, r.status
            # Each is one warning line, without a traceback or the offending bytes.
            refused = [e for e in logged if e["event"] == "refused malformed http request"]
            assert [(e["log_level"], e["peer"]) for e in refused] == [("warning", "127.0.0.1")] * 2
            assert "aaaa" not in repr(logged)
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            async with s.get("/healthz") as r:
                assert r.status == 200

    run(main(), timeout=10)


def test_a_stalled_body_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_api, "_BODY_READ_TIMEOUT_S", 0.2)

    async def main() -> None:
        run_ = FakeRun()
        async with serving(run_) as (server, _, _):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", server.port), 2
            )
            head = (
                "POST /stop HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {SECRET.decode()}\r\nContent-Length: 100\r\n\r\n"
            )
            writer.write(head.encode() + b'{"reason"')  # ... and the rest never comes
            status_line = await asyncio.wait_for(reader.readline(), 3)
            assert status_line.split()[1] == b"408"
            writer.close()
            assert run_.stops == []

    run(main(), timeout=10)


# ------------------------------------------------------------------------ binding, life


def _non_loopback_ip() -> str | None:
    """This host's outward address (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_binds_loopback_by_default_and_closes_cleanly() -> None:
    async def main() -> None:
        run_ = FakeRun()
        server = ApiServer(run_, SECRET)
        with pytest.raises(RuntimeError, match="not running"):
            _ = server.port
        url = await server.start()
        try:
            assert server.port > 0
            assert url == f"http://127.0.0.1:{server.port}"
            with pytest.raises(RuntimeError, match="already running"):
                await server.start()
            other = _non_loopback_ip()
            if other is not None:
                with pytest.raises(OSError):
                    _, w = await asyncio.wait_for(asyncio.open_connection(other, server.port), 2)
                    w.close()
            # The port is taken, so a second server on it fails with a one-line error.
            clash = ApiServer(run_, SECRET, port=server.port)
            with pytest.raises(
                DvlaError, match=f"cannot serve the HTTP API on 127.0.0.1:{server.port}"
            ):
                await clash.start()
        finally:
            await server.close()
        await server.close()  # twice is fine
        with pytest.raises(RuntimeError):
            _ = server.port
        with pytest.raises(OSError):
            _, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1])), 2
            )
            w.close()

    run(main(), timeout=10)


def test_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        ApiServer(FakeRun(), b"")
