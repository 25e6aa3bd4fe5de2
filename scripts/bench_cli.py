"""Seconds until the command line answers a config error or `--help` (issue 27's target: 2 s).

Each command runs `--repeats` times in a fresh process (the page cache warm after the
first); the median and the slowest are printed, with whether it imported jax (a core
config error is told before the experiment, and jax, are imported). Run:

    python scripts/bench_cli.py            # about a minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "a core key's typo (train.stpes=10)": ["digits_cnn", "train.stpes=10"],
    "a core value's type (train.steps=ten)": ["digits_cnn", "train.steps=ten"],
    "an experiment key's typo (model.chanels1=8)": ["digits_cnn", "model.chanels1=8"],
    "EXPERIMENT --help": ["digits_cnn", "--help"],
    "--help": ["--help"],
}
# Prints, after the command, whether it imported jax.
PROBE = ("import sys\nfrom jaxdist.run import main\nstatus = main(sys.argv[1:])\n"
         "print('imported jax' if 'jax' in sys.modules else 'no jax', file=sys.stderr)\n"
         "sys.exit(status)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':46s} {'median s':>9s} {'max s':>7s}  jax")
    for name, argv in COMMANDS.items():
        seconds, imported = [], ""
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            seconds.append(time.perf_counter() - started)
            imported = done.stderr.strip().splitlines()[-1]
        print(f"{name:46s} {statistics.median(seconds):9.2f} {max(seconds):7.2f}  {imported}")


if __name__ == "__main__":
    main()
