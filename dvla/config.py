"""Typed pipeline configuration, loaded from YAML.

A pipeline file is validated twice: once against the core schema below (every section
and field dvla itself understands), then each backend section against the options model
of the backend it names (see :mod:`dvla.registry`). Both passes reject unknown keys and
report the first problem as one line: file, YAML path of the field, what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from dvla.errors import ConfigError


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendOptions(Strict):
    """Base for the options model a backend declares as its ``Options`` attribute."""


class BackendSection(BaseModel):
    """A section that names a backend; every other key is that backend's option."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="Entry-point name of the backend (see `dvla plugins`).")

    def options(self) -> dict[str, Any]:
        """The keys meant for the backend itself."""
        return dict(self.model_extra or {})


class RunConfig(Strict):
    """How long to run, where to write, and when to call it done."""

    dir: str | None = Field(None, description="Run directory; default runs/<name>-<UTC timestamp>.")
    max_iterations: int = Field(1000, ge=1, description="Stop after this many learner updates.")
    max_env_steps: int | None = Field(
        None, ge=1, description="Stop after this many simulator steps (all envs together)."
    )
    max_wall_seconds: float = Field(
        300.0, gt=0, description="Stop after this much wall time, whatever else is left."
    )
    target_success: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Stop early once the rolling training success rate reaches this.",
    )
    success_window: int = Field(
        256, ge=1, description="Episodes in the rolling success-rate window."
    )
    eval_episodes: int = Field(
        0, ge=0, description="Greedy-policy episodes run after training for the final score."
    )
    progress_interval_s: float = Field(
        2.0, gt=0, description="Seconds between live progress lines."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Console log level; the JSON log file always gets debug."
    )
    tensorboard: Literal["auto"] | bool = Field(
        "auto",
        description="TensorBoard scalars per iteration in <run dir>/tensorboard/. auto: "
        "when the tensorboard package is installed (the [tensorboard] extra); true: "
        "required (an error without it); false: never.",
    )


class InferConfig(Strict):
    """Batching of observation requests into policy forwards."""

    max_batch: int = Field(512, ge=1, description="Most observations in one policy forward.")
    max_wait_ms: float = Field(
        2.0, ge=0, description="Longest wait for more requests before a partial batch runs."
    )


class MemoryConfig(Strict):
    """Rollout and training memory: two pools of buffers preallocated for the whole run.

    Observation and trajectory buffers come from the rollout pool and learner batches from
    the train pool, so the steady state allocates no large arrays per step; on CUDA the
    policy's inference and training allocations also go to separate allocator pools, so a
    training peak cannot fragment or evict what inference has cached.
    """

    pinned: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Page-locked host memory for buffers copied to the GPU. auto: the "
        "inference staging and learner batch buffers, where CUDA exists; on: every pool "
        "buffer, trajectory slots included (pinned memory cannot be swapped: size it); "
        "off: none.",
    )
    cuda_pools: bool = Field(
        True,
        description="On CUDA, route inference and training allocations to two separate "
        "torch.cuda.MemPool caching pools; no effect without CUDA.",
    )
    trajectory_slots: int | None = Field(
        None,
        ge=1,
        description="Finished-trajectory slots of each sample lane's ring; default computed "
        "from the queue and batch sizes (see dvla/pipeline/memory.py). A full ring never "
        "blocks: extra trajectories get fresh arrays and are counted as overflow.",
    )


