"""Steps/s of `digits_nnx` through jaxdist vs a hand-written `nnx.jit` loop on the same model.

flax#4459 measured NNX's Python overhead at about 8 ms a step against 1.8 ms for plain
JAX: `nnx.jit` walks the module's graph on every call. jaxdist traces a pure function of
the params and model state (`jaxdist.from_nnx`), so an NNX model should cost what a linen
one does. Sides, all on one batch of the digits training split already placed on the
devices, with the same optax transform (`digits_nnx`'s AdamW and schedule):

- `hand-written nnx.jit` (the baseline): the loop of flax's NNX guides on the same `CNN`
  (its BatchNorm statistics global over the batch, as GSPMD computes them on a batch
  sharded over the devices), `nnx.Optimizer`, `nnx.value_and_grad` of the weighted mean
  loss, `nnx.jit` with the model and optimizer donated.
- `jaxdist digits_nnx pmap` / `shard_map`: the train step `fit` runs for `digits_nnx`.
- `jaxdist linen, same CNN pmap`: the same CNN written in linen (with jaxdist's linen
  `CrossReplicaBatchNorm`), through the same step: what an NNX model costs beside linen.
- `jaxdist digits_cnn pmap`: the linen CNN of `digits_cnn` (no BatchNorm; its own size).

Each round runs every side for the same number of steps, in a shuffled order; ratios to
the baseline are taken within each round and their medians printed. Run:

    python scripts/bench_nnx.py              # 8 fake CPU devices on a CPU-only machine
"""

from __future__ import annotations

import argparse
import time

from benchlib import compare_in_rounds, jaxdist_runner

BASELINE = "hand-written nnx.jit"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8,
                        help="fake CPU devices when no accelerator is present")
    parser.add_argument("--windows", type=int, default=15, help="rounds")
    parser.add_argument("--steps", type=int, default=40, help="steps per side per round")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import flax.linen as nn
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    import experiments.digits_cnn as digits_cnn
    import experiments.digits_nnx as digits_nnx
    from jaxdist import Experiment, make_backend, make_train_step
    from jaxdist.data import Loader
    from jaxdist.loop.start import initial_state
    from jaxdist.parallel.backend import AXIS
    from jaxdist.parallel.dispatch import InFlightLimit
    from jaxdist.step.losses import cross_entropy
    from jaxdist.step.models.batchnorm import CrossReplicaBatchNorm
    from jaxdist.step.optimizers import build_optimizer, fix_schedule_horizon
    from jaxdist.step.precision import compute_dtype

    config = fix_schedule_horizon(digits_nnx.config())
    tx = build_optimizer(config.optimizer)
    experiment = digits_nnx.build(config)
    batch = next(Loader(experiment.train_data, config.train.batch_size, args.cpu_devices))
    m = config.model

    # --- the hand-written nnx.jit loop ---------------------------------------------------
    def hand_written():
        mesh = jax.make_mesh((len(jax.devices()),), ("batch",))
        replicated = NamedSharding(mesh, PartitionSpec())
        rows = NamedSharding(mesh, PartitionSpec("batch"))
        model = digits_nnx.CNN(m, compute_dtype("fp32"), nnx.Rngs(0))
        for bn in (model.bn1, model.bn2):
            bn.axis_name = None  # one global program: its batch statistics are global
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for node in (model, optimizer):
            nnx.update(node, jax.device_put(nnx.state(node), replicated))
        x, y, w = (jax.device_put(batch[key], rows) for key in ("image", "label", "weight"))

        @nnx.jit(donate_argnums=(0, 1))
        def train_step(model, optimizer, x, y, w):
            def mean_loss(model):
                losses = cross_entropy(model(x, w), y, m.label_smoothing)
                return jnp.sum(losses * w) / jnp.sum(w)

            loss, grads = nnx.value_and_grad(mean_loss)(model)
            optimizer.update(model, grads)
            return loss

        model.train()

        def run(steps: int) -> float:
            in_flight = InFlightLimit()
            start = time.perf_counter()
            for _ in range(steps):
                loss = train_step(model, optimizer, x, y, w)
                in_flight.add(loss)
            float(loss)
            return steps / (time.perf_counter() - start)

        return run

    # --- the same CNN in linen -----------------------------------------------------------
    class LinenCNN(nn.Module):
        axis_name: str | None = AXIS

        @nn.compact
        def __call__(self, images, weight, train):
            x = images[..., None]
            for width in (m.channels1, m.channels2):
                x = nn.Conv(width, (3, 3), use_bias=False)(x)
                x = nn.relu(CrossReplicaBatchNorm(axis_name=self.axis_name)(x, weight, train))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Dense(m.dense)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(nn.Dropout(m.dropout, deterministic=not train)(x))

    def linen_experiment():
        model, init_model = LinenCNN(), LinenCNN(axis_name=None)

        def init(rng):
            return init_model.init(rng, batch["image"][:1], jnp.ones(1), train=False)

        def loss_fn(params, model_state, batch, rng):
            logits, updated = model.apply({"params": params, "batch_stats": model_state},
                                          batch["image"], batch["weight"], train=True,
                                          mutable=["batch_stats"], rngs={"dropout": rng})
            losses = cross_entropy(logits, batch["label"], m.label_smoothing)
            return losses, {}, updated["batch_stats"]

        return Experiment(init_params=lambda rng: init(rng)["params"],
                          init_model_state=lambda rng: init(rng)["batch_stats"],
                          loss_fn=loss_fn, eval_fn=lambda *args: None,
                          train_data=experiment.train_data)

    # --- the jaxdist step ----------------------------------------------------------------
    def jaxdist_side(module, name: str):
        if isinstance(module, Experiment):
            built = module
        else:
            built = module.build(config if module is digits_nnx else fix_schedule_horizon(
                module.config()))
        backend = make_backend(name)
        step = backend.compile(make_train_step(built.loss_fn, tx, has_state=built.has_state))
        state = backend.replicate(initial_state(built, config, tx))
        placed = backend.put_batch(dict(batch))
        return jaxdist_runner(step, state, placed, backend)

    sides = {BASELINE: hand_written(),
             "jaxdist digits_nnx pmap": jaxdist_side(digits_nnx, "pmap"),
             "jaxdist digits_nnx shard_map": jaxdist_side(digits_nnx, "shard_map"),
             "jaxdist linen, same CNN pmap": jaxdist_side(linen_experiment(), "pmap"),
             "jaxdist digits_cnn pmap": jaxdist_side(digits_cnn, "pmap")}
    device = jax.devices()[0]
    print(f"devices: {len(jax.devices())} x {device.platform} ({device.device_kind}); "
          f"digits batch {config.train.batch_size}; {args.windows} rounds x {args.steps} "
          f"steps per side")
    compare_in_rounds(sides, BASELINE, args.windows, args.steps)


if __name__ == "__main__":
    main()
