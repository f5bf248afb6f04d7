"""The live dashboard the coordinator's HTTP API serves at ``/``.

An operator who opens the API's address in a browser should see the run at a glance
(which lanes are busy, how fast it goes, which workers are alive, where trajectories
went) without installing anything or reaching the internet: clusters are often offline.
So the dashboard is three static files shipped as package data (plain HTML, one vanilla
script, one stylesheet) that poll ``/status`` from the browser and draw with inline SVG.
The server side is only this module: it maps a fixed set of names to those files, so no
request path ever reaches the file system, and it marks every answer ``no-cache`` so a
browser picks up a new version of dvla after an upgrade instead of a stale script.
"""

from __future__ import annotations

import functools
from importlib import resources
from types import MappingProxyType

from aiohttp import web

#: The files a browser may fetch, by the name in the URL, with their content types.
#: Anything else under ``/dashboard/`` is a 404: the table is the whole allow-list.
ASSETS: MappingProxyType[str, str] = MappingProxyType(
    {
        "index.html": "text/html; charset=utf-8",
        "dashboard.js": "text/javascript; charset=utf-8",
        "dashboard.css": "text/css; charset=utf-8",
    }
)
#: Where the page's script and stylesheet are fetched from (index.html refers to it).
ASSET_PREFIX = "/dashboard/"

# The page needs only its own script, stylesheet and /status; forbidding everything else
# means a value in a status snapshot (a worker name, a stop reason) can never run as code
# or pull in a remote resource, even if the script had a bug that inserted it as HTML.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = MappingProxyType(
    {
        # Revalidate on every load: after an upgrade the browser must not mix an old
        # cached script with a new /status schema.
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": _CSP,
    }
)


@functools.cache
def asset(name: str) -> bytes:
    """The bytes of one dashboard file, read once from the installed package.

    Read through :mod:`importlib.resources` so the files are found in a wheel, an
    editable checkout or a zip alike; cached because they never change while the
    process runs and the page polls every second.

    Args:
        name: A key of :data:`ASSETS`.

    Raises:
        KeyError: ``name`` is not a dashboard file (never a path: no file-system lookup
            happens for unknown names).
    """
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name).read_bytes()


def add_routes(app: web.Application) -> None:
    """Serve the dashboard on ``app``: ``GET /`` and ``GET /dashboard/{name}``.

    Reading is unauthenticated, like ``/status``: the page shows nothing the status
    endpoint does not already expose to anyone who can reach the port.

    Args:
        app: The API's application, before it is frozen by its runner.
    """
    app.router.add_get("/", _index)
    app.router.add_get(ASSET_PREFIX + "{name}", _asset)


async def _index(request: web.Request) -> web.StreamResponse:
    return _respond("index.html")


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        # Same answer for an unknown name and a traversal attempt: nothing to probe.
        raise web.HTTPNotFound(text="no such dashboard file\n")
    return _respond(name)


def _respond(name: str) -> web.Response:
    # aiohttp refuses a charset inside content_type=, so the full value goes in headers.
    return web.Response(body=asset(name), headers={"Content-Type": ASSETS[name], **_HEADERS})
