"""Fingerprints of the compiled train step of each bundled experiment under each layout.

Run it in two checkouts and compare the lines: the same fingerprint means XLA compiled
the very same program (the optimized HLO, its source-location metadata left out), so a
change of the code around the step changed no number. Run:

    python scripts/same_programs.py [EXPERIMENT ...] > new.txt
    (cd OLD_CHECKOUT && PYTHONPATH=. python /path/to/scripts/same_programs.py) > old.txt
    diff old.txt new.txt
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jaxdist  # noqa: E402

try:
    from jaxdist.loop.compiled import lower_train_step
except ImportError:  # checkouts before jaxdist's folders
    from jaxdist.compiled import lower_train_step

EXPERIMENTS = {"linear_regression": [], "digits_cnn": ["train.steps=3"],
               "gpt_lm": ["train.steps=3", "train.batch_size=16"],
               "cifar_resnet": ["train.steps=3"]}
SETTINGS = [[], ["parallel.grad_reduce=sum"], ["train.grad_accum=2"],
            ["parallel.shard=optimizer"], ["parallel.shard=gradients", "train.grad_accum=2"],
            ["parallel.shard=params"], ["parallel.backend=shard_map"],
            ["parallel.backend=shard_map", "parallel.shard=params"],
            ["parallel.shard=optimizer", "parallel.grad_reduce=sum"], ["train.skip_with=where"]]


def fingerprint(hlo: str) -> str:
    """The sha256 of an optimized HLO module's computations, without source locations."""
    lines = hlo.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("%"))
    body = "\n".join(lines[first:])
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    body = re.sub(r",? ?stack_frame_id=\d+", "", body)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def main() -> None:
    """Print one line per experiment and setting: its name, overrides and fingerprint."""
    chosen = sys.argv[1:] or list(EXPERIMENTS)
    for name, base in EXPERIMENTS.items():
        if name not in chosen:
            continue
        for setting in SETTINGS:
            if name == "linear_regression" and "train.grad_accum=2" in setting:
                continue  # full-batch: no micro-batches
            experiment, config = jaxdist.load(name, base + setting)
            lowered, _ = lower_train_step(experiment, config)
            print(name, " ".join(setting) or "-", fingerprint(lowered.compile().as_text()),
                  flush=True)


if __name__ == "__main__":
    main()
