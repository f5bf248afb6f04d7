"""What the weight plane knows about the cluster: nodes, GPUs per node, and two link kinds.

The replication plan and its cost model need only this much: members on one node share
fast links (NVLink or PCIe), members on different nodes share one slow link per node pair
(InfiniBand/RoCE/Ethernet). A topology comes from a YAML file (``load_topology``) or, on a
GPU host, from ``nvidia-smi`` (``detect_topology``).

Units: bandwidths are gigabits per second (``1e9`` bits, the unit NICs are sold in),
latencies are microseconds and stand for the whole per-message cost of one hop (wire,
switch and software), which is what decides how small a pipelining chunk can usefully be.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dvla.config import format_validation_error, read_yaml
from dvla.errors import ConfigError

# Defaults of `detect_topology`: nvidia-smi tells GPU count and NVLink presence, not speeds.
NVLINK_GBPS = 3600.0
"""Intra-node bandwidth with NVLink: 450 GB/s per direction (H100 NVLink4, 900 GB/s both ways)."""
NVLINK_LATENCY_US = 2.0
PCIE_GBPS = 256.0
"""Intra-node bandwidth without NVLink: a PCIe Gen4 x16 path, 32 GB/s per direction."""
PCIE_LATENCY_US = 5.0
RDMA_LATENCY_US = 5.0
"""Per-message cost of an inter-node hop over an active InfiniBand/RoCE port."""
ETHERNET_GBPS = 100.0
"""Inter-node bandwidth assumed when no InfiniBand/RoCE port is found (TCP over Ethernet)."""
ETHERNET_LATENCY_US = 20.0
DETECT_TIMEOUT_S = 10.0


class LinkSpec(BaseModel):
    """One kind of link; strict so that ``"400"`` or ``true`` in YAML is an error, not a number."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    bandwidth_gbps: float = Field(
        gt=0, allow_inf_nan=False, description="Gigabits per second in one direction."
    )
    latency_us: float = Field(
        ge=0, allow_inf_nan=False, description="Per-message cost of one hop, in microseconds."
    )

    @property
    def bytes_per_s(self) -> float:
        """Bandwidth in bytes per second, the unit the cost model divides model sizes by."""
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def latency_s(self) -> float:
        """Latency in seconds."""
        return self.latency_us * 1e-6


class Topology(BaseModel):
    """A homogeneous cluster: ``nodes`` hosts with ``gpus_per_node`` GPUs each."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    nodes: int = Field(ge=1, description="Hosts taking part in weight distribution.")
    gpus_per_node: int = Field(ge=1, description="GPUs (inference replicas) per host.")
    intra_node: LinkSpec = Field(description="GPU to GPU inside one host (NVLink or PCIe).")
    inter_node: LinkSpec = Field(description="Host to host (InfiniBand, RoCE or Ethernet).")

    @property
    def total_gpus(self) -> int:
        """GPUs in the whole cluster, the publisher's included."""
        return self.nodes * self.gpus_per_node

    @property
    def intra_bytes_per_s(self) -> float:
        """Intra-node bandwidth in bytes per second."""
        return self.intra_node.bytes_per_s

    @property
    def inter_bytes_per_s(self) -> float:
        """Inter-node bandwidth in bytes per second."""
        return self.inter_node.bytes_per_s

    def with_nodes(self, nodes: int) -> Topology:
        """The same links and node shape at another scale, for sweeps over node counts."""
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        return self.model_copy(update={"nodes": nodes})


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file.

    Raises:
        ConfigError: the file is unreadable, not YAML, or a field is missing, unknown or
            out of range; the message is one line naming the file and the field.
    """
    p = Path(path)
    data = read_yaml(p, "topology file")
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "an empty document"
        raise ConfigError(f"{p}: expected a mapping at the top level, got {kind}")
    try:
        return Topology.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(p), err)) from None


def _run(args: list[str], timeout_s: float) -> str | None:
    """Stdout of a command, or None for any failure: detection must never take a host down."""
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def _has_nvlink(exe: str, timeout_s: float) -> bool:
    # `topo -m` marks NVLink-connected GPU pairs NV<n>; `nvlink -s` lists per-link speeds.
    matrix = _run([exe, "topo", "-m"], timeout_s)
    if matrix is not None and re.search(r"\bNV\d+\b", matrix):
        return True
    status = _run([exe, "nvlink", "-s"], timeout_s)
    return status is not None and re.search(r"Link \d+: *[\d.]+ *GB/s", status) is not None


def _rdma_gbps(sysfs: Path) -> float | None:
    """Fastest active InfiniBand/RoCE port, from ``.../ports/N/rate`` ("400 Gb/sec (4X NDR)")."""
    best: float | None = None
    try:
        ports = sorted(sysfs.glob("*/ports/*"))
    except OSError:
        return None
    for port in ports:
        try:
            state = (port / "state").read_text(encoding="utf-8")
            rate = (port / "rate").read_text(encoding="utf-8")
        except OSError:
            continue
        m = re.match(r"\s*([\d.]+)\s*Gb/sec", rate)
        if "ACTIVE" in state and m and float(m.group(1)) > 0:
            best = max(best or 0.0, float(m.group(1)))
    return best


def detect_topology(
    timeout_s: float = DETECT_TIMEOUT_S,
    infiniband_sysfs: str | Path = "/sys/class/infiniband",
) -> Topology | None:
    """This host as a one-node topology, or None where there is no working ``nvidia-smi``.

    nvidia-smi gives the GPU count (all GPUs of the host, whatever ``CUDA_VISIBLE_DEVICES``
    says) and whether NVLink connects them; speeds are the defaults above (NVLink 450 GB/s
    per direction, else PCIe Gen4 x16). The inter-node link is the fastest active
    InfiniBand/RoCE port with RDMA latency, else 100 Gb/s Ethernet with TCP latency; pass
    ``--nodes`` to ``dvla plan-sync`` for cluster sizes, since one host cannot see the rest.
    Never raises: each subprocess has a timeout and any failure gives None.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    listing = _run([exe, "--query-gpu=index", "--format=csv,noheader"], timeout_s)
    if listing is None:
        return None
    gpus = sum(1 for line in listing.splitlines() if line.strip())
    if gpus == 0:
        return None
    if gpus > 1 and _has_nvlink(exe, timeout_s):
        intra = LinkSpec(bandwidth_gbps=NVLINK_GBPS, latency_us=NVLINK_LATENCY_US)
    else:
        intra = LinkSpec(bandwidth_gbps=PCIE_GBPS, latency_us=PCIE_LATENCY_US)
    rdma = _rdma_gbps(Path(infiniband_sysfs))
    if rdma is not None:
        inter = LinkSpec(bandwidth_gbps=rdma, latency_us=RDMA_LATENCY_US)
    else:
        inter = LinkSpec(bandwidth_gbps=ETHERNET_GBPS, latency_us=ETHERNET_LATENCY_US)
    return Topology(nodes=1, gpus_per_node=gpus, intra_node=intra, inter_node=inter)
