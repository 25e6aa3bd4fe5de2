"""`python -m jaxdist.scaling EXPERIMENT`: how many devices do I need, measured and predicted.

Measures the experiment's train step at several device counts (weak and strong scaling),
its compute and its gradient all-reduce apart, fits the cost model of `jaxdist.scaling.costmodel`,
checks it against the counts it was not fitted to, and predicts throughput, speedup,
efficiency and the time and device-hours to a goal, for this machine and for a named
interconnect. Writes `WORKDIR/scaling.json` and `WORKDIR/scaling.png`. Exit status 0, or 2
with one line for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jaxdist.base.cli import OneLineParser
from jaxdist.base.errors import UserError, at_least

if TYPE_CHECKING:
    from jaxdist.base.config import Config
    from jaxdist.scaling.costmodel import Interconnect
    from jaxdist.scaling.study import Plan
    from jaxdist.step.experiment import Experiment

USAGE_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = OneLineParser(
        prog="python -m jaxdist.scaling",
        description="How many devices do I need? Measure the train step's scaling, fit a "
                    "cost model, predict.",
        epilog="Overrides are KEY=VALUE pairs as for python -m jaxdist.run. Interconnects: "
               "python -m jaxdist.scaling --interconnects.")
    parser.add_argument("experiment", nargs="?", help="a name from python -m jaxdist.run "
                                                      "--list, or an experiment .py file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--devices", metavar="N,N,...",
                        help="device counts to measure (default: 1, 2, 4, ... and all)")
    parser.add_argument("--fit-devices", metavar="N,N,...",
                        help="counts to fit the model to (default: all but the largest, "
                             "which then checks it, when 3 or more are measured)")
    parser.add_argument("--interconnect", metavar="NAME|GB/S[:US]",
                        help="also predict for devices linked by this (see --interconnects)")
    parser.add_argument("--devices-per-host", type=int, metavar="D",
                        help="predict for hosts of D devices, linked by --inter-host")
    parser.add_argument("--inter-host", default="ethernet-100g", metavar="NAME|GB/S[:US]",
                        help="the network between hosts, per host (default: %(default)s)")
    parser.add_argument("--max-devices", type=int, metavar="N",
                        help="predict up to N devices (default: the devices here; 64 with "
                             "--interconnect or --devices-per-host)")
    parser.add_argument("--target-efficiency", type=float, default=0.8, metavar="E",
                        help="report the largest count whose efficiency stays >= E, in (0, 1] "
                             "(default: %(default)s)")
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--steps", type=int, help="time and device-hours to this many steps "
                                                "(default: the experiment's train.steps)")
    goal.add_argument("--epochs", type=float, help="... or to this many epochs")
    parser.add_argument("--per-device-batch", type=int, metavar="B",
                        help="weak scaling's batch per device (default: the global batch "
                             "over the largest count)")
    parser.add_argument("--global-batch", type=int, metavar="B",
                        help="strong scaling's batch per step (default: train.batch_size)")
    parser.add_argument("--rounds", type=int, default=11,
                        help="timing rounds; medians are over these (default: %(default)s)")
    parser.add_argument("--window-steps", type=int, default=20,
                        help="steps per program per round (default: %(default)s)")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="on a CPU-only machine, split the CPU into N devices")
    parser.add_argument("--workdir", type=Path,
                        help="where to write scaling.json and scaling.png "
                             "(default: a new folder under runs/)")
    parser.add_argument("--interconnects", action="store_true",
                        help="list the named interconnects, their figures and sources")
    return parser


def parse_counts(text: str, option: str) -> list[int]:
    """`1,2,4` as [1, 2, 4]; one line naming the option if it is not that."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"{option} {text} is not a list of device counts >= 1; write e.g. "
                        f"{option} 1,2,4,8")
    return counts


