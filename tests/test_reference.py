"""The YAML reference in docs/ is the schema's own output, and documents every key."""

from __future__ import annotations

from pathlib import Path

from dvla.cli import main
from dvla.reference import config_reference

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config-reference.md"


def test_the_committed_reference_matches_the_schema() -> None:
    assert DOC.read_text(encoding="utf-8") == config_reference(), (
        "docs/config-reference.md is stale: run `dvla config-reference --out "
        "docs/config-reference.md`"
    )


def test_every_key_has_a_type_default_and_description() -> None:
    rows = [line for line in config_reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4, row
        key, kind, default, desc = cells
        assert kind and default and desc, f"undocumented key: {key}"


def test_the_reference_covers_sections_and_builtin_backends() -> None:
    text = config_reference()
    for key in ("`pipeline.max_staleness`", "`pipeline.infer.max_batch`", "`cluster.placement."):
        assert key in text
    for backend in ("simulator: {name: toy}", "model: {name: hf-vla}", "algorithm: {name: ppo}"):
        assert backend in text


def test_the_cli_writes_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "ref.md"
    assert main(["config-reference", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_reference()
