"""Flax NNX and equinox models through `jaxdist.from_nnx` / `jaxdist.from_equinox`.

Each property the linen experiments are held to, for both libraries, on the bundled
`digits_nnx` (a CNN with cross-replica BatchNorm and Dropout) and `digits_equinox`: 8
devices train as 1, pmap as shard_map, every `parallel.shard` as none, a run stopped by
SIGTERM resumes bit for bit, bf16 computes every matmul in bf16, `python -m
jaxdist.explain` explains the run, and the library's own tools read the checkpoint back
into the user's module. And the NNX GPT of `gpt_lm model.library=nnx`: the linen GPT's
logits from the same weights, the linen GPT's program under `parallel.shard=params` with
`model.remat`, and bf16 matmuls.
"""

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import experiments.digits_equinox as digits_equinox
import experiments.digits_nnx as digits_nnx
import experiments.gpt_lm as gpt_lm
from jaxdist import fit, from_equinox, load
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.loop.compiled import collectives, lower_train_step
from jaxdist.loop.hooks import Hook
from jaxdist.loop.metrics import TIMING_KEYS
from jaxdist.loop.restore import restore_run
from jaxdist.parallel.backend import AXIS
from jaxdist.step.models.eqx_layers import CrossReplicaBatchNorm
from jaxdist.step.models.gpt import GPT, SIZES
from jaxdist.step.models.nnx_gpt import GPT as NnxGPT
from jaxdist.step.precision import compute_dtype
from tests.test_precision import heavy_op_operand_types
from tests.toy import toy_config

pytestmark = pytest.mark.slow  # trains end to end

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"nnx": digits_nnx, "equinox": digits_equinox}
LIBRARIES = list(MODULES)
SMALL = ("train.batch_size=64", "train.log_every=2", "train.eval_every=0",
         "model.channels1=4", "model.channels2=8", "model.dense=16",
         "optimizer.warmup_steps=0", "optimizer.learning_rate=1e-2")


def small_config(library, *extra, steps=8):
    return apply_overrides(MODULES[library].config(), [*SMALL, f"train.steps={steps}", *extra])


@functools.cache
def run(library, *extra):
    """Train the small model (no evaluation); return its train history and params."""
    config = small_config(library, *extra)
    experiment = MODULES[library].build(config)
    experiment.eval_data = None
    result = fit(experiment, config, stream=None)
    return result.history("train"), result.params


def assert_same_run(a, b, rtol=1e-5):
    (history_a, params_a), (history_b, params_b) = a, b
    assert history_a.keys() == history_b.keys()
    for name in set(history_a) - set(TIMING_KEYS):
        np.testing.assert_allclose(history_a[name], history_b[name], rtol=rtol, err_msg=name)
    leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
    assert len(leaves_a) == len(leaves_b) > 4
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.xdist_group("adapter_runs")
@pytest.mark.parametrize("library", LIBRARIES)
def test_eight_devices_train_as_one(library):
    # Without dropout: its masks are drawn per device, so they differ with the count.
    assert_same_run(run(library, "model.dropout=0", "parallel.devices=1"),
                    run(library, "model.dropout=0"))


@pytest.mark.xdist_group("adapter_runs")
@pytest.mark.parametrize("library", LIBRARIES)
def test_pmap_and_shard_map_train_alike(library):
    assert_same_run(run(library, "parallel.backend=shard_map"), run(library))


