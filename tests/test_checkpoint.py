"""Training-state checkpoints: round trips, pruning, atomicity and refusing bad files."""

from __future__ import annotations

import copy
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dvla.cluster.checkpoint import (
    CheckpointError,
    CheckpointStore,
    TrainingState,
    capture_rng,
    restore_rng,
    state_digest,
)
from dvla.errors import ConfigError, DvlaError


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class Evil:
    """Unpickling this with a full unpickler would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (str(self.marker),))


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, iteration: int) -> TrainingState:
    return TrainingState(
        iteration=iteration,
        policy_version=iteration + 100,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        rng=capture_rng(),
        counters={"produced": 10 * iteration, "consumed": 9 * iteration, "loss_sum": 1.5},
        cursor={"next_generation": iteration + 1},
        meta={"name": "test-run", "dvla_version": "0.1.0", "created_unix": time.time()},
    )


def _trained(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    model, opt = _model_and_opt()
    for i in range(steps):
        _step(model, opt, seed=i)
    return model, opt


def _save_n(store: CheckpointStore, iterations: list[int]) -> list[Path]:
    model, opt = _trained(1)
    return [store.save(_state(model, opt, it)) for it in iterations]


def test_round_trip_digest_and_continued_training(tmp_path: Path) -> None:
    model, opt = _trained(3)
    state = _state(model, opt, iteration=3)
    saved_digest = state_digest(state.model, state.optimizer)
    store = CheckpointStore(tmp_path / "ckpts", keep=3)
    path = store.save(state)
    assert path == tmp_path / "ckpts" / "ckpt-000000003.pt"

    loaded = store.load(path)
    assert state_digest(loaded.model, loaded.optimizer) == saved_digest
    assert (loaded.iteration, loaded.policy_version) == (3, 103)
    assert loaded.counters == state.counters
    assert loaded.cursor == {"next_generation": 4}
    assert loaded.meta == state.meta
    assert loaded.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)

    fresh_model, fresh_opt = _model_and_opt(seed=123)
    fresh_model.load_state_dict(loaded.model)
    fresh_opt.load_state_dict(loaded.optimizer)
    assert state_digest(fresh_model.state_dict(), fresh_opt.state_dict()) == saved_digest

    _step(model, opt, seed=99)
    _step(fresh_model, fresh_opt, seed=99)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert state_digest(model.state_dict(), opt.state_dict()) == state_digest(
        fresh_model.state_dict(), fresh_opt.state_dict()
    )


def test_rng_round_trip_through_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0.0, 1.0)
    model, opt = _model_and_opt()
    store = CheckpointStore(tmp_path, keep=1)
    store.save(_state(model, opt, iteration=0))  # captures the RNGs

    def draw() -> tuple[list[float], list[float], list[float], list[float]]:
        return (
            torch.rand(5).tolist(),
            [*(random.random() for _ in range(5)), random.gauss(0.0, 1.0)],
            [*np.random.rand(5).tolist(), float(np.random.standard_normal())],
            torch.randn(3).tolist(),
        )

    first = draw()
    found = store.latest()
    assert found is not None
    restore_rng(found[1].rng)
    assert draw() == first


def test_rng_round_trip_in_memory() -> None:
    rng = capture_rng()
    a = (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist())
    restore_rng(copy.deepcopy(rng))
    b = (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist())
    assert a == b


def test_keep_prunes_to_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    saved = _save_n(store, [1, 2, 3, 4])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000003.pt",
        "ckpt-000000004.pt",
    ]
    assert store.paths() == [saved[3], saved[2]]


def test_paths_order_by_iteration_not_name(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    _save_n(store, [7, 1_000_000_000, 42])
    assert [p.name for p in store.paths()] == [
        "ckpt-1000000000.pt",
        "ckpt-000000042.pt",
        "ckpt-000000007.pt",
    ]


def test_save_leaves_no_tmp_files_and_removes_stale_ones(tmp_path: Path) -> None:
    stale = tmp_path / ".ckpt-000000001-abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    store = CheckpointStore(tmp_path, keep=3)
    _save_n(store, [1, 2])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert unrelated.exists()


def test_failed_save_cleans_up_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    store = CheckpointStore(tmp_path, keep=1)
    model, opt = _trained(1)
    with pytest.raises(OSError):
        store.save(_state(model, opt, 1))
    assert list(tmp_path.iterdir()) == []


def test_truncated_newest_falls_back_with_warning(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    older, newest = _save_n(store, [5, 6])
    with newest.open("r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    with capture_logs() as logs:
        found = store.latest()
    assert found is not None
    assert found[0] == older
    assert found[1].iteration == 5
    skipped = [e for e in logs if e["event"] == "checkpoint skipped"]
    assert len(skipped) == 1
    assert skipped[0]["log_level"] == "warning"
    assert skipped[0]["path"] == str(newest)
    assert skipped[0]["reason"]
    with pytest.raises(CheckpointError) as err:
        store.load(newest)
    assert "\n" not in str(err.value)
    assert str(newest) in str(err.value)


def test_garbage_and_empty_files_are_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=5)
    (good,) = _save_n(store, [1])
    (tmp_path / "ckpt-000000002.pt").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "ckpt-000000003.pt").write_bytes(b"")
    with capture_logs() as logs:
        found = store.latest()
    assert found is not None and found[0] == good
    assert len([e for e in logs if e["event"] == "checkpoint skipped"]) == 2


def test_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed.txt"
    store = CheckpointStore(tmp_path / "ckpts", keep=5)
    (good,) = _save_n(store, [1])
    payload = {
        "format": "dvla-checkpoint",
        "format_version": 1,
        "iteration": 2,
        "evil": Evil(marker),
    }
    bad = store.directory / "ckpt-000000002.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError) as err:
        store.load(bad)
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert str(bad) in msg and "weights-only" in msg
    with capture_logs() as logs:
        found = store.latest()
    assert found is not None and found[0] == good
    assert [e["path"] for e in logs if e["event"] == "checkpoint skipped"] == [str(bad)]
    assert not marker.exists()


def _payload(tmp_path: Path) -> tuple[CheckpointStore, dict[str, Any]]:
    store = CheckpointStore(tmp_path, keep=5)
    (path,) = _save_n(store, [1])
    payload: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    path.unlink()
    return store, payload


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.update(format="something-else"), "format field"),
        (lambda p: p.update(format_version=2), "format_version"),
        (lambda p: p.pop("optimizer"), "missing optimizer"),
        (lambda p: p.update(iteration="7"), "iteration"),
        (lambda p: p.update(counters={"produced": "many"}), "counters"),
        (lambda p: p.update(cursor={"next": 1.5}), "cursor"),
        (lambda p: p["model"].update(bogus=[1, 2]), "model"),
        (lambda p: p["rng"].pop("numpy"), "rng is missing numpy"),
        (lambda p: p["rng"].update(torch=torch.zeros(3)), "rng.torch"),
        (lambda p: p["model"]["0.weight"].add_(1.0), "digest mismatch"),
    ],
)
def test_invalid_structure_is_rejected(tmp_path: Path, mutate: Any, reason: str) -> None:
    store, payload = _payload(tmp_path)
    mutate(payload)
    bad = store.path_for(9)
    torch.save(payload, bad)
    with pytest.raises(CheckpointError) as err:
        store.load(bad)
    assert reason in str(err.value)
    assert str(bad) in str(err.value)
    with capture_logs():
        assert store.latest() is None


def test_latest_none_when_empty(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "does" / "not" / "exist", keep=1)
    assert store.directory.is_dir()
    assert store.paths() == []
    assert store.latest() is None


def test_load_missing_file_is_one_line_dvla_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    missing = tmp_path / "ckpt-000000001.pt"
    with pytest.raises(DvlaError) as err:
        store.load(missing)
    msg = str(err.value)
    assert str(missing) in msg
    assert "\n" not in msg


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CheckpointStore(tmp_path, keep=0)


def test_save_refuses_unloadable_state(tmp_path: Path) -> None:
    model, opt = _trained(1)
    state = _state(model, opt, 1)
    state.optimizer = {**state.optimizer, "extra": {"evil": Evil(tmp_path / "m")}}
    store = CheckpointStore(tmp_path, keep=1)
    with pytest.raises(CheckpointError, match="refusing to save"):
        store.save(state)
    assert store.paths() == []


def test_digest_sensitive_to_any_change() -> None:
    model, opt = _trained(2)
    sd, osd = model.state_dict(), opt.state_dict()
    base = state_digest(sd, osd)
    assert state_digest(copy.deepcopy(sd), copy.deepcopy(osd)) == base
    reordered = dict(reversed(list(sd.items())))
    assert state_digest(reordered, osd) == base

    one_elem = copy.deepcopy(sd)
    one_elem["2.bias"][1] += 1e-6
    assert state_digest(one_elem, osd) != base

    hyper = copy.deepcopy(osd)
    hyper["param_groups"][0]["lr"] = 0.011
    assert state_digest(sd, hyper) != base

    moment = copy.deepcopy(osd)
    moment["state"][0]["exp_avg"].view(-1)[0] += 1e-9
    assert state_digest(sd, moment) != base

    other_dtype = {k: v.double() for k, v in sd.items()}
    assert state_digest(other_dtype, osd) != base

    reshaped = {k: (v.reshape(-1) if k == "0.weight" else v) for k, v in sd.items()}
    assert state_digest(reshaped, osd) != base

    int_vs_float = copy.deepcopy(osd)
    int_vs_float["param_groups"][0]["weight_decay"] = 0
    zero_float = copy.deepcopy(osd)
    zero_float["param_groups"][0]["weight_decay"] = 0.0
    assert state_digest(sd, int_vs_float) != state_digest(sd, zero_float)