class PipelineConfig(Strict):
    """The swimlane pipeline: lane sizes, queues, staleness."""

    mode: Literal["async", "sync"] = Field(
        "async",
        description="async: the four lanes overlap; sync: sample, infer, learn, sync in turn.",
    )
    num_envs: int = Field(64, ge=1, description="Simulator environments in the sample lane.")
    shards: int = Field(
        2,
        ge=1,
        description="Env shards stepped independently so simulation overlaps inference.",
    )
    groups_per_iteration: int = Field(
        16, ge=1, description="Rollout groups the learner consumes per update."
    )
    max_staleness: int = Field(
        2,
        ge=0,
        description="Most policy versions a trajectory may lag the learner; older is dropped.",
    )
    importance_correction: bool = Field(
        True,
        description="Reweight stale-but-allowed samples by truncated importance ratios.",
    )
    staleness_gate: bool = Field(
        True,
        description="Start a rollout group only while fewer than groups_per_iteration x "
        "(max_staleness + 1) groups are unconsumed and the acting policy is at most "
        "max_staleness versions behind the learner, so samplers do not produce data the "
        "learner must drop (with max_staleness 0: only on-policy data). In-process sample "
        "lanes; sampler processes rely on the learner's drop alone.",
    )
    queue_groups: int = Field(
        16, ge=1, description="Bound of the trajectory queue (in groups): backpressure."
    )
    torch_threads: int = Field(
        1, ge=1, description="Intra-op threads per torch call; lanes give the parallelism."
    )
    lane_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest a single lane step may take before the run fails as hung.",
    )
    sample_processes: int = Field(
        0,
        ge=0,
        description="0: simulators run in this process; N: in N sampler processes that talk "
        "to the coordinator over the data plane (async mode only).",
    )
    inference: Literal["coordinator", "samplers"] = Field(
        "coordinator",
        description="Where the policy's forward runs: in the coordinator (sampler processes "
        "ask it over the data plane), or in every sampler process on its own replica that "
        "the weight plane keeps up to date (needs sample_processes >= 1).",
    )
    infer: InferConfig = Field(default_factory=InferConfig)  # type: ignore[arg-type]
    memory: MemoryConfig = Field(default_factory=MemoryConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _shards_fit(self) -> PipelineConfig:
        if self.shards > self.num_envs:
            raise ValueError(f"shards ({self.shards}) cannot exceed num_envs ({self.num_envs})")
        if self.inference == "samplers" and not self.sample_processes:
            raise ValueError("inference: samplers needs sample_processes >= 1")
        if self.sample_processes:
            if self.mode != "async":
                raise ValueError("sample_processes needs mode: async")
            if self.sample_processes > self.shards:
                raise ValueError(
                    f"sample_processes ({self.sample_processes}) cannot exceed "
                    f"shards ({self.shards})"
                )
        return self


class TlsConfig(Strict):
    """Certificates for TLS on data-plane TCP between hosts; both ends verify each other."""

    cert: str = Field(description="PEM certificate of this end.")
    key: str = Field(description="PEM private key of this end.")
    ca: str = Field(description="PEM CA bundle the peer's certificate must chain to.")


class DataPlaneConfig(Strict):
    """The msgpack-framed channels that carry observations, actions and trajectories."""

    transport: Literal["auto", "tcp", "unix", "ucx"] = Field(
        "auto",
        description="auto: a Unix socket when both ends share a host, else TCP; "
        "ucx needs the [ucx] extra.",
    )
    host: str = Field(
        "127.0.0.1", description="Address the coordinator listens on (loopback by default)."
    )
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    # SecretStr: dumps (config.yaml in the run directory, logs) show '**********'.
    secret: SecretStr | None = Field(
        None,
        description="Shared secret for the HMAC handshake; default: the secret_env variable, "
        "or a fresh random one for processes that `dvla run` starts itself.",
    )
    secret_env: str = Field("DVLA_SECRET", description="Environment variable holding the secret.")
    tls: TlsConfig | None = Field(None, description="TLS for TCP between hosts.")
    max_frame_bytes: int = Field(
        256 * 1024 * 1024, ge=4096, description="Largest frame accepted; larger closes the link."
    )
    send_queue_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes queued per connection before senders wait (backpressure).",
    )
    handshake_timeout_s: float = Field(
        5.0, gt=0, description="A peer must complete the handshake within this."
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="An idle connection sends a heartbeat this often."
    )
    heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="A connection silent for this long is closed as dead."
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Longest a sender keeps retrying to (re)connect."
    )
    unacked_chunks: int = Field(
        32, ge=1, description="Trajectory chunks in flight without an ack before senders wait."
    )

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> DataPlaneConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        return self


