"""`python -m jaxdist.plot WORKDIR`: draw the logged curves of a run to PNG files.

One figure per metric (loss first), train and eval curves against the step, written to
`WORKDIR/plots/METRIC.png`. A metric name becomes a file name with every character other
than letters, digits, `.`, `_` and `-` replaced by `_` (and a leading `.` or `-` too), so
`top/1` is drawn to `top_1.png`; a name that would then be taken by another metric's file
gets `-2`, `-3`, ... appended. Nothing is written outside `WORKDIR/plots/`, and a link
there is replaced, not written through.

Every line of `metrics.jsonl` must be a logged point (`jaxdist.base.records`: a JSON object with
an integer `step`, a string `split` and numbers or nulls), except a last line cut short by
a crash (skipped) and blank lines; anything else is refused with one line naming the file
and the line.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from jaxdist.base.cli import OneLineParser, print_paths
from jaxdist.base.errors import UserError
from jaxdist.base.files import output_folder, replace_inside
from jaxdist.base.records import METRICS_FILE, read_records

SKIP = {"step", "split", "examples"}
FIX = "give the --workdir of a jaxdist run (or delete a damaged line)"
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_STEM = 120  # characters of a metric name kept in its file name


def read_curves(workdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`{metric: {split: [(step, value), ...]}}` from `WORKDIR/metrics.jsonl`."""
    path = Path(workdir) / METRICS_FILE
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for record in read_records(path, FIX):
        for name, value in record.items():
            if name not in SKIP:
                curves[name][record["split"]].append((record["step"], value))
    if not curves:
        raise UserError(f"{path} holds no logged points yet")
    return curves


def safe_stem(name: str) -> str:
    """`name` as a file name: only letters, digits, `.`, `_`, `-`; no leading `.` or `-`."""
    stem = UNSAFE.sub("_", name)[:MAX_STEM]
    stem = re.sub(r"^[.-]+", lambda leading: "_" * len(leading.group()), stem)
    return stem or "_"


def file_stems(names: list[str]) -> dict[str, str]:
    """A distinct `safe_stem` for each metric name, also on a case-blind file system.

    Names that are safe already keep themselves (`loss` first); the others follow in sorted
    order, with `-2`, `-3`, ... appended where their stem is taken.
    """
    taken: set[str] = set()
    stems = {}
    for name in sorted(names, key=lambda n: (safe_stem(n) != n, n != "loss", n)):
        stem = candidate = safe_stem(name)
        copy = 1
        while candidate.lower() in taken:
            copy += 1
            candidate = f"{stem}-{copy}"
        taken.add(candidate.lower())
        stems[name] = candidate
    return stems


def _literal(text: str) -> str:
    """`text` for a matplotlib label, drawn as written (a `$` does not start mathtext)."""
    return text.replace("$", r"\$")


def never_changed(curve: dict[str, list[tuple[int, float]]]) -> bool:
    """Whether every value of a metric, in every split, is the same (a flat line)."""
    values = {value for points in curve.values() for _, value in points}
    return len(values) <= 1


def schedule_curve(workdir: Path) -> tuple[list[int], list[float]] | None:
    """The learning rate of each step's update, from the run's `config.json` (None if none).

    Step `s` (as logged) applied update `s - 1` of the optimizer's schedule, so the logged
    `lr` points lie on this curve.
    """
    import dataclasses

    from jaxdist.base.config import OptimizerConfig
    from jaxdist.base.schema import load_json

    path = Path(workdir) / "config.json"
    if not path.is_file():
        return None
    saved = load_json(path, dict, FIX)
    names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    try:
        optimizer = OptimizerConfig(**{k: v for k, v in saved["optimizer"].items()
                                       if k in names})
        steps = int(saved["train"]["steps"])
        import jax
        import numpy as np

        from jaxdist.step.optimizers import build_schedule

        rates = jax.vmap(build_schedule(optimizer))(np.arange(steps))
    except (KeyError, TypeError, ValueError):
        return None  # a config.json of another form: the logged points alone
    return list(range(1, steps + 1)), [float(rate) for rate in np.asarray(rates)]


def plot(workdir: Path) -> list[Path]:
    """Write one PNG per metric to `WORKDIR/plots/`; return their paths.

    A metric that never changed (a count of non-finite steps that stayed 0) gets no
    picture; windows that held non-finite steps are marked on the loss's. The loss's
    picture also draws the train `cross_entropy` where the experiment logs one (its train
    loss may hold label smoothing, which the eval loss does not), and the learning rate's
    draws the schedule over every step, with the logged points on it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    curves = read_curves(workdir)
    out = output_folder(workdir, "plots")
    stems = file_stems(list(curves))
    written = []
    for name in sorted(curves, key=lambda n: (n != "loss", n)):
        if name != "loss" and never_changed(curves[name]):
            continue
        label = _literal(name)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if name == "lr":
            curve = schedule_curve(workdir)
            if curve is not None:
                ax.plot(*curve, label="schedule", color="0.6")
        for split, points in sorted(curves[name].items(), reverse=True):  # train, then eval
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if split == "eval" or name == "lr" else None,
                    markersize=3, label="logged" if name == "lr" else _literal(split),
                    linestyle="none" if name == "lr" else "-")
        if name == "loss":
            _loss_companions(ax, curves)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{_literal(Path(workdir).name)}: {label}")
        if name == "loss" and all(v > 0 for pts in curves[name].values() for _, v in pts):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            path = replace_inside(out, f"{stems[name]}.png",
                                  lambda tmp, fig=fig: fig.savefig(tmp, dpi=110))
            written.append(out / path.name)
        finally:
            plt.close(fig)
    return written


def _loss_companions(ax, curves: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
    """On the loss's picture: the train cross-entropy, and windows with non-finite steps."""
    train_ce = curves.get("cross_entropy", {}).get("train")
    if train_ce:
        steps, values = zip(*train_ce, strict=True)
        ax.plot(steps, values, linestyle="--", label="train cross_entropy")
    losses = dict(curves["loss"].get("train", []))
    bad = [(step, losses[step]) for step, count in curves.get("nonfinite_steps", {}).get(
        "train", []) if count and step in losses]
    if bad:
        steps, values = zip(*bad, strict=True)
        ax.scatter(steps, values, marker="x", color="red", zorder=3,
                   label="window with non-finite steps")


def main(argv: list[str] | None = None) -> int:
    """Entry point: plot a workdir; bad input gives one line and exit status 2."""
    parser = OneLineParser(prog="python -m jaxdist.plot", description=__doc__)
    parser.add_argument("workdir", type=Path)
    return print_paths(lambda: plot(parser.parse_args(argv).workdir))


if __name__ == "__main__":
    sys.exit(main())
