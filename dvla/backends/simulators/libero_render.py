"""Headless rendering for LIBERO: pick a MuJoCo GL backend that works on this host.

MuJoCo reads ``MUJOCO_GL`` once, at import, so the choice has to be made before the
environment process imports robosuite. EGL comes first (a GPU's driver, or Mesa's
software renderer on a CPU-only host); OSMesa is the fallback. Each candidate is tried in
a throw-away subprocess, because a backend that fails can abort the process that tried.
A user's ``MUJOCO_GL`` is respected as given.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from dvla.errors import SimulatorError

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
