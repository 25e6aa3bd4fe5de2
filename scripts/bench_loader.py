"""The loader's throughput, and what it costs a training step.

(1) Examples/s the loader delivers on its own (host batches; then host batches placed on
    the devices through the prefetch thread), for a digits-sized source (1797 x 64 float32)
    and a CIFAR-sized one (50000 x 32x32x3 uint8), in memory and as a `.npy` shard folder
    (read with `os.pread`).
(2) Training steps/s of an MLP on the CIFAR-sized data, fed by the loader (in memory, and
    from the shard folder) vs fed the same kind of batches already placed on the devices.
    Target: step time with the loader <= 1.03 x without (time ratio in the table).

Run:

    python scripts/bench_loader.py              # 8 fake CPU devices on a CPU-only machine
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

from benchlib import compare_in_rounds, mlp_logits, mlp_params


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=20, help="steps per side per round")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxdist import make_backend, make_train_step
    from jaxdist.data import DevicePrefetcher, Loader, NpyFolderSource, write_shards
    from jaxdist.loop.metrics import MetricWindow
    from jaxdist.parallel.dispatch import InFlightLimit
    from jaxdist.step.steps import TrainState

    backend = make_backend("pmap")
    n = backend.num_devices
    rng = np.random.default_rng(0)
    digits = {"image": rng.normal(size=(1797, 64)).astype(np.float32),
              "label": rng.integers(0, 10, 1797).astype(np.int32)}
    cifar = {"image": rng.integers(0, 256, size=(50000, 32, 32, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 50000).astype(np.int32)}
    tmp = tempfile.TemporaryDirectory()
    cifar_folder = NpyFolderSource(write_shards(tmp.name, cifar, rows_per_shard=10000))

    device = jax.devices()[0]
    print(f"devices: {n} x {device.platform} ({device.device_kind}); global batch "
          f"{args.batch}")
    print("\n(1) loader alone, examples/s (median of 5 runs of 50 batches)")
    print(f"{'source':28s} {'host batches':>14s} {'placed on devices':>18s}")
    for name, data in [("digits 1797x64 f32, memory", digits),
                       ("cifar 50000x32x32x3 u8, memory", cifar),
                       ("cifar, .npy shard folder", cifar_folder)]:
        host, placed = [], []
        for _ in range(5):
            loader = Loader(data, args.batch, n, seed=0)
            start = time.perf_counter()
            for _ in range(50):
                next(loader)
            host.append(50 * args.batch / (time.perf_counter() - start))
            with DevicePrefetcher(Loader(data, args.batch, n, seed=1),
                                  backend.put_batch) as batches:
                start = time.perf_counter()
                for batch in itertools.islice(batches, 50):
                    jax.block_until_ready(batch)
                placed.append(50 * args.batch / (time.perf_counter() - start))
        print(f"{name:28s} {statistics.median(host):14.0f} {statistics.median(placed):18.0f}")

    sizes = [32 * 32 * 3, 512, 512, 10]
    params = mlp_params(sizes)
    tx = optax.adam(1e-4)

    def loss_fn(params, batch, rng):
        x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0
        logits = mlp_logits(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    step = backend.compile(make_train_step(loss_fn, tx))

    def trainer(batches):
        state = backend.replicate(TrainState.create(params, tx, jax.random.key(1)))

        def run(steps: int) -> float:
            nonlocal state
            window, in_flight = MetricWindow(), InFlightLimit()
            start = time.perf_counter()
            for _ in range(steps):
                state, sums = step(state, next(batches))
                window.add(sums)
                in_flight.add(sums)
            window.summarize(backend)
            return steps / (time.perf_counter() - start)

        return run

    preplaced = [backend.put_batch(b) for b in
                 itertools.islice(Loader(cifar, args.batch, n, seed=2), 8)]
    memory_feed = DevicePrefetcher(Loader(cifar, args.batch, n, seed=3), backend.put_batch)
    folder_feed = DevicePrefetcher(Loader(cifar_folder, args.batch, n, seed=4),
                                   backend.put_batch)
    baseline = "batches pre-placed on devices"
    sides = {baseline: trainer(itertools.cycle(preplaced)),
             "loader, memory": trainer(memory_feed),
             "loader, .npy shard folder": trainer(folder_feed)}
    print(f"\n(2) training steps/s, MLP {sizes} on the CIFAR-sized data, "
          f"{args.rounds} rounds x {args.steps} steps per side")
    compare_in_rounds(sides, baseline, args.rounds, args.steps)
    memory_feed.close()
    folder_feed.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
