"""LIBERO throughput: dvla's sample lane against one bare LIBERO environment in a loop.

Both sides render the same cameras (``agentview`` and the wrist camera,
``robot0_eye_in_hand``) at ``--resolution`` square with the same ``--render-quality``,
on the same GL backend, for one task of ``--suite``, with random actions in [-1, 1]^7
(the gripper dimension mapped to +-1 as dvla does for a policy's action):

* bare, the baseline, in this process: ``libero.libero`` imported directly,
  ``OffScreenRenderEnv`` built from the task's BDDL file, ``reset`` + ``set_init_state``
  and the same untimed no-op settle steps dvla takes after a reset, then ``env.step``
  for ``--steps`` steps in a plain loop. Only the steps are timed. The loop's process
  CPU time over its wall time (``time.process_time``) is printed too: the number of
  cores one bare environment keeps busy.
* dvla, in the same run, after the bare environment is closed: ``LiberoSimulator`` with
  ``--envs`` environment processes (default ``os.cpu_count()``), one ``EnvShard`` and
  ``SampleLane.run_shard``, the lane's own coroutine, thread and episode buffers, with a
  request coroutine that answers every observation batch at once with random actions,
  tokens and log-probabilities (no policy), for ``--steps`` steps per environment. The
  time runs from the first request (after the shard's first reset) to the end of the
  last step; ``max_steps`` is set above ``--steps`` so no episode hits its limit (one
  that succeeds by chance is reset inside the timed window, as the lane does).

Printed ratio: ``dvla_steps_per_s / (N * bare_steps_per_s)``; target >= 0.90.

The ratio compares against N bare environments that each get a core of their own. On a
host with fewer cores than N times what one bare environment uses, no system can reach
it: MuJoCo's EGL rendering (Mesa's llvmpipe on a CPU-only host) runs threads of its own,
so one "single" environment may keep more than one core busy, and on a 2-core host two
such environments share cores a bare environment had to itself. The bare loop's cores
(process CPU / wall) are therefore printed, with the host ceiling they imply,
``min(1, cpus / (N * bare_cores))``, and the CPU the dvla side's environment processes
and lane process used, so a ratio below target can be told apart from dvla overhead.

The machines this runs on are shared: during each timed phase the host's busy CPU time
(``/proc/stat``) less what the measured processes used is printed as "other load", and
a run where other work kept more than 0.2 cores busy is flagged as not clean.

Memory: about 2 GB per environment (the bare one is closed before dvla's start).
Time: building an environment takes about 8 s, a reset about 5 s, a step 0.1-0.5 s.

    python benchmarks/libero_throughput.py [--envs N] [--steps S] [--quick]
        [--resolution R] [--render-quality default|fast] [--suite SUITE] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dvla import logs
from dvla.backends.simulators.libero_render import choose_backend, gl_env

TARGET_RATIO = 0.90
TASK = 0
CAMERAS = ["agentview", "wrist"]
LANE_TIMEOUT_S = 600.0
#: Cores of other work during a timed phase above which the run is flagged as unclean.
OTHER_LOAD_LIMIT = 0.2
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 where it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def host_busy_s() -> float:
    """CPU seconds all cores of this host have spent busy (not idle or waiting on IO)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # up to steal, less idle, iowait


def random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (n, 7)).astype(np.float32)


