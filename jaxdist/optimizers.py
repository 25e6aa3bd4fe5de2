"""Build the optax transformation an `OptimizerConfig` names."""

from __future__ import annotations

import optax

from jaxdist.config import OptimizerConfig


def build_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Return the optax transformation for `config.name` at `config.learning_rate`.

    `weight_decay` is decoupled (AdamW-style) for `adamw` and added to the gradient for the
    others.
    """
    lr = config.learning_rate
    if config.name == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    base = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
        "adam": lambda: optax.adam(lr),
    }[config.name]()
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base
