"""The live dashboard at ``/``: served by the HTTP API, run for real in headless Chromium.

The serving tests need no browser. The browser tests drive Debian's ``chromium`` over
the DevTools protocol (through aiohttp's websocket client, no extra dependency), read
the page's DOM after its script ran against a live ``/status``, and save a screenshot
as a test artifact (``$DVLA_TEST_ARTIFACTS/dashboard.png``, else
``test-artifacts/dashboard.png`` in the checkout). They skip where Chromium is missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import tomllib
import zlib
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from dvla.cluster import dashboard
from dvla.cluster.http import ApiServer
from dvla.config import load_config
from dvla.pipeline.coordinator import Coordinator
from dvla.rundir import RunDir
from dvla.testing.aio import run, wait_until

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"test-secret-0123456789abcdef"
TIMEOUT = aiohttp.ClientTimeout(total=5)
LANES = ("sample", "infer", "learn", "sync")
WIDTH, HEIGHT = 1280, 900
# Every DevTools command answers in milliseconds; a hung browser must fail the test.
CDP_TIMEOUT_S = 15.0
BROWSER_START_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------ fixtures


def _worker(
    ident: str, name: str, state: str, slots: list[int], reason: str = ""
) -> dict[str, Any]:
    return {
        "id": ident,
        "name": name,
        "state": state,
        "host": f"host-{ident}",
        "capacity": 2,
        "slots": slots,
        "last_heartbeat_s": 0.4,
        "sampler_restarts": 1,
        "reason": reason,
    }


WORKERS = [
    _worker("w1", "node-a", "healthy", [0, 1]),
    _worker("w2", "node-b", "late", [2]),
    # A name that is markup: the page must show it as text, never parse it.
    _worker("w3", "<b>node-c</b>", "dead", [], "missed 3 heartbeats"),
]


class SteppingRun:
    """A StatusSource whose every snapshot is one second after the last.

    Each lane's busy seconds grow by a fixed share of that second and env steps by 500,
    so the page's per-interval figures are known exactly. ``broken`` makes snapshots
    fail (the API answers 503); ``restart`` starts a new run with the uptime back at 0.
    """

    SHARES = {"sample": 0.8, "infer": 0.4, "learn": 0.625, "sync": 0.1}
    STEPS_PER_S = 500

    def __init__(self) -> None:
        self.name = "fake-run"
        self.calls = 0
        self.broken = False

    def restart(self, name: str) -> None:
        self.name, self.calls = name, 0

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("snapshot exploded")
        self.calls += 1
        t = float(self.calls)
        return {
            "name": self.name,
            "state": "running",
            "stop_reason": "running",
            "uptime_s": t,
            "iteration": self.calls,
            "policy_version": self.calls - 1,
            "throughput": {
                "env_steps": self.STEPS_PER_S * self.calls,
                "env_steps_per_s": float(self.STEPS_PER_S),
                "trajectories_per_s": 60.0,
            },
            "success_rate": 0.25,
            "lanes": {k: {"busy_s": share * t, "share": share} for k, share in self.SHARES.items()},
            "accounting": {
                "produced": 100,
                "consumed": 80,
                "dropped_stale": 5,
                "discarded": 3,
                "discarded_dead_worker": 2,
                "episodes_lost": 4,
                "episodes_broken": 1,
                "in_flight": 10,
                "env_steps": self.STEPS_PER_S * self.calls,
            },
            "infer": {"mean_batch": 12.5},
            "checkpoint": {"last_iteration": -1},
            "workers": WORKERS,
            "slots": {"total": 3, "placed": 3, "pending": 0},
        }

    def request_stop(self, reason: str) -> None:
        raise AssertionError("the dashboard never stops a run")


@contextlib.asynccontextmanager
async def serving(source: Any) -> AsyncIterator[tuple[ApiServer, str, aiohttp.ClientSession]]:
    server = ApiServer(source, SECRET)
    url = await server.start()
    try:
        async with aiohttp.ClientSession(base_url=url, timeout=TIMEOUT) as session:
            yield server, url, session
    finally:
        await server.close()


async def raw_get(port: int, target: str) -> int:
    """The status code for a request line sent exactly as given (no client normalising)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()


# ------------------------------------------------------------------- serving the files


