"""Steps/s of the jaxdist train step vs a minimal hand-written jax.pmap loop, same work.

Both sides train the same MLP with the same optax Adam on the same batch, already placed on
the devices. The hand-written side is the textbook loop: `value_and_grad` of the mean loss,
`pmean` of the gradients, `tx.update`, donated buffers; a second hand-written side guards
the update as jaxdist does, skipping it under `lax.cond` unless the loss and every gradient
entry are finite (on XLA's CPU backend the cond alone changes the speed markedly, so this
is the like-for-like baseline, and ratios are taken to it).
The jaxdist side is what `fit` runs per step: the weighted-sum step with exact global means,
a per-device RNG, the non-finite guard, summed metrics kept on the devices and read back
once per window; one more jaxdist side adds the step's health norms on every 10th step
(`train.log_norms`, the default, with `train.log_every=10`).

Both loops let at most 2 steps run ahead of the host (`jaxdist.parallel.dispatch.InFlightLimit`);
without that bound, XLA's CPU collectives deadlock on 8 fake devices (jax 0.10.2).

Each round runs every side for the same number of steps, in a shuffled order; the ratio
to the hand-written loop is taken within each round (so machine drift cancels) and its
median over the rounds is printed. Run:

    python scripts/bench_step.py              # 8 fake CPU devices on a CPU-only machine
"""

from __future__ import annotations

import argparse
import time

from benchlib import compare_in_rounds, jaxdist_runner, mlp_logits, mlp_params

BASELINE = "hand-written pmap, guarded"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8,
                        help="fake CPU devices when no accelerator is present")
    parser.add_argument("--windows", type=int, default=21, help="rounds")
    parser.add_argument("--steps", type=int, default=20, help="steps per side per round")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxdist import make_backend, make_train_step
    from jaxdist.parallel.dispatch import InFlightLimit
    from jaxdist.step.steps import StepOptions, TrainState

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.features)).astype(np.float32)
    y = rng.integers(0, 10, size=args.batch).astype(np.int32)
    sizes = [args.features, args.hidden, args.hidden, 10]
    params = mlp_params(sizes)
    tx = optax.adam(1e-4)
    logits_fn = mlp_logits

    def per_example_loss(params, batch, rng):
        logits = logits_fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), {}

    # --- the hand-written pmap loop ------------------------------------------------------
    def hand_written(update_under_cond: bool):
        def hand_step(params, opt_state, x, y):
            def mean_loss(params):
                logits = logits_fn(params, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(mean_loss)(params)
            grads = jax.lax.pmean(grads, "batch")

            def update(_):
                updates, new_opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new_opt_state

            if update_under_cond:  # as jaxdist's non-finite guard does
                # Skip unless the loss and every gradient entry are finite (the check of
                # optax.apply_if_finite, and jaxdist's): one sum over all of them.
                total = loss + sum(jnp.sum(g) for g in jax.tree.leaves(grads))
                params, opt_state = jax.lax.cond(jnp.isfinite(total), update,
                                                 lambda _: (params, opt_state), None)
            else:
                params, opt_state = update(None)
            return params, opt_state, jax.lax.pmean(loss, "batch")

        step = jax.pmap(hand_step, axis_name="batch", donate_argnums=(0, 1))
        state = [backend.replicate(params), backend.replicate(tx.init(params))]

        def run(steps: int) -> float:
            in_flight = InFlightLimit()
            start = time.perf_counter()
            for _ in range(steps):
                state[0], state[1], loss = step(state[0], state[1], hand_x, hand_y)
                in_flight.add(loss)
            float(np.asarray(loss.addressable_shards[0].data)[0])
            return steps / (time.perf_counter() - start)

        return run

    backend = make_backend("pmap")
    n = backend.num_devices
    hand_x, hand_y = backend.put_batch(x), backend.put_batch(y)

    # --- the jaxdist step, per backend ---------------------------------------------------
    def jaxdist_side(name: str, options: StepOptions | None = None):
        backend = make_backend(name)
        options = options or StepOptions()
        step = backend.compile(make_train_step(per_example_loss, tx, options=options))
        state = backend.replicate(TrainState.create(params, tx, jax.random.key(1)))
        batch = backend.put_batch({"x": x, "y": y, "weight": np.ones(args.batch, np.float32)})
        return jaxdist_runner(step, state, batch, backend)

    sides = {"hand-written pmap": hand_written(False),
             BASELINE: hand_written(True),
             "jaxdist pmap": jaxdist_side("pmap"),
             "jaxdist shard_map": jaxdist_side("shard_map"),
             # train.log_norms (the default) with train.log_every=10: the norms of every
             # 10th step, as `fit` builds the step.
             "jaxdist pmap, norms every 10": jaxdist_side(
                 "pmap", StepOptions(norms_every=10))}
    device = jax.devices()[0]
    print(f"devices: {n} x {device.platform} ({device.device_kind}); MLP {sizes}, "
          f"global batch {args.batch}; {args.windows} rounds x {args.steps} steps per side")
    compare_in_rounds(sides, BASELINE, args.windows, args.steps)

if __name__ == "__main__":
    main()
