from __future__ import annotations

from pathlib import Path

import pytest

from dvla.cli import load_and_check
from dvla.config import load_config
from dvla.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: tiny
seed: 3
run:
  max_iterations: 5
pipeline:
  num_envs: 4
  shards: 2
  max_staleness: 1
  infer:
    max_batch: 8
simulator:
  name: toy
  image_size: 16
model:
  name: tiny-vla
algorithm:
  name: grpo
  group_size: 2
optimizer:
  name: adamw
  lr: 0.01
"""


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, sets: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_and_check(str(path), sets)
    msg = str(info.value)
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def test_good_file_validates(tmp_path: Path) -> None:
    cfg = load_and_check(str(write(tmp_path, GOOD)))
    assert cfg.name == "tiny"
    assert cfg.seed == 3
    assert cfg.run.max_iterations == 5
    assert cfg.pipeline.num_envs == 4
    assert cfg.pipeline.max_staleness == 1
    assert cfg.pipeline.infer.max_batch == 8
    assert cfg.pipeline.infer.max_wait_ms == 2.0  # default kept
    assert cfg.simulator.name == "toy"
    assert cfg.simulator.options() == {"image_size": 16}
    assert cfg.optimizer.options() == {"lr": 0.01}


def test_shipped_toy_config_validates() -> None:
    cfg = load_and_check(str(REPO / "configs" / "toy.yaml"))
    assert cfg.name == "toy"
    assert cfg.pipeline.mode == "async"


def test_unknown_core_key_names_its_yaml_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  max_staleness: 1", "  max_stalenes: 1"))
    msg = error_of(path)
    assert msg.startswith(f"{path}: ")
    assert "pipeline.max_stalenes" in msg
    assert "unknown key" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("    max_batch: 8", "    max_bach: 8"))
    msg = error_of(path)
    assert "pipeline.infer.max_bach" in msg
    assert "unknown key" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "extra_section: 1\n")
    assert "extra_section: unknown key" in error_of(path)


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  num_envs: 4", "  num_envs: many"))
    msg = error_of(path)
    assert "pipeline.num_envs" in msg
    assert "integer" in msg
    assert "'many'" in msg


def test_out_of_range_value_names_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  max_iterations: 5", "  max_iterations: 0"))
    msg = error_of(path)
    assert "run.max_iterations" in msg
    assert "greater than or equal to 1" in msg


def test_cross_field_check(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  shards: 2", "  shards: 5"))
    msg = error_of(path)
    assert "pipeline" in msg
    assert "shards (5) cannot exceed num_envs (4)" in msg


def test_invalid_yaml_gives_file_line_column(tmp_path: Path) -> None:
    # An unclosed flow sequence on line 3: the parser reports where it gave up.
    text = "name: x\nrun:\n  max_iterations: [1, 2\nseed: 1\n"
    path = write(tmp_path, text)
    msg = error_of(path)
    assert msg.startswith(f"{path}:")
    assert "invalid YAML" in msg
    rest = msg[len(str(path)) + 1 :]
    line, col, _ = rest.split(":", 2)
    assert line.isdigit() and col.isdigit()
    assert int(line) >= 3


def test_invalid_yaml_tab_indent_points_at_the_tab(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nrun:\n\tmax_iterations: 3\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3:1: invalid YAML")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    msg = error_of(path)
    assert msg == f"{path}: expected a mapping at the top level, got an empty document"


def test_top_level_list(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping at the top level, got list" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg
    assert "cannot read pipeline file" in msg


def test_missing_section(tmp_path: Path) -> None:
    text = GOOD.replace("optimizer:\n  name: adamw\n  lr: 0.01\n", "")
    msg = error_of(write(tmp_path, text))
    assert "optimizer: required key is missing" in msg


def test_backend_section_without_name(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD.replace("  name: grpo\n", "")))
    assert "algorithm.name: required key is missing" in msg


def test_set_overrides_replace_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    cfg = load_and_check(
        str(path),
        ["run.max_iterations=2", "pipeline.mode=sync", "simulator.image_size=24", "seed=9"],
    )
    assert cfg.run.max_iterations == 2
    assert cfg.pipeline.mode == "sync"
    assert cfg.simulator.options()["image_size"] == 24
    assert cfg.seed == 9


def test_set_can_create_missing_levels(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), {"run.target_success": 0.5, "run.dir": "x"})
    assert cfg.run.target_success == 0.5
    assert cfg.run.dir == "x"


def test_set_values_are_validated_like_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    msg = error_of(path, ("pipeline.max_stalenes=3",))
    assert "pipeline.max_stalenes" in msg and "unknown key" in msg
    msg = error_of(path, ("run.max_iterations=zero",))
    assert "run.max_iterations" in msg


def test_set_without_equals_is_rejected(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD), ("run.max_iterations",))
    assert "expected KEY=VALUE" in msg


def test_set_through_a_scalar_is_rejected(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, GOOD), ("seed.x=1",))
    assert "--set seed.x" in msg


def test_backend_option_typo_names_the_section_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  image_size: 16", "  image_sze: 16"))
    msg = error_of(path)
    assert msg == f"{path}: simulator.image_sze: unknown key"


def test_backend_option_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  lr: 0.01", "  lr: fast"))
    msg = error_of(path)
    assert "optimizer.lr" in msg
    assert "'fast'" in msg


def test_backend_option_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  group_size: 2", "  group_size: 1"))
    msg = error_of(path)
    assert "algorithm.group_size" in msg


def test_core_only_load_does_not_check_backend_options(tmp_path: Path) -> None:
    # load_config is the first pass only; load_and_check adds the backend pass.
    path = write(tmp_path, GOOD.replace("  image_size: 16", "  image_sze: 16"))
    cfg = load_config(path)
    assert cfg.simulator.options() == {"image_sze": 16}


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(Exception, match="frozen"):
        cfg.run.max_iterations = 3