def test_root_serves_the_page_and_the_assets_with_their_types() -> None:
    async def main() -> None:
        async with serving(SteppingRun()) as (_, _, s):
            async with s.get("/") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/html; charset=utf-8"
                assert r.headers["Cache-Control"] == "no-cache"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                html = await r.text()
            # Relative, so the page also works behind a proxy that adds a path prefix.
            assert '<script src="dashboard/dashboard.js" defer></script>' in html
            assert '<link rel="stylesheet" href="dashboard/dashboard.css">' in html
            for lane in LANES:
                assert f'data-lane="{lane}"' in html

            expected = {
                "index.html": "text/html; charset=utf-8",
                "dashboard.js": "text/javascript; charset=utf-8",
                "dashboard.css": "text/css; charset=utf-8",
            }
            package = resources.files("dvla.cluster.dashboard")
            for name, ctype in expected.items():
                async with s.get(f"/dashboard/{name}") as r:
                    assert r.status == 200, name
                    assert r.headers["Content-Type"] == ctype
                    assert r.headers["Cache-Control"] == "no-cache"
                    assert await r.read() == package.joinpath(name).read_bytes()
                async with s.head(f"/dashboard/{name}") as r:
                    assert r.status == 200 and r.headers["Content-Type"] == ctype

            # Reading stays open like /status; the page is not a way to change anything.
            async with s.get("/status") as r:
                assert r.status == 200
            async with s.post("/") as r:
                assert r.status == 405

    run(main(), timeout=10)


def test_only_the_known_files_are_served() -> None:
    async def main() -> None:
        async with serving(SteppingRun()) as (server, _, s):
            for path in (
                "/dashboard/",
                "/dashboard/nope.js",
                "/dashboard/__init__.py",  # sits beside the assets, but is not one
                "/dashboard/INDEX.HTML",
                "/dashboard/index.html/",
                "/dashboard/dashboard.js.map",
                "/index.html",
            ):
                async with s.get(path) as r:
                    assert r.status == 404, path
                    assert "dashboard.js" not in await r.text()
            # Traversal, encoded or not, sent byte for byte as written.
            for target in (
                "/dashboard/../http.py",
                "/dashboard/..%2Fhttp.py",
                "/dashboard/%2e%2e/__init__.py",
                "/dashboard/..%2F..%2F..%2Fpyproject.toml",
                "/dashboard/%2Fetc%2Fpasswd",
                "/dashboard/..",
                "/dashboard/index.html%00.py",
            ):
                assert await raw_get(server.port, target) == 404, target
            assert await raw_get(server.port, "/dashboard/dashboard.css") == 200
            with pytest.raises(KeyError):
                dashboard.asset("../http.py")

    run(main(), timeout=10)


def test_the_page_needs_nothing_from_outside_the_coordinator() -> None:
    """An offline cluster must get the whole page: no CDN, no remote font, no import."""
    package = resources.files("dvla.cluster.dashboard")
    html = package.joinpath("index.html").read_text()
    css = package.joinpath("dashboard.css").read_text()
    js = package.joinpath("dashboard.js").read_text()
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert set(refs) == {
        "dashboard/dashboard.css",
        "dashboard/dashboard.js",
        "status",
        "metrics",
        "healthz",
    }
    assert "url(" not in css and "@import" not in css
    assert re.findall(r"fetch\(\s*\"([^\"]*)\"", js) == ["status"]
    assert "import " not in js and "eval(" not in js and "innerHTML" not in js


def test_an_installed_wheel_carries_the_assets() -> None:
    """The package-data globs in pyproject.toml cover every file the server can serve."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["dvla.cluster.dashboard"]
    for name in dashboard.ASSETS:
        assert any(fnmatch.fnmatch(name, g) for g in globs), name
    assert not any(fnmatch.fnmatch("__init__.py", g) for g in globs)


# ------------------------------------------------------------------ headless Chromium


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found (/usr/bin/chromium or chromium on PATH); "
    "install Debian's package with `apt-get install chromium` to run the dashboard's script",
)


class Browser:
    """Headless Chromium, driven over the DevTools protocol through one page target."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0

    async def start(self) -> None:
        assert CHROMIUM is not None
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--remote-debugging-port=0", f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--mute-audio",
            "about:blank",
        ]  # fmt: skip
        with (self.workdir / "chromium.err").open("wb") as err:
            # Its own session, so the whole tree (renderer, GPU, zygote) can be killed.
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        active = profile / "DevToolsActivePort"
        try:
            await wait_until(
                lambda: self._exited() or (active.exists() and active.read_text().count("\n")),
                BROWSER_START_TIMEOUT_S,
            )
        except AssertionError:
            raise AssertionError(f"chromium did not start: {self.stderr_tail()}") from None
        if self._exited():
            raise AssertionError(f"chromium exited at start: {self.stderr_tail()}")
        port = int(active.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CDP_TIMEOUT_S))
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(
            page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
        )
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stderr_tail(self) -> str:
        try:
            text = (self.workdir / "chromium.err").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-10:])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result, skipping the events that arrive meanwhile."""
        assert self.ws is not None
        self._next_id += 1
        ident = self._next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(CDP_TIMEOUT_S):
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"devtools connection ended: {msg.type!r}")
                data = msg.json()
                if data.get("id") == ident:
                    if "error" in data:
                        raise AssertionError(f"{method} failed: {data['error']}")
                    result: dict[str, Any] = data["result"]
                    return result

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Evaluate until the value is truthy; the last value is in the failure message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Any = None
        while loop.time() < deadline:
            with contextlib.suppress(AssertionError):  # before the page has loaded
                last = await self.eval(expression)
                if last:
                    return last
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")

    async def screenshot(self) -> bytes:
        result = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        """Close politely, then kill whatever is left of the browser's process group."""
        with contextlib.suppress(Exception):
            if self.ws is not None and not self.ws.closed:
                async with asyncio.timeout(3):
                    await self.ws.close()
        if self.session is not None:
            await self.session.close()
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)


