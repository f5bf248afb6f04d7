"""Building the policy, and exporting it, the one way every part of a run does.

The learner, each sampler process's inference replica, ``dvla eval`` and ``dvla
export`` must build bit-for-bit the same module (same parameters, value head included),
or weights published by one would not load into another. So they all call
:func:`build_policy`.

An export is a directory any of them, and tools outside dvla, can read:
``model.safetensors`` (the state dict; safetensors cannot carry code, unlike a pickle),
``dvla-policy.json`` (the model section, the simulator's spec, the policy version), and
whatever the backend's :meth:`~dvla.backends.base.Policy.save_pretrained` adds (a
transformers backend writes the library's own model directory, LoRA merged).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dvla import logs, registry
from dvla.backends.base import Policy, SimulatorSpec, TaskSpec
from dvla.config import PipelineFile
from dvla.errors import ConfigError, DvlaError, ModelError

log = logs.get(__name__)

EXPORT_FORMAT = "dvla-policy/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "dvla-policy.json"


def build_policy(cfg: PipelineFile, spec: SimulatorSpec, source: str = "<config>") -> Policy:
    """The configured model for ``spec``, with a value head if the algorithm needs one.

    Raises:
        ConfigError: bad options, or a model that does not fit the simulator.
        ModelError: the model's files are missing or unreadable.
        PluginError: the model or algorithm is not installed.
    """
    model_cls, model_opts = registry.build_options("model", cfg.model, source)
    algo_cls = registry.resolve("algorithm", cfg.algorithm.name)
    try:
        policy: Policy = model_cls(model_opts, spec)
    except DvlaError:
        raise
    except Exception as err:
        raise ModelError(
            f"model '{cfg.model.name}' failed to build: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if getattr(algo_cls, "needs_values", False):
        try:
            policy.enable_value_head()
        except ConfigError as err:
            raise ConfigError(f"algorithm '{cfg.algorithm.name}': {err}") from None
    return policy


def spec_to_json(spec: SimulatorSpec) -> dict[str, Any]:
    """The spec as JSON-able data, so an export can rebuild the model without a simulator."""
    return asdict(spec)


def spec_from_json(doc: Mapping[str, Any]) -> SimulatorSpec:
    """Inverse of :func:`spec_to_json`; raises KeyError/TypeError on a malformed doc."""
    return SimulatorSpec(
        cameras={str(k): (int(v[0]), int(v[1])) for k, v in doc["cameras"].items()},
        proprio_dim=int(doc["proprio_dim"]),
        action_dim=int(doc["action_dim"]),
        max_episode_steps=int(doc["max_episode_steps"]),
        tasks=tuple(
            TaskSpec(str(t["instruction"]), int(t["num_init_states"])) for t in doc["tasks"]
        ),
    )


def export_policy(policy: Policy, cfg: PipelineFile, directory: Path, version: int) -> Path:
    """Write ``policy`` to ``directory`` (replaced atomically as a whole).

    The directory is built beside its final name and renamed into place, so a reader
    never sees half an export, and a failed export leaves the previous one intact.

    Returns:
        ``directory``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in policy.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    extra = policy.save_pretrained(tmp)
    meta = {
        "format": EXPORT_FORMAT,
        "model": cfg.model.model_dump(mode="json"),
        "algorithm": cfg.algorithm.name,
        "policy_version": version,
        "spec": spec_to_json(policy.spec),
        "files": [WEIGHTS_FILE, *extra],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def is_export(path: Path) -> bool:
    """Whether ``path`` is a directory :func:`export_policy` wrote."""
    return path.is_dir() and (path / META_FILE).is_file()


def read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and weights of an export directory.

    Raises:
        ConfigError: not an export, or its files are unreadable or of another format.
    """
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path / META_FILE}: cannot read the export's metadata ({err})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(
            f"{path}: not a dvla policy export (format {got!r}, want {EXPORT_FORMAT})"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise ConfigError(f"{path / WEIGHTS_FILE}: cannot read the weights ({err})") from None
    return meta, state


def load_weights(
    policy: Policy, state: Mapping[str, torch.Tensor], source: str, model_name: str
) -> None:
    """Load ``state`` into ``policy``, or say in one line why it does not fit.

    torch's own message lists every key over many lines; the first missing, unexpected
    or mis-shaped key is enough to see that the file belongs to another architecture
    (or another model option, e.g. a different head or no value head).

    Args:
        policy: the freshly built model.
        state: the weights read from ``source``.
        source: how the error names where the weights came from (``--checkpoint P``).
        model_name: the configured model backend, for the message.

    Raises:
        ConfigError: the weights are not ``policy``'s.
    """
    from dvla.cluster.checkpoint import load_error_line

    own = policy.state_dict()
    what = f"{source}: weights do not fit model '{model_name}'"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r} ({len(missing)} missing)")
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
        raise ConfigError(f"{what}: {', '.join(parts)}")
    for key, mine in own.items():
        theirs = state[key]
        if theirs.shape != mine.shape:
            raise ConfigError(
                f"{what}: {key!r} has shape {list(theirs.shape)} in the file, "
                f"{list(mine.shape)} in the model"
            )
    try:
        policy.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"{what}: {load_error_line(err)}") from None
