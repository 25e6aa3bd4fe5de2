"""The step's health: grad_norm, param_norm and update_norm on every train point.

References: the norm of the gradient of the whole data's mean loss taken by plain
`jax.grad` at the initial parameters (float64 in numpy), and SGD's closed form (the update
is `-lr * g`, so its norm is `lr * |g|`; clipped, `lr * clip`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdist import fit
from jaxdist.loop.start import initial_state
from jaxdist.step.norms import NORM_KEYS
from jaxdist.step.optimizers import build_optimizer
from tests.toy import make_data, mlp_experiment, toy_config

LR = 0.1


def config_of(steps=1, log_every=1, devices=0, backend="pmap", shard="none", **train):
    config = toy_config(steps=steps, batch_size=0, devices=devices, backend=backend,
                        optimizer="sgd", learning_rate=LR, log_every=log_every)
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, **train),
        parallel=dataclasses.replace(config.parallel, shard=shard))


def train_points(config, experiment=None):
    result = fit(experiment or mlp_experiment(), config, stream=None)
    return [point for point in result.records if point["split"] == "train"], result


def norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                             for x in jax.tree.leaves(tree))))


def reference(config) -> tuple[float, float]:
    """|gradient of the mean loss over all the data| and |params|, at the first step."""
    experiment = mlp_experiment()
    params = initial_state(experiment, config, build_optimizer(config.optimizer)).params
    data = make_data()
    batch = {**data, "weight": np.ones(len(data["y"]), np.float32)}

    def mean_loss(p):
        return jnp.mean(experiment.loss_fn(p, batch, jax.random.key(0))[0])

    return norm(jax.grad(mean_loss)(params)), norm(params)


@pytest.mark.parametrize("devices", [1, 8])
def test_the_first_point_gives_the_norms_of_the_gradient_params_and_sgd_update(devices):
    config = config_of(devices=devices)
    (point,), _ = train_points(config)
    grad, params = reference(config)
    assert point["grad_norm"] == pytest.approx(grad, rel=1e-5)
    assert point["param_norm"] == pytest.approx(params, rel=1e-6)
    assert point["update_norm"] == pytest.approx(LR * grad, rel=1e-5)


def test_grad_norm_is_taken_before_clipping_and_update_norm_after():
    config = config_of(devices=8)
    grad, _ = reference(config)
    clip = grad / 2
    config = dataclasses.replace(config, optimizer=dataclasses.replace(
        config.optimizer, clip_norm=clip))
    (point,), _ = train_points(config)
    assert point["grad_norm"] == pytest.approx(grad, rel=1e-5)
    assert point["update_norm"] == pytest.approx(LR * clip, rel=1e-5)


def test_a_point_shows_the_norms_of_its_last_step_and_nothing_else_changes():
    every, _ = train_points(config_of(steps=7, log_every=1))
    windows, result = train_points(config_of(steps=7, log_every=3))
    _, unmeasured = train_points(config_of(steps=7, log_every=3, log_norms=False))
    by_step = {point["step"]: point for point in every}
    assert [point["step"] for point in windows] == [3, 6, 7]
    for point in windows[:2]:
        assert {k: point[k] for k in NORM_KEYS} == {k: by_step[point["step"]][k]
                                                     for k in NORM_KEYS}
    # The last, partial window (step 7) measured none: the step measures every log_every
    # steps, whatever train.steps is.
    assert not any(key in windows[2] for key in NORM_KEYS)
    assert len({point["grad_norm"] for point in every}) == 7  # each step its own
    no_norms = [point for point in unmeasured.records if point["split"] == "train"]
    assert not any(key in point for point in no_norms for key in NORM_KEYS)
    for with_norms, without in zip(windows, no_norms, strict=True):
        assert {k: v for k, v in with_norms.items() if k not in NORM_KEYS} == without
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(unmeasured.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_every_backend_and_shard_reports_the_same_norms_to_the_bit():
    def norms_of(backend, shard):
        points, _ = train_points(config_of(steps=4, log_every=2, devices=8, backend=backend,
                                           shard=shard))
        return [[point[k] for k in NORM_KEYS] for point in points]

    replicated = norms_of("pmap", "none")
    for backend, shard in [("shard_map", "none"), ("pmap", "optimizer"),
                           ("shard_map", "gradients"), ("pmap", "params"),
                           ("shard_map", "params")]:
        assert norms_of(backend, shard) == replicated, (backend, shard)


def test_accumulated_micro_batches_report_the_whole_batch_norms():
    (whole,), _ = train_points(config_of(devices=8))
    (accumulated,), _ = train_points(config_of(devices=8, grad_accum=3))
    for key in NORM_KEYS:
        assert accumulated[key] == pytest.approx(whole[key], rel=1e-5)


def test_a_skipped_step_shows_its_nonfinite_gradient_and_no_update():
    data = make_data()
    data["y"][0] = np.nan
    (point,), result = train_points(config_of(devices=8), mlp_experiment(data))
    assert point["nonfinite_steps"] == 1
    assert math.isnan(point["grad_norm"])  # written as null in metrics.jsonl
    assert point["update_norm"] == 0.0
    assert point["param_norm"] == pytest.approx(norm(result.params), rel=1e-6)


@pytest.mark.slow
def test_measuring_the_norms_leaves_a_bf16_split_run_identical():
    """XLA keeps bf16 intermediates at excess precision where its fusion allows, so a step
    that read the optimizer's updates a second time trained differently (found here with
    `parallel.shard=optimizer`: a loss off by 1e-4 after 20 steps)."""
    import experiments.digits_cnn as digits
    from jaxdist.base.config import apply_overrides

    def run(log_norms):
        config = apply_overrides(digits.tiny_config(), [
            "train.steps=20", "train.log_every=1", "train.precision=bf16",
            "parallel.shard=optimizer", f"train.log_norms={log_norms}"])
        result = fit(dataclasses.replace(digits.build(config), eval_data=None), config,
                     stream=None)
        return result.history("train")["loss"], result.params

    (loss, params), (unmeasured_loss, unmeasured_params) = run("true"), run("false")
    np.testing.assert_array_equal(loss, unmeasured_loss)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(unmeasured_params), strict=True):
        np.testing.assert_array_equal(a, b)