@contextlib.asynccontextmanager
async def browser(workdir: Path) -> AsyncIterator[Browser]:
    b = Browser(workdir)
    try:
        await b.start()
        yield b
    finally:
        await b.close()


# What the tests read from the page: everything its script put into the DOM.
PAGE_STATE = """(() => {
  const lanes = {};
  for (const row of document.querySelectorAll(".lane")) {
    const rects = [...row.querySelectorAll("rect.busy")];
    lanes[row.dataset.lane] = {
      samples: Number(row.dataset.samples),
      share: row.dataset.share,
      rects: rects.length,
      opacity: rects.map((r) => Number(r.getAttribute("fill-opacity"))),
    };
  }
  const counters = {};
  for (const el of document.querySelectorAll("#accounting [data-counter]")) {
    counters[el.dataset.counter] = el.dataset.value;
  }
  const text = (id) => document.getElementById(id).textContent;
  const value = (id) => document.getElementById(id).dataset.value;
  return {
    connection: document.body.dataset.connection,
    connectionText: text("connection"),
    polls: Number(document.body.dataset.polls),
    runName: text("run-name"),
    state: value("state"),
    iteration: value("iteration"),
    iterationText: text("iteration"),
    policyVersion: value("policy-version"),
    stepsPerS: value("steps-per-s"),
    checkpoint: text("checkpoint"),
    lanes,
    stepsChart: {
      points: Number(document.getElementById("chart-steps").dataset.points),
      last: document.getElementById("chart-steps").dataset.last,
      peak: document.getElementById("chart-steps").dataset.peak,
      lines: document.querySelectorAll("#chart-steps polyline").length,
    },
    successChart: Number(document.getElementById("chart-success").dataset.points),
    workers: [...document.querySelectorAll("#workers tbody tr")].map((tr) => ({
      id: tr.dataset.worker,
      state: tr.dataset.state,
      cells: [...tr.cells].map((td) => td.textContent),
    })),
    markupInTable: document.querySelectorAll("#workers b").length,
    noWorkersShown: !document.getElementById("no-workers").hidden,
    slots: text("slots"),
    counters,
    balanced: document.getElementById("balance").dataset.balanced,
  };
})()"""


def _lanes_drawn(n: int) -> str:
    """A page expression true once every lane has at least ``n`` intervals drawn."""
    lanes = ", ".join(f'"{lane}"' for lane in LANES)
    return (
        f"[{lanes}].every((l) => Number(document.querySelector("
        f'`.lane[data-lane="${{l}}"]`).dataset.samples) >= {n})'
    )


