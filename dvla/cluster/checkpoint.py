"""Training-state checkpoints for the coordinator daemon.

A coordinator that dies (node loss, OOM kill, pre-emption) must resume from exactly the
state it saved, or a resumed run silently trains a different model than the one logged.
So a checkpoint holds everything the learner's next step depends on: weights, optimizer
moments, every RNG the run draws from, the accounting counters and the data cursor.

Files are written with :func:`torch.save` but only ever read back with
``torch.load(weights_only=True)``: a checkpoint directory may be shared or copied between
machines, and an unrestricted unpickler would run whatever code a tampered file names.
That is why the saved object is a plain tree of tensors and primitives, why numpy's RNG
state is converted to a tensor, and why :meth:`CheckpointStore.load` checks every type
before trusting the contents.

Writes are atomic (temporary file, fsync, rename, directory fsync) so a crash mid-save
leaves the previous checkpoint intact; :meth:`CheckpointStore.latest` still skips broken
files, because a disk can lose data the rename already promised.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvla import logs
from dvla.errors import ConfigError, DvlaError

log = logs.get(__name__)

FORMAT = "dvla-checkpoint"
FORMAT_VERSION = 1

_NAME = re.compile(r"ckpt-(\d{9,})\.pt")
_TMP_PREFIX = ".ckpt-"
_TMP_SUFFIX = ".tmp"
# Bounds the validator's recursion: a hostile file can nest lists far deeper than any
# optimizer state, and a RecursionError would escape as a bug instead of a bad file.
_MAX_DEPTH = 32
_FIELDS = (
    "iteration",
    "policy_version",
    "model",
    "optimizer",
    "rng",
    "counters",
    "cursor",
    "meta",
)
_NUMPY_KEY_LEN = 624


@dataclass
class TrainingState:
    """Everything the learner's next update depends on, as saved and restored."""

    iteration: int
    policy_version: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    counters: dict[str, int | float]
    cursor: dict[str, int]
    meta: dict[str, str | int | float]


class CheckpointError(DvlaError):
    """A checkpoint file cannot be read or does not hold a valid training state.

    Carries the path and the bare reason separately so :meth:`CheckpointStore.latest` can
    log why it skipped a file without parsing the message.
    """

    def __init__(self, path: Path, reason: str, what: str = "not a valid dvla checkpoint") -> None:
        super().__init__(f"{path}: {what}: {reason}")
        self.path = path
        self.reason = reason


class _Invalid(Exception):
    """Internal: a structural problem found while validating a loaded object."""


