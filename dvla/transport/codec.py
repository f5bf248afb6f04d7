"""Message bodies: pipeline records to msgpack maps and back, validated on receipt.

Each message type has a fixed set of fields with fixed types. A received body is checked
field by field before anything reaches a lane, so a malformed message closes its one
connection with a precise reason instead of failing deep inside a simulator or learner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dvla.data import ActionBatch, ObsBatch, Trajectory, TrajectoryGroup
from dvla.transport.frames import BATCHABLE, FrameError, MsgType

#: Field name -> expected Python/numpy type, per message type (the schema of protocol.md).
_SCHEMAS: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.HELLO: {"role": (str,), "peer": (str,), "nonce": (bytes,), "host": (str,)},
    MsgType.AUTH: {"proof": (bytes,)},
    MsgType.ACK: {"producer": (str,), "seq": (int,)},
    MsgType.OBS_BATCH: {
        "req": (int,),
        "images": (dict,),
        "proprio": (np.ndarray,),
        "instructions": (list,),
    },
    MsgType.ACTION_BATCH: {
        "req": (int,),
        "actions": (np.ndarray,),
        "tokens": (np.ndarray,),
        "logprobs": (np.ndarray,),
        "version": (int,),
    },
    MsgType.TRAJ_CHUNK: {
        "producer": (str,),
        "seq": (int,),
        "group": (dict,),
        "trajectories": (list,),
    },
    MsgType.HEARTBEAT: {"t": (float, int)},
    MsgType.ERROR: {"code": (str,), "message": (str,)},
    MsgType.CLOSE: {"reason": (str,)},
    MsgType.BATCH: {"type": (int,), "items": (list,)},
    MsgType.CONTROL: {"op": (str,), "data": (dict,)},
}
#: Optional fields (same format); anything else is rejected.
_OPTIONAL: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.HELLO: {"unix": (str,)},
    MsgType.TRAJ_CHUNK: {"stats": (dict,)},
}
_TRAJ_FIELDS: dict[str, tuple[type, ...]] = {
    "producer": (str,),
    "seq": (int,),
    "group_id": (int,),
    "task_id": (int,),
    "init_state_id": (int,),
    "instruction": (str,),
    "images": (dict,),
    "proprio": (np.ndarray,),
    "tokens": (np.ndarray,),
    "logprobs": (np.ndarray,),
    "versions": (np.ndarray,),
    "rewards": (np.ndarray,),
    "success": (bool,),
}
# dtype objects, not scalar types: comparing against a type converts it on every call.
_F32, _I64 = np.dtype(np.float32), np.dtype(np.int64)
_ACT_DT = {"actions": _F32, "tokens": _I64, "logprobs": _F32}
_PROPRIO_DT = {"proprio": _F32}
_TRAJ_DT = {"proprio": _F32, "tokens": _I64, "logprobs": _F32, "versions": _I64, "rewards": _F32}
_GROUP_FIELDS: dict[str, tuple[type, ...]] = {
    "group_id": (int,),
    "task_id": (int,),
    "init_state_id": (int,),
}


def _check(
    where: str,
    body: Any,
    fields: dict[str, tuple[type, ...]],
    optional: dict[str, tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise FrameError("schema", f"{where}: body must be a map, got {type(body).__name__}")
    optional = optional or {}
    # The hot path of every message: the common case costs one type() per field.
    for key, types in fields.items():
        value = body.get(key, _ABSENT)
        if type(value) is not types[0] and not _type_ok(value, types):
            if value is _ABSENT:
                raise FrameError("schema", f"{where}: missing field '{key}'")
            _type_error(where, key, value, types)
    if len(body) != len(fields):
        for key, value in body.items():
            if key in fields:
                continue
            if key not in optional:
                raise FrameError("schema", f"{where}: unknown field '{key}'")
            if not _type_ok(value, optional[key]):
                _type_error(where, key, value, optional[key])
    return body


_ABSENT = object()


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass; a bool where an int is expected is still an error.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_error(where: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    want = " or ".join(t.__name__ for t in types)
    raise FrameError("schema", f"{where}: field '{key}' must be {want}, got {type(value).__name__}")


def validate(msg_type: MsgType, body: Any) -> dict[str, Any]:
    """Check a decoded body against its message type's schema.

    Raises:
        FrameError: code ``schema`` naming the first offending field.
    """
    checked = _check(msg_type.name, body, _SCHEMAS[msg_type], _OPTIONAL.get(msg_type))
    deep = _DEEP.get(msg_type)
    if deep is None:
        return checked
    # Row counts, dtypes, nested records: a message is valid whole or not at all. The
    # record built while checking rides along, so the receiver does not build it twice.
    out = Body(checked)
    out.record = deep(checked)
    return out


class Body(dict[str, Any]):
    """A validated body; ``record`` is what its ``*_from_body`` converter returns."""

    record: Any = None


def _rows(
    where: str, arrays: dict[str, np.ndarray], n: int, dtypes: dict[str, Any] | None = None
) -> None:
    """Every array has ``n`` rows and, where ``dtypes`` names one, exactly that dtype."""
    for key, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise FrameError("schema", f"{where}: '{key}' has {arr.shape} rows, expected {n}")
        want = (dtypes or {}).get(key)
        if want is not None and arr.dtype != want:
            raise FrameError(
                "schema", f"{where}: '{key}' must be {np.dtype(want)}, not {arr.dtype}"
            )


def _strings(where: str, key: str, items: list[Any]) -> list[str]:
    if not all(isinstance(s, str) for s in items):
        raise FrameError("schema", f"{where}: '{key}' must be a list of strings")
    return items


def _images(where: str, images: dict[Any, Any]) -> dict[str, np.ndarray]:
    for cam, arr in images.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim < 1:
            raise FrameError("schema", f"{where}: image '{cam}' must be a uint8 tensor")
    return images


# ----------------------------------------------------------------- observations
def obs_body(req: int, obs: ObsBatch) -> dict[str, Any]:
    """An OBS_BATCH body; arrays travel as tensor references, not copies."""
    return {
        "req": req,
        "images": obs.images,
        "proprio": obs.proprio,
        "instructions": obs.instructions,
    }


def obs_from_body(body: dict[str, Any]) -> tuple[int, ObsBatch]:
    """The request id and observations of a validated OBS_BATCH body."""
    if isinstance(body, Body) and body.record is not None:
        return body.record  # type: ignore[no-any-return]
    where = "OBS_BATCH"
    instructions = _strings(where, "instructions", body["instructions"])
    images = _images(where, body["images"])
    n = len(instructions)
    _rows(where, {"proprio": body["proprio"]}, n, _PROPRIO_DT)
    _rows(where, images, n)
    return body["req"], ObsBatch(images, body["proprio"], instructions)


# ----------------------------------------------------------------- actions
def action_body(req: int, act: ActionBatch) -> dict[str, Any]:
    """An ACTION_BATCH body answering request ``req``."""
    return {
        "req": req,
        "actions": act.actions,
        "tokens": act.tokens,
        "logprobs": act.logprobs,
        "version": act.version,
    }


def action_from_body(body: dict[str, Any]) -> tuple[int, ActionBatch]:
    """The request id and actions of a validated ACTION_BATCH body."""
    if isinstance(body, Body) and body.record is not None:
        return body.record  # type: ignore[no-any-return]
    n = len(body["actions"]) if body["actions"].ndim else -1
    _rows("ACTION_BATCH", {k: body[k] for k in ("actions", "tokens", "logprobs")}, n, _ACT_DT)
    return body["req"], ActionBatch(
        body["actions"], body["tokens"], body["logprobs"], body["version"]
    )


# ----------------------------------------------------------------- trajectories
def traj_to_dict(t: Trajectory) -> dict[str, Any]:
    """One trajectory as a TRAJ_CHUNK entry."""
    return {
        "producer": t.producer,
        "seq": t.seq,
        "group_id": t.group_id,
        "task_id": t.task_id,
        "init_state_id": t.init_state_id,
        "instruction": t.instruction,
        "images": t.images,
        "proprio": t.proprio,
        "tokens": t.tokens,
        "logprobs": t.logprobs,
        "versions": t.versions,
        "rewards": t.rewards,
        "success": t.success,
    }


def traj_from_dict(d: Any) -> Trajectory:
    """Validate a TRAJ_CHUNK entry and build the trajectory (arrays stay views)."""
    where = "TRAJ_CHUNK trajectory"
    d = _check(where, d, _TRAJ_FIELDS)
    images = _images(where, d["images"])
    n = len(d["tokens"]) if d["tokens"].ndim else -1
    if n < 1:
        raise FrameError("schema", f"{where}: a trajectory needs at least one step")
    _rows(where, {k: d[k] for k in _TRAJ_DT}, n, _TRAJ_DT)
    _rows(where, images, n)
    return Trajectory(**{**d, "images": images})


def chunk_body(producer: str, seq: int, group: TrajectoryGroup) -> dict[str, Any]:
    """A TRAJ_CHUNK carrying one complete group of trajectories."""
    return {
        "producer": producer,
        "seq": seq,
        "group": {
            "group_id": group.group_id,
            "task_id": group.task_id,
            "init_state_id": group.init_state_id,
        },
        "trajectories": [traj_to_dict(t) for t in group.trajectories],
    }


def group_from_body(body: dict[str, Any]) -> TrajectoryGroup:
    """The group of a validated TRAJ_CHUNK body."""
    if isinstance(body, Body) and body.record is not None:
        return body.record  # type: ignore[no-any-return]
    g = _check("TRAJ_CHUNK group", body["group"], _GROUP_FIELDS)
    trajs = [traj_from_dict(t) for t in body["trajectories"]]
    if not trajs:
        raise FrameError("schema", "TRAJ_CHUNK: a chunk carries at least one trajectory")
    for t in trajs:
        if t.group_id != g["group_id"]:
            raise FrameError("schema", "TRAJ_CHUNK: a trajectory belongs to another group")
    return TrajectoryGroup(g["group_id"], g["task_id"], g["init_state_id"], trajs)


def batch_body(msg_type: MsgType, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """A BATCH body: several messages of one type in one frame, sharing its blob section."""
    return {"type": int(msg_type), "items": bodies}


def batch_from_body(body: dict[str, Any]) -> list[tuple[MsgType, dict[str, Any]]]:
    """The messages of a BATCH body, each validated as if it had come in its own frame."""
    if isinstance(body, Body) and body.record is not None:
        return body.record  # type: ignore[no-any-return]
    code = body["type"]
    if code not in _BATCHABLE_CODES:
        raise FrameError("schema", f"BATCH: message type {code} cannot be batched")
    mtype = MsgType(code)
    if not body["items"]:
        raise FrameError("schema", "BATCH: no items")
    return [(mtype, validate(mtype, item)) for item in body["items"]]


_BATCHABLE_CODES = frozenset(int(t) for t in BATCHABLE)

_DEEP: dict[MsgType, Any] = {
    MsgType.BATCH: batch_from_body,
    MsgType.OBS_BATCH: obs_from_body,
    MsgType.ACTION_BATCH: action_from_body,
    MsgType.TRAJ_CHUNK: group_from_body,
}