@needs_chromium
def test_the_page_computes_interval_shares_and_survives_a_broken_or_hung_status(
    tmp_path: Path,
) -> None:
    """Against a source with known busy shares: exact figures, workers, 503s, a new run."""

    async def main() -> None:
        source = SteppingRun()
        async with serving(source) as (_, url, _), browser(tmp_path) as b:
            await b.goto(url + "/")
            await b.wait_for(_lanes_drawn(3), 20, "three intervals on every lane")
            st = await b.eval(PAGE_STATE)
            assert st["connection"] == "live" and st["runName"] == "fake-run"
            assert st["state"] == "running"
            for lane, share in SteppingRun.SHARES.items():
                got = st["lanes"][lane]
                # Each interval's share is d(busy_s) / d(uptime_s), drawn as its opacity.
                assert got["share"] == f"{share:.3f}", lane
                assert got["rects"] == got["samples"] >= 3
                assert got["opacity"] == [share] * got["rects"], lane
            assert float(st["stepsPerS"]) == SteppingRun.STEPS_PER_S
            assert st["stepsChart"]["last"] == str(SteppingRun.STEPS_PER_S)
            assert st["stepsChart"]["peak"] == str(SteppingRun.STEPS_PER_S)
            assert st["stepsChart"]["lines"] == 1 and st["successChart"] >= 3
            assert st["checkpoint"] == "none yet"
            assert [(w["id"], w["state"]) for w in st["workers"]] == [
                ("w1", "healthy"),
                ("w2", "late"),
                ("w3", "dead"),
            ]
            node_c = st["workers"][2]["cells"]
            assert node_c[0] == "<b>node-c</b>" and st["markupInTable"] == 0
            assert "missed 3 heartbeats" in node_c
            assert st["workers"][0]["cells"][3] == "0, 1"
            assert not st["noWorkersShown"]
            assert st["slots"] == "slots: 3 of 3 placed, 0 pending"
            assert st["counters"]["dropped_stale"] == "5"
            assert st["counters"]["episodes_broken"] == "1"
            assert st["balanced"] == "true"

            # The status source breaks: the page says so and keeps the last picture.
            source.broken = True
            st = await b.wait_for(
                f"(() => {{ const s = {PAGE_STATE}; "
                "return s.connection === 'disconnected' ? s : null; })()",
                10,
                "the page to show it is disconnected",
            )
            assert "HTTP 503" in st["connectionText"]
            assert "snapshot exploded" in st["connectionText"]
            assert all(st["lanes"][lane]["rects"] >= 3 for lane in LANES)
            assert len(st["workers"]) == 3

            # It recovers by itself, and a new run (uptime back at 0) starts a new picture.
            source.broken = False
            source.restart("fake-run-2")
            st = await b.wait_for(
                f"(() => {{ const s = {PAGE_STATE}; "
                "return s.runName === 'fake-run-2' && s.connection === 'live' ? s : null; })()",
                15,
                "the page to follow the new run",
            )
            for lane in LANES:
                # Only the new run's snapshots: one interval fewer than its iterations.
                assert st["lanes"][lane]["samples"] == int(st["iteration"]) - 1, st

            # A /status that never answers: the fetch is aborted, the page says why.
            async with stalling_status() as stalled_url:
                await b.goto(stalled_url + "/")
                st = await b.wait_for(
                    f"(() => {{ const s = {PAGE_STATE}; "
                    "return s.connection === 'disconnected' ? s : null; })()",
                    15,
                    "the page to give up on a hung /status",
                )
                assert "no answer in time" in st["connectionText"]
                assert st["polls"] == 0

    run(main(), timeout=60)


@contextlib.asynccontextmanager
async def stalling_status() -> AsyncIterator[str]:
    """The dashboard beside a /status that holds every request until the test ends."""
    released = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await released.wait()
        return web.json_response({})

    app = web.Application()
    dashboard.add_routes(app)
    app.router.add_get("/status", hang)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        released.set()
        async with asyncio.timeout(10):
            await runner.cleanup()


def _artifact_path() -> Path:
    folder = os.environ.get("DVLA_TEST_ARTIFACTS")
    return (Path(folder) if folder else ROOT / "test-artifacts") / "dashboard.png"


