"""The hf-vla model backend on a tiny random PaliGemma, built the way a run builds it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvla.backends.algorithms.grpo import GRPO, GRPOOptions
from dvla.backends.base import Policy, SimulatorSpec
from dvla.backends.simulators.toy import ToyOptions, ToySimulator
from dvla.cli import main
from dvla.config import PipelineFile, parse_config
from dvla.data import ObsBatch
from dvla.errors import ConfigError, DvlaError, ModelError
from dvla.pipeline.policy import build_policy, export_policy
from dvla.testing.fakes import make_group
from dvla.testing.hf import make_tiny_vla

pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parents[1]
SPEC: SimulatorSpec = ToySimulator(ToyOptions(), 1, 0).spec
# Instructions of different lengths, so batches are padded.
INSTRUCTIONS = [
    "pick up the red block",
    "pick up the blue block and put it in the basket",
    "pick up the green block",
    "open the top drawer",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vla(tmp_path_factory.mktemp("hf") / "tiny")


def config(path: Path, algorithm: str = "grpo", **model: Any) -> PipelineFile:
    return parse_config(
        {
            "name": "hf-test",
            "simulator": {"name": "toy"},
            "model": {"name": "hf-vla", "path": str(path), **model},
            "algorithm": {"name": algorithm},
            "optimizer": {"name": "adamw", "lr": 1e-3},
        }
    )


def build(path: Path, **model: Any) -> Policy:
    return build_policy(config(path, **model), SPEC)


def observations(n: int = 4, seed: int = 0) -> ObsBatch:
    rng = np.random.default_rng(seed)
    return ObsBatch(
        images={"agentview": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)},
        proprio=np.zeros((n, SPEC.proprio_dim), np.float32),
        instructions=[INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(n)],
    )


def one_line(err: pytest.ExceptionInfo[DvlaError]) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Random values in every trainable tensor, so greedy actions are not ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("head", ["vocab", "head"])
def test_act_outputs_have_the_simulator_shapes_and_ranges(tiny: Path, head: str) -> None:
    policy = build(tiny, action_head=head, action_bins=64)
    actions, tokens, logp = policy.act(policy.prepare(observations(5)))
    assert actions.shape == tokens.shape == logp.shape == (5, SPEC.action_dim)
    assert actions.dtype == np.float32 and tokens.dtype == np.int64 and logp.dtype == np.float32
    assert (np.abs(actions) <= 1).all()
    assert ((tokens >= 0) & (tokens < 64)).all()
    assert np.isfinite(logp).all() and (logp <= 0).all()


def test_vocab_act_logprobs_equal_teacher_forced_evaluate(tiny: Path) -> None:
    policy = build(tiny, temperature=0.7)
    inputs = policy.prepare(observations(6))
    for deterministic in (False, True):
        gen = torch.Generator().manual_seed(3)
        _, tokens, logp = policy.act(inputs, deterministic=deterministic, generator=gen)
        with torch.no_grad():
            out = policy.evaluate(inputs, torch.from_numpy(tokens))
        np.testing.assert_allclose(out.logprobs.numpy(), logp, atol=1e-4, rtol=0)
        assert (out.entropy > 0).all()


def test_vocab_teacher_forcing_is_causal(tiny: Path) -> None:
    """Changing dimension d's token changes the scores of later dimensions only."""
    policy = build(tiny)
    inputs = policy.prepare(observations(3))
    _, tokens, _ = policy.act(inputs, generator=torch.Generator().manual_seed(0))
    changed = torch.from_numpy(tokens).clone()
    changed[:, 3] = (changed[:, 3] + 17) % 256
    with torch.no_grad():
        a = policy.evaluate(inputs, torch.from_numpy(tokens)).logprobs
        b = policy.evaluate(inputs, changed).logprobs
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("head", ["vocab", "head"])
def test_batched_rows_equal_rows_alone(tiny: Path, head: str) -> None:
    policy = build(tiny, action_head=head)
    perturb(policy)
    obs = observations(4)
    inputs = policy.prepare(obs)
    assert (inputs["attention_mask"] == 0).any(), "the batch should need padding"
    _, tokens, logp = policy.act(inputs, deterministic=True)
    with torch.no_grad():
        batched = policy.evaluate(inputs, torch.from_numpy(tokens)).logprobs.numpy()
    for i in range(len(obs)):
        row = policy.prepare(obs.select(np.array([i])))
        _, tok_i, logp_i = policy.act(row, deterministic=True)
        np.testing.assert_array_equal(tok_i[0], tokens[i])
        np.testing.assert_allclose(logp_i[0], logp[i], atol=1e-4, rtol=0)
        with torch.no_grad():
            alone = policy.evaluate(row, torch.from_numpy(tok_i)).logprobs.numpy()
        np.testing.assert_allclose(alone[0], batched[i], atol=1e-4, rtol=0)


def grpo_step(policy: Policy) -> dict[str, float]:
    params = [p for p in policy.parameters() if p.requires_grad]
    algo = GRPO(GRPOOptions(group_size=4), policy, torch.optim.AdamW(params, lr=1e-2))
    group = make_group([1.0, 0.0, 1.0, 0.0], length=2, spec=SPEC, action_bins=256)
    return algo.update([group], learner_version=0, max_staleness=2, importance_correction=True)


@pytest.mark.parametrize("head", ["vocab", "head"])
def test_a_grpo_step_changes_the_weights(tiny: Path, head: str) -> None:
    policy = build(tiny, action_head=head, freeze_vision=True)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = grpo_step(policy)
    assert metrics["updated"] == 1.0 and np.isfinite(metrics["loss"])
    after = policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed
    assert not any("vision_tower" in k for k in changed)  # frozen
    if head == "vocab":
        assert any("language_model" in k for k in changed)
    else:
        assert any(k.startswith("action_head.") for k in changed)


