"""The ``dvla`` command: run, validate, evaluate, list plugins and plan weight sync.

User mistakes (a bad file, an unknown backend, a simulator that raises, a diverging loss)
end with one ``error:`` line and a non-zero exit, never a traceback; a traceback means a
bug in dvla, and ``--debug`` shows it for any error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dvla import __version__, logs, registry
from dvla.config import PipelineFile, backend_sections, load_config
from dvla.errors import ConfigError, DvlaError


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. run.max_iterations=10")
        out[key] = yaml.safe_load(raw)
    return out


def write_json(path: str, doc: Any) -> None:
    """``--json FILE``: write ``doc``, or fail with one line."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    except OSError as err:
        raise ConfigError(f"--json {path}: cannot write: {err.strerror}") from None


def load_and_check(path: str, sets: Sequence[str] = ()) -> PipelineFile:
    """Load a pipeline file and validate every backend section's options."""
    cfg = load_config(path, _parse_set(sets))
    for section, spec in backend_sections(cfg).items():
        registry.build_options(section, spec, path)
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    """``dvla validate``: every check a run would make before starting, without running."""
    cfg = load_and_check(args.file, args.set)
    sys.stdout.write(
        f"{args.file}: ok ({cfg.name}: simulator={cfg.simulator.name} model={cfg.model.name} "
        f"algorithm={cfg.algorithm.name} optimizer={cfg.optimizer.name} "
        f"mode={cfg.pipeline.mode})\n"
    )
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """``dvla plugins``: what is installed, so a missing or doubled plugin is easy to spot."""
    for group, entries in registry.installed().items():
        sys.stdout.write(f"{group}:\n")
        if not entries:
            sys.stdout.write("  (none)\n")
        for e in entries:
            sys.stdout.write(f"  {e.name:<16} {e.package} {e.version}  ({e.target})\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``dvla run``: the embedded coordinator, with its workers in this process."""
    cfg = load_and_check(args.file, args.set)
    return run_pipeline(cfg, args.file, args.run_dir, resume=args.resume)


def run_pipeline(
    cfg: PipelineFile, source: str, run_dir: str | None, *, resume: bool = False
) -> int:
    """Run ``cfg`` to its end as coordinator: the path of ``dvla run`` and the daemon.

    Raises:
        DvlaError: the run could not start or failed (logged to the run's log first).
    """
    from dvla.pipeline import Coordinator
    from dvla.rundir import RunDir

    if resume and not (run_dir or cfg.run.dir):
        raise ConfigError("--resume needs the run directory to resume (--run-dir or run.dir)")
    if resume and not Path(run_dir or cfg.run.dir or "").is_dir():
        raise ConfigError(f"--resume: run directory {run_dir or cfg.run.dir} does not exist")
    rundir = RunDir.for_config(cfg, run_dir)
    logs.configure(cfg.run.log_level, rundir.log_path)
    rundir.write_config(cfg)
    log = logs.get("dvla.run")
    try:
        coordinator = Coordinator(cfg, rundir, source=source, resume=resume, exit_watchdog=True)
        summary = coordinator.run()
    except DvlaError as err:
        logs.get(f"{logs.FILE_ONLY}.run").error(
            "run failed", error=str(err), run_dir=str(rundir.root)
        )
        raise
    finally:
        rundir.close()
    log.info("summary", **{k: v for k, v in vars(summary).items() if not isinstance(v, dict)})
    logs.close()
    sys.stdout.write(summary.line() + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``dvla eval``: greedy success rate of saved weights, per task and in total.

    Scores a run's ``policy.pt``, a training checkpoint or a run directory on the
    pipeline file's simulator, with the same fixed episodes and seed as a run's final
    evaluation, so numbers from different checkpoints compare.
    """
    from dvla.data import Trajectory
    from dvla.pipeline.evaluate import format_table, run_eval
    from dvla.pipeline.progress import EvalProgress
    from dvla.pipeline.video import EpisodeVideos

    cfg = load_and_check(args.file, args.set)
    logs.configure(cfg.run.log_level)
    episodes = args.episodes if args.episodes is not None else cfg.run.eval_episodes or 50
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    envs = args.envs if args.envs is not None else min(episodes, cfg.pipeline.num_envs)
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        # Checked now: finding out after an hour of LIBERO episodes would lose them.
        raise ConfigError(f"--json {args.json}: its directory does not exist")
    videos = EpisodeVideos(Path(args.video)) if args.video is not None else None
    # A bar on a terminal, else one "episode" log line per episode; closed on any exit.
    with EvalProgress(episodes, log_level=cfg.run.log_level) as progress:

        def on_episode(traj: Trajectory) -> None:
            if videos is not None:
                videos(traj)
            progress.on_episode(traj)

        result = run_eval(cfg, args.file, Path(args.checkpoint), episodes, envs, on_episode)
    sys.stdout.write(format_table(result))
    if args.json is not None:
        write_json(args.json, {"config": args.file, **result})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``dvla export``: saved weights as a self-contained policy directory.

    The directory holds ``model.safetensors`` and ``dvla-policy.json`` (plus the model
    backend's own format, e.g. a transformers model directory), which ``dvla eval``
    and the model backend load, and tools outside dvla read without unpickling anything.
    """
    from dvla.pipeline.evaluate import read_weights
    from dvla.pipeline.policy import build_policy, export_policy, load_weights
    from dvla.pipeline.sample import probe_spec

    cfg = load_and_check(args.file, args.set)
    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its parent directory does not exist")
    path, state = read_weights(Path(args.checkpoint))
    sim_cls, sim_opts = registry.build_options("simulator", cfg.simulator, args.file)
    spec = probe_spec(sim_cls, sim_opts, cfg.simulator.name, cfg.seed)
    policy = build_policy(cfg, spec, args.file)
    load_weights(policy, state, f"--checkpoint {path}", cfg.model.name)
    export_policy(policy, cfg, out, args.policy_version)
    sys.stdout.write(f"exported {path} -> {out}\n")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    """``dvla config-reference``: every pipeline-file key, from the schema, as Markdown."""
    from dvla.reference import config_reference

    text = config_reference(include_plugins=args.all)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_plan_sync(args: argparse.Namespace) -> int:
    """``dvla plan-sync``: how long a weight push takes with the replication plan vs flat.

    Answers "how far from the best possible is our plan, and how bad would a flat broadcast
    be" for a cluster shape before it is rented; no GPU or network is touched.
    """
    from dvla.control.costmodel import format_size, format_sweep, parse_size, sweep
    from dvla.control.topology import detect_topology, load_topology

    model_bytes = parse_size(args.model_bytes)
    if args.topology is not None:
        topology = load_topology(args.topology)
        where = args.topology
    else:
        detected = detect_topology()
        if detected is None:
            raise ConfigError(
                "no topology: nvidia-smi is not available here; pass --topology FILE "
                "(e.g. configs/topology/example.yaml)"
            )
        topology, where = detected, "detected with nvidia-smi"
    if args.nodes is None:
        nodes = [2**i for i in range(11)]
    else:
        try:
            nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
        except ValueError:
            nodes = []
        if not nodes or min(nodes) < 1:
            raise ConfigError(f"--nodes {args.nodes!r}: expected positive integers, e.g. 1,8,128")
    rows = sweep(topology, model_bytes, nodes)
    intra, inter = topology.intra_node, topology.inter_node
    sys.stdout.write(
        f"topology: {where}: {topology.gpus_per_node} GPUs/node, intra-node "
        f"{intra.bandwidth_gbps:g} Gb/s {intra.latency_us:g} us, inter-node "
        f"{inter.bandwidth_gbps:g} Gb/s {inter.latency_us:g} us; "
        f"model {model_bytes} bytes ({format_size(model_bytes)})\n"
    )
    sys.stdout.write(format_sweep(rows))
    if args.json is not None:
        write_json(
            args.json,
            {"topology": topology.model_dump(), "model_bytes": model_bytes, "rows": rows},
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from :func:`main` so docs and tests can inspect it."""
    parser = argparse.ArgumentParser(
        prog="dvla", description="Asynchronous RL post-training of VLA policies."
    )
    parser.add_argument("--version", action="version", version=f"dvla {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for every error.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    run = add("run", cmd_run, "Run a pipeline file on this machine (embedded coordinator).")
    run.add_argument("file", help="Pipeline YAML file, e.g. configs/toy.yaml.")
    run.add_argument("--run-dir", help="Where to write logs and metrics (overrides run.dir).")
    run.add_argument(
        "--resume",
        action="store_true",
        help="Continue from the newest valid checkpoint in the run directory.",
    )
    val = add("validate", cmd_validate, "Check a pipeline file without running it.")
    val.add_argument("file")
    ev = add("eval", cmd_eval, "Greedy success rate of saved policy weights, per task.")
    ev.add_argument("file", help="Pipeline YAML file the weights were trained with.")
    ev.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="A run's policy.pt or policy/ export, a checkpoints/ckpt-*.pt file, or a run "
        "directory.",
    )
    ev.add_argument(
        "--episodes",
        type=int,
        metavar="N",
        help="Episodes to run; episode k is task k mod T (default run.eval_episodes or 50).",
    )
    ev.add_argument(
        "--envs",
        type=int,
        metavar="N",
        help="Environments run in parallel (default min(episodes, pipeline.num_envs)).",
    )
    ev.add_argument("--json", metavar="FILE", help="Also write the result as JSON here.")
    ev.add_argument(
        "--video",
        metavar="DIR",
        help="Write one video per episode here, cameras side by side (needs OpenCV).",
    )
    ex = add(
        "export",
        cmd_export,
        "Write saved weights as a policy directory: model.safetensors, dvla-policy.json and "
        "the model backend's own format.",
    )
    ex.add_argument("file", help="Pipeline YAML file the weights were trained with.")
    ex.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="A run's policy.pt, a checkpoints/ckpt-*.pt file, or a run directory.",
    )
    ex.add_argument("--out", required=True, metavar="DIR", help="Directory to write (replaced).")
    ex.add_argument(
        "--policy-version",
        type=int,
        default=-1,
        metavar="N",
        help="Policy version recorded in dvla-policy.json (default -1: unknown).",
    )
    for p in (run, val, ev, ex):
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Override a field, e.g. --set run.max_iterations=5 (repeatable).",
        )
    add("plugins", cmd_plugins, "List installed backends by group, with their packages.")
    ref = add(
        "config-reference",
        cmd_config_reference,
        "Print the pipeline-file reference (every key, type, default, description) as Markdown.",
    )
    ref.add_argument("--out", metavar="FILE", help="Write it here instead of stdout.")
    ref.add_argument(
        "--all",
        action="store_true",
        help="Include backends of installed third-party packages, not only dvla's own.",
    )
    plan = add(
        "plan-sync",
        cmd_plan_sync,
        "Predict weight-push time: replication plan vs flat broadcast vs the lower bound.",
    )
    plan.add_argument(
        "--topology",
        metavar="FILE",
        help="Topology YAML, e.g. configs/topology/example.yaml (default: detect this host).",
    )
    plan.add_argument(
        "--model-bytes",
        required=True,
        metavar="N",
        help="Size of one model version: bytes, or 14GB, 500MB, 1GiB.",
    )
    plan.add_argument(
        "--nodes",
        metavar="N,N,...",
        help="Node counts to predict for (default 1,2,4,...,1024).",
    )
    plan.add_argument("--json", metavar="FILE", help="Also write the rows as JSON here.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dvla`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        logs.configure("warning")
    try:
        code: int = args.fn(args)
        return code
    except DvlaError as err:
        if args.debug:
            raise
        sys.stderr.write(f"error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    finally:
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