class WeightPlaneConfig(Strict):
    """The control plane that carries new weights from the learner to inference replicas."""

    backend: Literal["auto", "tcp", "gloo", "nccl"] = Field(
        "auto",
        description="auto: nccl where cupy's NCCL and a GPU are present, else tcp "
        "(authenticated, topology-aware relaying); gloo uses torch.distributed's broadcast.",
    )
    host: str = Field(
        "127.0.0.1", description="Address the publisher and receivers listen on (loopback)."
    )
    advertise_host: str | None = Field(
        None, description="Address peers dial, when it differs from host (e.g. host: 0.0.0.0)."
    )
    port: int = Field(0, ge=0, le=65535, description="Publisher's control port; 0 picks one.")
    bucket_mb: float = Field(
        64.0, gt=0, description="Bucket size: the unit of checksums and of gloo/NCCL calls."
    )
    plan: Literal["topology", "flat"] = Field(
        "topology",
        description="topology: a pipelined chain across nodes, then within each node; "
        "flat: the learner sends every receiver its own copy (the baseline).",
    )
    topology: str | None = Field(
        None, description="Topology YAML (see configs/topology/); default: detect, else flat."
    )
    min_bandwidth_mbps: float = Field(
        50.0,
        gt=0,
        description="Slowest acceptable rate (MB/s): a round's deadline is "
        "deadline_base_s + bytes / this.",
    )
    deadline_base_s: float = Field(10.0, gt=0, description="Fixed part of every round's deadline.")
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="Publisher pings receivers this often."
    )
    heartbeat_timeout_s: float = Field(
        10.0, gt=0, description="A receiver silent this long is dropped from the group."
    )
    low_priority: bool = Field(
        False,
        description="Run weight-transfer threads at a lower CPU nice level, so the data "
        "plane wins a contended core. Off by default: a lowered thread that holds the "
        "interpreter lock when preempted stalls its whole process (measured: 4x slower "
        "rounds and fewer learner updates on 2 cores); see docs/weight-plane.md.",
    )

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> WeightPlaneConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        return self

    @property
    def bucket_bytes(self) -> int:
        return max(64, int(self.bucket_mb * 1024 * 1024) // 64 * 64)

    def deadline_s(self, nbytes: int) -> float:
        """How long one round of ``nbytes`` may take before it counts as failed."""
        return self.deadline_base_s + nbytes / (self.min_bandwidth_mbps * 1e6)


class PlacementConfig(Strict):
    """Which worker hosts which sampler process, and what each process needs.

    The learner (learn lane and the weight publisher of the sync lane) runs with the
    coordinator; the infer lane runs there too, or in every sampler process when
    ``pipeline.inference: samplers``; the sample lane's ``pipeline.sample_processes``
    processes (slots) are spread over the workers that have room for them.
    """

    processes_per_worker: int = Field(
        0, ge=0, description="Most sampler processes one worker runs; 0: as its resources allow."
    )
    cpus_per_process: float = Field(1.0, ge=0, description="CPU cores one sampler process needs.")
    memory_gb_per_process: float = Field(
        0.5, ge=0, description="Memory (GB) one sampler process needs, simulators included."
    )
    gpus_per_process: float = Field(0.0, ge=0, description="GPUs one sampler process needs.")


class ClusterConfig(Strict):
    """Coordinator and workers: registration, liveness, placement, stopping, HTTP API."""

    listen: str | None = Field(
        None,
        description="HOST:PORT the coordinator serves workers and sampler processes on "
        "(one port for both); default: data_plane.host and data_plane.port.",
    )
    local_workers: int = Field(
        1,
        ge=0,
        description="Workers the coordinator starts in its own process (`dvla run` uses "
        "them; 0: only remote `dvla-worker`s host sampler processes).",
    )
    min_workers: int = Field(
        1,
        ge=1,
        description="Sampler slots are first placed once this many workers have joined, so "
        "they spread over the cluster instead of filling the first worker to arrive.",
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, description="Workers report this often.")
    heartbeat_timeout_s: float = Field(
        2.0,
        gt=0,
        description="A heartbeat is missed when none arrives within this of the previous one.",
    )
    heartbeat_misses: int = Field(
        3,
        ge=1,
        description="Missed heartbeats in a row after which a worker is declared dead and its "
        "sampler processes are placed elsewhere (detection within misses x timeout).",
    )
    restart_backoff_s: float = Field(
        1.0, ge=0, description="First delay before a crashed sampler process is restarted."
    )
    reconnect_max_s: float = Field(
        10.0, gt=0, description="Longest (jittered) pause between a worker's reconnect attempts."
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="SIGTERM/SIGINT or POST /stop: lanes drain, a final checkpoint is written "
        "and the coordinator exits within this.",
    )
    http: bool = Field(True, description="Serve /healthz, /status, /metrics and POST /stop.")
    http_host: str = Field("127.0.0.1", description="Address of the HTTP API (loopback).")
    http_port: int = Field(0, ge=0, le=65535, description="Port of the HTTP API; 0 picks one.")
    http_token_env: str | None = Field(
        None,
        description="Environment variable with the bearer token POST /stop requires; default: "
        "the data-plane secret (plain HTTP carries it in the clear: off loopback, set this).",
    )
    placement: PlacementConfig = Field(default_factory=PlacementConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _timeouts_fit(self) -> ClusterConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        return self

    @property
    def dead_after_s(self) -> float:
        """Silence after which a worker is declared dead."""
        return self.heartbeat_timeout_s * self.heartbeat_misses


class CheckpointConfig(Strict):
    """Training-state checkpoints: what ``--resume`` continues from."""

    every_iterations: int = Field(
        0, ge=0, description="Write a checkpoint every this many learner updates; 0: never."
    )
    keep: int = Field(3, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    final: bool = Field(True, description="Write one when the run stops (also on SIGTERM).")
    dir: str | None = Field(None, description="Where; default <run dir>/checkpoints.")


class PipelineFile(Strict):
    """A whole pipeline file."""

    name: str = Field("pipeline", description="Name used for the run directory and logs.")
    seed: int = Field(0, description="Seeds simulators, model initialisation and sampling.")
    run: RunConfig = Field(default_factory=RunConfig)  # type: ignore[arg-type]
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)  # type: ignore[arg-type]
    data_plane: DataPlaneConfig = Field(default_factory=DataPlaneConfig)  # type: ignore[arg-type]
    weight_plane: WeightPlaneConfig = Field(default_factory=WeightPlaneConfig)  # type: ignore[arg-type]
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)  # type: ignore[arg-type]
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)  # type: ignore[arg-type]
    simulator: BackendSection
    model: BackendSection
    algorithm: BackendSection
    optimizer: BackendSection


