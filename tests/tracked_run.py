"""A toy run with tracking.mlflow, for tests that kill it or its server partway.

python tests/tracked_run.py WORKDIR TRACKING_URI [HOLD_AT [GO_FILE]]

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


def tracked_config(uri: str):
    config = toy_config(steps=20, log_every=2)
    config.train.eval_every = 10
    config.train.checkpoint_every = 6
    config.tracking.mlflow = uri
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
    workdir, uri = sys.argv[1], sys.argv[2]
    hold = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    go = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    hooks = [HoldAt(hold, go)] if hold else []
    fit(mlp_experiment(), tracked_config(uri), workdir, hooks=hooks)
