"""What the compiled train step holds: the expected collectives and nothing more.

Checked on the CPU build of the step (the optimized HLO module): the gradient all-reduce
and the metric all-reduce, and nothing that would stall a step on the host. With bf16,
every matrix product and convolution the model asks for takes bf16 operands.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from toy import mlp_experiment, toy_config

import jaxdist
from jaxdist.loop.compiled import collectives, host_round_trips, lower_train_step, matmul_dtypes
from jaxdist.loop.start import train_step_fn
from jaxdist.step.norms import NORM_KEYS
from jaxdist.step.steps import NONFINITE

pytestmark = pytest.mark.slow  # starts processes or trains end to end

SMALL = {
    "gpt_lm": ["train.batch_size=16", "data.max_bytes=100000"],
    "digits_cnn": ["train.batch_size=64"],
}


def _expected_reduction(experiment, start) -> collections.Counter:
    """A float32 array per gradient leaf, and a float32 scalar per summed metric."""
    _, sums = start.backend.trace(train_step_fn(experiment, start), start.host_state,
                                  start.loader.peek())
    arrays = collections.Counter(("f32", tuple(np.shape(leaf)))
                                 for leaf in jax.tree.leaves(start.host_state.params))
    # Every sum but the non-finite flag, which is computed from the reduced values, and the
    # norms, gathered together: each device's sums of squares of its chunk of each leaf of
    # the gradient, the params and the update (one all-reduce of a devices x 3 leaves array).
    arrays[("f32", ())] += len([name for name in sums
                                if name != NONFINITE and name not in NORM_KEYS])
    if any(name in NORM_KEYS for name in sums):
        leaves = len(jax.tree.leaves(start.host_state.params))
        arrays[("f32", (start.backend.num_devices, 3 * leaves))] += 1
    return arrays


def _reduced_arrays(lowered) -> tuple[collections.Counter, list[str], str]:
    text = lowered.compile().as_text()
    found = collectives(text)
    arrays = collections.Counter(a for c in found for a in c.arrays)
    return arrays, sorted({c.op for c in found}), text


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_the_toy_step_all_reduces_the_gradient_and_the_metrics_only(backend):
    experiment = mlp_experiment()
    lowered, start = lower_train_step(experiment, toy_config(backend=backend))
    arrays, ops, text = _reduced_arrays(lowered)
    assert ops == ["all-reduce"]
    params = start.host_state.params
    expected = collections.Counter(("f32", tuple(np.shape(p))) for p in jax.tree.leaves(params))
    expected[("f32", ())] += 3  # the loss, weight and abs_error sums
    expected[("f32", (8, 3 * len(jax.tree.leaves(params))))] += 1  # the norms' chunk sums
    assert arrays == expected == _expected_reduction(experiment, start)
    assert host_round_trips(text) == []


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_bundled_steps_reduce_exactly_their_gradient_and_metrics(name, backend):
    experiment, config = jaxdist.load(name, [*SMALL[name], f"parallel.backend={backend}"])
    lowered, start = lower_train_step(experiment, config)
    arrays, ops, text = _reduced_arrays(lowered)
    assert ops == ["all-reduce"], ops
    assert arrays == _expected_reduction(experiment, start)
    assert host_round_trips(text) == []


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_products_and_convolutions_take_bf16_operands(name):
    experiment, config = jaxdist.load(name, [*SMALL[name], "train.precision=bf16"])
    lowered, _ = lower_train_step(experiment, config)
    found = collections.Counter(matmul_dtypes(lowered.as_text()))
    assert found, "no matrix products found: the parser is wrong"
    assert {(lhs, rhs) for _, lhs, rhs in found} == {("bf16", "bf16")}, found
    if name == "digits_cnn":
        assert any(op == "convolution" for op, _, _ in found)


def test_fp32_products_stay_fp32():
    """The check above can fail: without bf16 the same parser finds float32 operands."""
    experiment, config = jaxdist.load("gpt_lm", SMALL["gpt_lm"])
    lowered, _ = lower_train_step(experiment, config)
    assert {(lhs, rhs) for _, lhs, rhs in matmul_dtypes(lowered.as_text())} == {("f32", "f32")}


def test_a_host_callback_in_the_loss_is_found():
    """A loss that calls back to the host (a jax.debug.print) shows up as a round trip."""
    experiment = mlp_experiment()
    loss_fn = experiment.loss_fn

    def chatty(params, batch, rng):
        losses, aux = loss_fn(params, batch, rng)
        jax.debug.print("loss {}", losses.sum())
        return losses, aux

    experiment.loss_fn = chatty
    lowered, _ = lower_train_step(experiment, toy_config(backend="shard_map"))
    assert host_round_trips(lowered.compile().as_text())
