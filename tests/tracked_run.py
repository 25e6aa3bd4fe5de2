"""A toy run with a tracker, for tests that kill it or its server partway.

python tests/tracked_run.py WORKDIR tracking.KEY=VALUE [HOLD_AT [GO_FILE]] [KEY=VALUE ...]

(`tracking.mlflow=URI`, `tracking.wandb=PROJECT`, or `tracking.mlflow=` for none; then
`train.*` overrides of the toy run's config.)

After logging the train point of step HOLD_AT, the run holds (with its points already
queued for the tracker) until GO_FILE exists; without GO_FILE it holds for good, to be
killed.
"""

import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxdist import fit  # noqa: E402
from jaxdist.loop.hooks import Hook  # noqa: E402
from tests.toy import mlp_experiment, toy_config  # noqa: E402


def tracked_config(tracking: str, overrides: tuple[str, ...] = ()):
    """The toy run's config with one `tracking.KEY=VALUE` set, and `train.KEY=INT`s."""
    config = toy_config(steps=20, log_every=2)
    config.train.eval_every = 10
    config.train.checkpoint_every = 6
    key, value = tracking.removeprefix("tracking.").split("=", 1)
    setattr(config.tracking, key, value)
    for override in overrides:
        key, value = override.removeprefix("train.").split("=", 1)
        setattr(config.train, key, int(value))
    return config


class HoldAt(Hook):
    def __init__(self, step: int, go: Path | None):
        self.step, self.go = step, go

    def after_log(self, run, split, values):
        if split == "train" and run.step == self.step:
            print(f"holding at step {run.step}", flush=True)
            while self.go is None or not self.go.exists():
                time.sleep(0.1)


if __name__ == "__main__":
    workdir, tracking, *rest = sys.argv[1:]
    overrides = tuple(arg for arg in rest if "=" in arg)
    positional = [arg for arg in rest if "=" not in arg]
    hold = int(positional[0]) if positional else 0
    go = Path(positional[1]) if len(positional) > 1 else None
    hooks = [HoldAt(hold, go)] if hold else []
    fit(mlp_experiment(), tracked_config(tracking, overrides), workdir, hooks=hooks)
