"""``dvla-coordinator`` and ``dvla-worker``: one pipeline across several machines.

The coordinator runs the learner, serves one port that workers and their sampler
processes dial, and answers the HTTP API; it takes the same code path as ``dvla run``
(which is this with its workers inside the coordinator's process). A worker registers,
receives sampler slots and runs them until the coordinator ends the run. See
``docs/deploy.md`` for a two-node walk-through.

Exit codes: 0 the run ended (or the worker was told to stop); 2 bad input, or a worker
the coordinator refused (wrong secret, protocol, resources, placement); 1 a worker that
gave up waiting for its coordinator; 3 a stop that did not drain in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dvla import __version__, logs
from dvla.errors import ConfigError, DvlaError


def _host_port(flag: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} {value!r}: expected HOST:PORT, e.g. 10.0.0.1:7400")
    return host.strip("[]"), int(port)


def coordinator_main(argv: Sequence[str] | None = None) -> int:
    """Run a pipeline as the cluster's coordinator."""
    parser = argparse.ArgumentParser(
        prog="dvla-coordinator", description="Coordinate a dvla pipeline across workers."
    )
    parser.add_argument("--version", action="version", version=f"dvla {__version__}")
    parser.add_argument("--config", required=True, help="Pipeline YAML file.")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="Where workers and sampler processes connect (overrides cluster.listen); "
        "use 0.0.0.0:PORT to accept other hosts.",
    )
    parser.add_argument(
        "--http", metavar="HOST:PORT", help="HTTP API address (default 127.0.0.1, any port)."
    )
    parser.add_argument(
        "--local-workers",
        type=int,
        default=0,
        metavar="N",
        help="Workers to run inside the coordinator's process as well (default 0).",
    )
    parser.add_argument("--run-dir", help="Run directory (overrides run.dir).")
    parser.add_argument(
        "--resume", action="store_true", help="Continue from the newest valid checkpoint."
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for every error.")
    args = parser.parse_args(argv)
    from dvla.cli import load_and_check, run_pipeline

    try:
        if args.local_workers < 0:
            raise ConfigError(f"--local-workers {args.local_workers}: must be 0 or more")
        sets = [*args.set, f"cluster.local_workers={args.local_workers}"]
        if args.listen:
            host, port = _host_port("--listen", args.listen)
            sets.append(f"cluster.listen={host}:{port}")
        if args.http:
            host, port = _host_port("--http", args.http)
            sets += [f"cluster.http_host={host}", f"cluster.http_port={port}"]
        cfg = load_and_check(args.config, sets)
        if not cfg.pipeline.sample_processes:
            sys.stderr.write(
                f"warning: {args.config}: pipeline.sample_processes is 0: the simulators run "
                "inside the coordinator and workers have nothing to do\n"
            )
        return run_pipeline(cfg, args.config, args.run_dir, resume=args.resume)
    except DvlaError as err:
        if args.debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    finally:
        logs.close()


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Start a worker that hosts sampler processes for a coordinator."""
    from dvla.cluster.protocol import Resources
    from dvla.config import TlsConfig
    from dvla.transport.auth import Secret

    parser = argparse.ArgumentParser(prog="dvla-worker", description="Host dvla sampler processes.")
    parser.add_argument("--version", action="version", version=f"dvla {__version__}")
    parser.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    parser.add_argument("--name", default=os.uname().nodename, help="Name in /status and logs.")
    parser.add_argument(
        "--secret-env",
        default="DVLA_SECRET",
        metavar="VAR",
        help="Environment variable holding the shared secret (default DVLA_SECRET).",
    )
    parser.add_argument("--cpus", type=int, help="CPU cores to offer (default: detected).")
    parser.add_argument("--memory-gb", type=float, help="Memory to offer (default: detected).")
    parser.add_argument("--gpus", type=int, help="GPUs to offer (default: detected).")
    parser.add_argument("--log-dir", help="Sampler logs (default: ./dvla-worker-NAME).")
    parser.add_argument(
        "--tls-cert", help="PEM certificate of this worker (TLS to the coordinator)."
    )
    parser.add_argument("--tls-key", help="PEM private key of this worker.")
    parser.add_argument("--tls-ca", help="PEM CA bundle the coordinator's certificate chains to.")
    parser.add_argument(
        "--give-up-s",
        type=float,
        default=None,
        metavar="S",
        help="Exit 1 after this long without a coordinator (default: retry forever).",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    log = logs.get("dvla.worker")
    try:
        host, port = _host_port("--coordinator", args.coordinator)
        if not os.environ.get(args.secret_env):
            raise ConfigError(
                f"no shared secret: set {args.secret_env} to the coordinator's secret"
            )
        secret = Secret.resolve(None, args.secret_env)
        tls_args = (args.tls_cert, args.tls_key, args.tls_ca)
        if any(tls_args) and not all(tls_args):
            raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        tls = (
            TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
            if all(tls_args)
            else None
        )
        found = Resources.detect()
        res = Resources(
            args.cpus if args.cpus is not None else found.cpus,
            args.memory_gb if args.memory_gb is not None else found.memory_gb,
            args.gpus if args.gpus is not None else found.gpus,
        )
        from dvla.cluster.worker import Worker
        from dvla.config import DataPlaneConfig

        dp = DataPlaneConfig(secret_env=args.secret_env, tls=tls)  # type: ignore[call-arg]
        worker = Worker(
            f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}",
            secret,
            name=args.name,
            resources=res,
            log_dir=Path(args.log_dir or f"dvla-worker-{args.name}"),
            data_plane=dp,
            tls=tls,
            give_up_s=args.give_up_s,
        )
    except (DvlaError, ValueError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    log.info("worker starting", name=args.name, coordinator=args.coordinator, **res.to_wire())

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await worker.run(stop)

    import uvloop

    code = uvloop.run(main())
    if code != 0:
        sys.stderr.write(f"error: {worker.exit_reason}\n")
    return code
