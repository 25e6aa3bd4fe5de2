"""Build the optax transformation and learning-rate schedule an `OptimizerConfig` names.

A run's schedule is fixed when the run starts: `decay_steps=0` ("decay over the run") is
resolved to that run's `train.steps` by `fix_schedule_horizon` and saved with the run, so a
run resumed with more steps continues the very same schedule (after its end, at its final
rate) instead of stretching it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdist.base.config import Config, OptimizerConfig
from jaxdist.parallel.chunks import Chunks


def fix_schedule_horizon(config: Config, saved: Mapping[str, Any] | None = None) -> Config:
    """`config` with `optimizer.decay_steps` resolved, if its schedule decays over the run.

    `saved` is the config (as a dict) that a resumed run was started with: its horizon is
    kept. A fresh run's horizon is its `train.steps`.
    """
    o = config.optimizer
    if o.schedule != "warmup_cosine" or o.decay_steps:
        return config
    horizon = (saved or {}).get("optimizer", {}).get("decay_steps") or config.train.steps
    return dataclasses.replace(config, optimizer=dataclasses.replace(o, decay_steps=horizon))


def build_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the number of updates applied so far."""
    peak = config.learning_rate
    if config.schedule == "warmup_cosine":
        if not config.decay_steps:
            raise ValueError("optimizer.decay_steps must be resolved (fix_schedule_horizon)")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
            decay_steps=max(config.decay_steps, config.warmup_steps + 1),
            end_value=peak * config.final_fraction)
    if config.schedule == "step":
        return optax.exponential_decay(peak, transition_steps=config.step_every,
                                       decay_rate=config.step_factor, staircase=True)
    return optax.constant_schedule(peak)


def build_optimizer(config: OptimizerConfig, across: str | None = None,
                    devices: int = 1) -> optax.GradientTransformation:
    """Return the optax transformation for `config` (its schedule's horizon resolved).

    `weight_decay` is decoupled for `adamw` and `lamb` and added to the gradient for the
    others; `clip_norm` clips the global gradient norm before everything else. The learning
    rate of the last applied update is kept in the optimizer state (optax's
    `inject_hyperparams`), where `learning_rate(opt_state)` reads it.

    The norms that clipping and LAMB need are summed over `devices` chunks of each leaf
    (`jaxdist.parallel.chunks.Chunks`), chunk by chunk in device order. `across=None`: the
    transformation sees whole leaves and cuts them itself; `across=AXIS`: it sees this
    device's chunks (`parallel.shard`) and gathers the other chunks' sums. The norms, and so
    the whole run, are then the same bits whatever `parallel.shard` splits.
    """

    def with_rate(learning_rate):
        if config.name == "adamw":
            return optax.adamw(learning_rate, weight_decay=config.weight_decay)
        if config.name == "lamb":  # optax.lamb, with the trust ratio's norms summed as above
            return optax.chain(optax.scale_by_adam(eps=1e-6),
                               optax.add_decayed_weights(config.weight_decay),
                               scale_by_trust_ratio(devices, across),
                               optax.scale_by_learning_rate(learning_rate))
        base = {
            "sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=config.momentum),
            "adam": lambda: optax.adam(learning_rate),
        }[config.name]()
        if config.weight_decay:
            return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
        return base

    tx = optax.inject_hyperparams(with_rate)(learning_rate=build_schedule(config))
    if config.clip_norm:
        return optax.chain(clip_by_global_norm(config.clip_norm, devices, across), tx)
    return tx


def sum_of_squares(x: jax.Array, devices: int, across: str | None) -> jax.Array:
    """The sum of the squares of a leaf's entries, added chunk by chunk in device order.

    `across=None`: `x` is the whole leaf, cut here into `devices` zero-padded chunks.
    Otherwise `x` is this device's chunk and the other chunks' sums are all-gathered over
    the axis `across`. Each chunk is reduced as one array of its own and the chunks' sums
    are added in a fixed order, so both give the same bits.
    """
    if across is not None:
        gathered = jax.lax.all_gather(jnp.sum(jnp.square(x.astype(jnp.float32))), across)
        parts = [gathered[i] for i in range(devices)]
    else:
        chunks = Chunks.of(x.shape, devices)
        flat = chunks.padded(x.astype(jnp.float32))
        parts = [jnp.sum(jnp.square(flat[i * chunks.chunk:(i + 1) * chunks.chunk]))
                 for i in range(devices)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def clip_by_global_norm(max_norm: float, devices: int = 1,
                        across: str | None = None) -> optax.GradientTransformation:
    """Optax's `clip_by_global_norm`, its norm summed as `sum_of_squares` says.

    `u` if the global norm is below `max_norm`, else `u / norm * max_norm`; the norm is
    that of the whole gradient, also when each device sees its chunks (`across`).
    """

    def update(updates, state, params=None):
        del params
        squares = [sum_of_squares(u, devices, across) for u in jax.tree.leaves(updates)]
        norm = jnp.sqrt(sum(squares[1:], squares[0]))
        keep = norm < max_norm
        return jax.tree.map(lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype))
                                                     * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_trust_ratio(devices: int = 1,
                         across: str | None = None) -> optax.GradientTransformation:
    """Optax's `scale_by_trust_ratio` (LAMB's layer-wise ratio), norms as `sum_of_squares`.

    Each leaf's parameter and update norms are those of the whole leaf, also when each
    device sees its chunks (`across`); the ratio is optax's (1 where either norm is 0).
    """

    def update(updates, state, params):
        def scaled(u, p):
            param_norm = jnp.sqrt(sum_of_squares(p, devices, across))
            update_norm = jnp.sqrt(sum_of_squares(u, devices, across))
            ratio = param_norm / update_norm
            safe = jnp.where((param_norm == 0.0) | (update_norm == 0.0), 1.0, ratio)
            return u * safe.astype(u.dtype)

        return jax.tree.map(scaled, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update, from a `build_optimizer` state."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [getattr(key, "name", getattr(key, "key", None)) for key in path[-2:]]
        if names == ["hyperparams", "learning_rate"]:
            return leaf
    raise ValueError("the optimizer state holds no learning rate (not from build_optimizer)")
