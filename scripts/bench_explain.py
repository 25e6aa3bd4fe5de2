"""Examples/s of jaxdist's integrated gradients vs a hand-written jax.vmap(jax.grad) loop.

Both explain the same 1,000 digits images (the 899 test images, then training ones) with
the same digits CNN (trained 30 steps)
by integrated gradients at 64 midpoint steps from a zero baseline, for the predicted class.
jaxdist splits the examples over all devices (`jaxdist.explain.Explainer`, pmap); the
hand-written side is one jitted function on one device: `jax.vmap` over the 64 points of
`jax.grad` of the summed logit, in chunks of 125 examples. The two are checked to give the
same attributions first. Each round runs both once, in a shuffled order; the ratio is
taken within each round and its median printed. Run:

    python scripts/bench_explain.py           # 8 fake CPU devices on a CPU-only machine
"""

from __future__ import annotations

import argparse
import time

from benchlib import compare_in_rounds

BASELINE = "hand-written vmap(grad), 1 device"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-devices", type=int, default=8,
                        help="fake CPU devices when no accelerator is present")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=64, help="integration points")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np

    from experiments._digits import load_split
    from jaxdist import fit, load, make_backend
    from jaxdist.explain import Explainer, Method, integration_points

    experiment, config = load("digits_cnn", ["train.steps=30", "train.batch_size=64",
                                             "train.eval_every=0",
                                             "optimizer.warmup_steps=0"])
    params = fit(experiment, config, stream=None).params
    spec = experiment.explain
    train, test = load_split()  # 1,797 images: the first 1,000 of train + test
    rows = {"image": np.concatenate([test["image"], train["image"]])[:args.examples]}
    explainer = Explainer(spec, make_backend("pmap"), Method("ig", steps=args.steps))
    alphas, _ = integration_points(args.steps, "riemann")
    chunk = 125

    @jax.jit
    def hand_written(params, images):
        targets = jnp.argmax(spec.output(params, None, images), axis=-1)

        def summed_logit(x):
            logits = spec.output(params, None, x)
            return jnp.sum(jnp.take_along_axis(logits, targets[:, None], axis=1))

        grads = jax.vmap(lambda a: jax.grad(summed_logit)(a * images))(jnp.asarray(alphas))
        return images * grads.mean(axis=0)

    def by_hand() -> np.ndarray:
        return np.concatenate([np.asarray(hand_written(params, rows["image"][i:i + chunk]))
                               for i in range(0, args.examples, chunk)])

    ours = explainer(params, None, rows).attributions
    theirs = by_hand()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; {args.examples} "
          f"digits, ig with {args.steps} steps; max |difference| "
          f"{np.abs(ours - theirs).max():.2e} (attributions up to {np.abs(theirs).max():.2f})")

    def rate(run):
        def measure(repeats: int) -> float:
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            return repeats * args.examples / (time.perf_counter() - start)
        return measure

    compare_in_rounds({BASELINE: rate(by_hand),
                       "jaxdist Explainer, all devices": rate(
                           lambda: explainer(params, None, rows))},
                      BASELINE, rounds=args.rounds, steps=1, unit="examples/s")


if __name__ == "__main__":
    main()
