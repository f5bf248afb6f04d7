"""One LIBERO environment in its own process, and the handle its simulator holds.

A LIBERO step costs 100-500 ms of CPU and holds the interpreter lock, so every
environment gets a process of its own and a simulator steps them in parallel. Parent and
child talk over a private pipe pair (not stdout, which LIBERO and robosuite print to) in
length-prefixed msgpack frames; arrays travel as dtype, shape and raw bytes. Nothing is
pickled. Every read has a deadline: a process that dies or hangs is reported as such,
and its simulator replaces it.

Child commands: ``reset(task, init)`` -> observation; ``step(action)`` -> observation,
reward, done, success; ``close``. The child keeps one LIBERO environment, rebuilt when
the task changes (each task has its own scene).
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack
import numpy as np

_LEN = struct.Struct("<I")
_MAX_FRAME = 64 * 1024 * 1024
#: robosuite's camera names for the two views a VLA policy sees.
CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}


class EnvDied(Exception):
    """The environment process exited, broke the protocol or missed its deadline."""


def _pack(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return {"__nd__": o.dtype.str, "shape": list(o.shape), "data": o.tobytes()}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot send {type(o).__name__}")

    body: bytes = msgpack.packb(obj, default=default, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _unpack(body: bytes) -> Any:
    def hook(d: dict[str, Any]) -> Any:
        if "__nd__" in d:
            return np.frombuffer(d["data"], np.dtype(d["__nd__"])).reshape(d["shape"])
        return d

    return msgpack.unpackb(body, object_hook=hook, raw=False)


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EnvDied("no answer in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EnvDied("process closed its pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float) -> Any:
    """One message from ``fd``; raises :class:`EnvDied` at ``deadline`` or on EOF."""
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    if n > _MAX_FRAME:
        raise EnvDied(f"frame of {n} bytes exceeds the limit")
    return _unpack(_read_exact(fd, n, deadline))


def write_frame(fd: int, obj: Any) -> None:
    """Send one message (blocking: pipe buffers drain as fast as the peer reads)."""
    data = memoryview(_pack(obj))
    while data:
        try:
            n = os.write(fd, data)
        except (BrokenPipeError, OSError) as err:
            raise EnvDied(f"cannot write to the process: {err}") from None
        data = data[n:]


class EnvProcess:
    """Parent-side handle of one environment process."""

    def __init__(self, config: dict[str, Any], env: dict[str, str], start_timeout: float) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        fd, self.log_path = tempfile.mkstemp(prefix="dvla-libero-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._w, self._r = to_child_w, from_child_r
        self.pending = False
        try:
            write_frame(self._w, {"cmd": "init", **config})
            self.result(start_timeout)
        except EnvDied:
            self.kill()
            raise

    def send(self, cmd: str, **args: Any) -> None:
        """Start a command; :meth:`result` collects its answer (so many run at once)."""
        write_frame(self._w, {"cmd": cmd, **args})
        self.pending = True

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            out = read_frame(self._r, time.monotonic() + timeout)
        finally:
            self.pending = False
        if not isinstance(out, dict):
            raise EnvDied("malformed answer")
        if "error" in out:
            raise EnvDied(str(out["error"]))
        return out

    def tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                lines = fh.read().strip().splitlines()
        except OSError:
            return ""
        return lines[-1][-300:] if lines else ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for fd in (self._w, self._r) if hasattr(self, "_w") else ():
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(EnvDied):
            write_frame(self._w, {"cmd": "close"})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()


# --------------------------------------------------------------------------- child side
class _Child:
    """The LIBERO environment inside the process."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from libero.libero import benchmark

        self.cfg = cfg
        self.suite = benchmark.get_benchmark_dict()[cfg["suite"]]()
        self.env: Any = None
        self.task = -1
        self.init_states: dict[int, Any] = {}

    def _make(self, task: int) -> None:
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        if self.env is not None:
            self.env.close()
            self.env = None
        t = self.suite.get_task(task)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        res = int(self.cfg["resolution"])
        kwargs: dict[str, Any] = {
            "bddl_file_name": bddl,
            "camera_heights": res,
            "camera_widths": res,
            "camera_names": [CAMERAS[c] for c in self.cfg["cameras"]],
        }
        self.env = OffScreenRenderEnv(**kwargs)
        if self.cfg["render_quality"] == "fast":
            _fast_rendering(self.env)
        self.env.seed(int(self.cfg["seed"]))
        self.task = task

    def _obs(self, raw: dict[str, Any]) -> dict[str, Any]:
        images = {}
        for cam in self.cfg["cameras"]:
            # LIBERO renders upside down (OpenGL's origin); flip to the usual orientation.
            images[cam] = np.ascontiguousarray(raw[f"{CAMERAS[cam]}_image"][::-1, ::-1])
        proprio = np.concatenate(
            [raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]]
        ).astype(np.float32)
        return {"images": images, "proprio": proprio}

    def reset(self, task: int, init: int) -> dict[str, Any]:
        if task != self.task or self.env is None:
            self._make(task)
        if task not in self.init_states:
            self.init_states[task] = self.suite.get_task_init_states(task)
        states = self.init_states[task]
        self.env.reset()
        raw = self.env.set_init_state(states[init % len(states)])
        # Objects settle for a few simulator steps before the policy acts, as in the
        # published LIBERO evaluations.
        for _ in range(int(self.cfg["settle_steps"])):
            raw, _, _, _ = self.env.step(_NOOP)
        return self._obs(raw)

    def step(self, action: np.ndarray) -> dict[str, Any]:
        success = False
        raw: dict[str, Any] = {}
        for _ in range(int(self.cfg["action_repeat"])):
            raw, _, _, _ = self.env.step(to_libero_action(action))
            success = bool(self.env.check_success())
            if success:
                break
        return {**self._obs(raw), "reward": float(success), "success": success}


