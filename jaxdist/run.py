"""The command line: `python -m jaxdist.run EXPERIMENT [--workdir DIR] [KEY=VALUE ...]`.

Exit status: 0 on success (and after a SIGTERM/SIGINT that stopped and saved the run), 2
on bad input or a fault the user can fix (one line on stderr naming the fix), 130 when
interrupted during start-up, before anything was saved. `--debug` (or `JAXDIST_DEBUG=1`)
shows the full traceback of those errors as well; a bug in jaxdist always shows one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from jaxdist.base.cli import OneLineParser, nonempty_path
from jaxdist.base.errors import UserError
from jaxdist.loop.preemption import PreemptionWatch, StartupSignals
from jaxdist.parallel.processes import (
    DEFAULT_BARRIER_TIMEOUT,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DistributedSettings,
    initialize,
    is_primary,
    joined,
)

USAGE_EXIT = 2
DEBUG_VARIABLE = "JAXDIST_DEBUG"
# Started once this process has joined a multi-process run
# (jaxdist.parallel.agreement.FailureWatch).
_peer_failures = None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = OneLineParser(
        prog="python -m jaxdist.run", add_help=False,
        description="Train a jaxdist experiment on every local device.",
        epilog="Overrides are KEY=VALUE pairs, e.g. train.steps=500 optimizer.learning_rate=0.1 "
               "parallel.backend=shard_map parallel.devices=1. The resolved config is saved to "
               "WORKDIR/config.json and the logged metrics to WORKDIR/metrics.jsonl.")
    parser.add_argument("experiment", nargs="?",
                        help="a name from --list, or the path of an experiment .py file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides")
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help; after an EXPERIMENT, also its keys, types and "
                             "defaults")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--workdir", type=nonempty_path,
                        help="where to write config.json, metrics.jsonl and checkpoints; a "
                             "workdir that holds a checkpoint is resumed "
                             "(default: a new folder under runs/)")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="on a CPU-only machine, split the CPU into N devices "
                             "(the tests use 8)")
    parser.add_argument("--restart", action="store_true",
                        help="remove what an earlier run wrote in --workdir and start over")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="let KEY differ from the checkpoint's value on resume (e.g. "
                             "optimizer.learning_rate after a run diverged); repeatable")
    parser.add_argument("--compilation-cache", metavar="DIR|off", type=nonempty_path,
                        help="keep compiled steps here, so that a resumed run does not "
                             "compile again (default: $JAXDIST_COMPILATION_CACHE, else "
                             "~/.cache/jaxdist/xla; off: no cache)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show full tracebacks for user errors too (or "
                             f"{DEBUG_VARIABLE}=1)")
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
    group.add_argument("--join-timeout", type=int, default=120, metavar="S",
                       help="seconds to wait for the coordinator and the other processes "
                            "at start-up (default: %(default)s)")
    group.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT,
                       metavar="S", help="seconds without a heartbeat after which a peer is "
                                         "dead and every process stops (default: %(default)s)")
    group.add_argument("--barrier-timeout", type=int, default=DEFAULT_BARRIER_TIMEOUT,
                       metavar="S", help="seconds a process waits for the others where they "
                                         "meet (start, checkpoints), then stops with one line "
                                         "(default: %(default)s)")
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
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.help and not args.experiment:
        parser.print_help()
        return 0
    from jaxdist.base.config import check_core_overrides

    check_core_overrides(args.overrides)  # before the experiment's imports: a typo at once
    if args.cpu_devices is not None:
        from jaxdist.parallel.devices import use_cpu_devices

        use_cpu_devices(args.cpu_devices)
    if not args.help and not args.list and initialize(DistributedSettings(
            coordinator=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, auto=args.distributed,
            heartbeat_timeout=args.heartbeat_timeout,
            initialization_timeout=args.join_timeout, barrier_timeout=args.barrier_timeout)):
        from jaxdist.parallel.agreement import FailureWatch

        global _peer_failures
        _peer_failures = FailureWatch().start()

    from jaxdist.base.config import describe_keys
    from jaxdist.loop.discovery import list_experiments, load, load_experiment

    if args.list:
        for name, summary in list_experiments().items():
            print(f"{name:24s} {summary}")
        return 0
    if not args.experiment:
        raise UserError("name an experiment, e.g. python -m jaxdist.run linear_regression "
                        "(python -m jaxdist.run --list shows them)")
    if args.help:
        parser.print_help()
        print(f"\nkeys of {args.experiment} (KEY  TYPE  DEFAULT):")
        config = load_experiment(args.experiment).config()
        print("\n".join(f"  {line}" for line in describe_keys(config)))
        return 0
    experiment, config = load(args.experiment, args.overrides)
    workdir = args.workdir or default_workdir(args.experiment)
    from jaxdist.loop.compile_cache import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache)

    from jaxdist.loop.fit import fit

    StartupSignals.deliver()  # the imports are done
    result = fit(experiment, config, workdir, start_over=args.restart,
                 allow_changes=args.allow_change)
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
    """Entry point: run, turning user errors into one line on stderr and exit status 2.

    In a multi-process run a failing process first tells the others why (they stop at
    once, naming the cause) and then exits without waiting for its peers.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    if threading.current_thread() is threading.main_thread():
        # Outside the training loop (which saves and exits 0), SIGTERM is an interrupt too.
        StartupSignals.install()
    PreemptionWatch.exit_on_second_signal = True  # a command may end at once; a kernel not
    try:
        status = run(argv)
    except UserError as error:
        status = _fail(error, f"error: {error}", USAGE_EXIT, debug)
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        when = ("after the run ended; what it saved is intact" if PreemptionWatch.entered
                else "during start-up; nothing was saved")
        status = _fail(error, f"error: interrupted by {signal.Signals(signum).name} {when}",
                       128 + signum, debug)
        # Interrupted anywhere (inside jax's start-up, say), the interpreter's own clean-up
        # can crash on half-built native state; nothing is left to save, so leave directly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    except BaseException as error:
        if isinstance(error, SystemExit):
            raise
        if joined() and _lost_peer(error):
            status = _fail(error, f"error: a collective with another process failed "
                                  f"({_last_line(error)}): another task died or was killed; "
                                  f"see its log, then rerun the same command on every "
                                  f"process to resume from the newest checkpoint",
                           USAGE_EXIT, debug)
        else:  # a bug: the traceback is for us to read
            status = _fail(error, None, 1, True)
    finally:
        if _peer_failures is not None:
            _peer_failures.stop()
    return status


# What a collective reports when a peer process vanished under it (gloo's and gRPC's
# words: jaxlib raises the same XlaRuntimeError type for every failure of a collective).
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Connection refused",
             "Socket closed", "Broken pipe", "another task died", "Read error", "Write error")


def _lost_peer(error: BaseException) -> bool:
    text = str(error)
    return any(words in text for words in PEER_LOST)


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1][:200] if lines else type(error).__name__


def _fail(error: BaseException, line: str | None, status: int, debug: bool) -> int:
    """Report `error` (one line, or the traceback); in a multi-process run, leave at once."""
    if debug or line is None:
        error.__suppress_context__ = False
        traceback.print_exception(error)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    if joined():
        from jaxdist.parallel.agreement import announce_failure, leave_after_failure

        announce_failure(line.removeprefix("error: ") if line else
                         f"{type(error).__name__}: {error}")
        leave_after_failure(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