# ----------------------------------------------------------------- bare baseline
def measure_bare(args: argparse.Namespace, steps: int, settle: int) -> dict[str, Any]:
    """One ``OffScreenRenderEnv`` stepped in a plain loop in this process."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    from dvla.backends.simulators.libero_env import CAMERAS as NAMES
    from dvla.backends.simulators.libero_env import _fast_rendering, to_libero_action

    rng = np.random.default_rng(args.seed)
    suite = benchmark.get_benchmark_dict()[args.suite]()
    task = suite.get_task(TASK)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    init_states = suite.get_task_init_states(TASK)
    t0 = time.perf_counter()
    env = OffScreenRenderEnv(
        bddl_file_name=bddl,
        camera_heights=args.resolution,
        camera_widths=args.resolution,
        camera_names=[NAMES[c] for c in CAMERAS],
    )
    try:
        if args.render_quality == "fast":
            _fast_rendering(env)
        env.seed(args.seed)
        create_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        env.reset()
        env.set_init_state(init_states[int(rng.integers(len(init_states)))])
        noop = np.array([0, 0, 0, 0, 0, 0, -1], np.float64)
        for _ in range(settle):
            env.step(noop)
        reset_s = time.perf_counter() - t0
        actions = [to_libero_action(a) for a in random_actions(rng, steps)]
        host0, cpu0, t0 = host_busy_s(), time.process_time(), time.perf_counter()
        for a in actions:
            env.step(a)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        other = host_busy_s() - host0 - cpu
    finally:
        env.close()
        del env
        gc.collect()
    return {
        "steps": steps,
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "cpu_s": cpu,
        "cores": cpu / wall,
        "other_load_cores": max(0.0, other / wall),
        "create_s": create_s,
        "reset_s": reset_s,
    }


# ----------------------------------------------------------------- dvla
async def _drive(lane: Any, shard: Any, steps: int, seed: int) -> dict[str, Any]:
    from dvla.data import ActionBatch

    rng = np.random.default_rng(seed + 1)
    stop = asyncio.Event()
    pids = [p.proc.pid for p in shard.sim.procs if p is not None]
    state: dict[str, Any] = {"calls": 0, "steps": 0, "t0": None}

    async def request(obs: Any) -> ActionBatch:
        if state["t0"] is None:
            state["env_cpu0"] = sum(proc_cpu_s(p) for p in pids)
            state["lane_cpu0"] = time.process_time()
            state["host0"] = host_busy_s()
            state["t0"] = time.perf_counter()
        n = len(obs)
        state["calls"] += 1
        state["steps"] += n
        if state["calls"] >= steps:
            stop.set()  # this batch is still stepped; the loop ends after it
        return ActionBatch(
            actions=random_actions(rng, n),
            tokens=rng.integers(0, 256, (n, 7), dtype=np.int64),
            logprobs=rng.uniform(-6.0, 0.0, (n, 7)).astype(np.float32),
            version=0,
        )

    async def emit(group: Any) -> None:
        state["groups"] = state.get("groups", 0) + 1

    t_reset = time.perf_counter()
    await lane.run_shard(shard, request, emit, stop)
    t1 = time.perf_counter()
    lane_cpu = time.process_time() - state["lane_cpu0"]
    env_cpu = sum(proc_cpu_s(p) for p in pids) - state["env_cpu0"]
    other = host_busy_s() - state["host0"] - lane_cpu - env_cpu
    wall = t1 - state["t0"]
    return {
        "steps": state["steps"],
        "wall_s": wall,
        "steps_per_s": state["steps"] / wall,
        "first_reset_s": state["t0"] - t_reset,
        "env_processes_cpu_s": env_cpu,
        "env_processes_cores": env_cpu / wall,
        "lane_process_cpu_s": lane_cpu,
        "lane_process_cores": lane_cpu / wall,
        "other_load_cores": max(0.0, other / wall),
        "episodes_finished": state.get("groups", 0),
    }


def measure_dvla(args: argparse.Namespace, n: int, steps: int) -> dict[str, Any]:
    """``n`` environment processes driven through one shard of the sample lane."""
    from dvla.backends.simulators.libero import LiberoOptions, LiberoSimulator
    from dvla.pipeline.sample import EnvShard, EpisodeSource, SampleLane
    from dvla.pipeline.stats import Accounting

    opts = LiberoOptions(
        suite=args.suite,
        task_ids=[TASK],
        cameras=CAMERAS,
        resolution=args.resolution,
        render_quality=args.render_quality,
        max_steps=steps + 10,
    )
    t0 = time.perf_counter()
    sim = LiberoSimulator(opts, n, args.seed)
    start_s = time.perf_counter() - t0
    lane = None
    try:
        source = EpisodeSource(
            [t.num_init_states for t in sim.spec.tasks], 1, args.seed, limited=False
        )
        shard = EnvShard("bench", sim, "libero", source)
        lane = SampleLane([shard], 1, Accounting(), LANE_TIMEOUT_S)
        out = asyncio.run(_drive(lane, shard, steps, args.seed))
        out["restarts"] = sim.restarts
        out["episodes_broken"] = shard.broken
    finally:
        if lane is not None:
            lane.close()  # closes the shard and its simulator
        else:
            sim.close()
    return {"envs": n, "start_s": start_s, **out}


# ----------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--envs", type=int, default=os.cpu_count() or 1, help="dvla environments (cores)."
    )
    parser.add_argument("--steps", type=int, default=None, help="Steps per env (default 40).")
    parser.add_argument("--quick", action="store_true", help="10 steps per environment.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--render-quality", choices=("default", "fast"), default="default")
    parser.add_argument(
        "--suite",
        default="libero_spatial",
        choices=("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="Write the figures as JSON.")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (10 if args.quick else 40)
    if steps < 1 or args.envs < 1:
        parser.error("--steps and --envs must be at least 1")
    logs.configure("warning")
    # MuJoCo reads MUJOCO_GL at import: choose before this process imports LIBERO.
    backend = choose_backend()
    os.environ.update(gl_env(backend))
    from dvla.backends.simulators.libero import LiberoOptions

    settle = LiberoOptions().settle_steps
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    w = sys.stdout.write
    w(
        f"libero throughput: {args.suite} task {TASK}, {args.resolution}x{args.resolution} "
        f"{'+'.join(CAMERAS)}, render {args.render_quality}, gl {backend}, cpus {cpus}, "
        f"{steps} steps per env\n"
    )
    sys.stdout.flush()
    bare = measure_bare(args, steps, settle)
    w(
        f"bare  1 env : {bare['steps_per_s']:7.2f} steps/s  ({bare['steps']} steps in "
        f"{bare['wall_s']:.1f} s; process CPU {bare['cores']:.2f} cores, other load "
        f"{bare['other_load_cores']:.2f} cores)  "
        f"create {bare['create_s']:.1f} s, reset {bare['reset_s']:.1f} s\n"
    )
    sys.stdout.flush()
    dvla = measure_dvla(args, args.envs, steps)
    w(
        f"dvla  {dvla['envs']} env{'s' if dvla['envs'] > 1 else ' '}: "
        f"{dvla['steps_per_s']:7.2f} steps/s  ({dvla['steps']} steps in {dvla['wall_s']:.1f} s; "
        f"env processes {dvla['env_processes_cores']:.2f} cores, lane process "
        f"{dvla['lane_process_cores']:.2f} cores, other load "
        f"{dvla['other_load_cores']:.2f} cores)  start {dvla['start_s']:.1f} s, "
        f"first reset {dvla['first_reset_s']:.1f} s\n"
    )
    ratio = dvla["steps_per_s"] / (args.envs * bare["steps_per_s"])
    ceiling = min(1.0, cpus / (args.envs * bare["cores"]))
    passed = ratio >= TARGET_RATIO
    w(
        f"dvla / ({args.envs} x bare) = {ratio:.3f}   target >= {TARGET_RATIO:.2f}: "
        f"{'PASS' if passed else 'FAIL'}\n"
    )
    w(
        f"bare env uses {bare['cores']:.2f} cores; host ceiling min(1, {cpus} cpus / "
        f"({args.envs} x {bare['cores']:.2f})) = {ceiling:.3f}; dvla / ceiling = "
        f"{ratio / ceiling:.3f}\n"
    )
    other = max(bare["other_load_cores"], dvla["other_load_cores"])
    if other > OTHER_LOAD_LIMIT:
        w(
            f"warning: other processes kept up to {other:.2f} cores busy during the timed "
            "steps; the figures are not clean (rerun on an idle host)\n"
        )
    if dvla["restarts"] or dvla["episodes_broken"]:
        w(f"warning: {dvla['restarts']} environment processes replaced during the run\n")
    out = {
        "parameters": {
            "suite": args.suite,
            "task": TASK,
            "cameras": CAMERAS,
            "resolution": args.resolution,
            "render_quality": args.render_quality,
            "gl": backend,
            "envs": args.envs,
            "steps_per_env": steps,
            "settle_steps": settle,
            "seed": args.seed,
            "quick": args.quick,
            "cpus": cpus,
            "total_s": time.perf_counter() - started,
            "loadavg_1min_start_end": [load_start, os.getloadavg()[0]],
        },
        "bare": bare,
        "dvla": dvla,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "pass": passed,
        "bare_cores": bare["cores"],
        "host_ceiling_ratio": ceiling,
        "ratio_over_ceiling": ratio / ceiling,
        "clean": other <= OTHER_LOAD_LIMIT,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