_NOOP = np.array([0, 0, 0, 0, 0, 0, -1], np.float64)


def to_libero_action(action: np.ndarray) -> np.ndarray:
    """Map a policy action in [-1, 1]^7 onto LIBERO's OSC_POSE controller input.

    Dimensions 0-5 are end-effector position and rotation deltas, which the controller
    takes in [-1, 1] and scales itself. Dimension 6 is the gripper: positive closes
    (+1), zero or negative opens (-1), the convention of LIBERO's demonstrations.
    """
    a = np.clip(np.asarray(action, np.float64).reshape(7), -1.0, 1.0)
    out = a.copy()
    out[6] = 1.0 if a[6] > 0 else -1.0
    return out


def _fast_rendering(env: Any) -> None:
    """Turn off anti-aliasing (multisampling) and shadows: about half the render time."""
    with contextlib.suppress(Exception):
        sim = env.env.sim
        sim.model.vis.quality.offsamples = 0
        sim.model.vis.quality.shadowsize = 0
        for i in range(sim.model.nlight):
            sim.model.light_castshadow[i] = 0


def main() -> int:
    """Entry point of an environment process: serve commands until ``close``."""
    r, w = int(sys.argv[1]), int(sys.argv[2])
    child: _Child | None = None
    while True:
        try:
            msg = read_frame(r, time.monotonic() + 86400.0)
        except EnvDied:
            return 0  # the parent went away
        cmd = msg.get("cmd")
        try:
            if cmd == "init":
                child = _Child(msg)
                out: dict[str, Any] = {"ok": True}
            elif cmd == "close":
                if child is not None and child.env is not None:
                    child.env.close()
                return 0
            elif child is None:
                out = {"error": "not initialised"}
            elif cmd == "reset":
                out = child.reset(int(msg["task"]), int(msg["init"]))
            elif cmd == "step":
                out = child.step(np.asarray(msg["action"], np.float32))
            elif cmd == "crash":  # tests: die the way a segfaulting simulator does
                os._exit(139)
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except Exception as err:
            out = {"error": f"{type(err).__name__}: {err}"}
        write_frame(w, out)


if __name__ == "__main__":
    sys.exit(main())
