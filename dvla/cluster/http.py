"""The coordinator's HTTP API: health, status, Prometheus metrics and an authenticated stop.

A live dashboard for browsers is served at ``/`` too (see :mod:`dvla.cluster.dashboard`).

Operators, probes and scrapers need to look at a run (is it alive, how fast, where do
trajectories go) and to stop it cleanly without a shell on the coordinator's host. Reading
is open because nothing in a status snapshot is secret; stopping needs the run's shared
secret, because any process that can reach the port could otherwise end a run.

The server binds to loopback unless told otherwise, bounds request lines, headers and
bodies, and never lets a failing status source take the process down: a broken snapshot
turns into a 503 answer, not an exception in the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from dvla import logs
from dvla.cluster import dashboard
from dvla.errors import DvlaError

log = logs.get(__name__)

#: The content type of the Prometheus text exposition format that ``/metrics`` speaks.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Worker states always exported by ``dvla_workers``, so a dashboard sees a 0, not a gap.
WORKER_STATES = ("healthy", "late", "dead", "left")
#: Where a trajectory can end up; the keys of the status snapshot's ``accounting``.
TRAJECTORY_FATES = ("produced", "consumed", "dropped_stale", "discarded", "discarded_dead_worker")
#: Longest stop reason accepted, so a caller cannot flood the run's logs through it.
MAX_REASON_CHARS = 200

# aiohttp's parser limits (its defaults, pinned so an upgrade cannot silently loosen them):
# a request line or a header line longer than this is refused before any handler runs.
_MAX_LINE_SIZE = 8190
_MAX_FIELD_SIZE = 8190
# Far more than any client of this API sends; bounds the memory one request can pin.
_MAX_HEADERS = 64
# A client that announces a body and then stalls must not hold a handler forever.
_BODY_READ_TIMEOUT_S = 5.0
# Our handlers never wait on the run, so in-flight requests finish well within this.
_SHUTDOWN_GRACE_S = 1.0
# Idle keep-alive connections are cheap but not free; scrapers reconnect happily.
_KEEPALIVE_TIMEOUT_S = 30.0
# Binding a local socket does not block, but a bound keeps start() honest.
_START_TIMEOUT_S = 10.0


class StatusSource(Protocol):
    """What the API reads from and stops: the coordinator's run."""

    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the run (see the module's status schema)."""
        ...

    def request_stop(self, reason: str) -> None:
        """Ask the run to drain and stop; must return at once."""
        ...


class ApiServer:
    """An aiohttp server for ``/healthz``, ``/status``, ``/metrics``, ``POST /stop`` and ``/``.

    ``/`` is the live dashboard, a page that polls ``/status`` from the browser.

    Args:
        source: The run to report on and to stop.
        secret: Shared secret a ``POST /stop`` must present as ``Authorization: Bearer``.
        host: Address to bind; loopback by default so that exposing the API is a choice.
        port: Port to bind; 0 picks a free one (see :attr:`port` after :meth:`start`).
        max_body_bytes: Largest request body accepted; larger ones get 413.

    Raises:
        ValueError: ``secret`` is empty (any request would then pass) or the body limit is
            not positive.
    """

    def __init__(
        self,
        source: StatusSource,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = 64 * 1024,
    ) -> None:
        if not secret:
            raise ValueError("the HTTP API's stop secret must not be empty")
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self._source = source
        self._secret = bytes(secret)
        self._host = host
        self._requested_port = port
        self._max_body_bytes = max_body_bytes
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port actually bound (differs from the requested one when that was 0).

        Raises:
            RuntimeError: the server is not running.
        """
        if self._port is None:
            raise RuntimeError("the HTTP API is not running")
        return self._port

    async def start(self) -> str:
        """Bind and serve; returns the base URL, e.g. ``http://127.0.0.1:8265``.

        Raises:
            RuntimeError: it is already running.
            DvlaError: the address cannot be bound (e.g. the port is taken).
        """
        if self._runner is not None:
            raise RuntimeError("the HTTP API is already running")
        runner = web.AppRunner(
            self._make_app(),
            # Requests are logged by our handlers where it matters (refused stops);
            # a line per scrape would drown the run's log.
            access_log=None,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
            keepalive_timeout=_KEEPALIVE_TIMEOUT_S,
            max_line_size=_MAX_LINE_SIZE,
            max_field_size=_MAX_FIELD_SIZE,
            max_headers=_MAX_HEADERS,
            logger=_ServerLog(logging.getLogger("aiohttp.server")),
        )
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await runner.setup()
                site = web.TCPSite(runner, self._host, self._requested_port)
                await site.start()
        except BaseException as exc:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await runner.cleanup()
            if isinstance(exc, OSError):
                raise DvlaError(
                    f"cannot serve the HTTP API on {self._host}:{self._requested_port}: "
                    f"{exc.strerror or repr(exc)}"
                ) from exc
            raise
        sockname = runner.addresses[0]
        host, port = str(sockname[0]), int(sockname[1])
        self._runner, self._port = runner, port
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        log.info("http api listening", url=url)
        return url

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening and close connections; safe to call twice or before start.

        Args:
            timeout: Bound on the whole shutdown; past it the server is abandoned with a
                warning rather than holding up the run's own shutdown.
        """
        runner, self._runner, self._port = self._runner, None, None
        if runner is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await runner.cleanup()
        except TimeoutError:
            log.warning("http api did not close in time", timeout_s=timeout)

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/stop", self._stop)
        dashboard.add_routes(app)
        return app

    def _snapshot(self) -> tuple[dict[str, Any] | None, str]:
        """The source's status, or None and why not: a broken source must not crash us."""
        try:
            return self._source.status(), ""
        except Exception as exc:
            log.warning("status snapshot failed", error=repr(exc))
            return None, f"status unavailable: {type(exc).__name__}: {exc}"

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        status, error = self._snapshot()
        if status is None:
            return _json({"ok": False, "state": None, "error": error}, 503)
        state = status.get("state")
        ok = state != "failed"
        return _json({"ok": ok, "state": state}, 200 if ok else 503)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        status, error = self._snapshot()
        if status is None:
            return _json({"error": error}, 503)
        return _json(status, 200)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        status, error = self._snapshot()
        if status is None:
            # A failed scrape is how Prometheus learns the target is unhealthy.
            return web.Response(status=503, text=error + "\n")
        try:
            body = render_metrics(status)
        except Exception as exc:  # a malformed snapshot is a bug upstream, not a crash here
            log.warning("metrics rendering failed", error=repr(exc))
            return web.Response(status=500, text=f"cannot render metrics: {exc!r}\n")
        return web.Response(
            body=body.encode("utf-8"), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def _stop(self, request: web.Request) -> web.StreamResponse:
        refusal = self._check_auth(request.headers.get("Authorization"))
        if refusal:
            # Never log what was presented: a near-miss secret is still a secret.
            log.warning("refused http stop request", peer=request.remote, why=refusal)
            return _json({"error": refusal}, 401, {"WWW-Authenticate": "Bearer"})
        try:
            async with asyncio.timeout(_BODY_READ_TIMEOUT_S):
                body = await request.read()
        except TimeoutError:
            return _json({"error": f"request body not received in {_BODY_READ_TIMEOUT_S} s"}, 408)
        except web.HTTPRequestEntityTooLarge:
            return _json({"error": f"request body over {self._max_body_bytes} bytes"}, 413)
        reason, problem = _parse_reason(body)
        if problem:
            return _json({"error": problem}, 400)
        full = f"http: {reason}" if reason else "http"
        try:
            self._source.request_stop(full)
        except Exception as exc:
            log.warning("stop request failed", peer=request.remote, error=repr(exc))
            return _json({"error": f"stop failed: {type(exc).__name__}: {exc}"}, 500)
        log.info("stop requested over http", peer=request.remote, reason=full)
        return _json({"stopping": True}, 202)

    def _check_auth(self, header: str | None) -> str:
        """Empty if ``header`` carries our secret, else a one-line reason for the client."""
        if header is None:
            return "missing 'Authorization: Bearer <secret>' header"
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return "the Authorization header must use the Bearer scheme"
        try:
            # aiohttp decodes headers as UTF-8 with surrogateescape; this gives back the
            # exact bytes sent, so a secret that is not valid UTF-8 still compares.
            given = token.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return "wrong secret"
        if not hmac.compare_digest(given, self._secret):
            return "wrong secret"
        return ""


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, minus tracebacks for requests that do not parse.

    aiohttp logs every malformed request (an over-long header, a TLS hello on the plain
    port) as an error with a traceback and the first 100 bytes of the offending line. That
    is the client's fault, not ours, and the line may hold a presented token; a one-line
    warning without the content says enough. Anything else keeps its traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else None
            log.warning(
                "refused malformed http request",
                peer=peer,
                status=exc_info.code,
                error=type(exc_info).__name__,
            )
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def _json(data: Any, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response; a snapshot that will not serialise is a 500 with a reason."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError) as exc:
        log.warning("status snapshot is not JSON-serialisable", error=repr(exc))
        text, status = json.dumps({"error": f"status is not JSON-serialisable: {exc}"}), 500
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def _parse_reason(body: bytes) -> tuple[str, str]:
    """The optional ``reason`` of a stop body, and an error message if the body is bad."""
    if not body.strip():
        return "", ""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return "", f"body is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return "", 'body must be a JSON object like {"reason": "..."}'
    reason = data.get("reason")
    if reason is None:
        return "", ""
    if not isinstance(reason, str):
        return "", "reason must be a string"
    if len(reason) > MAX_REASON_CHARS:
        return "", f"reason is longer than {MAX_REASON_CHARS} characters"
    if not reason.isprintable():
        # The reason ends up in one-line log messages and the run's final report.
        return "", "reason must not contain control characters"
    return reason.strip(), ""


# ---------------------------------------------------------------------------- metrics

_Sample = tuple[Mapping[str, str], Any]


def render_metrics(status: Mapping[str, Any]) -> str:
    """Render a status snapshot in the Prometheus text exposition format 0.0.4.

    Missing or non-numeric entries are left out rather than exported as 0, so a gap on a
    dashboard means "not reported", never a made-up value. Worker counts are the
    exception: every known state is exported, since 0 dead workers is a real fact.

    Args:
        status: A snapshot as returned by :meth:`StatusSource.status`.

    Returns:
        The exposition text, ending in a newline.
    """
    out: list[str] = []
    throughput = _mapping(status.get("throughput"))
    accounting = _mapping(status.get("accounting"))
    lanes = _mapping(status.get("lanes"))
    slots = _mapping(status.get("slots"))
    workers = status.get("workers")
    worker_list = (
        [w for w in workers if isinstance(w, Mapping)] if isinstance(workers, list) else []
    )

    _family(out, "dvla_up", "gauge", "1 while the coordinator answers.", [({}, 1)])
    _family(
        out,
        "dvla_uptime_seconds",
        "gauge",
        "Seconds since the run started.",
        _one(status.get("uptime_s")),
    )
    _family(
        out,
        "dvla_iteration",
        "gauge",
        "Learner iterations completed.",
        _one(status.get("iteration")),
    )
    _family(
        out,
        "dvla_policy_version",
        "gauge",
        "Version of the policy weights samplers act with.",
        _one(status.get("policy_version")),
    )
    _family(
        out,
        "dvla_env_steps_total",
        "counter",
        "Environment steps taken by all samplers.",
        _one(throughput.get("env_steps")),
    )
    _family(
        out,
        "dvla_env_steps_per_second",
        "gauge",
        "Recent environment steps per second.",
        _one(throughput.get("env_steps_per_s")),
    )
    _family(
        out,
        "dvla_trajectories_per_second",
        "gauge",
        "Recent trajectories produced per second.",
        _one(throughput.get("trajectories_per_s")),
    )
    _family(
        out,
        "dvla_success_rate",
        "gauge",
        "Recent fraction of episodes that succeeded.",
        _one(status.get("success_rate")),
    )
    lane_stats = [(str(name), _mapping(v)) for name, v in lanes.items()]
    _family(
        out,
        "dvla_lane_busy_seconds_total",
        "counter",
        "Seconds each lane spent working.",
        [({"lane": name}, s.get("busy_s")) for name, s in lane_stats],
    )
    _family(
        out,
        "dvla_lane_busy_share",
        "gauge",
        "Recent fraction of time each lane was busy.",
        [({"lane": name}, s.get("share")) for name, s in lane_stats],
    )
    _family(
        out,
        "dvla_trajectories_total",
        "counter",
        "Trajectories by fate: produced, consumed by the learner, or dropped and why.",
        [({"fate": fate}, accounting.get(fate)) for fate in TRAJECTORY_FATES],
    )
    _family(
        out,
        "dvla_episodes_lost_total",
        "counter",
        "Episodes lost to failed samplers or workers.",
        _one(accounting.get("episodes_lost")),
    )
    _family(
        out,
        "dvla_trajectories_in_flight",
        "gauge",
        "Trajectories produced but not yet consumed or dropped.",
        _one(accounting.get("in_flight")),
    )
    counts = dict.fromkeys(WORKER_STATES, 0)
    restarts = 0
    for w in worker_list:
        state = str(w.get("state", "unknown"))
        counts[state] = counts.get(state, 0) + 1
        n = w.get("sampler_restarts")
        if isinstance(n, int) and not isinstance(n, bool):  # a count; anything else is noise
            restarts += n
    _family(
        out,
        "dvla_workers",
        "gauge",
        "Workers known to the coordinator, by state.",
        [({"state": state}, n) for state, n in counts.items()],
    )
    _family(
        out,
        "dvla_sampler_restarts_total",
        "counter",
        "Sampler processes restarted, summed over workers.",
        [({}, restarts)],
    )
    _family(
        out,
        "dvla_slots",
        "gauge",
        "Sampler slots placed on a worker or waiting for one.",
        [({"state": s}, slots.get(s)) for s in ("placed", "pending")],
    )
    _family(
        out,
        "dvla_checkpoint_iteration",
        "gauge",
        "Iteration of the last checkpoint written.",
        _one(_mapping(status.get("checkpoint")).get("last_iteration")),
    )
    return "".join(out)


def _family(out: list[str], name: str, kind: str, doc: str, samples: Iterable[_Sample]) -> None:
    """Append one metric family; a family with no numeric sample is left out whole."""
    lines = []
    for labels, raw in samples:
        value = _value(raw)
        if value is None:
            continue
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {value}\n")
        else:
            lines.append(f"{name} {value}\n")
    if not lines:
        return
    out.append(f"# HELP {name} {_escape_help(doc)}\n")
    out.append(f"# TYPE {name} {kind}\n")
    out.extend(lines)


def _one(raw: Any) -> list[_Sample]:
    return [({}, raw)]


def _mapping(raw: Any) -> Mapping[str, Any]:
    """``raw`` if it is a mapping, else empty: the snapshot may lack any section."""
    return raw if isinstance(raw, Mapping) else {}


def _value(raw: Any) -> str | None:
    """A sample value as the format spells it, or None for anything not a number."""
    if isinstance(raw, bool):
        return "1" if raw else "0"
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if math.isnan(raw):
            return "NaN"
        if math.isinf(raw):
            return "+Inf" if raw > 0 else "-Inf"
        return repr(raw)
    return None


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
