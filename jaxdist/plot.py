"""`python -m jaxdist.plot WORKDIR`: draw the logged curves of a run to PNG files.

One figure per metric (loss first), train and eval curves against the step, written to
`WORKDIR/plots/METRIC.png`.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from jaxdist.cli import OneLineParser, print_paths
from jaxdist.errors import UserError
from jaxdist.metrics import METRICS_FILE, from_json_line

SKIP = {"step", "split", "examples"}


def read_curves(workdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """`{metric: {split: [(step, value), ...]}}` from `WORKDIR/metrics.jsonl`."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        raise UserError(f"{path} does not exist; give the --workdir of a jaxdist run")
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        try:
            record = from_json_line(line)
        except ValueError:
            continue  # a line cut short by a crash
        for name, value in record.items():
            if name not in SKIP and isinstance(value, (int, float)):
                curves[name][record.get("split", "train")].append((record["step"], value))
    if not curves:
        raise UserError(f"{path} holds no logged points yet")
    return curves


def plot(workdir: Path) -> list[Path]:
    """Write one PNG per metric to `WORKDIR/plots/`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(workdir)
    out = Path(workdir) / "plots"
    out.mkdir(exist_ok=True)
    written = []
    for name in sorted(curves, key=lambda n: (n != "loss", n)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for split, points in sorted(curves[name].items(), reverse=True):  # train, then eval
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if split == "eval" else None,
                    markersize=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{Path(workdir).name}: {name}")
        if name == "loss" and all(v > 0 for pts in curves[name].values() for _, v in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point: plot a workdir; bad input gives one line and exit status 2."""
    parser = OneLineParser(prog="python -m jaxdist.plot", description=__doc__)
    parser.add_argument("workdir", type=Path)
    return print_paths(lambda: plot(parser.parse_args(argv).workdir))


if __name__ == "__main__":
    sys.exit(main())
