"""Predicted time to get one model version from the publisher to every replica.

The model exists to pick the pipelining chunk for a plan and to show, before anyone rents
a cluster, how far a plan is from the best any plan could do (``dvla plan-sync``). It is
deliberately simple (formulas in ``docs/weight-plane.md``): each hop moves a chunk in
``c / B + L``; a chain of hops is a pipeline; links of different hops do not contend
(a node leader forwards to the next node over its NIC while feeding its own GPUs over
NVLink); the last chunk is counted as a full one.

A path is described by its hop counts ``(inter_node_hops, intra_node_hops)``: in a chain
the order of hops does not change the pipelined time, only how many of each kind there are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from dvla.control.topology import Topology
from dvla.errors import ConfigError

MIN_CHUNK = 256 * 1024
"""Below this, per-message costs the model does not see (kernel launches, syscalls) dominate."""
MAX_CHUNK = 64 * 1024 * 1024
"""Above this, staging buffers get large and a slow hop delays the whole pipeline fill."""
CHUNK_ALIGN = 4096
"""Chunks are page multiples so that device copies and registered buffers stay aligned."""
_GRID_STEPS_PER_OCTAVE = 16

Kind = Literal["topology", "flat"]
HopCounts = tuple[int, int]


def chain_time(topology: Topology, model_bytes: int, chunk_bytes: int, hops: HopCounts) -> float:
    """Seconds for the last chunk to reach the end of a pipelined chain.

    ``T = (k - 1) * max(t_hop) + sum(t_hop)`` with ``k = ceil(M / c)`` chunks and
    ``t_hop = c / B + L`` for the hop's link: the slowest hop sets the pace once the
    pipeline is full, and filling plus draining it costs one chunk time per hop.
    """
    inter, intra = hops
    if inter + intra == 0:
        return 0.0
    k = math.ceil(model_bytes / chunk_bytes)
    t_inter = chunk_bytes / topology.inter_bytes_per_s + topology.inter_node.latency_s
    t_intra = chunk_bytes / topology.intra_bytes_per_s + topology.intra_node.latency_s
    t_max = max(t_inter if inter else 0.0, t_intra if intra else 0.0)
    return (k - 1) * t_max + inter * t_inter + intra * t_intra


def pareto(paths: Iterable[HopCounts]) -> list[HopCounts]:
    """The paths no other path dominates (chain time grows with both counts): all that matter."""
    out: list[HopCounts] = []
    best_intra = -1
    for inter, intra in sorted(set(paths), key=lambda p: (-p[0], -p[1])):
        if intra > best_intra and inter + intra > 0:
            out.append((inter, intra))
            best_intra = intra
    return out


def tree_time(
    topology: Topology, model_bytes: int, chunk_bytes: int, paths: Iterable[HopCounts]
) -> float:
    """Seconds until the slowest source-to-member path of a pipelined tree has all chunks."""
    return max((chain_time(topology, model_bytes, chunk_bytes, p) for p in paths), default=0.0)


def critical_paths(topology: Topology) -> list[HopCounts]:
    """The longest path of the topology plan over the whole cluster.

    The leader chain crosses ``N - 1`` inter-node links, and the last node's chain then has
    ``G - 1`` intra-node hops; every other path is a prefix-plus-shorter-tail of it.
    """
    return [(topology.nodes - 1, topology.gpus_per_node - 1)]


def chunk_bounds(model_bytes: int) -> tuple[int, int]:
    """``(lo, hi)`` chunk sizes allowed for a model: [256 KiB, 64 MiB], never above the model."""
    hi = min(MAX_CHUNK, model_bytes)
    return min(MIN_CHUNK, hi), hi


def _normalise(c: float, model_bytes: int, lo: int, hi: int) -> int:
    """The smallest aligned chunk giving the same chunk count (a smaller chunk is never slower)."""
    c = min(max(c, lo), hi)
    k = math.ceil(model_bytes / c)
    even = math.ceil(model_bytes / k)
    aligned = -(-even // CHUNK_ALIGN) * CHUNK_ALIGN
    return max(lo, aligned if aligned <= hi else even)


def best_chunk(
    topology: Topology, model_bytes: int, paths: Sequence[HopCounts] | None = None
) -> int:
    """The chunk size with the least predicted time for these paths.

    Args:
        topology: link speeds; with ``paths`` None, also the cluster whose topology plan
            is meant.
        model_bytes: bytes to move.
        paths: hop counts of the plan's source-to-member paths.

    A small chunk fills the pipeline fast but pays ``L`` per chunk; a big one pays the
    fill ``(hops - 1) * c / B`` once. The search covers a 1/16-octave grid between the
    bounds plus the closed-form optimum for each link kind as the bottleneck, so the
    answer is within a fraction of a percent of the continuous optimum.
    """
    if model_bytes < 1:
        raise ValueError(f"model_bytes must be >= 1, got {model_bytes}")
    lo, hi = chunk_bounds(model_bytes)
    front = pareto(critical_paths(topology) if paths is None else paths)
    if not front:
        return hi
    raw: list[float] = [lo, hi]
    steps = math.ceil(math.log2(hi / lo) * _GRID_STEPS_PER_OCTAVE)
    raw += [lo * (hi / lo) ** (i / steps) for i in range(1, steps)] if steps > 1 else []
    links = (
        (topology.inter_bytes_per_s, topology.inter_node.latency_s),
        (topology.intra_bytes_per_s, topology.intra_node.latency_s),
    )
    for inter, intra in front:
        fill = inter / links[0][0] + intra / links[1][0]
        for bw, lat in links:
            if fill - 1 / bw > 0 and lat > 0:
                raw.append(math.sqrt(model_bytes * lat / (fill - 1 / bw)))
    candidates = {_normalise(c, model_bytes, lo, hi) for c in raw}
    return min(candidates, key=lambda c: (tree_time(topology, model_bytes, c, front), -c))


def flat_time(
    topology: Topology, model_bytes: int, inter_receivers: int, intra_receivers: int
) -> float:
    """Seconds for the publisher to send a whole copy to each receiver itself.

    The copies go one after another: they share the publisher's NIC (inter-node ones)
    and its GPU's copy engines and memory bandwidth, so sending the NVLink copies
    alongside does not make the NIC copies faster. One latency is paid, for the slowest
    link used, since copies are large messages streamed back to back.
    """
    if inter_receivers + intra_receivers == 0:
        return 0.0
    lat = max(
        topology.inter_node.latency_s if inter_receivers else 0.0,
        topology.intra_node.latency_s if intra_receivers else 0.0,
    )
    return (
        inter_receivers * model_bytes / topology.inter_bytes_per_s
        + intra_receivers * model_bytes / topology.intra_bytes_per_s
        + lat
    )


def predict(
    topology: Topology, model_bytes: int, kind: Kind, chunk_bytes: int | None = None
) -> float:
    """Predicted seconds for a plan of this kind over the whole topology.

    The publisher occupies one GPU of the first node; every other GPU receives.
    ``chunk_bytes`` None means the chunk ``best_chunk`` picks.
    """
    if kind == "flat":
        n, g = topology.nodes, topology.gpus_per_node
        return flat_time(topology, model_bytes, (n - 1) * g, g - 1)
    if kind != "topology":
        raise ValueError(f"kind must be 'topology' or 'flat', got {kind!r}")
    paths = critical_paths(topology)
    c = best_chunk(topology, model_bytes, paths) if chunk_bytes is None else chunk_bytes
    return tree_time(topology, model_bytes, c, paths)


def lower_bound(topology: Topology, model_bytes: int) -> float:
    """Seconds no plan can beat: some node other than the publisher's gets M bytes over one link.

    With one node, some GPU gets M bytes over NVLink/PCIe; with one GPU in all, nothing moves.
    """
    if topology.nodes > 1:
        return model_bytes / topology.inter_bytes_per_s + topology.inter_node.latency_s
    if topology.gpus_per_node > 1:
        return model_bytes / topology.intra_bytes_per_s + topology.intra_node.latency_s
    return 0.0


def sweep(topology: Topology, model_bytes: int, node_counts: Iterable[int]) -> list[dict[str, Any]]:
    """One row per node count (same node shape and links): plan vs flat vs the lower bound.

    ``gpus`` is the total GPU count; ratios are 1.0 where nothing has to move (one GPU).
    """
    rows: list[dict[str, Any]] = []
    for n in node_counts:
        topo = topology.with_nodes(n)
        chunk = best_chunk(topo, model_bytes)
        plan_s = predict(topo, model_bytes, "topology", chunk)
        flat_s = predict(topo, model_bytes, "flat")
        lb = lower_bound(topo, model_bytes)
        rows.append(
            {
                "nodes": n,
                "gpus": topo.total_gpus,
                "plan_s": plan_s,
                "flat_s": flat_s,
                "lower_bound_s": lb,
                "plan_over_lb": plan_s / lb if lb > 0 else 1.0,
                "flat_over_lb": flat_s / lb if lb > 0 else 1.0,
                "chunk_bytes": chunk,
            }
        )
    return rows


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from ``14GB`` (10^9), ``1GiB`` (2^30), ``500MB`` or a plain integer.

    Raises:
        ConfigError: not a size, an unknown unit, or less than one byte.
    """
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f"model size {text!r}: expected bytes such as 14GB, 500MB, 1GiB or 14000000000"
        )
    value = round(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConfigError(f"model size {text!r}: must be at least one byte")
    return value


def format_size(n: float) -> str:
    """Binary-unit size for tables, e.g. ``5.06 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of ``sweep`` rows, one line per node count."""
    header = ("nodes", "GPUs", "plan s", "flat s", "lower bound s", "plan/LB", "flat/LB", "chunk")
    body = [
        (
            str(r["nodes"]),
            str(r["gpus"]),
            f"{r['plan_s']:.4f}",
            f"{r['flat_s']:.4f}",
            f"{r['lower_bound_s']:.4f}",
            f"{r['plan_over_lb']:.3f}",
            f"{r['flat_over_lb']:.1f}",
            format_size(r["chunk_bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
        for line in (header, *body)
    ]
    return "\n".join(lines) + "\n"
