"""Build the optax transformation and learning-rate schedule an `OptimizerConfig` names."""

from __future__ import annotations

import optax

from jaxdist.config import OptimizerConfig


def build_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the update count."""
    peak = config.learning_rate
    if config.schedule == "warmup_cosine":
        decay = config.decay_steps or total_steps
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
            decay_steps=max(decay, config.warmup_steps + 1),
            end_value=peak * config.final_fraction)
    if config.schedule == "step":
        return optax.exponential_decay(peak, transition_steps=config.step_every,
                                       decay_rate=config.step_factor, staircase=True)
    return optax.constant_schedule(peak)


def build_optimizer(config: OptimizerConfig,
                    total_steps: int = 1) -> optax.GradientTransformation:
    """Return the optax transformation for `config` over a run of `total_steps` updates.

    `weight_decay` is decoupled for `adamw` and `lamb` and added to the gradient for the
    others; `clip_norm` clips the global gradient norm before everything else.
    """
    lr = build_schedule(config, total_steps)
    if config.name == "adamw":
        base = optax.adamw(lr, weight_decay=config.weight_decay)
    elif config.name == "lamb":
        base = optax.lamb(lr, weight_decay=config.weight_decay)
    else:
        base = {
            "sgd": lambda: optax.sgd(lr),
            "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
            "adam": lambda: optax.adam(lr),
        }[config.name]()
        if config.weight_decay:
            base = optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    if config.clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), base)
    return base
