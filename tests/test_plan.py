from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvla.cli import main
from dvla.control import topology as topology_mod
from dvla.control.costmodel import (
    MAX_CHUNK,
    MIN_CHUNK,
    best_chunk,
    chain_time,
    lower_bound,
    parse_size,
    predict,
    sweep,
)
from dvla.control.plan import DEFAULT_TOPOLOGY, Member, Plan, build_plan, hop_counts, plan_time
from dvla.control.topology import LinkSpec, Topology, detect_topology, load_topology
from dvla.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "topology" / "example.yaml"
GB14 = 14 * 10**9


@pytest.fixture(autouse=True)
def _drop_dvla_log_handlers() -> Iterator[None]:
    """The CLI installs root log handlers bound to the captured stderr; remove them after."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()


@pytest.fixture
def example() -> Topology:
    return load_topology(EXAMPLE)


def cluster(nodes: int, gpus: int) -> tuple[Member, list[Member]]:
    """The publisher on GPU 0 of node n000, every other GPU a receiver (names shuffled)."""
    src = Member("learner", "n000")
    members = [
        Member(f"r-{n:03d}-{g}", f"n{n:03d}")
        for n in range(nodes)
        for g in range(gpus)
        if (n, g) != (0, 0)
    ]
    return src, members[::-1]


# ---------------------------------------------------------------- plan shape


def test_topology_plan_is_a_leader_chain_with_node_chains() -> None:
    src, members = cluster(3, 3)
    plan = build_plan(src, members, 10**8)
    assert plan.kind == "topology"
    assert plan.source == "learner"
    assert dict(plan.parent) == {
        # leaders (first name of each other node) chain from the source
        "r-001-0": "learner",
        "r-002-0": "r-001-0",
        # the source's node: a chain from the source
        "r-000-1": "learner",
        "r-000-2": "r-000-1",
        # other nodes: a chain from their leader
        "r-001-1": "r-001-0",
        "r-001-2": "r-001-1",
        "r-002-1": "r-002-0",
        "r-002-2": "r-002-1",
    }
    # the next leader (slow hop, critical path) comes before the local member
    assert plan.children("learner") == ["r-001-0", "r-000-1"]
    assert plan.children("r-001-0") == ["r-002-0", "r-001-1"]
    assert plan.children("r-002-2") == []
    assert plan.depth() == 4  # 2 leader hops + 2 intra hops on the last node
    assert plan.depth("r-000-2") == 2
    assert plan.path("r-002-2") == ["learner", "r-001-0", "r-002-0", "r-002-1", "r-002-2"]


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 8), (2, 1), (5, 4), (64, 8)])
def test_every_other_node_gets_exactly_one_copy_over_the_network(nodes: int, gpus: int) -> None:
    src, members = cluster(nodes, gpus)
    plan = build_plan(src, members, GB14)
    node_of = {m.name: m.node for m in (src, *members)}
    assert set(plan.parent) == {m.name for m in members}
    cross = [c for c, p in plan.parent.items() if node_of[c] != node_of[p]]
    per_node = Counter(node_of[c] for c in cross)
    assert per_node == Counter({f"n{n:03d}": 1 for n in range(1, nodes)})
    # and each node pair's link is used at most once
    pairs = Counter(frozenset((node_of[c], node_of[plan.parent[c]])) for c in cross)
    assert all(v == 1 for v in pairs.values())
    assert plan.depth() == (nodes - 1) + (gpus - 1)


def test_plan_is_deterministic_whatever_the_member_order() -> None:
    src, members = cluster(4, 4)
    a = build_plan(src, members, GB14)
    b = build_plan(src, sorted(members, key=lambda m: m.name), GB14)
    assert a == b
    assert list(a.parent) == list(b.parent)


def test_source_node_without_other_members_still_starts_the_chain() -> None:
    src = Member("learner", "a")
    members = [Member("y", "c"), Member("x", "b"), Member("z", "b")]
    plan = build_plan(src, members, 10**6)
    assert dict(plan.parent) == {"x": "learner", "y": "x", "z": "x"}


def test_flat_plan_sends_every_member_from_the_source() -> None:
    src, members = cluster(3, 2)
    plan = build_plan(src, members, GB14, kind="flat")
    assert plan.kind == "flat"
    assert set(plan.parent.values()) == {"learner"}
    assert plan.children("learner") == sorted(m.name for m in members)
    assert plan.depth() == 1
    # one hop: nothing to pipeline, so as few chunks as allowed (evened out, page aligned)
    assert plan.chunk_bytes <= MAX_CHUNK
    assert math.ceil(GB14 / plan.chunk_bytes) == math.ceil(GB14 / MAX_CHUNK)


def test_empty_members_give_a_plan_with_no_edges() -> None:
    plan = build_plan(Member("learner", "a"), [], 10**9)
    assert dict(plan.parent) == {}
    assert plan.children("learner") == []
    assert plan.depth() == 0


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([Member("a", "n1"), Member("a", "n2")], "duplicate"),
        ([Member("learner", "n1")], "source"),
        ([Member("", "n1")], "non-empty"),
        ([Member("a", "")], "non-empty"),
    ],
)
def test_bad_members_are_rejected(members: list[Member], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_plan(Member("learner", "n0"), members, 10**6)


def test_bad_model_size_and_kind_are_rejected() -> None:
    src = Member("learner", "n0")
    with pytest.raises(ValueError, match="model_bytes"):
        build_plan(src, [Member("a", "n0")], 0)
    with pytest.raises(ValueError, match="kind"):
        build_plan(src, [Member("a", "n0")], 10, kind="ring")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parent", "match"),
    [
        ({"a": "b", "b": "a"}, "cycle"),
        ({"a": "ghost"}, "not in the plan"),
        ({"src": "a", "a": "src"}, "cannot also be a member"),
    ],
)
def test_plan_rejects_invalid_trees(parent: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Plan("src", parent, chunk_bytes=4096, kind="topology")


def test_plan_rejects_bad_chunk_and_kind_and_is_read_only() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        Plan("src", {"a": "src"}, chunk_bytes=0, kind="flat")
    with pytest.raises(ValueError, match="kind"):
        Plan("src", {"a": "src"}, chunk_bytes=1, kind="tree")
    plan = Plan("src", {"a": "src"}, chunk_bytes=1, kind="flat")
    with pytest.raises(TypeError):
        plan.parent["b"] = "src"  # type: ignore[index]
    with pytest.raises(KeyError):
        plan.children("nobody")


# ---------------------------------------------------------------- chunk size


def test_chunk_is_clamped_and_never_exceeds_the_model(example: Topology) -> None:
    src, members = cluster(4, 8)
    assert build_plan(src, members, 1000, example).chunk_bytes == 1000
    assert build_plan(src, members, MIN_CHUNK - 1, example).chunk_bytes == MIN_CHUNK - 1
    # a huge model over a long chain: somewhere inside the bounds, page aligned
    big = build_plan(src, members, 10**12, example).chunk_bytes
    assert MIN_CHUNK <= big <= MAX_CHUNK
    assert big % 4096 == 0
    # zero latency: nothing to gain from large chunks, so the smallest allowed one
    fast = LinkSpec(bandwidth_gbps=400.0, latency_us=0.0)
    free = Topology(nodes=4, gpus_per_node=8, intra_node=fast, inter_node=fast)
    assert build_plan(src, members, GB14, free).chunk_bytes == MIN_CHUNK
    # huge latency: as few chunks as allowed, the same count as 64 MiB ones but evened out
    slow = LinkSpec(bandwidth_gbps=400.0, latency_us=1e6)
    costly = Topology(nodes=4, gpus_per_node=8, intra_node=slow, inter_node=slow)
    chunk = build_plan(src, members, GB14, costly).chunk_bytes
    assert MAX_CHUNK - 4096 * 209 < chunk <= MAX_CHUNK
    assert math.ceil(GB14 / chunk) == math.ceil(GB14 / MAX_CHUNK) == 209


def test_best_chunk_is_near_the_optimum_of_a_brute_force_search(example: Topology) -> None:
    topo = example.with_nodes(128)
    chosen = best_chunk(topo, GB14)
    path = (127, 7)
    brute = min(chain_time(topo, GB14, c, path) for c in range(MIN_CHUNK, MAX_CHUNK, 65536))
    assert chain_time(topo, GB14, chosen, path) <= brute * 1.001


def test_default_topology_is_used_without_one() -> None:
    src, members = cluster(2, 2)
    plan = build_plan(src, members, GB14)
    node_of = {m.name: m.node for m in (src, *members)}
    assert plan.chunk_bytes == best_chunk(DEFAULT_TOPOLOGY, GB14, hop_counts(plan, node_of))


# ---------------------------------------------------------------- cost model


def test_plan_is_within_1_2x_of_the_lower_bound_at_128_nodes(example: Topology) -> None:
    topo = example.with_nodes(128)
    assert topo.gpus_per_node == 8
    assert topo.inter_node.bandwidth_gbps == 400.0
    ratio = predict(topo, GB14, "topology") / lower_bound(topo, GB14)
    assert 1.0 <= ratio <= 1.2


def test_flat_broadcast_grows_linearly_with_nodes(example: Topology) -> None:
    flat = {n: predict(example.with_nodes(n), GB14, "flat") for n in (64, 128, 256)}
    assert flat[256] / flat[128] == pytest.approx(2.0, rel=0.05)
    assert flat[128] / flat[64] == pytest.approx(2.0, rel=0.05)
    # while the plan barely moves
    plan = {n: predict(example.with_nodes(n), GB14, "topology") for n in (128, 256)}
    assert plan[256] / plan[128] < 1.1


def test_formulas_by_hand() -> None:
    link = LinkSpec(bandwidth_gbps=8.0, latency_us=1.0)  # 1e9 bytes/s, 1e-6 s
    topo = Topology(nodes=3, gpus_per_node=2, intra_node=link, inter_node=link)
    m, c = 10**9, 10**8  # 10 chunks of 0.1 s
    # 2 inter + 1 intra hops: (k-1)*t + 3*t
    t = 0.1 + 1e-6
    assert predict(topo, m, "topology", chunk_bytes=c) == pytest.approx(9 * t + 3 * t)
    # flat: 4 remote copies + 1 local copy of 1 s each, one latency
    assert predict(topo, m, "flat") == pytest.approx(5.0 + 1e-6)
    assert lower_bound(topo, m) == pytest.approx(1.0 + 1e-6)
    one = topo.with_nodes(1)
    assert lower_bound(one, m) == pytest.approx(1.0 + 1e-6)
    single = Topology(nodes=1, gpus_per_node=1, intra_node=link, inter_node=link)
    assert lower_bound(single, m) == 0.0
    assert predict(single, m, "topology") == predict(single, m, "flat") == 0.0


def test_plan_time_of_a_built_plan_matches_predict(example: Topology) -> None:
    topo = example.with_nodes(6)
    src, members = cluster(6, 8)
    node_of = {m.name: m.node for m in (src, *members)}
    plan = build_plan(src, members, GB14, topo)
    assert plan.chunk_bytes == best_chunk(topo, GB14)
    assert plan_time(plan, node_of, topo, GB14) == pytest.approx(predict(topo, GB14, "topology"))
    flat = build_plan(src, members, GB14, topo, kind="flat")
    assert plan_time(flat, node_of, topo, GB14) == pytest.approx(predict(topo, GB14, "flat"))


def test_sweep_rows(example: Topology) -> None:
    rows = sweep(example, GB14, [1, 2, 128])
    assert [r["nodes"] for r in rows] == [1, 2, 128]
    assert [r["gpus"] for r in rows] == [8, 16, 1024]
    for r in rows:
        assert set(r) == {
            "nodes",
            "gpus",
            "plan_s",
            "flat_s",
            "lower_bound_s",
            "plan_over_lb",
            "flat_over_lb",
            "chunk_bytes",
        }
        assert r["lower_bound_s"] <= r["plan_s"] <= r["flat_s"]
        assert r["plan_over_lb"] == pytest.approx(r["plan_s"] / r["lower_bound_s"])


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("14GB", 14 * 10**9),
        ("500MB", 500 * 10**6),
        ("1GiB", 2**30),
        ("1.5 gib", 3 * 2**29),
        ("123", 123),
        ("4096B", 4096),
        ("0.5MiB", 2**19),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "14XB", "-5GB", "0", "1e9", "GB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="model size"):
        parse_size(text)


# ---------------------------------------------------------------- topology files


def test_example_topology_loads(example: Topology) -> None:
    assert example.gpus_per_node == 8
    assert example.inter_bytes_per_s == 50e9
    assert example.intra_bytes_per_s >= 400e9
    assert example.total_gpus == example.nodes * 8


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nodes: 2\ngpus_per_node: 8\n", r"intra_node: required key is missing"),
        ("nodes: [\n", r"invalid YAML"),
        ("- 1\n", r"expected a mapping"),
        ("", r"expected a mapping"),
        ("nodes: 0\n", r"nodes: Input should be greater than or equal to 1"),
        ("nodes: 1\nnodes: 2\n", r"duplicate key 'nodes'"),
    ],
)
def test_bad_topology_yaml_is_one_line_naming_file_and_field(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_topology(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_link_fields_name_the_field(tmp_path: Path) -> None:
    base = EXAMPLE.read_text()
    for bad, field in [
        ("bandwidth_gbps: 400.0", "inter_node.bandwidth_gbps"),
        ("latency_us: 5.0", "inter_node.latency_us"),
    ]:
        for value in ("0", "-1", '"400"', ".nan"):
            if field.endswith("latency_us") and value == "0":
                continue
            key = bad.split(":")[0]
            path = tmp_path / "t.yaml"
            path.write_text(base.replace(bad, f"{key}: {value}"))
            with pytest.raises(ConfigError, match=field):
                load_topology(path)
    path = tmp_path / "extra.yaml"
    path.write_text(base + "switches: 4\n")
    with pytest.raises(ConfigError, match="switches: unknown key"):
        load_topology(path)


# ---------------------------------------------------------------- detection


def test_detect_topology_is_none_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dvla.control.topology.shutil.which", lambda name: None)
    assert detect_topology() is None


def fake_nvidia_smi(bindir: Path, gpus: int, topo: str, rc: int = 0) -> None:
    bindir.mkdir()
    script = bindir / "nvidia-smi"
    listing = "\\n".join(str(i) for i in range(gpus))
    script.write_text(
        "#!/bin/sh\n"
        f'case "$1" in\n'
        f"  --query-gpu=index) printf '{listing}\\n'; exit {rc};;\n"
        f"  topo) printf '{topo}\\n';;\n"
        "  nvlink) exit 3;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
def test_detect_topology_from_a_fake_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin", 4, "GPU0 X NV18 NV18\\nGPU1 NV18 X NV18")
    port = tmp_path / "ib" / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    topo = detect_topology(infiniband_sysfs=tmp_path / "ib")
    assert topo is not None
    assert (topo.nodes, topo.gpus_per_node) == (1, 4)
    assert topo.intra_node.bandwidth_gbps == topology_mod.NVLINK_GBPS
    assert topo.inter_node.bandwidth_gbps == 400.0


@pytest.mark.skipif(os.name != "posix", reason="fake nvidia-smi is a shell script")
def test_detect_topology_pcie_ethernet_and_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "a", 2, "GPU0 X PHB\\nGPU1 PHB X")
    monkeypatch.setenv("PATH", str(tmp_path / "a"))
    topo = detect_topology(infiniband_sysfs=tmp_path / "missing")
    assert topo is not None
    assert topo.intra_node.bandwidth_gbps == topology_mod.PCIE_GBPS
    assert topo.inter_node.bandwidth_gbps == topology_mod.ETHERNET_GBPS
    fake_nvidia_smi(tmp_path / "b", 2, "", rc=9)  # nvidia-smi fails (no driver)
    monkeypatch.setenv("PATH", str(tmp_path / "b"))
    assert detect_topology() is None


# ---------------------------------------------------------------- CLI


def test_cli_plan_sync_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rows.json"
    argv = ["plan-sync", "--topology", str(EXAMPLE), "--model-bytes", "14GB"]
    assert main([*argv, "--nodes", "1,8,128", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "8 GPUs/node" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["nodes", "GPUs"] and header[-1] == "chunk"
    table = [line.split() for line in lines[2:]]
    assert [row[0] for row in table] == ["1", "8", "128"]
    assert [row[1] for row in table] == ["8", "64", "1024"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns
    doc = json.loads(out.read_text())
    assert doc["model_bytes"] == GB14
    assert doc["topology"]["gpus_per_node"] == 8
    assert [r["nodes"] for r in doc["rows"]] == [1, 8, 128]
    row = doc["rows"][2]
    assert row["plan_over_lb"] <= 1.2
    assert float(table[2][2]) == pytest.approx(row["plan_s"], abs=1e-4)
    assert float(table[2][3]) == pytest.approx(row["flat_s"], abs=1e-4)


def test_cli_default_node_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan-sync", "--topology", str(EXAMPLE), "--model-bytes", "1GiB"]) == 0
    nodes = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert nodes == [str(2**i) for i in range(11)]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model-bytes", "lots"], "model size 'lots'"),
        (["--model-bytes", "1GB", "--nodes", "1,x"], "--nodes"),
        (["--model-bytes", "1GB", "--nodes", "0"], "--nodes"),
    ],
)
def test_cli_bad_arguments_are_one_error_line(
    extra: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plan-sync", "--topology", str(EXAMPLE), *extra])
    assert code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert err.count("\n") == 1


def test_cli_bad_topology_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("nodes: 2\ngpus_per_node: eight\n")
    assert main(["plan-sync", "--topology", str(path), "--model-bytes", "14GB"]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: gpus_per_node: ")
    assert err.count("\n") == 1


def test_cli_without_topology_or_nvidia_smi_says_to_pass_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("dvla.control.topology.shutil.which", lambda name: None)
    assert main(["plan-sync", "--model-bytes", "14GB"]) != 0
    err = capsys.readouterr().err
    assert "--topology" in err and err.count("\n") == 1
