"""Replication plans: who receives a new model version from whom, in what chunk size.

A plan is a tree rooted at the publisher. The topology plan sends each version across
every slow inter-node link once: node leaders form one pipelined chain from the
publisher, and inside each node the GPUs form a chain over fast links, so the node
chains overlap with the leader chain. The flat plan (the publisher sends every receiver
its own copy) is the baseline that ``dvla plan-sync`` compares against. The executor
moves bytes along ``Plan.parent`` edges in ``Plan.chunk_bytes`` pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from dvla.control.costmodel import HopCounts, best_chunk, flat_time, tree_time
from dvla.control.topology import LinkSpec, Topology

KINDS = ("topology", "flat")

_LOOPBACK = LinkSpec(bandwidth_gbps=40.0, latency_us=20.0)
DEFAULT_TOPOLOGY = Topology(nodes=1, gpus_per_node=1, intra_node=_LOOPBACK, inter_node=_LOOPBACK)
"""Links assumed when ``build_plan`` gets no topology: TCP over loopback, 5 GB/s and 20 us.

Only the chunk size depends on it; it keeps chunks in the low MiB, which suits tests and
single-host runs, where every hop is a local socket or a host-memory copy.
"""


@dataclass(frozen=True)
class Member:
    """A receiver of weights; ``node`` is its host: members on one host share fast links."""

    name: str
    node: str


@dataclass(frozen=True)
class Plan:
    """A validated replication tree; constructing one with a cycle or a stray edge raises.

    Attributes:
        source: the publisher's name; never a key of ``parent``.
        parent: every member's name to the name it receives from (read-only).
        chunk_bytes: the pipelining unit the executor must use.
        kind: ``"topology"`` or ``"flat"``.
    """

    source: str
    parent: Mapping[str, str] = field(hash=False)
    chunk_bytes: int
    kind: str
    _children: Mapping[str, tuple[str, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _depth: Mapping[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"plan kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.chunk_bytes, bool) or self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes!r}")
        if not self.source:
            raise ValueError("plan source must be a non-empty name")
        parent = dict(self.parent)
        if self.source in parent:
            raise ValueError(f"plan source {self.source!r} cannot also be a member")
        children: dict[str, list[str]] = {self.source: []}
        for child, par in parent.items():
            if not child:
                raise ValueError("plan member names must be non-empty")
            if par != self.source and par not in parent:
                raise ValueError(f"{child!r} receives from {par!r}, which is not in the plan")
            children.setdefault(par, []).append(child)
            children.setdefault(child, [])
        depth: dict[str, int] = {self.source: 0}
        for start in parent:
            trail: list[str] = []
            on_trail: set[str] = set()
            node = start
            while node not in depth:
                if node in on_trail:
                    raise ValueError(f"plan has a cycle through {node!r}")
                trail.append(node)
                on_trail.add(node)
                node = parent[node]
            for i, name in enumerate(reversed(trail), start=1):
                depth[name] = depth[node] + i
        object.__setattr__(self, "parent", MappingProxyType(parent))
        frozen = {k: tuple(v) for k, v in children.items()}
        object.__setattr__(self, "_children", MappingProxyType(frozen))
        object.__setattr__(self, "_depth", MappingProxyType(depth))

    @property
    def members(self) -> tuple[str, ...]:
        """Every receiver, in the order of ``parent``."""
        return tuple(self.parent)

    def children(self, name: str) -> list[str]:
        """Whom ``name`` forwards to, in the order of ``parent``.

        ``build_plan`` inserts the leader chain first, so a leader starts the next node's
        (slow, critical) hop before its local one. Raises ``KeyError`` for unknown names.
        """
        return list(self._children[name])

    def depth(self, name: str | None = None) -> int:
        """Hop count from the source to ``name``, or the longest one over the whole plan."""
        if name is not None:
            return self._depth[name]
        return max(self._depth.values())

    def path(self, name: str) -> list[str]:
        """Names from the source down to ``name``, both included."""
        out = [name]
        while out[-1] != self.source:
            out.append(self.parent[out[-1]])
        return out[::-1]


def _check_members(source: Member, members: Sequence[Member]) -> None:
    seen: set[str] = set()
    for m in (source, *members):
        if not m.name or not m.node:
            raise ValueError(f"member {m!r}: name and node must be non-empty")
        if m.name in seen:
            what = "the source's name" if m.name == source.name else "a duplicate name"
            raise ValueError(f"member {m.name!r} has {what}; every name must be unique")
        seen.add(m.name)


def _topology_edges(source: Member, members: Sequence[Member]) -> dict[str, str]:
    by_node: dict[str, list[str]] = {}
    for m in members:
        by_node.setdefault(m.node, []).append(m.name)
    for names in by_node.values():
        names.sort()
    others = sorted(n for n in by_node if n != source.node)
    parent: dict[str, str] = {}
    prev = source.name
    for node in others:  # the leader chain first: it is the critical path
        parent[by_node[node][0]] = prev
        prev = by_node[node][0]
    local = by_node.get(source.node, [])
    chains = [(source.name, local)] + [(by_node[n][0], by_node[n][1:]) for n in others]
    for head, rest in chains:
        for name in rest:
            parent[name] = head
            head = name
    return parent


def hop_counts(plan: Plan, node_of: Mapping[str, str]) -> list[HopCounts]:
    """``(inter_node_hops, intra_node_hops)`` of every member's path, in plan order.

    Args:
        plan: the tree.
        node_of: node of every name in the plan, the source's included.
    """
    counts: dict[str, HopCounts] = {plan.source: (0, 0)}
    for name in sorted(plan.parent, key=plan.depth):
        par = plan.parent[name]
        inter, intra = counts[par]
        cross = node_of[name] != node_of[par]
        counts[name] = (inter + 1, intra) if cross else (inter, intra + 1)
    return [counts[name] for name in plan.parent]


def build_plan(
    source: Member,
    members: Sequence[Member],
    model_bytes: int,
    topology: Topology | None = None,
    kind: Literal["topology", "flat"] = "topology",
) -> Plan:
    """The replication tree for one publisher and its receivers.

    Args:
        source: the publisher; not one of ``members``.
        members: every receiver; names unique, ``node`` says which share fast links.
        model_bytes: size of one version, to size the pipelining chunk.
        topology: link speeds for the chunk choice; None means ``DEFAULT_TOPOLOGY``.
            Its node and GPU counts are not used: the members define the tree.
        kind: ``"topology"`` (leader chain plus per-node chains) or ``"flat"``.

    Raises:
        ValueError: a duplicate or empty name, the source among the members, a model
            smaller than one byte, or an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"plan kind must be one of {KINDS}, got {kind!r}")
    if isinstance(model_bytes, bool) or model_bytes < 1:
        raise ValueError(f"model_bytes must be >= 1, got {model_bytes!r}")
    _check_members(source, members)
    topo = topology or DEFAULT_TOPOLOGY
    if kind == "flat":
        parent = {m.name: source.name for m in sorted(members, key=lambda m: m.name)}
    else:
        parent = _topology_edges(source, members)
    node_of = {m.name: m.node for m in (source, *members)}
    shape = Plan(source.name, parent, chunk_bytes=1, kind=kind)
    chunk = best_chunk(topo, model_bytes, hop_counts(shape, node_of))
    return Plan(source.name, parent, chunk_bytes=chunk, kind=kind)


def plan_time(
    plan: Plan, node_of: Mapping[str, str], topology: Topology, model_bytes: int
) -> float:
    """Predicted seconds for this plan, by the same model as ``costmodel.predict``.

    Use it to set a measured distribution time beside what the model expected.
    """
    paths = hop_counts(plan, node_of)
    if plan.kind == "flat":
        inter = sum(1 for p in paths if p[0])
        return flat_time(topology, model_bytes, inter, len(paths) - inter)
    return tree_time(topology, model_bytes, plan.chunk_bytes, paths)
