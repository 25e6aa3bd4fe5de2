"""Model-side training features: accumulation, bf16, dropout keys, BatchNorm, losses, LR."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxdist import fit, make_backend
from jaxdist.base.config import OptimizerConfig
from jaxdist.step.losses import class_weights_for, cross_entropy
from jaxdist.step.models.batchnorm import CrossReplicaBatchNorm
from jaxdist.step.optimizers import build_optimizer, build_schedule
from jaxdist.step.steps import device_rng
from tests.toy import make_data, mlp_experiment, toy_config


def leaves_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(backend):
    experiment = mlp_experiment(make_data(128))
    whole = toy_config(steps=4, batch_size=64, optimizer="sgd", learning_rate=0.1,
                       backend=backend)
    accumulated = toy_config(steps=4, batch_size=64, optimizer="sgd", learning_rate=0.1,
                             backend=backend)
    accumulated.train.grad_accum = 4  # 8 examples per device: 4 micro-batches of 2
    a = fit(experiment, whole, stream=None)
    b = fit(experiment, accumulated, stream=None)
    leaves_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    for x, y in zip(a.records, b.records, strict=True):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)
        assert x["examples"] == y["examples"]


def test_bf16_tracks_fp32_within_two_percent():
    config = toy_config(steps=40, batch_size=64, learning_rate=0.01, log_every=10)
    fp32 = fit(mlp_experiment(make_data(256)), config, stream=None)
    config.train.precision = "bf16"
    bf16 = fit(mlp_experiment(make_data(256), precision="bf16"), config, stream=None)
    assert jax.tree.leaves(bf16.params)[0].dtype == np.float32  # params stay float32
    for x, y in zip(fp32.records, bf16.records, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 0.02 * x["loss"], (x, y)
    assert fp32.records[0]["loss"] != bf16.records[0]["loss"]  # bf16 really computed


def test_dropout_masks_differ_across_devices_and_repeat_across_runs():
    backend = make_backend("shard_map")
    root = jax.random.key_data(jax.random.key(7))
    dropout = nn.Dropout(rate=0.5, deterministic=False)

    def masks(root, step):
        rng = device_rng(root, step[0])
        return dropout.apply({}, jnp.ones((1, 64)), rngs={"dropout": rng})

    mapped = jax.jit(jax.shard_map(masks, mesh=backend.mesh, in_specs=(P(), P("batch")),
                                   out_specs=P("batch")))
    first = np.asarray(mapped(root, np.zeros(8, np.int32)))
    again = np.asarray(mapped(root, np.zeros(8, np.int32)))
    next_step = np.asarray(mapped(root, np.ones(8, np.int32)))
    assert len({row.tobytes() for row in first != 0}) == 8  # every device its own mask
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, next_step)
    assert 0.3 < (first != 0).mean() < 0.7


def test_batchnorm_statistics_exclude_padding_and_match_numpy():
    backend = make_backend("shard_map")
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(64, 4, 4, 3)).astype(np.float32)
    weight = np.ones(64, np.float32)
    weight[[5, 17, 40, 41, 63]] = 0.0
    x[weight == 0] = 1e6  # garbage in padding rows must not matter
    bn = CrossReplicaBatchNorm(momentum=0.5)
    variables = bn.init(jax.random.key(0), x[:1], weight[:1], train=False)

    def apply(variables, batch):
        y, updated = bn.apply(variables, batch["x"], batch["weight"], train=True,
                              mutable=["batch_stats"])
        return y, updated["batch_stats"]

    mapped = jax.jit(jax.shard_map(apply, mesh=backend.mesh, in_specs=(P(), P("batch")),
                                   out_specs=(P("batch"), P())))
    y, stats = mapped(variables, backend.put_batch({"x": x, "weight": weight}))
    real = x[weight == 1].astype(np.float64)
    mean, var = real.mean(axis=(0, 1, 2)), real.var(axis=(0, 1, 2))
    expected = (real - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[weight == 1], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], 0.5 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.5 + 0.5 * var, rtol=1e-5)
    copies = [np.asarray(s.data) for s in stats["mean"].addressable_shards]
    assert all(np.array_equal(copies[0], c) for c in copies)


def test_cross_entropy_with_label_smoothing_and_class_weights_matches_numpy():
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], np.float32)
    labels = np.array([0, 2])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    smoothed = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[labels]
    np.testing.assert_allclose(cross_entropy(logits, labels, label_smoothing=0.1),
                               -(smoothed * log_p).sum(axis=1), rtol=1e-6)
    weights = class_weights_for(np.array([90, 9, 1]))
    np.testing.assert_allclose(weights, [100 / 270, 100 / 27, 100 / 3], rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, labels, class_weights=weights),
                               -log_p[[0, 1], labels] * np.asarray(weights)[labels], rtol=1e-6)


def test_schedules_and_clipping():
    cosine = build_schedule(OptimizerConfig(learning_rate=1.0, schedule="warmup_cosine",
                                            warmup_steps=10, decay_steps=110,
                                            final_fraction=0.1))
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-6)
    assert float(cosine(110)) == pytest.approx(0.1)
    step = build_schedule(OptimizerConfig(learning_rate=1.0, schedule="step", step_every=5,
                                          step_factor=0.5))
    assert [float(step(i)) for i in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    tx = build_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, clip_norm=1.0))
    grads = {"a": jnp.array([3.0, 4.0])}
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)
    for name in ["sgd", "momentum", "adam", "adamw", "lamb"]:
        tx = build_optimizer(OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.01))
        updates, _ = tx.update(grads, tx.init(grads), grads)
        assert np.all(np.isfinite(updates["a"])) and np.any(updates["a"] != 0)
    assert optax  # the transformations are optax's own
