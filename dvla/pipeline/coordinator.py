"""The coordinator: builds the lanes from a pipeline file and runs them.

In ``async`` mode the four lanes are concurrent coroutines on one uvloop event loop,
linked by a bounded trajectory queue (backpressure keeps samplers from racing ahead of
the learner) and the weight bus. In ``sync`` mode the same lane objects run one stage
after another, as colocated trainers do, so the two modes differ only in overlap.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dvla import logs, registry
from dvla.backends.base import Algorithm, Policy, Simulator, SimulatorSpec
from dvla.cluster.checkpoint import CheckpointStore, TrainingState
from dvla.cluster.membership import split
from dvla.config import PipelineFile
from dvla.control.publisher import WeightPublisher
from dvla.data import TrajectoryGroup
from dvla.errors import ConfigError, DvlaError
from dvla.pipeline import checkpointing, tensorboard
from dvla.pipeline.evaluate import evaluate
from dvla.pipeline.gate import StalenessGate
from dvla.pipeline.infer import InferLane
from dvla.pipeline.lane import Lane
from dvla.pipeline.learn import LearnLane
from dvla.pipeline.memory import MemoryPools, ring_slots
from dvla.pipeline.policy import build_policy, export_policy
from dvla.pipeline.progress import EvalProgress, RunProgress, RunSnapshot
from dvla.pipeline.remote import RemoteSampleLane, run_secret
from dvla.pipeline.reporting import Reports
from dvla.pipeline.runtime import RunSummary, arm_watchdog, first_error, loop_factory
from dvla.pipeline.sample import (
    EnvShard,
    EpisodeSource,
    SampleLane,
    probe_spec,
    start_simulator,
)
from dvla.pipeline.stats import Accounting
from dvla.pipeline.sync import SyncLane
from dvla.pipeline.weights import (
    FanoutBus,
    LocalWeightBus,
    ReplicaSet,
    WeightBus,
    snapshot,
    start_publisher,
)
from dvla.rundir import RunDir

log = logs.get(__name__)


class Coordinator(Reports):
    """Runs one pipeline file in this process."""

    def __init__(
        self,
        cfg: PipelineFile,
        rundir: RunDir,
        source: str = "<config>",
        resume: bool = False,
        exit_watchdog: bool = False,
    ) -> None:
        self.cfg = cfg
        self.rundir = rundir
        self.source = source
        self.stop_reason = "running"
        self.state = "starting"
        self._t0 = time.perf_counter()
        self._stop: asyncio.Event | None = None
        #: The async trajectory queue while it exists (its depth is a reported figure).
        self._queue: asyncio.Queue[TrajectoryGroup] | None = None
        # run.tensorboard: true without the package fails here, before any simulator.
        tensorboard.check(cfg.run.tensorboard)
        self.tensorboard: tensorboard.TensorBoardLog | None = None
        self._lanes: list[Lane | RemoteSampleLane] = []
        # POST /stop and signals end the process within drain_timeout_s even if a lane
        # hangs; only the CLI sets this, never an embedding program or a test.
        self.exit_watchdog = exit_watchdog
        self.secret = run_secret(cfg)
        self.api_url = ""
        self._base = (0, 0)
        ck = cfg.checkpoint
        self.checkpoints = checkpointing.Checkpointer(
            CheckpointStore(Path(ck.dir) if ck.dir else rundir.root / "checkpoints", ck.keep),
            ck.every_iterations,
        )
        self.resumed: dict[str, Any] | None = None
        self._resume_state: TrainingState | None = None
        if resume:
            found = self.checkpoints.store.latest()
            if found is None:
                raise DvlaError(
                    f"--resume: no valid checkpoint in {self.checkpoints.store.directory}"
                )
            path, self._resume_state = found
            self.resumed = {"path": str(path), "iteration": self._resume_state.iteration}
        self._build()

    # ----------------------------------------------------------------- building
    def _build(self) -> None:
        cfg, p = self.cfg, self.cfg.pipeline
        torch.set_num_threads(p.torch_threads)
        torch.manual_seed(cfg.seed)
        self.sim_cls, self.sim_opts = registry.build_options(
            "simulator", cfg.simulator, self.source
        )
        # The model is built (and its files and action head checked) before any
        # simulator starts whenever the simulator can describe itself: a wrong model path
        # must not cost LIBERO's start-up first.
        spec = self.sim_cls.describe(self.sim_opts)
        early = build_policy(cfg, spec, self.source) if spec is not None else None
        sims: list[Simulator] = []
        try:
            if spec is None and p.sample_processes:
                # Simulators live in sampler processes; one environment here tells the
                # model the observation and action spec, then goes away.
                spec = probe_spec(self.sim_cls, self.sim_opts, cfg.simulator.name, cfg.seed)
            if not p.sample_processes:
                for i, n in enumerate(split(p.num_envs, p.shards)):
                    sims.append(self._make_sim(n, cfg.seed + i))
                spec = sims[0].spec
            assert spec is not None
            self._build_rest(sims, spec, early)
        except BaseException:
            for sim in sims:
                sim.close()
            raise

    def _build_rest(
        self, sims: list[Simulator], spec: SimulatorSpec, policy: Policy | None
    ) -> None:
        cfg, p = self.cfg, self.cfg.pipeline
        algo_cls, algo_opts = registry.build_options("algorithm", cfg.algorithm, self.source)
        opt_cls, opt_opts = registry.build_options("optimizer", cfg.optimizer, self.source)
        self.policy: Policy = policy or build_policy(cfg, spec, self.source)
        self.optimizer = optimizer = opt_cls(opt_opts).build(self.policy.parameters())
        self.algorithm: Algorithm = algo_cls(algo_opts, self.policy, optimizer)
        self.memory = MemoryPools(p.memory)
        g = self.algorithm.group_size
        self.memory.train.min_rows = p.groups_per_iteration * g * spec.max_episode_steps
        self.algorithm.train_pool = self.memory.train
        self.accounting = Accounting(window=deque(maxlen=cfg.run.success_window))
        version, generation = 0, 0
        if self._resume_state is not None:
            st = self._resume_state
            assert self.resumed is not None
            self.resumed["digest"] = checkpointing.restore(self, st)
            version, generation = st.policy_version, st.cursor.get("generation", 0)
        self.gate: StalenessGate | None = None
        if p.staleness_gate and p.mode == "async" and not p.sample_processes:
            self.gate = StalenessGate(
                p.groups_per_iteration,
                p.max_staleness,
                lambda: self.learn.version,
                lambda: self.replicas.active.version,
            )
        source = EpisodeSource(
            [t.num_init_states for t in spec.tasks],
            self.algorithm.group_size,
            cfg.seed,
            limited=p.mode == "sync",
            gate=self.gate,
        )
        ring = self.memory.ring(spec, ring_slots(p, g, p.num_envs)) if sims else None
        shards = [
            EnvShard(f"shard{i}", sim, cfg.simulator.name, source, self.memory.rollout, ring)
            for i, sim in enumerate(sims)
        ]
        self.bus: WeightBus = LocalWeightBus()
        self.replicas = ReplicaSet(self.policy, version)
        self.publisher: WeightPublisher | None = None
        self.sample: SampleLane | RemoteSampleLane
        if p.sample_processes:
            secret = self.secret
            if p.inference == "samplers":
                self.publisher = start_publisher(cfg, secret, snapshot(self.policy), version)
                self.bus = FanoutBus(self.bus, [self.publisher])
            self.sample = RemoteSampleLane(
                cfg,
                self.algorithm.group_size,
                self.accounting,
                self.rundir.root,
                secret,
                self.publisher.address if self.publisher else None,
                generation,
            )
        else:
            self.sample = SampleLane(
                shards, self.algorithm.group_size, self.accounting, p.lane_timeout_s
            )
        self.infer = InferLane(self.replicas, p.infer, p.lane_timeout_s, cfg.seed, self.memory)
        self.learn = LearnLane(
            self.algorithm,
            self.policy,
            self.bus,
            self.accounting,
            p,
            self._on_iteration,
            self.gate,
            self.memory,
        )
        if self._resume_state is not None:
            self.learn.iteration = self._resume_state.iteration
            self.learn.version = version
        local_bus = self.bus.local if isinstance(self.bus, FanoutBus) else self.bus
        self.sync = SyncLane(local_bus, self.replicas, p.lane_timeout_s)
        self._lanes = [
            self.sample,
            self.infer,
            self.learn,
            self.sync,
        ]

    def _make_sim(self, num_envs: int, seed: int) -> Simulator:
        return start_simulator(self.sim_cls, self.sim_opts, self.cfg.simulator.name, num_envs, seed)

    # ----------------------------------------------------------------- reporting
    def _on_iteration(self, iteration: int, metrics: dict[str, float]) -> None:
        wall = time.perf_counter() - self._t0
        acc = self.accounting
        row = {
            "iteration": iteration,
            "wall_s": round(wall, 4),
            "env_steps": acc.env_steps,
            "env_steps_per_s": (acc.env_steps - self._base[0]) / max(wall, 1e-9),
            "success_rate": acc.success_rate(),
            "accounting": acc.as_dict(),
            "lanes": self.lane_shares(),
            "infer_mean_batch": self.infer_mean_batch(),
            "staleness_hist": {str(k): v for k, v in self.learn.batch_staleness.items()},
            "memory_high_water_bytes": {
                name: pool["high_water_bytes"] for name, pool in self.memory_report().items()
            },
            "queues": self.queue_depths(),
            "weight_sync_s": self.latest_weight_sync_s(),
            **metrics,
        }
        self.rundir.append_metrics(row)
        if self.tensorboard is not None:
            self.tensorboard.write(row)
        log.debug("iteration", **{k: v for k, v in row.items() if not isinstance(v, dict)})
        if self.checkpoints.due(iteration):
            self.checkpoints.save_async(checkpointing.capture(self))
        run = self.cfg.run
        if iteration >= run.max_iterations:
            self._request_stop("max_iterations")
        elif run.max_env_steps is not None and acc.env_steps >= run.max_env_steps:
            self._request_stop("max_env_steps")
        elif (
            run.target_success is not None
            and len(acc.window) == acc.window.maxlen
            and acc.success_rate() >= run.target_success
        ):
            self._request_stop("target_success")

    def _request_stop(self, reason: str) -> None:
        if self._stop is not None and not self._stop.is_set():
            self.stop_reason = reason
            self.state = "draining"
            self._stop.set()

    def request_stop(self, reason: str) -> None:
        """Drain and stop (POST /stop, SIGTERM, SIGINT); returns at once."""
        log.info("stop requested", reason=reason)
        self._request_stop(reason)
        if self.exit_watchdog:
            arm_watchdog(self.cfg.cluster.drain_timeout_s)

    def generation(self) -> int:
        """Sampler placements made so far (the data cursor a checkpoint keeps)."""
        if isinstance(self.sample, RemoteSampleLane):
            return self.sample.cluster.membership.generation
        return 0

    def _snapshot(self) -> RunSnapshot:
        return RunSnapshot(
            wall_s=time.perf_counter() - self._t0,
            iteration=self.learn.iteration,
            version=self.learn.version,
            env_steps=self.accounting.env_steps,
            success=self.accounting.success_rate(),
            busy={k: v["share"] for k, v in self.lane_shares().items()},
        )

    async def _progress(self, stop: asyncio.Event) -> None:
        """Live progress (a bar on a terminal, else log lines) and the wall-clock limit."""
        progress = RunProgress(self.cfg.run, start_steps=self._base[0])
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
                if time.perf_counter() - self._t0 >= self.cfg.run.max_wall_seconds:
                    self._request_stop("max_wall_seconds")
                progress.update(self._snapshot())
        finally:
            # Cancelled (a lane failed), stopped or interrupted: the bar ends either way.
            progress.finish(self._snapshot())

    # ----------------------------------------------------------------- running
    async def _run_async(self, stop: asyncio.Event) -> None:
        queue: asyncio.Queue[TrajectoryGroup] = asyncio.Queue(
            maxsize=self.cfg.pipeline.queue_groups
        )
        self._queue = queue

        async def emit(group: TrajectoryGroup) -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(queue.put(group), 0.25)
                    return
                except TimeoutError:
                    continue
            self.accounting.discarded += len(group.trajectories)
            group.release()

        def stop_on_failure(task: asyncio.Task[None]) -> None:
            # The task group cancels the other lanes when one fails, but Python 3.11's
            # wait_for returns a result instead of raising when its inner await finishes
            # in the same loop pass as the cancellation, and a lane polling with wait_for
            # would then go on polling forever; the stop event ends every lane's loop.
            if not task.cancelled() and task.exception() is not None:
                stop.set()

        async with asyncio.TaskGroup() as tg:
            lanes = [
                tg.create_task(self.infer.run(stop), name="infer"),
                tg.create_task(self.learn.run(queue, stop), name="learn"),
                tg.create_task(self.sync.run(stop), name="sync"),
                tg.create_task(self._progress(stop), name="progress"),
            ]
            if isinstance(self.sample, RemoteSampleLane):
                lanes.append(
                    tg.create_task(self.sample.run(self.infer.request, emit, stop), name="samplers")
                )
            else:
                for shard in self.sample.shards:
                    lanes.append(
                        tg.create_task(
                            self.sample.run_shard(shard, self.infer.request, emit, stop),
                            name=shard.id,
                        )
                    )
            for task in lanes:
                task.add_done_callback(stop_on_failure)
        while not queue.empty():
            left = queue.get_nowait()
            self.accounting.discarded += len(left.trajectories)
            left.release()

    async def _run_sync(self, stop: asyncio.Event) -> None:
        progress = asyncio.create_task(self._progress(stop))
        try:
            assert isinstance(self.sample, SampleLane)
            while not stop.is_set():
                groups = await self.sample.rollout(
                    self.cfg.pipeline.groups_per_iteration, self.infer.forward
                )
                for g in groups:
                    self.learn.admit(g)
                await self.learn.train()
                await self.sync.apply_newer(0.0)
        finally:
            stop.set()
            await progress

    def _install_signals(self) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
            except (ValueError, RuntimeError, NotImplementedError):
                continue  # not the main thread (an embedding program): its signals
            installed.append(sig)
        return installed

    async def _start_api(self) -> Any:
        if not self.cfg.cluster.http:
            return None
        from dvla.cluster.http import ApiServer

        c = self.cfg.cluster
        token = os.environ.get(c.http_token_env) if c.http_token_env else None
        if c.http_token_env and not token:
            raise ConfigError(f"cluster.http_token_env: {c.http_token_env} is not set")
        api = ApiServer(
            self, token.encode() if token else self.secret.value, c.http_host, c.http_port
        )
        self.api_url = await api.start()
        return api

    async def _main(self) -> None:
        self._stop = stop = asyncio.Event()
        self._t0 = time.perf_counter()
        self._base = (self.accounting.env_steps, self.accounting.produced)
        log.info(
            "run started",
            name=self.cfg.name,
            mode=self.cfg.pipeline.mode,
            run_dir=str(self.rundir.root),
            envs=self.cfg.pipeline.num_envs,
            resumed_from=self.resumed["path"] if self.resumed else None,
            iteration=self.learn.iteration,
        )
        if self.resumed:
            log.info("resumed", **self.resumed)
        self.tensorboard = tensorboard.TensorBoardLog.open(
            self.cfg.run.tensorboard, self.rundir.root
        )
        signals = self._install_signals()
        api = await self._start_api()
        self.state = "running"
        try:
            if self.cfg.pipeline.mode == "async":
                await self._run_async(stop)
            else:
                await self._run_sync(stop)
        except BaseExceptionGroup as eg:
            self.state = "failed"
            raise first_error(eg) from None
        finally:
            if self.state != "failed":
                self.state = "draining"
            if api is not None:
                await api.close(2.0)
            loop = asyncio.get_running_loop()
            for sig in signals:
                loop.remove_signal_handler(sig)

    def run(self) -> RunSummary:
        """Run to a stop condition, evaluate, write the summary; blocking."""
        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(self._main())
        finally:
            self.stop_reason = "error" if self.stop_reason == "running" else self.stop_reason
            wall = time.perf_counter() - self._t0
            if self.tensorboard is not None:
                self.tensorboard.close()
            for lane in self._lanes:
                lane.close()
            if self.publisher is not None:
                self.publisher.close()
            self.accounting.discarded += sum(len(g.trajectories) for g in self.learn.pending)
            self.accounting.discarded += self.sample.in_progress()
            for group in self.learn.pending:
                group.release()
            self.learn.pending = []
            self.checkpoints.wait(self.cfg.cluster.drain_timeout_s)
            already = self.checkpoints.last_iteration == self.learn.iteration
            if self.cfg.checkpoint.final and self.stop_reason != "error" and not already:
                done = self.checkpoints.save(
                    checkpointing.capture(self), self.cfg.cluster.drain_timeout_s
                )
                if not done:
                    log.error("final checkpoint did not finish within drain_timeout_s")
        self.rundir.save_policy(self.policy.state_dict())
        try:
            export_policy(self.policy, self.cfg, self.rundir.root / "policy", self.learn.version)
        except Exception as err:  # the run's result is policy.pt; the export is a copy
            log.error("policy export failed", error=f"{type(err).__name__}: {err}")
        eval_result = None
        # A stop someone asked for (signal, POST /stop) must finish within the drain
        # timeout, so it skips the final evaluation.
        asked = self.stop_reason.startswith(("signal", "http"))
        if self.cfg.run.eval_episodes and not asked:
            # No more evaluation environments than training ones: they can be costly.
            n = min(self.cfg.run.eval_episodes, self.cfg.pipeline.num_envs, 64)
            sim = self._make_sim(n, self.cfg.seed + 10_000)
            episodes = self.cfg.run.eval_episodes
            progress = EvalProgress(
                episodes, label="final eval", log_level=self.cfg.run.log_level, log_lines=False
            )
            try:
                eval_result = evaluate(
                    self.policy,
                    sim,
                    self.cfg.simulator.name,
                    episodes,
                    on_episode=progress.on_episode,
                )
            finally:
                progress.close()
                sim.close()
        acc = self.accounting
        summary = RunSummary(
            name=self.cfg.name,
            mode=self.cfg.pipeline.mode,
            run_dir=str(self.rundir.root),
            stop_reason=self.stop_reason,
            iterations=self.learn.iteration,
            policy_version=self.learn.version,
            env_steps=acc.env_steps,
            wall_s=round(wall, 3),
            env_steps_per_s=(acc.env_steps - self._base[0]) / max(wall, 1e-9),
            success_rate=acc.success_rate(),
            eval=eval_result,
            lanes=self.lane_shares(wall),
            accounting=acc.as_dict(),
            infer_mean_batch=self.infer_mean_batch(),
            weight_sync=self.weight_sync(),
            staleness={str(k): v for k, v in sorted(self.learn.staleness_seen.items())},
            infer=self.infer_report(),
            memory=self.memory_report(),
            staleness_gate=self.gate.status() if self.gate else {},
        )
        self.rundir.write_summary(asdict(summary))
        self.state = "stopped"
        return summary
