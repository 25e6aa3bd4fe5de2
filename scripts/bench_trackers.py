"""Steps/s of a run with its trackers on (a real MLflow server, W&B offline) vs them off.

Each side trains the bundled `digits_cnn` (`--steps` steps, a train point every
`--log-every` steps, so the tracker gets a point every few hundred milliseconds) through
`jaxdist.fit` into a fresh workdir. The rate is measured over the loop, from the end of the
first step (compiling excluded) to the end of the last, so it holds what the tracker costs
training while it runs: queueing each point, and its thread's work beside the steps. What
the end of the run waits for the tracker is printed apart (the seconds from the last step
until `fit` returned, which also hold the final evaluation and save on both sides).

The MLflow server (sqlite store) is started by this script and stopped by its pid; W&B runs
with `WANDB_MODE=offline` (no network), writing its run files in each workdir. Rounds run
every side in a shuffled order and take the ratios within the round. Run:

    python scripts/bench_trackers.py             # 8 fake CPU devices, about 10 minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import compare_in_rounds

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OFF = "tracking off"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    import jax

    import jaxdist
    from jaxdist.loop.compile_cache import enable_compilation_cache
    from jaxdist.loop.hooks import Hook
    from tests.servers import MlflowServer

    scratch = Path(tempfile.mkdtemp(prefix="bench-trackers-"))
    os.environ.setdefault("JAXDIST_COMPILATION_CACHE", str(scratch / "xla"))
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    enable_compilation_cache()

    class LoopTimer(Hook):
        """When the first and the last step ended."""

        def after_step(self, run, sums):
            if run.step == 1:
                jax.block_until_ready(sums)
                self.first = time.perf_counter()
            if run.step == run.config.train.steps:
                jax.block_until_ready(sums)
                self.last = time.perf_counter()

    endings: dict[str, list[float]] = {}
    runs = iter(range(10**6))

    def side(name: str, overrides: list[str]):
        def run(steps: int) -> float:
            experiment, config = jaxdist.load("digits_cnn", [
                f"train.steps={steps}", f"train.log_every={args.log_every}",
                "train.eval_every=0", *overrides])
            timer = LoopTimer()
            fit_result = jaxdist.fit(experiment, config, scratch / f"run-{next(runs)}",
                                     stream=None, hooks=[timer])
            ended = time.perf_counter()
            assert fit_result.step == steps
            endings.setdefault(name, []).append(ended - timer.last)
            return (steps - 1) / (timer.last - timer.first)
        return run

    with MlflowServer(scratch / "mlflow") as server:
        print(f"MLflow server {server.uri} (pid {server.process.pid}), digits_cnn, "
              f"{args.steps} steps, a point every {args.log_every}")
        mlflow, wandb = [f"tracking.mlflow={server.uri}"], ["tracking.wandb=bench"]
        compare_in_rounds({OFF: side(OFF, []),
                           "tracking.mlflow": side("mlflow", mlflow),
                           "tracking.wandb (offline)": side("wandb", wandb),
                           "both": side("both", mlflow + wandb)},
                          OFF, args.rounds, args.steps)
    for name, seconds in endings.items():
        print(f"end of run ({name}): median {statistics.median(seconds):.2f} s from the last "
              f"step until fit returned")


if __name__ == "__main__":
    main()