def _shown(value: float) -> str:
    """A number as an error message shows it (a huge one cut short)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse a count below 1, a step goal beyond the step counter, epochs not finite > 0."""
    from jaxdist.base.config.checks import MAX_STEPS

    for option in ("devices_per_host", "max_devices", "steps", "per_device_batch",
                   "global_batch", "rounds", "window_steps"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(at_least(f"--{option.replace('_', '-')} {value}", 1))
    if args.steps is not None and args.steps > MAX_STEPS:
        raise UserError(f"--steps {_shown(args.steps)} is more than a run can take "
                        f"({MAX_STEPS}: the step counter is 32-bit); ask for fewer")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise UserError(f"--epochs {_shown(args.epochs)} must be a finite number > 0, e.g. "
                        f"--epochs 10")


def check_epochs_goal(epochs: float, dataset_size: int, smallest_batch: int) -> None:
    """Refuse `--epochs` whose steps (at the smallest batch predicted for) no run can take."""
    from jaxdist.base.config.checks import MAX_STEPS

    steps = epochs * dataset_size / smallest_batch
    if not steps <= MAX_STEPS:
        raise UserError(f"--epochs {_shown(epochs)} of {dataset_size} examples is "
                        f"{_shown(float(steps))} steps of {smallest_batch}, more than a run "
                        f"can take ({MAX_STEPS}: the step counter is 32-bit); ask for fewer")


def interconnect_table() -> str:
    """The named interconnects as a text table."""
    from jaxdist.scaling.costmodel import INTERCONNECTS

    lines = [f"{'name':16s} {'GB/s used':>9s} {'latency':>8s}  listed figure; source"]
    for i in INTERCONNECTS.values():
        lines.append(f"{i.name:16s} {i.bandwidth_gbs:9g} {i.latency_us:6g}us  {i.description}: "
                     f"{i.listed}; {i.source}")
    lines.append("GB/s used: per device and direction; latency per ring step, assumed.")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    """Parse `argv`, measure, fit, predict, write and print; return the exit status."""
    from jaxdist.scaling.costmodel import parse_interconnect

    args = build_parser().parse_intermixed_args(argv)
    if args.interconnects:
        print(interconnect_table())
        return 0
    if not args.experiment:
        raise UserError("name an experiment, e.g. python -m jaxdist.scaling digits_cnn "
                        "(python -m jaxdist.run --list shows them)")
    if not 0 < args.target_efficiency <= 1:
        raise UserError(f"--target-efficiency {args.target_efficiency:g} must be in (0, 1], "
                        f"e.g. --target-efficiency 0.8")
    link = inter = None
    try:
        if args.interconnect is not None:
            link = parse_interconnect(args.interconnect)
    except ValueError as error:
        raise UserError(f"--interconnect {error}") from None
    try:
        if args.devices_per_host:
            inter = parse_interconnect(args.inter_host)
    except ValueError as error:
        raise UserError(f"--inter-host {error}") from None
    check_numbers(args)
    counts = None if args.devices is None else parse_counts(args.devices, "--devices")
    fit_counts = (None if args.fit_devices is None
                  else parse_counts(args.fit_devices, "--fit-devices"))
    if args.cpu_devices is not None:
        from jaxdist.parallel.devices import use_cpu_devices

        use_cpu_devices(args.cpu_devices)

    import jax

    from jaxdist.checkpoints.workdir import prepare_workdir
    from jaxdist.loop.discovery import load
    from jaxdist.run import default_workdir

    experiment, config = load(args.experiment, args.overrides)
    devices = jax.local_devices()
    available = len(devices)
    if counts is None:
        counts = sorted({available, *(2 ** k for k in range(available.bit_length())
                                      if 2 ** k <= available)})
    from jaxdist.scaling.study import dataset_size, make_plan

    examples = dataset_size(experiment)
    plan = make_plan(config, examples, counts, fit_counts,
                     args.per_device_batch, args.global_batch, args.rounds, args.window_steps,
                     available, devices[0].platform)
    if args.epochs is not None:
        check_epochs_goal(args.epochs, examples, min(plan.per_device_batch, plan.global_batch))
    workdir = prepare_workdir(args.workdir or default_workdir(
        f"{Path(args.experiment).stem}-scaling"))
    command = shlex.join(["python", "-m", "jaxdist.scaling", *argv])
    report = study(args, command, experiment, config, plan, link, inter, available)
    json_path, png_path = workdir / "scaling.json", workdir / "scaling.png"
    from jaxdist.base.files import write_text_atomically
    from jaxdist.scaling import report as reporting

    write_text_atomically(json_path, json.dumps(reporting.finite(report), indent=1,
                                                allow_nan=False) + "\n")
    reporting.plot(report, png_path)
    print()
    print(reporting.text(report))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def study(args: argparse.Namespace, command: str, experiment: Experiment, config: Config,
          plan: Plan, link: Interconnect | None, inter: Interconnect | None,
          available: int) -> dict:
    """Measure, fit, check and predict; the report as a dict."""
    import jax
    import jaxlib

    from jaxdist.scaling import report as reporting
    from jaxdist.scaling.costmodel import StepModel
    from jaxdist.scaling.study import accelerator_model, check, fit, measure

    measured = measure(experiment, config, plan)
    fitted = fit(measured, plan)
    goal = ({"epochs": args.epochs} if args.epochs is not None
            else {"steps": args.steps or config.train.steps})
    compile_seconds = measured.timing("step", plan.counts[-1],
                                      plan.batch("weak", plan.counts[-1])).compile_seconds
    hosts = args.devices_per_host
    wide = link is not None or hosts is not None
    max_devices = args.max_devices or (max(64, 2 * (hosts or 1)) if wide else available)
    common = {"plan": plan, "target": args.target_efficiency, "goal": goal,
              "dataset_size": measured.dataset_size, "fixed_seconds": compile_seconds}
    here = StepModel(fitted.compute, fitted.intra, fitted.gradient_bytes,
                     None if inter is None else inter.link, hosts, fitted.volume)
    # This machine's fitted links hold among its own devices only, unless hosts are given.
    scenarios = [reporting.scenario("this machine's links (fitted)", here, inter=inter,
                                    max_devices=max_devices if hosts else available,
                                    **common)]
    if link is not None:
        named = StepModel(accelerator_model(fitted), link.link, fitted.gradient_bytes,
                          None if inter is None else inter.link, hosts, fitted.volume)
        scenarios.append(reporting.scenario(link.description, named, link=link, inter=inter,
                                            max_devices=max_devices, **common))
    return reporting.build(
        command=command,
        date=time.strftime("%Y-%m-%d"), experiment=args.experiment,
        overrides=args.overrides, measured=measured, plan=plan, fitted=fitted,
        check=check(fitted, measured, plan), scenarios=scenarios,
        target=args.target_efficiency, goal=goal, fixed_seconds=compile_seconds,
        devices_available=available,
        versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__})


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input gives one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