_BACKEND_SECTIONS = ("simulator", "model", "algorithm", "optimizer")


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's multi-line report into the one line a user reads first."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "<top level>")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"]
        if "input" in first and not isinstance(first["input"], (dict, list)):
            msg += f" (got {first['input']!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {path}: {msg}{more}"


def parse_config(data: Any, source: str = "<config>") -> PipelineFile:
    """Validate already-parsed YAML data against the core schema."""
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "an empty document"
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    try:
        return PipelineFile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (YAML keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file safely, rejecting duplicate keys, with one-line errors.

    Raises:
        ConfigError: the file cannot be read or is not valid YAML (with line and column).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineFile:
    """Read and validate a pipeline file.

    Args:
        path: the YAML file.
        overrides: dotted keys (``run.max_iterations``) replacing values from the file,
            as the CLI's ``--set`` passes them.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or fails validation.
    """
    p = Path(path)
    data = read_yaml(p, "pipeline file")
    if overrides and isinstance(data, dict):
        for dotted, value in overrides.items():
            apply_override(data, dotted, value)
    return parse_config(data, str(p))


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating missing levels."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a mapping in the file")
        node = child
    node[keys[-1]] = value


def backend_sections(cfg: PipelineFile) -> dict[str, BackendSection]:
    """The four backend sections by name, in a fixed order."""
    return {name: getattr(cfg, name) for name in _BACKEND_SECTIONS}