@pytest.mark.xdist_group("adapter_runs")
@pytest.mark.parametrize("shard", ["optimizer", "gradients", "params"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_every_split_trains_as_the_replicated_run(library, shard):
    assert_same_run(run(library, f"parallel.shard={shard}"), run(library))


@pytest.mark.parametrize("library", LIBRARIES)
def test_bf16_runs_every_convolution_and_matmul_in_bf16(library):
    module = MODULES[library]
    fp32 = heavy_op_operand_types(module, small_config(library))
    bf16 = heavy_op_operand_types(module, small_config(library, "train.precision=bf16"))
    assert len(bf16) == len(fp32) >= 6  # forward and backward of 2 convs and 2 dense layers
    assert all("bf16" not in operands for operands in fp32)
    assert not [operands for operands in bf16 if "f32" in operands], bf16


class SigtermAfter(Hook):
    """Send this process SIGTERM after step `step`, as a cluster's scheduler would."""

    def __init__(self, step):
        self.step = step

    def after_step(self, run, sums):
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def metrics_lines(workdir):
    return (Path(workdir) / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module", params=LIBRARIES)
def resumed(request, tmp_path_factory):
    """A run stopped by SIGTERM after step 5 and resumed to 10, and the same run unbroken."""
    library = request.param
    folder = tmp_path_factory.mktemp(library)
    overrides = [*SMALL, "train.steps=10", "train.checkpoint_every=0"]
    experiment, config = load(f"digits_{library}", overrides)
    whole = fit(experiment, config, folder / "whole", stream=None)
    experiment, config = load(f"digits_{library}", overrides)
    stopped = fit(experiment, config, folder / "split", stream=None, hooks=[SigtermAfter(5)])
    experiment, config = load(f"digits_{library}", overrides)
    finished = fit(experiment, config, folder / "split", stream=None)
    return library, folder, whole, stopped, finished


def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(resumed):
    library, folder, whole, stopped, finished = resumed
    assert stopped.stop_reason == "preempted" and 5 <= stopped.step < 10
    assert finished.stop_reason == "completed" and finished.step == 10
    at = stopped.step
    after = [line for line in metrics_lines(folder / "split") if json.loads(line)["step"] > at]
    expected = [line for line in metrics_lines(folder / "whole")
                if json.loads(line)["step"] > at]
    assert after == expected and len(after) >= 3
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(finished.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def final_eval(workdir):
    return [json.loads(line) for line in metrics_lines(workdir)
            if json.loads(line)["split"] == "eval"][-1]


def deep_merge(a, b):
    merged = dict(a)
    for key, value in b.items():
        merged[key] = deep_merge(a[key], value) if key in a else value
    return merged


def test_the_librarys_own_tools_read_the_checkpoint_into_the_users_module(resumed):
    library, folder, whole, _, _ = resumed
    checkpoint = folder / "whole" / "checkpoints" / "step_00000010" / "state"
    config = small_config(library, steps=10)
    m, dtype = config.model, compute_dtype("fp32")
    test = digits_nnx.load_split()[1]
    if library == "nnx":
        # Plain orbax, then NNX's own functions: no jaxdist code reads it back.
        saved = ocp.StandardCheckpointer().restore(checkpoint)
        model = digits_nnx.CNN(m, dtype, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        nnx.replace_by_pure_dict(state, deep_merge(saved["params"], saved["model_state"]))
        model = nnx.merge(graphdef, state)
        model.eval()
        logits = model(test["image"], jnp.ones(len(test["label"])))
    else:
        restored = restore_run(folder / "whole")
        static = eqx.partition(digits_equinox.CNN(m, jax.random.key(1)), eqx.is_array)[1]
        model = eqx.nn.inference_mode(eqx.combine(restored.params, static))
        logits = jax.vmap(model)(test["image"], None)
        assert jax.tree.structure(restored.module) == jax.tree.structure(model)
    logged = final_eval(folder / "whole")
    accuracy = np.mean(np.argmax(logits, axis=-1) == test["label"])
    assert accuracy == pytest.approx(logged["accuracy"], abs=1e-6)
    losses = -jax.nn.log_softmax(logits)[np.arange(len(logits)), test["label"]]
    assert float(np.mean(losses)) == pytest.approx(logged["loss"], rel=1e-5)


def test_the_explain_command_explains_the_run(resumed):
    library, folder, _, _, _ = resumed
    result = subprocess.run([sys.executable, "-m", "jaxdist.explain", str(folder / "whole"),
                             "--examples", "6", "--method", "ig", "--steps", "128"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = np.load(folder / "whole" / "explain" / "attributions.npz")
    assert saved["attributions"].shape == saved["inputs"].shape == (6, 8, 8)
    # The predictions explained are the trained module's own, on the same images.
    module = restore_run(folder / "whole").module
    if library == "nnx":
        logits = module(jnp.asarray(saved["inputs"]), jnp.ones(6))
    else:
        logits = jax.vmap(module)(jnp.asarray(saved["inputs"]), None)
    np.testing.assert_array_equal(saved["predictions"], np.argmax(logits, axis=-1))
    # Completeness: the attributions add up to the change of the explained score.
    np.testing.assert_allclose(saved["attributions"].reshape(6, -1).sum(axis=1),
                               saved["scores"] - saved["baseline_scores"], rtol=0.05,
                               atol=1e-3)


# --- the NNX GPT (gpt_lm model.library=nnx) -------------------------------------------------

GPT_SMALL = ("train.steps=4", "train.batch_size=8", "train.log_every=2",
             "parallel.backend=shard_map")


def gpt_config(*extra):
    return apply_overrides(gpt_lm.tiny_config(), [*GPT_SMALL, *extra])


def test_the_nnx_gpt_computes_the_linen_gpts_logits_from_the_same_weights():
    size = SIZES["tiny"]
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)
    linen = GPT(vocab_size=256, size=size)
    params = linen.init(jax.random.key(0), tokens, train=False)["params"]
    want = linen.apply({"params": params}, tokens, train=False)
    model = NnxGPT(256, size, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    blocks = {i: params[f"block{i}"] for i in range(size.layers)}
    nnx.replace_by_pure_dict(state, {**{k: v for k, v in params.items()
                                        if not k.startswith("block")}, "blocks": blocks})
    got = nnx.merge(graphdef, state)(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levers", [("model.remat=block", "parallel.shard=params")],
                         ids=["remat_block_shard_params"])
def test_the_nnx_gpt_compiles_to_the_linen_gpts_program(levers):
    """Each block gathers its own weights, as linen's do: the same collectives, memory."""
    found = {}
    for library in ("linen", "nnx"):
        config = gpt_config(f"model.library={library}", *levers)
        lowered, _ = lower_train_step(gpt_lm.build(config), config)
        compiled = lowered.compile()
        kinds = {}
        for instruction in collectives(compiled.as_text()):
            op = instruction.op.removesuffix("-start")
            kinds[op] = kinds.get(op, 0) + 1
        memory = compiled.memory_analysis()
        found[library] = kinds, memory.temp_size_in_bytes, memory.argument_size_in_bytes
    assert found["nnx"] == found["linen"]
    assert found["nnx"][0]["all-gather"] >= 2 * 12 * 2  # every block leaf, forward and back


def test_the_nnx_gpt_trains_alike_with_split_params_and_remat():
    def history(*extra):
        config = gpt_config("model.library=nnx", *extra)
        return fit(gpt_lm.build(config), config, stream=None).history("train")

    want, got = history(), history("parallel.shard=params", "model.remat=block")
    for name in ("loss", "bits_per_byte"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
    assert want["loss"][-1] < want["loss"][0]


def test_the_nnx_gpt_in_bf16_runs_every_matmul_in_bf16():
    fp32 = heavy_op_operand_types(gpt_lm, gpt_config("model.library=nnx"))
    bf16 = heavy_op_operand_types(gpt_lm, gpt_config("model.library=nnx",
                                                     "train.precision=bf16"))
    assert len(bf16) == len(fp32) > 10
    assert all("bf16" not in operands for operands in fp32)
    assert not [operands for operands in bf16 if "f32" in operands], bf16[:3]


# --- an equinox model with a State (eqx.nn.make_with_state) ---------------------------------

class BatchNormNet(eqx.Module):
    """Linear, BatchNorm over the examples of every device, linear: a model with a State."""

    hidden: eqx.nn.Linear
    norm: eqx.Module
    out: eqx.nn.Linear

    def __init__(self, key, norm):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(3, 8, key=k1)
        self.norm = norm
        self.out = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, batch, state):
        h = jax.nn.relu(jax.vmap(self.hidden)(batch["x"]))
        h, state = self.norm(h, batch["weight"], state)
        return jax.vmap(self.out)(h)[:, 0], state


def state_data():
    rows = np.random.default_rng(0).normal(size=(72, 3)).astype(np.float32)
    return {"x": rows, "y": (rows @ np.array([1.0, -2.0, 0.5], np.float32)) ** 2}


def equinox_state_run(devices, backend="pmap", norm=None):
    data = state_data()
    norm = norm or (lambda: CrossReplicaBatchNorm(8))

    def loss_fn(model, state, batch, key):
        predictions, state = model(batch, state)
        return (predictions - batch["y"]) ** 2, {}, state

    experiment = from_equinox(eqx.nn.make_with_state(lambda key: BatchNormNet(key, norm())),
                              loss_fn, train_data=data, eval_data=data)
    # sgd: through BatchNorm the hidden bias has a gradient of exactly 0 in exact arithmetic,
    # which Adam would turn into a step of ±learning_rate decided by rounding
    config = toy_config(steps=6, batch_size=32, devices=devices, backend=backend,
                        optimizer="sgd", learning_rate=0.003)
    result = fit(experiment, config, stream=None)
    return result, result.backend.first_copy(result.state.model_state), experiment


def test_an_equinox_state_is_carried_as_the_model_state_on_any_device_count_and_backend():
    """72 rows in batches of 32: the last batch of each epoch is padded, the statistics not."""
    one, state1, _ = equinox_state_run(1)
    assert isinstance(state1, eqx.nn.State) and one.history("train")["loss"].size > 0
    means = [leaf for leaf in jax.tree.leaves(state1) if np.shape(leaf) == (8,)]
    assert means and max(np.abs(mean).max() for mean in means) > 0.01  # it moved from 0/1
    for backend in ("pmap", "shard_map"):
        eight, state8, _ = equinox_state_run(8, backend)
        for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert eight.last("eval")["loss"] == pytest.approx(one.last("eval")["loss"], rel=1e-5)


def test_the_evaluation_of_an_equinox_state_normalizes_with_the_running_statistics():
    result, state, experiment = equinox_state_run(1)
    data = state_data()
    batch = {"x": data["x"], "weight": np.ones(len(data["x"]), np.float32)}
    module, state = experiment.module_of(result.params, state)
    predictions, after = module(batch, state)
    expected = float(np.mean((np.asarray(predictions) - data["y"]) ** 2))
    assert result.last("eval")["loss"] == pytest.approx(expected, rel=1e-5)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)  # inference leaves the statistics alone
    training = jax.vmap(lambda _: eqx.nn.inference_mode(module, False)(batch, state)[0],
                        axis_name=AXIS)(np.zeros(1))[0]  # one device: the axis BatchNorm names
    assert not np.allclose(training, predictions, rtol=1e-3)  # batch statistics differ


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_own_batchnorm_is_refused_in_one_line_naming_the_layer_to_use(mode):
    norm = lambda: eqx.nn.BatchNorm(8, axis_name=AXIS, mode=mode)  # noqa: E731

    class Wrapped(eqx.Module):
        inner: eqx.nn.BatchNorm = eqx.field(default_factory=norm)

        def __call__(self, h, weight, state):
            return jax.vmap(self.inner, axis_name="examples", in_axes=(0, None),
                            out_axes=(0, None))(h, state)

    with pytest.raises(UserError, match="eqx_layers.CrossReplicaBatchNorm"):
        equinox_state_run(8, "pmap", Wrapped)
