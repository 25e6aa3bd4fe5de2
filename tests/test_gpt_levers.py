"""gpt_lm's speed levers (`model.attention`, `model.loss_chunk`, `model.remat`) change how
the values are computed, never the values: each is checked against the default path."""

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from experiments import gpt_lm
from jaxdist import fit
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.step.losses import chunked_cross_entropy, cross_entropy
from jaxdist.step.models.gpt import GPT, SIZES, check_attention

pytestmark = pytest.mark.slow  # starts processes or trains end to end

FAST = ["data.max_bytes=20000"]


def numpy_cross_entropy(hidden, embedding, labels):
    """-log softmax(hidden @ embedding.T)[label], in float64."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(embedding, np.float64).T
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, np.asarray(labels)[..., None], axis=-1)[..., 0]


def full_cross_entropy(hidden, embedding, labels):
    logits = hidden @ embedding.T
    return cross_entropy(logits.reshape(-1, logits.shape[-1]),
                         labels.reshape(-1)).reshape(labels.shape)


@pytest.mark.parametrize("chunk", [7, 10, 30, 64])  # 30 positions: 7 leaves 2, 64 > all
def test_chunked_cross_entropy_equals_the_full_logits_value_and_gradients(chunk):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (3, 10, 16))
    embedding = jax.random.normal(keys[1], (50, 16))
    labels = jax.random.randint(keys[2], (3, 10), 0, 50)
    weights = jax.random.uniform(keys[3], (3, 10))  # so that every position's gradient differs

    chunked = chunked_cross_entropy(hidden, embedding, labels, chunk)
    assert chunked.shape == (3, 10) and chunked.dtype == jnp.float32
    np.testing.assert_allclose(chunked, full_cross_entropy(hidden, embedding, labels),
                               rtol=1e-6)
    np.testing.assert_allclose(chunked, numpy_cross_entropy(hidden, embedding, labels),
                               rtol=1e-5)

    def weighted(loss):
        return jax.grad(lambda h, e: (loss(h, e, labels) * weights).sum(), argnums=(0, 1))

    got = jax.jit(weighted(lambda h, e, y: chunked_cross_entropy(h, e, y, chunk)))(
        hidden, embedding)
    want = jax.jit(weighted(full_cross_entropy))(hidden, embedding)
    for g, w in zip(got, want, strict=True):
        assert np.abs(w).max() > 0
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_chunked_cross_entropy_keeps_no_chunk_logits_for_the_backward_pass():
    hidden, embedding = jnp.ones((3, 10, 16)), jnp.ones((50, 16))
    labels = jnp.zeros((3, 10), jnp.int32)
    grad = jax.grad(lambda h, e: chunked_cross_entropy(h, e, labels, 10).sum(), argnums=(0, 1))
    # Without the per-chunk checkpoint, lax.map would stack every chunk's logits for it.
    assert "f32[3,10,50]" not in str(jax.make_jaxpr(grad)(hidden, embedding))


def test_chunked_cross_entropy_gives_nan_for_a_label_outside_the_vocabulary_as_full_does():
    hidden, embedding = jnp.ones((1, 5, 4)), jnp.ones((6, 4))
    labels = jnp.array([[0, 1, 6, 2, -1]])
    chunked = np.asarray(chunked_cross_entropy(hidden, embedding, labels, 2))
    np.testing.assert_array_equal(np.isnan(chunked), [[False, False, True, False, True]])
    np.testing.assert_array_equal(chunked, full_cross_entropy(hidden, embedding, labels))


TOKENS = np.random.default_rng(1).integers(0, 256, (2, 65)).astype(np.int32)


@functools.cache
def gpt_params():
    model = GPT(vocab_size=256, size=SIZES["tiny"])
    return jax.jit(lambda key: model.init(key, TOKENS[:, :-1], train=False))(
        jax.random.key(0))["params"]


@functools.cache
def gpt_loss_and_grads(remat):
    model = GPT(vocab_size=256, size=SIZES["tiny"], dropout=0.1, remat=remat)
    tokens, params = TOKENS, gpt_params()  # remat leaves the params as they are

    def loss(params):
        logits = model.apply({"params": params}, tokens[:, :-1], train=True,
                             rngs={"dropout": jax.random.key(2)})  # remat redraws the same masks
        return cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).mean()

    saved = io.StringIO()
    with contextlib.redirect_stdout(saved):
        print_saved_residuals(loss, params)
    activations = [line for line in saved.getvalue().splitlines()
                   if "from the argument" not in line and "from a literal" not in line]
    return *jax.jit(jax.value_and_grad(loss))(params), len(activations)


@pytest.mark.xdist_group("gpt_loss_and_grads")  # shares its cached programs
@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_loss_and_gradients_of_none(remat):
    want_loss, want_grads, _ = gpt_loss_and_grads("none")
    loss, grads, _ = gpt_loss_and_grads(remat)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(want_grads)  # the same params
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
                 grads, want_grads)


@pytest.mark.xdist_group("gpt_loss_and_grads")  # shares its cached programs
def test_remat_keeps_fewer_activations_for_the_backward_pass():
    kept = {remat: gpt_loss_and_grads(remat)[2] for remat in ("none", "dots", "block")}
    assert kept["none"] > kept["dots"] > kept["block"] > 0, kept


@functools.cache
def gpt_lm_losses_and_grads(*overrides):
    """The per-example losses, aux, gradients of their sum, and the lowered step's text."""
    experiment = gpt_lm.build(apply_overrides(gpt_lm.tiny_config(), FAST + list(overrides)))
    params = jax.jit(experiment.init_params)(jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, 256, (4, 129)).astype(np.int32)

    def summed(params):
        losses, aux = experiment.loss_fn(params, {"tokens": tokens}, jax.random.key(2))
        return losses.sum(), (losses, aux)

    lowered = jax.jit(jax.grad(summed, has_aux=True)).lower(params)
    grads, (losses, aux) = lowered.compile()(params)
    return losses, aux, grads, lowered.as_text()