def _decode_png(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Pixels of an 8-bit, non-interlaced RGB(A) PNG: enough for a browser screenshot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind == b"IEND":
            break
    assert header is not None, "PNG without IHDR"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * bpp
    assert len(raw) == height * (stride + 1), "truncated image data"
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        start = y * (stride + 1)
        kind_ = raw[start]
        line = np.frombuffer(raw, np.uint8, stride, start + 1).astype(np.int64)
        if kind_ == 0:
            cur = line
        elif kind_ == 1:  # Sub: a running sum along the row, per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 255
        elif kind_ == 2:  # Up
            cur = (line + prev) & 255
        else:  # Average and Paeth depend on the byte just decoded: one at a time
            up, row = prev.tolist(), line.tolist()
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                if kind_ == 3:
                    row[i] = (row[i] + ((left + up[i]) >> 1)) & 255
                    continue
                corner = up[i - bpp] if i >= bpp else 0
                p = left + up[i] - corner
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else corner)
                row[i] = (row[i] + pred) & 255
            cur = np.array(row, dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


@contextlib.contextmanager
def toy_pipeline(tmp_path: Path) -> Iterator[Coordinator]:
    """A real toy run (one sampler process on a local worker) with its HTTP API on loopback.

    ``Coordinator.run`` blocks, so it runs on a thread; the wall-clock limit ends it even
    if the test never gets to stop it.
    """
    cfg = load_config(
        ROOT / "configs" / "toy-processes.yaml",
        {
            "run.target_success": None,
            "run.eval_episodes": 0,
            "run.max_wall_seconds": 90,
            "pipeline.num_envs": 16,
            "pipeline.shards": 2,
            "pipeline.sample_processes": 1,
            "pipeline.groups_per_iteration": 2,
            "checkpoint.final": False,
            "cluster.http": True,
            "cluster.http_host": "127.0.0.1",
            "cluster.http_port": 0,
        },
    )
    co = Coordinator(cfg, RunDir(tmp_path / "run"))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            co.run()
        except BaseException as exc:  # reported by the test, not as a thread warning
            errors.append(exc)
        finally:
            co.rundir.close()

    thread = threading.Thread(target=target, name="toy-run", daemon=True)
    thread.start()
    try:
        yield co
    finally:
        thread.join(120)
        assert not thread.is_alive(), "the toy run did not stop"
        if errors:
            raise errors[0]


@needs_chromium
def test_the_page_shows_the_lanes_of_a_running_toy_pipeline(tmp_path: Path) -> None:
    """The page in a real browser against a real run; a screenshot is kept as an artifact."""
    with toy_pipeline(tmp_path) as co:

        async def main() -> None:
            await wait_until(lambda: co.api_url, 30)
            try:
                await check_page(co, tmp_path)
            finally:
                await stop(co)

        run(main(), timeout=100)


async def stop(co: Coordinator) -> None:
    """POST /stop with the run's secret, as an operator would; gone already is fine."""
    if not co.api_url:
        return  # never started serving; max_wall_seconds ends the run
    auth = {"Authorization": "Bearer " + co.secret.value.decode()}
    with contextlib.suppress(aiohttp.ClientConnectionError):
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            s.post(co.api_url + "/stop", headers=auth, json={"reason": "test over"}) as r,
        ):
            assert r.status == 202


async def check_page(co: Coordinator, workdir: Path) -> None:
    async with browser(workdir) as b:
        await b.goto(co.api_url + "/")
        # One sampler process must start (imports torch) before iterations begin.
        ready = (
            f"{_lanes_drawn(5)} && Number(document.getElementById('iteration').dataset.value)"
            " >= 2 && document.querySelectorAll('#workers tbody tr').length >= 1"
        )
        await b.wait_for(ready, 45, "the lanes, an iteration and the worker on the page")
        st = await b.eval(PAGE_STATE)
        assert st["connection"] == "live" and st["runName"] == "toy-processes"
        assert st["state"] == "running"
        assert 2 <= int(st["iteration"]) <= co.learn.iteration
        assert st["iterationText"] == f"{int(st['iteration']):,}"
        for lane in LANES:
            got = st["lanes"][lane]
            assert got["rects"] == got["samples"] >= 5, (lane, got)
            assert all(0 <= o <= 1 for o in got["opacity"]), (lane, got)
        # The lanes that do the work of a toy run are busy in some interval.
        for lane in ("infer", "learn"):
            assert max(st["lanes"][lane]["opacity"]) > 0, (lane, st["lanes"][lane])
        assert st["stepsChart"]["points"] >= 5 and st["stepsChart"]["lines"] == 1
        assert float(st["stepsChart"]["peak"]) > 0  # the samplers stepped their envs
        (worker,) = st["workers"]
        assert worker["state"] == "healthy" and worker["cells"][0] == "local0"
        assert worker["cells"][3] == "0"  # its one slot
        assert int(st["counters"]["produced"]) > 0 and st["balanced"] == "true"

        png = await b.screenshot()
        path = _artifact_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        assert len(png) > 10_000
        pixels = _decode_png(path.read_bytes())
        assert pixels.shape[:2] == (HEIGHT, WIDTH)
        colours = np.unique(pixels.reshape(-1, pixels.shape[2])[:, :3], axis=0)
        assert len(colours) > 50, f"a nearly blank screenshot: {len(colours)} colours"

        # The run ends: the page says it is disconnected and keeps the last picture.
        await stop(co)
        st = await b.wait_for(
            f"(() => {{ const s = {PAGE_STATE}; "
            "return s.connection === 'disconnected' ? s : null; })()",
            15,
            "the page to show the run is gone",
        )
        assert "showing the last picture" in st["connectionText"]
        assert all(st["lanes"][lane]["rects"] >= 5 for lane in LANES)
        assert int(st["iteration"]) >= 2 and len(st["workers"]) == 1
