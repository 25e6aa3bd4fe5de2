"""The core's promises: exact global means, backend and device-count invariance, replicas."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import linear_regression
from jaxdist import fit, make_backend
from jaxdist.step.steps import device_rng
from tests.toy import mlp_experiment, toy_config

BACKENDS = ["pmap", "shard_map"]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_eight_fake_devices_are_there():
    assert jax.device_count() == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_devices_equal_one_device_with_the_same_global_batch(backend):
    experiment = mlp_experiment()
    one = fit(experiment, toy_config(steps=6, devices=1, backend=backend), stream=None)
    eight = fit(experiment, toy_config(steps=6, devices=8, backend=backend), stream=None)
    assert one.backend.num_devices == 1 and eight.backend.num_devices == 8
    assert_trees_close(one.params, eight.params)
    for a, b in zip(one.records, eight.records, strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # The run actually moved the parameters.
    start = fit(experiment, toy_config(steps=1, learning_rate=1e-12), stream=None).params
    assert not np.allclose(start["w1"], eight.params["w1"])


def test_pmap_and_shard_map_give_the_same_numbers():
    experiment = mlp_experiment(input_noise=0.1)
    runs = [fit(experiment, toy_config(steps=8, backend=b), stream=None) for b in BACKENDS]
    assert_trees_close(runs[0].params, runs[1].params, rtol=1e-6, atol=1e-7)
    for a, b in zip(runs[0].records, runs[1].records, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_full_batch_gives_the_gradient_of_the_mean_over_all_rows(backend):
    data = linear_regression.load_data()
    experiment = linear_regression.build(linear_regression.config())
    # One SGD step with learning rate 1 from W = 0, b = 0 moves the params by -gradient.
    config = toy_config(steps=1, batch_size=0, optimizer="sgd", learning_rate=1.0,
                        backend=backend)
    result = fit(experiment, config, stream=None)
    assert result.backend.num_devices == 8 and 442 % 8 != 0  # 6 rows of padding
    x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
    residual = -y  # prediction 0 minus target
    grad_w = 2 * x.T @ residual / len(y)
    grad_b = 2 * residual.mean()
    np.testing.assert_allclose(-result.params["w"], grad_w, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(-result.params["b"], grad_b, rtol=1e-6)
    assert result.last("train")["examples"] == 442


def test_evaluation_over_padded_batches_counts_each_row_once():
    data = linear_regression.load_data()
    experiment = linear_regression.build(linear_regression.config())
    # batch 48 over 8 devices: 442 = 9 * 48 + 10, so the last batch holds 38 padding rows.
    config = toy_config(steps=3, batch_size=48, optimizer="sgd", learning_rate=0.1)
    result = fit(experiment, config, stream=None)
    params = result.params
    error = data["x"].astype(np.float64) @ params["w"] + params["b"] - data["y"]
    evaluation = result.last("eval")
    assert evaluation["examples"] == 442
    np.testing.assert_allclose(evaluation["loss"], np.mean(error**2), rtol=1e-5)
    np.testing.assert_allclose(evaluation["abs_error"], np.mean(np.abs(error)), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_batch_linear_regression_reaches_the_least_squares_mse(backend):
    data = linear_regression.load_data()
    config = linear_regression.config()
    config.parallel.backend = backend
    result = fit(linear_regression.build(config), config, stream=None)
    x = np.c_[data["x"].astype(np.float64), np.ones(len(data["y"]))]
    solution, *_ = np.linalg.lstsq(x, data["y"].astype(np.float64), rcond=None)
    lstsq_mse = np.mean((x @ solution - data["y"]) ** 2)
    final_mse = result.last("eval")["loss"]
    assert abs(final_mse - lstsq_mse) / lstsq_mse < 1e-3, (final_mse, lstsq_mse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_stay_identical_on_every_device(backend):
    # Per-device input noise makes every device's local gradient different.
    experiment = mlp_experiment(input_noise=0.5)
    result = fit(experiment, toy_config(steps=150, backend=backend, log_every=50), stream=None)
    copies = result.backend.device_copies(result.state.params)
    assert len(copies) == 8
    for copy in copies[1:]:
        for a, b in zip(jax.tree.leaves(copies[0]), jax.tree.leaves(copy), strict=True):
            np.testing.assert_array_equal(a, b)


def test_sum_mode_equals_mean_mode_with_the_learning_rate_times_the_device_count():
    experiment = mlp_experiment()
    lr = 0.01
    summed = fit(experiment, toy_config(steps=5, batch_size=64, optimizer="sgd",
                                        learning_rate=lr, grad_reduce="sum"), stream=None)
    meaned = fit(experiment, toy_config(steps=5, batch_size=64, optimizer="sgd",
                                        learning_rate=8 * lr, grad_reduce="mean"), stream=None)
    assert_trees_close(summed.params, meaned.params, rtol=1e-5, atol=1e-6)
    plain = fit(experiment, toy_config(steps=5, batch_size=64, optimizer="sgd",
                                       learning_rate=lr, grad_reduce="mean"), stream=None)
    assert not np.allclose(plain.params["w1"], meaned.params["w1"])


def test_a_run_repeats_bit_for_bit_and_the_seed_matters():
    experiment = mlp_experiment(input_noise=0.3)
    a = fit(experiment, toy_config(steps=10, seed=3), stream=None)
    b = fit(experiment, toy_config(steps=10, seed=3), stream=None)
    c = fit(experiment, toy_config(steps=10, seed=4), stream=None)
    assert a.records == b.records
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.records != c.records


def test_each_device_and_each_step_gets_its_own_key():
    backend = make_backend("shard_map")
    root = jax.random.key_data(jax.random.key(0))

    def keys(root, step):
        return jax.random.key_data(device_rng(root, step[0]))[None]

    mapped = jax.jit(jax.shard_map(keys, mesh=backend.mesh, in_specs=(P(), P("batch")),
                                   out_specs=P("batch")))
    step0 = np.asarray(mapped(root, np.zeros(8, np.int32)))
    step1 = np.asarray(mapped(root, np.ones(8, np.int32)))
    all_keys = {tuple(k) for k in np.concatenate([step0, step1]).reshape(16, -1)}
    assert len(all_keys) == 16
    np.testing.assert_array_equal(step0, np.asarray(mapped(root, np.zeros(8, np.int32))))


@pytest.mark.parametrize("backend,traces", [("shard_map", 1), ("pmap", 2)])
def test_a_run_traces_its_train_step_once_and_pmap_once_more_for_its_check(backend, traces):
    # shard_map checks the step by tracing the program it runs; pmap cannot refuse outputs
    # that differ across devices, so its check is a trace of its own under shard_map.
    experiment = mlp_experiment()
    loss_fn, seen = experiment.loss_fn, []

    def counting_loss(*args):
        seen.append(1)  # runs at each trace, not at each step
        return loss_fn(*args)

    counted = dataclasses.replace(experiment, loss_fn=counting_loss, eval_data=None)
    result = fit(counted, toy_config(steps=4, backend=backend), stream=None)
    assert result.step == 4 and len(seen) == traces