class CheckpointStore:
    """A directory of ``ckpt-{iteration:09d}.pt`` files, newest kept, oldest pruned."""

    def __init__(self, directory: Path, keep: int) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"checkpoint keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, iteration: int) -> Path:
        return self.directory / f"ckpt-{iteration:09d}.pt"

    def save(self, state: TrainingState) -> Path:
        """Write ``state`` atomically, then prune to the ``keep`` newest checkpoints.

        Returns:
            The final path of the new checkpoint.

        Raises:
            CheckpointError: ``state`` holds values that a weights-only load could not
                read back; refusing here beats discovering it when resuming.
        """
        final = self.path_for(state.iteration)
        payload = _to_payload(state)
        try:
            _check_payload(payload, with_digest=False)
        except _Invalid as exc:
            raise CheckpointError(final, str(exc), what="refusing to save checkpoint") from None
        payload["digest"] = state_digest(payload["model"], payload["optimizer"])
        fd, tmp_name = tempfile.mkstemp(
            dir=self.directory,
            prefix=f"{_TMP_PREFIX}{state.iteration:09d}-",
            suffix=_TMP_SUFFIX,
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        self._prune(final)
        return final

    def paths(self) -> list[Path]:
        """Checkpoint files, highest iteration first."""
        found: list[tuple[int, Path]] = []
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        for p in entries:
            m = _NAME.fullmatch(p.name)
            if m is not None and p.is_file():
                found.append((int(m.group(1)), p))
        found.sort(key=lambda item: item[0], reverse=True)
        return [p for _, p in found]

    def latest(self) -> tuple[Path, TrainingState] | None:
        """The newest checkpoint that loads and validates, or None.

        A broken newest file (disk full, power loss after rename, manual tampering) must
        not strand a run whose older checkpoints are fine, so it is logged and skipped.
        """
        for p in self.paths():
            try:
                return p, self.load(p)
            except CheckpointError as exc:
                log.warning("checkpoint skipped", path=str(p), reason=exc.reason)
        return None

    def load(self, path: Path) -> TrainingState:
        """Read and validate one checkpoint file.

        Raises:
            CheckpointError: the file is missing, unreadable, refused by the weights-only
                unpickler, or does not have the structure and types of a checkpoint.
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                obj = torch.load(f, weights_only=True, map_location="cpu")
        except OSError as exc:
            raise CheckpointError(path, f"cannot read it ({exc.strerror or exc})") from None
        except Exception as exc:
            # Any failure of the restricted unpickler or the zip reader means a damaged
            # or foreign file; none of it can have run code from the file.
            raise CheckpointError(path, _load_failure(exc)) from None
        try:
            _check_payload(obj)
        except _Invalid as exc:
            raise CheckpointError(path, str(exc)) from None
        try:
            digest = state_digest(obj["model"], obj["optimizer"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(path, f"cannot digest its state ({exc})") from None
        if digest != obj["digest"]:
            raise CheckpointError(path, "model/optimizer digest mismatch (corrupted data)")
        return TrainingState(
            iteration=obj["iteration"],
            policy_version=obj["policy_version"],
            model=dict(obj["model"]),
            optimizer=obj["optimizer"],
            rng=obj["rng"],
            counters=dict(obj["counters"]),
            cursor=dict(obj["cursor"]),
            meta=dict(obj["meta"]),
        )

    def _prune(self, just_saved: Path) -> None:
        # The file just written is never pruned, even if higher iterations exist (a run
        # resumed from an older checkpoint): losing the only state of the current
        # history would be worse than keeping one file too many.
        for p in self.paths()[self.keep :]:
            if p == just_saved:
                continue
            p.unlink(missing_ok=True)
        try:
            saved_ns = just_saved.stat().st_mtime_ns
        except OSError:
            return
        for p in self.directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            # Only leftovers older than our own write: a newer one may belong to a save
            # still in flight in another process.
            try:
                if p.stat().st_mtime_ns < saved_ns:
                    p.unlink()
            except FileNotFoundError:
                pass


def capture_rng() -> dict[str, Any]:
    """Snapshot every global RNG a run draws from, in a weights-only-loadable form.

    numpy's ``get_state`` holds an ndarray, which the weights-only unpickler refuses, so
    its key is stored as an int64 tensor and converted back in :func:`restore_rng`.
    """
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):
        raise TypeError(f"numpy global RNG state is not legacy MT19937: {type(np_state)}")
    name, key, pos, has_gauss, cached = np_state
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        rng["cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the RNG states from :func:`capture_rng`.

    A CUDA state from a machine with a different number of GPUs is restored for the
    devices both have, with a warning: refusing would block resuming on a resized node.
    """
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    npr = rng["numpy"]
    key = npr["key"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            npr["bit_generator"],
            key,
            int(npr["pos"]),
            int(npr["has_gauss"]),
            float(npr["cached_gaussian"]),
        )
    )
    saved_cuda: list[torch.Tensor] = list(rng.get("cuda", []))
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda and len(saved_cuda) != present:
        log.warning("cuda rng devices differ", saved=len(saved_cuda), present=present)
    for i in range(min(len(saved_cuda), present)):
        torch.cuda.set_rng_state(saved_cuda[i], i)


