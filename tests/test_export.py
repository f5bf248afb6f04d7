"""Policy exports: safetensors + config that dvla eval, dvla export and outside tools read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvla.cli import main
from dvla.config import load_config
from dvla.errors import ConfigError
from dvla.pipeline.evaluate import run_eval
from dvla.pipeline.policy import (
    META_FILE,
    WEIGHTS_FILE,
    build_policy,
    export_policy,
    read_export,
    spec_from_json,
)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy.yaml"
TINY = [
    "--set", "run.max_iterations=2",
    "--set", "run.target_success=null",
    "--set", "run.eval_episodes=0",
    "--set", "pipeline.num_envs=16",
    "--set", "checkpoint.every_iterations=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("export") / "run"
    assert main(["run", str(TOY), "--run-dir", str(d), *TINY]) == 0
    return d


def test_a_run_exports_its_policy_as_safetensors_and_json(run_dir: Path) -> None:
    export = run_dir / "policy"
    meta = json.loads((export / META_FILE).read_text())
    assert meta["format"] == "dvla-policy/1" and meta["model"]["name"] == "tiny-vla"
    assert meta["policy_version"] >= 1 and meta["files"] == [WEIGHTS_FILE]
    # Readable without dvla: plain safetensors, the same tensors as the run's policy.pt.
    tensors = load_file(str(export / WEIGHTS_FILE))
    saved = torch.load(run_dir / "policy.pt", weights_only=True)
    assert tensors.keys() == saved.keys()
    assert all(torch.equal(tensors[k], saved[k]) for k in saved)
    # The spec in the metadata rebuilds the model without a simulator.
    cfg = load_config(TOY)
    policy = build_policy(cfg, spec_from_json(meta["spec"]))
    policy.load_state_dict(tensors)


def test_dvla_eval_scores_an_export_like_the_run_directory(run_dir: Path) -> None:
    cfg = load_config(TOY)
    a = run_eval(cfg, str(TOY), run_dir / "policy", episodes=6, envs=6)
    b = run_eval(cfg, str(TOY), run_dir, episodes=6, envs=6)
    assert a["checkpoint"].endswith(WEIGHTS_FILE)
    assert a["success_rate"] == b["success_rate"] and a["per_task"] == b["per_task"]


def test_dvla_export_writes_an_export_from_a_training_checkpoint(
    run_dir: Path, tmp_path: Path
) -> None:
    ckpt = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    out = tmp_path / "exported"
    assert main(["export", str(TOY), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    meta, state = read_export(out)
    assert meta["policy_version"] == -1
    ref = load_file(str(run_dir / "policy" / WEIGHTS_FILE))
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    # Exporting again replaces the directory as a whole.
    assert main(["export", str(TOY), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])


def test_an_export_of_another_architecture_is_a_one_line_error(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "eval", str(TOY), "--checkpoint", str(run_dir / "policy"),
            "--set", "model.channels=[8,8]", "--episodes", "2",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --checkpoint") and "shape" in err and err.count("\n") == 1


def test_a_broken_export_is_a_one_line_error(run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ConfigError, match="not a dvla policy export"):
        read_export(bad)
    (bad / META_FILE).write_text(json.dumps({"format": "dvla-policy/1"}))
    (bad / WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    with pytest.raises(ConfigError, match="cannot read the weights") as err:
        read_export(bad)
    assert "\n" not in str(err.value)


def test_export_is_atomic_over_a_previous_one(run_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(TOY)
    meta, state = read_export(run_dir / "policy")
    policy = build_policy(cfg, spec_from_json(meta["spec"]))
    policy.load_state_dict(state)
    out = tmp_path / "p"
    export_policy(policy, cfg, out, 7)
    (out / "stray.txt").write_text("x")
    export_policy(policy, cfg, out, 8)
    assert not (out / "stray.txt").exists()
    assert read_export(out)[0]["policy_version"] == 8
    assert not out.with_name("p.tmp").exists() and not out.with_name("p.old").exists()


def test_resume_with_another_architecture_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "run"
    assert main(["run", str(TOY), "--run-dir", str(d), *TINY]) == 0
    capsys.readouterr()
    code = main(
        ["run", str(TOY), "--run-dir", str(d), "--resume", *TINY, "--set", "model.hidden=64"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --resume ") and "weights do not fit" in err
    assert err.count("\n") == 1


def test_a_camera_the_simulator_lacks_is_a_one_line_error() -> None:
    cfg = load_config(TOY, {"model.camera": "wrist"})
    from dvla.backends.simulators.toy import ToyOptions, ToySimulator

    with pytest.raises(ConfigError, match="'wrist' is not a camera") as err:
        build_policy(cfg, ToySimulator.describe(ToyOptions()))
    assert "\n" not in str(err.value)
