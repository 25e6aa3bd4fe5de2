"""The command line: `python -m jaxdist.run EXPERIMENT [--workdir DIR] [KEY=VALUE ...]`.

Exit status: 0 on success, 2 on bad input (with one line on stderr naming the fix).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jaxdist.distributed import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DistributedSettings,
    initialize,
    is_primary,
)
from jaxdist.errors import UserError

USAGE_EXIT = 2


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see python -m jaxdist.run --help")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = _OneLineParser(
        prog="python -m jaxdist.run",
        description="Train a jaxdist experiment on every local device.",
        epilog="Overrides are KEY=VALUE pairs, e.g. train.steps=500 optimizer.learning_rate=0.1 "
               "parallel.backend=shard_map parallel.devices=1. The resolved config is saved to "
               "WORKDIR/config.json and the logged metrics to WORKDIR/metrics.jsonl.")
    parser.add_argument("experiment", nargs="?",
                        help="a name from --list, or the path of an experiment .py file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--workdir", type=Path,
                        help="where to write config.json, metrics.jsonl and checkpoints; a "
                             "workdir that holds a checkpoint is resumed "
                             "(default: a new folder under runs/)")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="on a CPU-only machine, split the CPU into N devices "
                             "(the tests use 8)")
    group = parser.add_argument_group(
        "multi-process runs (jax.distributed; see the README)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0 (or $JAXDIST_COORDINATOR)")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="how many processes take part (or $JAXDIST_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's index, 0 to N-1 (or $JAXDIST_PROCESS_ID)")
    group.add_argument("--distributed", action="store_true",
                       help="let JAX detect the cluster: TPU pod slice, SLURM, Open MPI, GKE")
    group.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT,
                       metavar="S", help="seconds without a heartbeat after which a peer is "
                                         "dead and every process stops (default: %(default)s)")
    return parser


def default_workdir(experiment: str) -> Path:
    """A fresh folder name under `runs/`: the experiment and the start time."""
    stem = Path(experiment).stem
    base = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, suffix = base, 1
    while path.exists():
        suffix += 1
        path = base.with_name(f"{base.name}-{suffix}")
    return path


def run(argv: list[str] | None = None) -> int:
    """Parse `argv`, run the experiment, and return the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    if args.cpu_devices is not None:
        if args.cpu_devices < 1:
            raise UserError(f"--cpu-devices {args.cpu_devices} must be >= 1")
        import jax

        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    initialize(DistributedSettings(
        coordinator=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, auto=args.distributed,
        heartbeat_timeout=args.heartbeat_timeout))

    from jaxdist.config import apply_overrides
    from jaxdist.discovery import list_experiments, load_experiment

    if args.list:
        for name, summary in list_experiments().items():
            print(f"{name:24s} {summary}")
        return 0
    if not args.experiment:
        raise UserError("name an experiment, e.g. python -m jaxdist.run linear_regression "
                        "(python -m jaxdist.run --list shows them)")
    module = load_experiment(args.experiment)
    config = apply_overrides(module.config(), args.overrides)
    workdir = args.workdir or default_workdir(args.experiment)

    from jaxdist.train import fit

    result = fit(module.build(config), config, workdir)
    if not is_primary():
        return 0
    if result.stop_reason == "preempted":
        print(f"{result.signal_name}: stopped at step {result.step} and saved "
              f"{result.checkpoint}; run the same command to resume")
    elif result.stop_reason == "already_complete":
        print(f"{workdir} already holds this run up to step {result.step}; raise "
              f"train.steps to continue it")
    else:
        print(f"workdir: {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, turning bad input into one line on stderr and exit status 2."""
    try:
        return run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
