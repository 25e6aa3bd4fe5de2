"""Run every experiment's full CPU config and print result, target and wall time.

Each experiment runs as a user would run it (`python -m jaxdist.run NAME --cpu-devices 8`,
a fresh process, compilation included) in a temporary workdir; its final `eval` line is
read from `metrics.jsonl`. Then the imbalanced-digits table. Run:

    python scripts/bench_experiments.py            # about 5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (metric, target as text, check on the value and wall seconds)
TARGETS = {
    "linear_regression": ("loss", "<= 2862.56 (lstsq 2859.70 + 0.1%)",
                          lambda v, s: v <= 2859.70 * 1.001),
    "digits_cnn": ("accuracy", ">= 0.975 within 20 s", lambda v, s: v >= 0.975 and s <= 20),
    "digits_nnx": ("accuracy", ">= 0.99", lambda v, s: v >= 0.99),
    "digits_equinox": ("accuracy", ">= 0.99", lambda v, s: v >= 0.99),
    "digits_mlp": ("accuracy", "none (scikit-learn's SVC: 0.969)", None),
    "digits_imbalanced": ("recall_8", "none (see the table below)", None),
    "cifar_resnet": ("accuracy", ">= 0.95 (synthetic set)", lambda v, s: v >= 0.95),
    "gpt_lm": ("bits_per_byte", "<= 2.5 (uniform: 8)", lambda v, s: v <= 2.5),
}


def run(name: str, devices: int, workdir: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "jaxdist.run", name, "--cpu-devices",
                             str(devices), "--workdir", str(workdir)], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == "eval"][-1], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8)
    parser.add_argument("names", nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {args.cpu_devices} CPU devices")
    print(f"{'experiment':20s} {'metric':14s} {'result':>10s} {'wall s':>7s}  {'met':4s} target")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            metric, target, check = TARGETS[name]
            values, seconds = run(name, args.cpu_devices, Path(tmp) / name)
            met = "-" if check is None else ("yes" if check(values[metric], seconds) else "NO")
            print(f"{name:20s} {metric:14s} {values[metric]:10.4f} {seconds:7.1f}  {met:4s} "
                  f"{target}", flush=True)
    if "digits_imbalanced" in args.names:
        print("\ndigits_imbalanced, minority-class recall by remedy:")
        subprocess.run([sys.executable, "-m", "experiments.digits_imbalanced"], cwd=ROOT,
                       check=True)


if __name__ == "__main__":
    main()
