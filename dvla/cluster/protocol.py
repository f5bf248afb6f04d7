"""Control messages between the coordinator and its workers, and what a worker offers.

Control messages ride the data plane's authenticated connections as ``CONTROL`` frames
(``{"op": ..., "data": {...}}``), so a worker needs nothing but the coordinator's one
port and the shared secret. Each op has a fixed schema checked on receipt; a worker that
sends nonsense is refused with a reason, never trusted halfway.

Worker → coordinator: ``register``, ``heartbeat``, ``sampler_exit``, ``leaving``.
Coordinator → worker: ``welcome``, ``refuse``, ``assign``, ``revoke``, ``fenced``, ``stop``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from dvla.transport.frames import FrameError

#: Version of the control conversation; a worker speaking another one is refused.
CLUSTER_PROTOCOL = 1

_SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "register": {
        "protocol": (int,),
        "dvla": (str,),
        "name": (str,),
        "host": (str,),
        "host_id": (str,),
        "resources": (dict,),
        "pid": (int,),
        "resume": (str,),
    },
    "heartbeat": {"t": (float, int), "samplers": (list,)},
    "sampler_exit": {"slot": (int,), "producer": (str,), "code": (int,), "started": (int,)},
    "leaving": {"reason": (str,)},
    "welcome": {
        "worker_id": (str,),
        "session": (str,),
        "url": (str,),
        "config": (dict,),
        "group_size": (int,),
        "weights": (str,),
        "heartbeat_interval_s": (float, int),
        "resumed": (bool,),
    },
    "refuse": {"reason": (str,)},
    "assign": {
        "slot": (int,),
        "generation": (int,),
        "slots": (int,),
        "shard_envs": (list,),
        "first_shard": (int,),
    },
    "revoke": {"slot": (int,)},
    "fenced": {"reason": (str,)},
    "stop": {"reason": (str,)},
}
_SAMPLER_FIELDS: dict[str, tuple[type, ...]] = {
    "slot": (int,),
    "producer": (str,),
    "pid": (int,),
    "started": (int,),
    "restarts": (int,),
}


def _check(where: str, data: Any, schema: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise FrameError("schema", f"{where}: expected a map")
    for key, types in schema.items():
        if key not in data:
            raise FrameError("schema", f"{where}: field '{key}' is missing")
        value = data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(t.__name__ for t in types)
            raise FrameError("schema", f"{where}: field '{key}' must be {want}")
    extra = set(data) - set(schema)
    if extra:
        raise FrameError("schema", f"{where}: unknown field '{sorted(extra)[0]}'")
    return data


def parse(op: str, data: Any) -> dict[str, Any]:
    """Check one control message against its op's schema.

    Raises:
        FrameError: code ``schema``, naming the op and the first offending field.
    """
    schema = _SCHEMAS.get(op)
    if schema is None:
        raise FrameError("schema", f"unknown control op {op!r}")
    out = _check(op, data, schema)
    if op == "heartbeat":
        for item in out["samplers"]:
            _check("heartbeat sampler", item, _SAMPLER_FIELDS)
    if op == "assign" and not all(isinstance(n, int) and n > 0 for n in out["shard_envs"]):
        raise FrameError("schema", "assign: shard_envs must be positive integers")
    return out


def message(op: str, **data: Any) -> dict[str, Any]:
    """The CONTROL body of one message (checked, so a bug here fails loudly at the sender)."""
    return {"op": op, "data": parse(op, data)}


# Sanity bounds on what a worker may claim: beyond these it is a typo or an attack.
_MAX_CPUS = 4096
_MAX_MEMORY_GB = 65536.0
_MAX_GPUS = 64


@dataclass(frozen=True)
class Resources:
    """What a worker offers to sampler processes."""

    cpus: int
    memory_gb: float
    gpus: int

    @staticmethod
    def detect() -> Resources:
        """This host's cores (those this process may run on), memory and visible GPUs."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        return Resources(cpus, round(memory, 2), _gpu_count())

    @staticmethod
    def from_wire(data: dict[str, Any]) -> Resources:
        """Validate a worker's claim.

        Raises:
            ValueError: a one-line reason the claim is impossible.
        """
        cpus, mem, gpus = data.get("cpus"), data.get("memory_gb"), data.get("gpus")
        if not isinstance(cpus, int) or isinstance(cpus, bool) or not 1 <= cpus <= _MAX_CPUS:
            raise ValueError(f"cpus must be an integer from 1 to {_MAX_CPUS}, got {cpus!r}")
        if not isinstance(mem, int | float) or isinstance(mem, bool):
            raise ValueError(f"memory_gb must be a number, got {mem!r}")
        if not 0 < float(mem) <= _MAX_MEMORY_GB or mem != mem:
            raise ValueError(f"memory_gb must be in (0, {_MAX_MEMORY_GB:g}], got {mem!r}")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= _MAX_GPUS:
            raise ValueError(f"gpus must be an integer from 0 to {_MAX_GPUS}, got {gpus!r}")
        return Resources(cpus, float(mem), gpus)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


def _gpu_count() -> int:
    """Visible CUDA GPUs without initialising CUDA in this process (workers stay light)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()])
    except OSError:
        return 0
