"""``dvla-coordinator`` and ``dvla-worker``.

The coordinator runs a pipeline file with its lanes hosted in this process (the same code
path as ``dvla run``). Remote workers need the data plane to carry their lanes' traffic;
until that lands a worker reports its resources and says plainly that it cannot join.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dvla import __version__, logs
from dvla.cli import main as cli_main


def coordinator_main(argv: Sequence[str] | None = None) -> int:
    """Run a pipeline as coordinator with local lanes."""
    parser = argparse.ArgumentParser(
        prog="dvla-coordinator", description="Coordinate a dvla pipeline."
    )
    parser.add_argument("--version", action="version", version=f"dvla {__version__}")
    parser.add_argument("--config", required=True, help="Pipeline YAML file.")
    parser.add_argument("--run-dir", help="Run directory (overrides run.dir).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    forwarded = ["run", args.config]
    if args.run_dir:
        forwarded += ["--run-dir", args.run_dir]
    for item in args.set:
        forwarded += ["--set", item]
    return cli_main(forwarded)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Start a worker: report local resources, then refuse remote lanes for now."""
    parser = argparse.ArgumentParser(prog="dvla-worker", description="Host dvla lanes.")
    parser.add_argument("--version", action="version", version=f"dvla {__version__}")
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    parser.add_argument("--name", default=os.uname().nodename)
    args = parser.parse_args(argv)
    logs.configure("info")
    host, sep, port = args.coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        sys.stderr.write(f"error: --coordinator {args.coordinator!r}: expected HOST:PORT\n")
        return 2
    log = logs.get("dvla.worker")
    log.info(
        "worker resources",
        name=args.name,
        cpus=os.cpu_count(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    )
    sys.stderr.write(
        "error: remote workers need the data plane, which this version does not have yet; "
        "run the pipeline with `dvla run FILE` or `dvla-coordinator --config FILE`\n"
    )
    return 3