def state_digest(model: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> str:
    """SHA-256 over the model and optimizer state, independent of dict order.

    Lets a resumed run prove it continues from exactly the saved state: every tensor
    contributes its dtype, shape and bytes, every other leaf its type and exact value
    (floats by ``float.hex``), and every dict its keys in a canonical order, so two
    states digest equal iff they are equal.
    """
    h = hashlib.sha256()
    _feed(h.update, {"model": model, "optimizer": optimizer}, 0)
    return h.hexdigest()


def _to_payload(state: TrainingState) -> dict[str, Any]:
    # Plain dicts: a state_dict is an OrderedDict with a ``_metadata`` attribute, which
    # is not part of the weights and only complicates what the file contains.
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iteration": state.iteration,
        "policy_version": state.policy_version,
        "model": dict(state.model),
        "optimizer": state.optimizer,
        "rng": state.rng,
        "counters": dict(state.counters),
        "cursor": dict(state.cursor),
        "meta": dict(state.meta),
    }


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some platforms and filesystems refuse to open or
    # fsync a directory, where there is nothing better to do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_error_line(exc: BaseException) -> str:
    """Boil a torch.load failure down to one line; its own messages span paragraphs.

    The paragraphs before a weights-only refusal advise ``weights_only=False``, which
    dvla never does, so only the refusal's reason is kept.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1]
        detail = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
        detail = detail.split(" Please use", 1)[0]
        return _clip(f"refused by weights-only loading: {detail}".rstrip(": "))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if isinstance(exc, EOFError) and not first:
        first = "file is empty or truncated"
    return _clip(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def _load_failure(exc: Exception) -> str:
    line = load_error_line(exc)
    return line if line.startswith("refused") else _clip(f"cannot decode it ({line})")


def _clip(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return _is_int(x) or isinstance(x, float)


def _check_payload(obj: object, *, with_digest: bool = True) -> None:
    """Raise _Invalid naming the first problem that would make ``obj`` unusable."""
    if not isinstance(obj, dict):
        raise _Invalid(f"top level is {type(obj).__name__}, not dict")
    if obj.get("format") != FORMAT:
        raise _Invalid(f"format field is {obj.get('format')!r}, not {FORMAT!r}")
    version = obj.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise _Invalid(f"unsupported format_version {version!r}")
    required = (*_FIELDS, "digest") if with_digest else _FIELDS
    missing = [k for k in required if k not in obj]
    if missing:
        raise _Invalid(f"missing {', '.join(missing)}")
    for field in ("iteration", "policy_version"):
        if not _is_int(obj[field]) or obj[field] < 0:
            raise _Invalid(f"{field} is {obj[field]!r}, not a non-negative int")
    if with_digest and not isinstance(obj["digest"], str):
        raise _Invalid("digest is not a string")
    _check_flat(obj["model"], "model", lambda v: isinstance(v, torch.Tensor), "tensor")
    _check_flat(obj["counters"], "counters", _is_num, "int or float")
    _check_flat(obj["cursor"], "cursor", _is_int, "int")
    _check_flat(
        obj["meta"], "meta", lambda v: isinstance(v, str) or _is_num(v), "str, int or float"
    )
    optimizer = obj["optimizer"]
    if not isinstance(optimizer, dict) or not all(isinstance(k, str) for k in optimizer):
        raise _Invalid("optimizer is not a dict with str keys")
    _check_tree(optimizer, "optimizer", 0)
    _check_rng(obj["rng"])


def _check_flat(value: object, name: str, ok: Callable[[object], bool], expected: str) -> None:
    if not isinstance(value, dict):
        raise _Invalid(f"{name} is {type(value).__name__}, not dict")
    for k, v in value.items():
        if not isinstance(k, str):
            raise _Invalid(f"{name} has non-str key {k!r}")
        if not ok(v):
            raise _Invalid(f"{name}[{k!r}] is {type(v).__name__}, not {expected}")


def _check_tree(value: object, where: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Invalid(f"{where} is nested too deeply")
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise _Invalid(f"{where} has key of type {type(k).__name__}")
            _check_tree(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_tree(v, f"{where}[{i}]", depth + 1)
        return
    raise _Invalid(f"{where} holds unsupported type {type(value).__name__}")


def _is_state_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 1


def _check_rng(rng: object) -> None:
    # Checked here rather than left to restore_rng, so a bad file is skipped by
    # latest() instead of crashing the resume half-way through restoring.
    if not isinstance(rng, dict):
        raise _Invalid(f"rng is {type(rng).__name__}, not dict")
    unknown = set(rng) - {"torch", "python", "numpy", "cuda"}
    if unknown:
        raise _Invalid(f"rng has unknown keys {sorted(map(str, unknown))}")
    for key in ("torch", "python", "numpy"):
        if key not in rng:
            raise _Invalid(f"rng is missing {key}")
    if not _is_state_tensor(rng["torch"]):
        raise _Invalid("rng.torch is not a 1-d uint8 tensor")
    py = rng["python"]
    if (
        not isinstance(py, tuple | list)
        or len(py) != 3
        or not _is_int(py[0])
        or not isinstance(py[1], tuple | list)
        or not all(_is_int(x) for x in py[1])
        or not (py[2] is None or isinstance(py[2], float))
    ):
        raise _Invalid("rng.python is not a random.getstate() tuple")
    npr = rng["numpy"]
    if (
        not isinstance(npr, dict)
        or npr.get("bit_generator") != "MT19937"
        or not isinstance(npr.get("key"), torch.Tensor)
        or npr["key"].dtype != torch.int64
        or tuple(npr["key"].shape) != (_NUMPY_KEY_LEN,)
        or not _is_int(npr.get("pos"))
        or not _is_int(npr.get("has_gauss"))
        or not isinstance(npr.get("cached_gaussian"), float)
    ):
        raise _Invalid("rng.numpy is not an MT19937 state")
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list | tuple) or not all(_is_state_tensor(t) for t in cuda):
        raise _Invalid("rng.cuda is not a list of 1-d uint8 tensors")


def _feed(write: Callable[[bytes], object], value: object, depth: int) -> None:
    """Write an unambiguous, type-tagged, length-prefixed encoding of ``value``."""
    if depth > _MAX_DEPTH:
        raise ValueError("state nested too deeply to digest")
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        write(b"X")
        _feed_str(write, str(t.dtype))
        shape = tuple(value.shape)
        write(struct.pack("<Q", len(shape)))
        for d in shape:
            write(struct.pack("<q", d))
        write(struct.pack("<Q", len(raw)))
        write(raw)
    elif value is None:
        write(b"N")
    elif isinstance(value, bool):
        write(b"B1" if value else b"B0")
    elif isinstance(value, int):
        _feed_str(write, str(value), tag=b"I")
    elif isinstance(value, float):
        text = value.hex() if math.isfinite(value) else repr(value)
        _feed_str(write, text, tag=b"F")
    elif isinstance(value, str):
        _feed_str(write, value)
    elif isinstance(value, bytes):
        write(b"Y" + struct.pack("<Q", len(value)) + value)
    elif isinstance(value, Mapping):
        items = sorted(((_encode(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        write(b"D" + struct.pack("<Q", len(items)))
        for key_bytes, v in items:
            write(key_bytes)
            _feed(write, v, depth + 1)
    elif isinstance(value, list | tuple):
        write((b"L" if isinstance(value, list) else b"T") + struct.pack("<Q", len(value)))
        for v in value:
            _feed(write, v, depth + 1)
    else:
        raise TypeError(f"cannot digest a value of type {type(value).__name__}")


def _feed_str(write: Callable[[bytes], object], text: str, tag: bytes = b"S") -> None:
    raw = text.encode("utf-8", "surrogatepass")
    write(tag + struct.pack("<Q", len(raw)) + raw)


def _encode(key: object) -> bytes:
    parts: list[bytes] = []
    _feed(parts.append, key, 0)
    return b"".join(parts)
