"""bf16: the model computes in bfloat16; params, targets, losses and metrics stay float32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar_resnet, gpt_lm, linear_regression
from jaxdist import Experiment, TrainState, fit, make_backend, make_train_step
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.data import Loader
from jaxdist.step.optimizers import build_optimizer, fix_schedule_horizon
from tests.toy import make_data, toy_config

HEAVY_OPS = re.compile(r"stablehlo\.(convolution|dot_general)\b.*:\s*\((?P<operands>[^)]*)\)")
BF16_ALGORITHM = "lhs_precision_type = bf16, rhs_precision_type = bf16"


def heavy_op_operand_types(module, config):
    """What every convolution and dot product of the compiled train step computes in.

    Its operand types, or "bf16, bf16" where the op's own algorithm rounds its operands to
    bf16 (as jax.nn.dot_product_attention's backward pass does with float32 gradients).
    """
    experiment = module.build(config)
    backend = make_backend("shard_map")
    tx = build_optimizer(fix_schedule_horizon(config).optimizer)
    step = backend.compile(make_train_step(experiment.loss_fn, tx,
                                           has_state=experiment.has_state))
    key = jax.random.key(0)
    model_state = experiment.init_model_state(key) if experiment.has_state else None
    state = backend.replicate(jax.device_get(TrainState.create(
        experiment.init_params(key), tx, key, model_state)))
    batch = backend.put_batch(next(Loader(experiment.train_data, config.train.batch_size, 8)))
    text = step.lower(state, batch).as_text()
    return ["bf16, bf16" if BF16_ALGORITHM in m.group(0) else m.group("operands")
            for m in HEAVY_OPS.finditer(text)]


@pytest.mark.slow  # trains a model end to end
@pytest.mark.parametrize("module", [cifar_resnet, gpt_lm], ids=["cifar_resnet", "gpt_lm"])
def test_bf16_runs_every_convolution_and_matmul_in_bf16(module):
    tiny = module.tiny_config()
    fp32 = heavy_op_operand_types(module, tiny)
    bf16 = heavy_op_operand_types(module, apply_overrides(tiny, ["train.precision=bf16"]))
    assert len(bf16) == len(fp32) > 10
    assert all("bf16" not in operands for operands in fp32)
    not_bf16 = [operands for operands in bf16 if "f32" in operands]
    assert not not_bf16, not_bf16[:3]


def test_bf16_leaves_linear_regression_targets_in_float32():
    config = apply_overrides(linear_regression.config(), ["train.precision=bf16"])
    experiment = linear_regression.build(config)
    data = linear_regression.load_data()
    zero = {"w": jnp.zeros(10), "b": jnp.zeros(())}
    losses, _ = experiment.loss_fn(zero, {**data, "weight": np.ones(442, np.float32)}, None)
    # With W = 0 and b = 0 each loss is exactly its target squared, in float32.
    assert losses.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(losses), data["y"] ** 2)


def test_the_core_passes_targets_and_labels_through_uncast():
    data = make_data(64)
    data["label"] = np.arange(64, dtype=np.int32) * 1001
    seen = {}

    def loss_fn(params, batch, rng):
        seen.update({name: value.dtype for name, value in batch.items()})
        return (batch["x"] @ params["w"] - batch["y"]) ** 2, {"y": batch["y"]}

    experiment = Experiment(init_params=lambda rng: {"w": jnp.zeros(5)}, loss_fn=loss_fn,
                            train_data=data, precision="bf16")
    config = toy_config(steps=1, batch_size=64, optimizer="sgd")
    config.train.precision = "bf16"
    result = fit(experiment, config, stream=None)
    assert seen == {"x": jnp.float32, "y": jnp.float32, "label": jnp.int32,
                    "weight": jnp.float32}
    assert result.records[0]["y"] == pytest.approx(float(data["y"].astype(np.float64).mean()),
                                                   rel=1e-6)


def test_bf16_is_refused_for_an_experiment_that_does_not_compute_in_it():
    experiment = Experiment(init_params=lambda rng: {"w": jnp.zeros(5)},
                            loss_fn=lambda p, b, r: ((b["x"] @ p["w"] - b["y"]) ** 2, {}),
                            train_data=make_data(64))
    config = toy_config(steps=1, batch_size=64)
    config.train.precision = "bf16"
    with pytest.raises(UserError, match="train.precision=bf16"):
        fit(experiment, config, stream=None)
