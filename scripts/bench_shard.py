"""ZeRO (`parallel.shard`): per-device memory from XLA's analysis, and steps/s side by side.

Memory (`--memory`): gpt_lm at GPT-2's four shapes (124M, 355M, 774M, 1.5B with GPT-2's
50257-token vocabulary), compiled only (nothing is initialized or trained) for each
`parallel.shard` value on the shard_map backend, one window of `--window` tokens per
device (128 by default: the state, not the activations, is what ZeRO splits),
`model.remat=block`; on the CPU with XLA's memory-optimized scheduler and
`jax.checkpoint`'s optimization barriers kept (see `memory_table`). From each compiled
step's `memory_analysis()`, per device: the arguments (the state and the batch), the
temporaries, their sum, and that sum as a share of `none`'s. The largest model takes
about 17 minutes to compile for `none`.

Speed (`--speed`): steps/s of the whole jaxdist step (`fit`'s step, metric window
included) on gpt_lm tiny, for each `parallel.shard` value, in shuffled paired rounds; the
ratio to `none` is taken within each round and its median printed.

    python scripts/bench_shard.py --memory            # about 50 minutes on 2 cores
    python scripts/bench_shard.py --speed             # about 2 minutes
"""

from __future__ import annotations

import argparse
import time

from benchlib import compare_in_rounds, jaxdist_runner

SIZES = {"124M": "gpt2", "355M": "gpt2_medium", "774M": "gpt2_large", "1.5B": "gpt2_xl"}
GIB = 1 << 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="the memory table")
    parser.add_argument("--speed", action="store_true", help="steps/s on gpt_lm tiny")
    parser.add_argument("--cpu-devices", type=int, default=8,
                        help="fake CPU devices when no accelerator is present")
    parser.add_argument("--sizes", default=",".join(SIZES),
                        help=f"comma-separated, of: {', '.join(SIZES)}")
    parser.add_argument("--window", type=int, default=128,
                        help="tokens per device per step (gpt_lm's data.window; 1024: all)")
    parser.add_argument("--backend", default="shard_map", choices=["pmap", "shard_map"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per side per round")
    return parser.parse_args()


def memory_table(args: argparse.Namespace) -> None:
    """Print per-device bytes of state and temporaries for every size and shard value."""
    import jax

    import experiments.gpt_lm as gpt
    from jaxdist.base.config import apply_overrides
    from jaxdist.loop.compiled import lower_abstract_train_step
    from jaxdist.parallel.layout import SHARDS

    devices = len(jax.devices())
    # XLA:CPU's default scheduler favours running things at once over memory: ask for its
    # memory-optimized one. And XLA:CPU removes the optimization barriers of jax.checkpoint
    # early ("cse_barrier_expander"), after which common-subexpression elimination merges a
    # recomputed block's parameter gathers with the forward pass's, keeping every layer's
    # gathered weights until the backward pass: keep the barriers, as jax.checkpoint asks.
    options = ({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                "xla_disable_hlo_passes": "cse_barrier_expander"}
               if jax.devices()[0].platform == "cpu" else {})
    print(f"per-device memory of the compiled train step ({devices} x "
          f"{jax.devices()[0].platform}, {args.backend}); AdamW fp32 state, one window of "
          f"{args.window} tokens per device, model.remat=block; compiler options "
          f"{options or 'default'}")
    print(f"{'model':>6s} {'params':>8s} {'shard':>10s} {'args GiB':>10s} "
          f"{'temp GiB':>9s} {'total GiB':>10s} {'of none':>8s} {'compile s':>10s}")
    for label in args.sizes.split(","):
        none_total = None
        for shard in SHARDS:
            config = apply_overrides(gpt.config(), [
                f"model.size={SIZES[label]}", "model.vocab_size=50257", "model.remat=block",
                f"train.batch_size={devices}", f"parallel.backend={args.backend}",
                f"parallel.shard={shard}", "data.max_bytes=200000",
                f"data.window={args.window}"])
            started = time.perf_counter()
            lowered, layout = lower_abstract_train_step(gpt.build(config), config)
            analysis = lowered.compile(compiler_options=options).memory_analysis()
            seconds = time.perf_counter() - started
            params = sum(c.size for c in jax.tree.leaves(layout.param_chunks))
            # The arguments are the state and this device's batch (one window: 4 KiB).
            state = analysis.argument_size_in_bytes
            temp = analysis.temp_size_in_bytes
            total = state + temp
            none_total = none_total or total
            print(f"{label:>6s} {params / 1e6:7.0f}M {shard:>10s} {state / GIB:10.2f} "
                  f"{temp / GIB:9.2f} {total / GIB:10.2f} {total / none_total:8.3f} "
                  f"{seconds:10.1f}", flush=True)


def speed_table(args: argparse.Namespace) -> None:
    """Print steps/s of gpt_lm tiny's step for every shard value, as ratios to `none`."""
    import experiments.gpt_lm as gpt
    from jaxdist.base.config import apply_overrides
    from jaxdist.loop.start import prepare_run
    from jaxdist.parallel.layout import SHARDS

    def runner(shard: str):
        config = apply_overrides(gpt.tiny_config(), [f"parallel.backend={args.backend}",
                                                     f"parallel.shard={shard}"])
        experiment = gpt.build(config)
        start = prepare_run(experiment, config, None, False, ())
        backend, layout = start.backend, start.layout
        state = layout.to_devices(backend, start.host_state)
        batch = backend.put_batch(start.loader.peek())
        return jaxdist_runner(start.train_step, state, batch, backend)

    sides = {f"shard={shard}": runner(shard) for shard in SHARDS}
    print(f"gpt_lm tiny, {args.backend}; {args.rounds} rounds x {args.steps} steps per side")
    compare_in_rounds(sides, "shard=none", args.rounds, args.steps)


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if not (args.memory or args.speed):
        args.memory = args.speed = True
    if args.speed:
        speed_table(args)
    if args.memory:
        memory_table(args)


if __name__ == "__main__":
    main()
