"""Seconds per checkpoint of a model's train state: written in place, and in the background.

Builds the `gpt_lm` train state (AdamW) at `--size` (default `gpt2`, GPT-2 124M with a
50304-token vocabulary) on the host, then saves it `--saves` times with
`jaxdist.checkpoints.store.CheckpointStore` in place, and as many times through
`jaxdist.checkpoints.saving.CheckpointWriter` in the background, where the training loop
waits only for the host copy. Prints each time, their medians, and the sha256 pass over
one checkpoint's files on its own.

    python scripts/bench_checkpoint.py [--size gpt2] [--saves 3] [--folder DIR]

Without `--folder` it writes to a new temporary folder and removes it at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2", help="gpt_lm's model.size")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None,
                        help="where to write (default: a new temporary folder)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax
    import numpy as np

    import jaxdist
    from jaxdist.loop.start import initial_state
    from jaxdist.step.optimizers import build_optimizer

    experiment, config = jaxdist.load("gpt_lm", [
        f"model.size={args.size}", "model.vocab_size=50304", "data.max_bytes=3000000",
        "optimizer.schedule=constant"])
    state = initial_state(experiment, config, build_optimizer(config.optimizer))
    params = sum(np.size(x) for x in jax.tree.leaves(state.params))
    size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_checkpoint-"))
    try:
        measure(args, state, params, size, folder)
    finally:
        if args.folder is None:  # a GiB of checkpoints per save: never left in /tmp
            shutil.rmtree(folder, ignore_errors=True)


def measure(args: argparse.Namespace, state: Any, params: int, size: int,
            folder: Path) -> None:
    """Time the saves of `state` into `folder` and print the table."""
    from jaxdist.checkpoints.integrity import checkpoint_files, sha256_file
    from jaxdist.checkpoints.saving import CheckpointWriter
    from jaxdist.checkpoints.store import CheckpointStore

    print(f"gpt_lm {args.size}: {params:,} parameters, train state {size / 2**30:.2f} GiB "
          f"(AdamW); writing to {folder}")

    store = CheckpointStore(folder / "checkpoints", keep=1)
    in_place = []
    for step in range(1, args.saves + 1):
        started = time.perf_counter()
        store.save(step, state, {"eval": None})
        in_place.append(time.perf_counter() - started)

    writer = CheckpointWriter(store, background=True)
    blocking, total = [], []
    for step in range(args.saves + 1, 2 * args.saves + 1):
        started = time.perf_counter()
        writer.save(step, state, {"eval": None}, lambda path, seconds: None)
        blocking.append(time.perf_counter() - started)
        writer.wait()
        total.append(time.perf_counter() - started)

    started = time.perf_counter()
    for path in checkpoint_files(store.path(2 * args.saves)):
        sha256_file(path)
    hashing = time.perf_counter() - started
    store.close()

    def show(name: str, values: list[float]) -> None:
        print(f"{name:44s} median {statistics.median(values):6.2f} s   "
              f"({', '.join(f'{v:.2f}' for v in values)})")

    show("save in place (the loop waits for all of it)", in_place)
    show("background: the loop waits for the host copy", blocking)
    show("background: the whole save", total)
    print(f"{'sha256 of one checkpoint files, alone':44s}        {hashing:6.2f} s")


if __name__ == "__main__":
    main()
