from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

from dvla import registry
from dvla.backends.base import Algorithm, OptimizerFactory, Policy, Simulator
from dvla.config import BackendSection
from dvla.errors import ConfigError, PluginError
from dvla.testing.fakes import FakeSimulator


class FakeDist:
    """Just what registry.discover reads from a Distribution."""

    def __init__(self, name: str, version: str = "1.0") -> None:
        self.metadata = {"Name": name}
        self.version = version


def ep(name: str, value: str, group: str, package: str | None) -> EntryPoint:
    point = EntryPoint(name, value, group)
    if package is not None:
        point = point._for(FakeDist(package))  # type: ignore[attr-defined]
    return point


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, points: list[EntryPoint]) -> None:
    def entry_points(*, group: str) -> list[EntryPoint]:
        return [p for p in points if p.group == group]

    monkeypatch.setattr(registry, "entry_points", entry_points)


@pytest.mark.parametrize(
    ("section", "name", "base", "target"),
    [
        ("simulator", "toy", Simulator, "dvla.backends.simulators.toy:ToySimulator"),
        ("model", "tiny-vla", Policy, "dvla.backends.models.tiny_vla:TinyVLA"),
        ("model", "hf-vla", Policy, "dvla.backends.models.hf_vla:HFVLA"),
        ("algorithm", "grpo", Algorithm, "dvla.backends.algorithms.grpo:GRPO"),
        ("algorithm", "ppo", Algorithm, "dvla.backends.algorithms.ppo:PPO"),
        ("optimizer", "adamw", OptimizerFactory, "dvla.backends.optimizers.adamw:AdamW"),
    ],
)
def test_builtins_are_discovered(section: str, name: str, base: type, target: str) -> None:
    group = registry.GROUPS[section]
    found = registry.discover(group)
    assert name in found
    entry = found[name]
    assert entry.group == group
    assert entry.target == target
    assert entry.package == "dvla"
    assert entry.version == "0.1.0"
    cls = registry.resolve(section, name)
    assert issubclass(cls, base)
    assert cls is entry.load()


def test_installed_lists_all_four_groups_sorted() -> None:
    inst = registry.installed()
    assert list(inst) == list(registry.GROUPS.values())
    for entries in inst.values():
        names = [e.name for e in entries]
        assert names == sorted(names)
        assert names, "every group has a built-in backend"


def test_unknown_name_is_one_line_naming_group_name_and_installed() -> None:
    with pytest.raises(PluginError) as info:
        registry.resolve("simulator", "libero-typo")
    msg = str(info.value)
    assert "\n" not in msg
    # Whatever simulator plugins are installed besides dvla's own, sorted.
    installed = sorted(registry.discover("dvla.simulators"))
    assert {"libero", "toy"} <= set(installed)
    assert msg == (
        f"dvla.simulators: no backend named 'libero-typo' (installed: {', '.join(installed)})"
    )


def test_unknown_name_in_empty_group(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, [])
    with pytest.raises(PluginError, match=r"no backend named 'x' \(installed: none\)"):
        registry.resolve("model", "x")


def test_unknown_name_lists_every_installed_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "dvla.simulators"
    fake_entry_points(
        monkeypatch,
        [
            ep("zeta", "pkg_z:Sim", group, "pkg-z"),
            ep("alpha", "pkg_a:Sim", group, "pkg-a"),
        ],
    )
    with pytest.raises(PluginError) as info:
        registry.resolve("simulator", "beta")
    assert "(installed: alpha, zeta)" in str(info.value)


def test_duplicate_name_from_two_packages_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "dvla.simulators"
    fake_entry_points(
        monkeypatch,
        [
            ep("toy", "dvla.backends.simulators.toy:ToySimulator", group, "dvla"),
            ep("toy", "other_pkg.sims:Toy", group, "other-pkg"),
        ],
    )
    with pytest.raises(PluginError) as info:
        registry.discover(group)
    msg = str(info.value)
    assert "\n" not in msg
    assert "backend name 'toy' is registered by two packages" in msg
    assert "'dvla'" in msg and "'other-pkg'" in msg
    assert "other_pkg.sims:Toy" in msg
    # The error also surfaces through resolve (what a run or `dvla validate` calls).
    with pytest.raises(PluginError, match="registered by two packages"):
        registry.resolve("simulator", "toy")


def test_same_distribution_seen_twice_is_not_a_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = "dvla.simulators"
    target = "dvla.backends.simulators.toy:ToySimulator"
    fake_entry_points(
        monkeypatch, [ep("toy", target, group, "dvla"), ep("toy", target, group, "dvla")]
    )
    found = registry.discover(group)
    assert list(found) == ["toy"]


def test_entry_point_without_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "dvla.simulators"
    fake_entry_points(monkeypatch, [ep("fake", "dvla.testing.fakes:FakeSimulator", group, None)])
    entry = registry.discover(group)["fake"]
    assert entry.package == "<unknown>"
    assert entry.version == "?"
    assert registry.resolve("simulator", "fake") is FakeSimulator


def test_import_failure_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "dvla.simulators"
    fake_entry_points(
        monkeypatch,
        [ep("broken", "dvla_no_such_module_xyz.sim:Broken", group, "broken-sim-plugin")],
    )
    with pytest.raises(PluginError) as info:
        registry.resolve("simulator", "broken")
    msg = str(info.value)
    assert "\n" not in msg
    assert "backend 'broken'" in msg
    assert "package 'broken-sim-plugin'" in msg
    assert "failed to import" in msg
    assert "ModuleNotFoundError" in msg
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_attribute_is_an_import_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    group = "dvla.models"
    fake_entry_points(monkeypatch, [ep("ghost", "dvla.testing.fakes:NoSuchPolicy", group, "g")])
    with pytest.raises(PluginError, match=r"package 'g' failed to import .*AttributeError"):
        registry.resolve("model", "ghost")


def test_build_options_validates_against_the_backend_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = "dvla.simulators"
    fake_entry_points(monkeypatch, [ep("fake", "dvla.testing.fakes:FakeSimulator", group, "t")])
    spec = BackendSection.model_validate({"name": "fake", "episode_length": 5})
    cls, opts = registry.build_options("simulator", spec, "f.yaml")
    assert cls is FakeSimulator
    assert isinstance(opts, FakeSimulator.Options)
    assert opts.episode_length == 5
    bad = BackendSection.model_validate({"name": "fake", "episode_lenght": 5})
    with pytest.raises(ConfigError) as info:
        registry.build_options("simulator", bad, "f.yaml")
    assert str(info.value) == "f.yaml: simulator.episode_lenght: unknown key"


def test_backend_without_options_model_rejects_any_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A class with no Options attribute falls back to the empty BackendOptions model.
    group = "dvla.optimizers"
    fake_entry_points(monkeypatch, [ep("plain", "builtins:object", group, "p")])
    cls: Any
    cls, opts = registry.build_options(
        "optimizer", BackendSection.model_validate({"name": "plain"})
    )
    assert cls is object
    assert opts.model_dump() == {}
    with pytest.raises(ConfigError, match=r"optimizer\.lr: unknown key"):
        registry.build_options(
            "optimizer", BackendSection.model_validate({"name": "plain", "lr": 1})
        )


def test_the_hf_backend_imports_without_transformers() -> None:
    """`dvla plugins` and `dvla validate` must work without the [hf] extra."""
    import subprocess
    import sys

    code = (
        "import sys; import dvla.backends.models.hf_vla; "
        "sys.exit(int('transformers' in sys.modules or 'peft' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