@pytest.mark.xdist_group("gpt_lm_losses_and_grads")  # shares its cached programs
@pytest.mark.parametrize(("precision", "chunk", "rtol"), [
    ("fp32", 32, 1e-5), ("fp32", 100, 1e-5), ("bf16", 32, 2e-2)])
def test_the_gpt_lm_loss_chunk_by_chunk_equals_the_loss_over_all_logits(precision, chunk,
                                                                        rtol):
    precision_key = f"train.precision={precision}"
    want_losses, want_aux, want_grads, _ = gpt_lm_losses_and_grads(precision_key)
    losses, aux, grads, text = gpt_lm_losses_and_grads(precision_key,
                                                       f"model.loss_chunk={chunk}")
    assert losses.shape == (4,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(losses, want_losses, rtol=rtol)
    np.testing.assert_allclose(aux["bits_per_byte"], want_aux["bits_per_byte"], rtol=rtol)
    np.testing.assert_allclose(aux["bits_per_byte"], losses / np.log(2), rtol=1e-6)
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale),
                 grads, want_grads)
    # Each chunk's logits are a [chunk, width] x [width, vocab] matmul in the compute
    # dtype, and no [batch, time, vocab] array appears, forward or backward.
    dtype = "bf16" if precision == "bf16" else "f32"
    chunk_logits = re.compile(rf"stablehlo\.dot_general .*: \(tensor<{chunk}x128x{dtype}>, "
                              rf"tensor<128x256x{dtype}>\) -> tensor<{chunk}x256x{dtype}>")
    assert chunk_logits.search(text), "no chunk-sized logits matmul in the compute dtype"
    assert "tensor<4x128x256x" not in text


def test_cudnn_attention_is_refused_on_this_cpu_in_one_line_naming_the_fix():
    config = apply_overrides(gpt_lm.tiny_config(), FAST + ["model.attention=cudnn",
                                                           "train.precision=bf16"])
    with pytest.raises(UserError, match="model.attention=xla") as refused:
        gpt_lm.build(config)
    assert "\n" not in str(refused.value) and "GPU" in str(refused.value)


def test_cudnn_attention_on_a_gpu_needs_bf16_compute():
    with pytest.raises(UserError, match="train.precision=bf16") as refused:
        check_attention("cudnn", jnp.float32, "gpu")
    assert "\n" not in str(refused.value)
    check_attention("cudnn", jnp.bfloat16, "gpu")  # allowed
    check_attention("xla", jnp.float32, "cpu")


@pytest.mark.xdist_group("gpt_lm_losses_and_grads")  # shares its cached programs
def test_xla_attention_equals_the_default():
    want_losses, _, want_grads, _ = gpt_lm_losses_and_grads("train.precision=fp32")
    losses, _, grads, _ = gpt_lm_losses_and_grads("train.precision=fp32",
                                                  "model.attention=xla")
    np.testing.assert_array_equal(losses, want_losses)
    jax.tree.map(np.testing.assert_array_equal, grads, want_grads)


@pytest.mark.parametrize("override", ["model.remat=all", "model.attention=flash",
                                      "model.loss_chunk=-1"])
def test_a_bad_lever_value_is_refused_in_one_line(override):
    with pytest.raises(UserError) as refused:
        gpt_lm.build(apply_overrides(gpt_lm.tiny_config(), FAST + [override]))
    assert "\n" not in str(refused.value)


def test_gpt_lm_trains_to_the_same_metrics_with_the_levers_on():
    steps = ["train.steps=4", "train.log_every=2", "train.batch_size=8"]

    def train_losses(levers):
        config = apply_overrides(gpt_lm.tiny_config(), FAST + steps + levers)
        result = fit(gpt_lm.build(config), config, stream=None)
        return result.history("train")

    want = train_losses([])
    got = train_losses(["model.loss_chunk=64", "model.remat=block"])
    np.testing.assert_array_equal(got["step"], want["step"])
    for name in ("loss", "bits_per_byte"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)


def test_a_shorter_window_trains_on_windows_of_that_many_bytes():
    config = apply_overrides(gpt_lm.tiny_config(), [*FAST, "data.window=32"])
    experiment = gpt_lm.build(config)
    batch = experiment.train_data.get_batch(np.arange(3))
    assert batch["tokens"].shape == (3, 33)  # inputs and next-byte targets
    np.testing.assert_array_equal(batch["tokens"][1, 0], batch["tokens"][0, 32])
    result = fit(experiment, config, stream=None)
    assert np.isfinite(result.last("train")["loss"])
    for bad in (-1, 129):
        with pytest.raises(UserError, match="data.window"):
            gpt_lm.build(apply_overrides(gpt_lm.tiny_config(), [f"data.window={bad}"]))