def test_freeze_vision_freezes_the_vision_tower_and_projector(tiny: Path) -> None:
    policy = build(tiny, freeze_vision=True)
    grads = {n: p.requires_grad for n, p in policy.named_parameters()}
    vision = [n for n in grads if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and not any(grads[n] for n in vision)
    assert all(g for n, g in grads.items() if "language_model" in n)
    assert all(p.requires_grad for p in build(tiny).parameters())


def test_lora_trains_adapters_only_and_exports_merged(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tiny, action_head="head", finetune="lora", lora_r=4)
    policy = build_policy(cfg, SPEC)
    policy.enable_value_head()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or n.startswith(("action_head.", "value_head.")) for n in trainable), (
        trainable
    )
    assert not any("vision_tower" in n for n in trainable)
    perturb(policy)
    inputs = policy.prepare(observations(4))
    actions, tokens, logp = policy.act(inputs, deterministic=True)
    export = export_policy(policy, cfg, tmp_path / "export", version=1)
    # Merged on a copy: the training policy still has its adapters.
    assert any("lora_" in k for k in policy.state_dict())
    reloaded = build(export / "hf")
    assert not any("lora_" in k for k in reloaded.state_dict())
    a2, t2, lp2 = reloaded.act(reloaded.prepare(observations(4)), deterministic=True)
    np.testing.assert_array_equal(t2, tokens)
    np.testing.assert_allclose(lp2, logp, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(a2, actions)


def test_value_head_gives_values_and_survives_export(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tiny, action_head="head")
    policy = build_policy(cfg, SPEC)
    policy.enable_value_head()
    perturb(policy)
    inputs = policy.prepare(observations(3))
    tokens = torch.zeros(3, SPEC.action_dim, dtype=torch.int64)
    values = policy.evaluate(inputs, tokens).values
    assert values is not None and values.shape == (3,) and values.requires_grad
    export = export_policy(policy, cfg, tmp_path / "export", version=2)
    reloaded = build(export / "hf")
    reloaded.enable_value_head()
    with torch.no_grad():
        again = reloaded.evaluate(reloaded.prepare(observations(3)), tokens).values
    assert again is not None
    torch.testing.assert_close(again, values.detach(), atol=1e-5, rtol=0)


def test_export_reloads_in_dvla_and_in_transformers(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    cfg = config(tiny)
    policy = build_policy(cfg, SPEC)
    perturb(policy, seed=5)
    inputs = policy.prepare(observations(4))
    _, tokens, logp = policy.act(inputs, deterministic=True)
    export = export_policy(policy, cfg, tmp_path / "export", version=3)
    meta = json.loads((export / "dvla-policy.json").read_text())
    assert meta["files"] == ["model.safetensors", "hf"]
    assert json.loads((export / "hf" / "dvla_action.json").read_text())["action_dim"] == 7
    reloaded = build(export / "hf")
    _, t2, lp2 = reloaded.act(reloaded.prepare(observations(4)), deterministic=True)
    np.testing.assert_array_equal(t2, tokens)
    np.testing.assert_allclose(lp2, logp, atol=1e-5, rtol=0)
    outside = AutoModelForImageTextToText.from_pretrained(str(export / "hf"), local_files_only=True)
    ours = policy.state_dict()
    for name, value in outside.state_dict().items():
        torch.testing.assert_close(value, ours[f"vlm.{name}"], atol=0, rtol=0)


def test_missing_path_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        build(tmp_path / "nowhere")
    assert "does not exist" in one_line(err)
    with pytest.raises(ModelError) as err:
        build(tmp_path)
    assert "no config.json" in one_line(err)


def test_a_text_only_model_is_refused_naming_its_type(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ModelError) as err:
        build(tmp_path / "bert")
    assert "'bert'" in one_line(err) and "image-text-to-text" in str(err.value)


def test_action_layout_mismatch_is_a_one_line_error(tiny: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(tiny, tmp_path / "other"))
    record = {"action_dim": 3, "action_bins": 256, "action_head": "vocab"}
    (other / "dvla_action.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        build(other)
    assert "3" in one_line(err) and "7" in str(err.value)
    record["action_dim"] = 7
    (other / "dvla_action.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        build(other, action_bins=64)
    assert "64" in one_line(err) and "256" in str(err.value)


def test_a_vocabulary_too_small_for_the_bins_is_a_one_line_error(tmp_path: Path) -> None:
    small = make_tiny_vla(tmp_path / "small", vocab_size=200)
    with pytest.raises(ConfigError) as err:
        build(small)
    assert "200" in one_line(err) and "256" in str(err.value)
    build(small, action_head="head")  # the dedicated head needs no vocabulary room


def test_importing_the_backend_does_not_import_transformers() -> None:
    code = (
        "import sys, dvla.backends.models.hf_vla, dvla.cli; "
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_dvla_run_of_the_toy_hf_vla_config(tiny: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "run", str(ROOT / "configs" / "toy_hf_vla.yaml"), "--run-dir", str(run_dir),
            "--set", f"model.path={tiny}",
            "--set", "run.max_iterations=3",
            "--set", "run.target_success=null",
            "--set", "run.eval_episodes=6",
            "--set", "run.max_wall_seconds=120",
            "--set", "pipeline.num_envs=16",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["eval"]["episodes"] == 6
    assert (run_dir / "policy" / "hf" / "config.json").is_file()
