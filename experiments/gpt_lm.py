"""GPT language model: a GPT-2-style decoder, byte-level, on Python's own standard library.

Pre-LayerNorm blocks, causal attention through `jax.nn.dot_product_attention`, tied input
and output embeddings. The text is `data.path` (a file, or every file under a folder) or,
by default, the top-level `.py` files of the standard library of the Python running it
(about 4.7 MB on Python 3.11; real text that is always there). The last 5% of the bytes
are held out. Reported: loss (nats per byte) and `bits_per_byte` on train and held-out.
`data.tokens=PATH` reads GPT-2 token files instead, window by window (`os.pread`, not a
memory map, so a file truncated while training stops the run in one line): nanoGPT's
headerless uint16 `.bin` or llm.c's shards (told apart by llm.c's header), one file or a
folder of `*.bin` whose files named `val.bin`, `*_val.bin`, `val_N.bin` or `*_val_N.bin`
(N: digits) are held out (without one, the last 5% of the tokens); `build` prints which
files are held out. Set `model.vocab_size` to cover the tokens (50257 for GPT-2). The loss
is then in nats per token and the metric is `bits_per_token`; `scripts/make_tokens.py`
writes a synthetic file.

Sizes (`model.size`): `tiny` (2 layers, width 128, 128-byte context) for the CPU; `small`;
`gpt2` (12 layers, width 768, 12 heads, 1024-byte context: GPT-2 small's shape; with a
256-byte vocabulary it has 86M parameters, `model.vocab_size=50257` gives GPT-2's 124M) for
a GPU, e.g. `model.size=gpt2 train.batch_size=16 train.precision=bf16`; `gpt2_medium`,
`gpt2_large` and `gpt2_xl` (24, 36 and 48 layers of width 1024, 1280 and 1600: GPT-2's 355M,
774M and 1.5B with `model.vocab_size=50257`) for `parallel.shard` (`scripts/bench_shard.py`).
`data.window=N` trains on windows of N tokens instead of the whole context.

Speed levers, each changing how the same values are computed, not the values:
`model.attention=cudnn` runs attention as cuDNN's flash attention (an NVIDIA GPU with
`train.precision=bf16`; elsewhere it is refused), instead of XLA's (`xla`, the default).
`model.loss_chunk=N` computes the loss over N positions' logits at a time, recomputing them
in the backward pass, instead of keeping all `[batch, time, vocab]` of them (0, the default).
`model.remat=block` recomputes each transformer block in the backward pass instead of
keeping its activations, and `dots` all but its Dense layers' outputs (`none`, the default).

`model.library=nnx` trains the same model written in Flax NNX
(`jaxdist.step.models.nnx_gpt`, through `jaxdist.from_nnx`), with every lever above,
`parallel.shard=params` (each block gathering its own weights) and `train.precision=bf16`.

Command:   python -m jaxdist.run gpt_lm
Runtime:   about 145 s on a 2-core CPU with 8 fake devices (tiny, 600 steps of 32 x 128 bytes,
           two evaluations over the 1835 held-out windows).
Result:    held-out bits per byte 2.38 after 600 steps (the final `eval` line); a uniform
           guess over bytes is 8. Both measured 2026-11-27 on that CPU by
           `python scripts/bench_experiments.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import jax.numpy as jnp
import numpy as np

from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.data.text import ByteWindows, read_bytes, text_files
from jaxdist.data.tokens import describe_split, token_windows
from jaxdist.parallel.chunks import gather_where_used
from jaxdist.step.losses import chunked_cross_entropy, cross_entropy
from jaxdist.step.models.gpt import GPT, SIZES, check_attention
from jaxdist.step.precision import compute_dtype


@dataclass
class GPTModelConfig:
    """The model's size, and speed levers that leave the values computed as they are."""

    size: str = "tiny"  # tiny | small | gpt2 | gpt2_medium | gpt2_large | gpt2_xl
    vocab_size: int = 256
    dropout: float = 0.0
    attention: Literal["xla", "cudnn"] = "xla"  # cudnn: flash attention (NVIDIA GPU, bf16)
    loss_chunk: int = 0  # >0: the loss over this many positions' logits at a time; 0: all
    remat: Literal["none", "block", "dots"] = "none"  # what the backward pass recomputes
    library: Literal["linen", "nnx"] = "linen"  # the same GPT written in Flax linen or NNX


@dataclass
class TextDataConfig:
    """Where the text comes from."""

    path: str = ""  # a file or a folder; empty: the Python standard library's .py files
    max_bytes: int = 0  # read at most this many bytes (0: all)
    held_out: float = 0.05  # the last fraction of the bytes (or tokens), for evaluation
    tokens: str = ""  # uint16 token files (a .bin or a folder of them) instead of bytes
    window: int = 0  # tokens per training window; 0: the model's whole context (seq_len)


def config() -> Config:
    """The tiny model for the CPU: 600 steps of 32 windows of 128 bytes."""
    return Config(
        train=TrainConfig(steps=600, batch_size=32, log_every=50, eval_every=300,
                          checkpoint_every=300),
        optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, weight_decay=0.01,
                                  schedule="warmup_cosine", warmup_steps=50, clip_norm=1.0),
        model=GPTModelConfig(),
        data=TextDataConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=10", "train.batch_size=16", "train.log_every=5", "train.eval_every=0",
        "data.max_bytes=100000", "optimizer.warmup_steps=0"])


def check_model(m: GPTModelConfig, tokens: bool) -> None:
    """Refuse model values that cannot build a model, each in one line naming its key."""
    if m.size not in SIZES:
        raise UserError(f"model.size={m.size} is unknown; choose one of: {', '.join(SIZES)}")
    if tokens and m.vocab_size < 1:
        raise UserError(f"model.vocab_size={m.vocab_size} must be >= 1: it is the number of "
                        f"tokens the model knows (50257 for GPT-2)")
    if not tokens and m.vocab_size < 256:
        raise UserError(f"model.vocab_size={m.vocab_size} is too small for text read as bytes "
                        f"(0 to 255); give 256 or more, or read token files with data.tokens")
    if not 0 <= m.dropout < 1:
        raise UserError(f"model.dropout={m.dropout} must be in [0, 1): the probability of "
                        f"dropping an activation, e.g. 0.1")
    if m.loss_chunk < 0:
        raise UserError(f"model.loss_chunk={m.loss_chunk} is negative; give a number of "
                        f"positions, or 0 for the loss over all the logits at once")


def check_data(d: TextDataConfig, seq_len: int) -> None:
    """Refuse data values that cannot be read, each in one line naming its key."""
    if d.path and d.tokens:
        raise UserError(f"data.path={d.path} and data.tokens={d.tokens} are both given; give "
                        f"one (data.path: text read as bytes, data.tokens: token files)")
    if not 0 < d.held_out < 1:
        raise UserError(f"data.held_out={d.held_out} must be in (0, 1): the fraction of the "
                        f"text held out for evaluation, e.g. 0.05")
    if d.max_bytes < 0:
        raise UserError(f"data.max_bytes={d.max_bytes} is negative; give a number of bytes "
                        f"to read, or 0 for all of the text")
    if not 0 <= d.window <= seq_len:
        raise UserError(f"data.window={d.window} is outside the model's context of "
                        f"{seq_len} tokens; give 1 to {seq_len}, or 0 for all of it")


def too_short_advice(config: Config, length: int) -> str:
    """What to change when the data holds no window of `length + 1` tokens (real keys)."""
    m, d = config.model, config.data
    now = (f"data.window={d.window}" if d.window
           else f"the whole {length}-token context of model.size={m.size}")
    more = "tokens" if d.tokens else "text"
    return (f"give more {more}, or a smaller data.window (a window of N needs N + 1; now "
            f"{now})")


def byte_windows(text: np.ndarray, length: int, what: str, fix: str) -> ByteWindows:
    """`ByteWindows` of `text`, refusing text too short for one window with advice `fix`."""
    if len(text) < length + 1:
        raise UserError(f"{what} has {len(text)} bytes, fewer than one window of "
                        f"{length + 1}; {fix}")
    return ByteWindows(text, length)


def sequence_losses(forward, embedding, tokens, loss_chunk: int, bits_per: str):
    """Each window's mean next-token loss, and its bits: from all the logits, or by chunks.

    `forward(inputs, hidden)` runs the model (the final hidden states when `hidden`, else
    the logits); `embedding()` is the tied embedding matrix, for the chunked loss.
    """
    targets = tokens[:, 1:]
    if loss_chunk:
        losses = chunked_cross_entropy(forward(tokens[:, :-1], True), embedding(), targets,
                                       loss_chunk)
    else:
        logits = forward(tokens[:, :-1], False)
        losses = cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               targets.reshape(-1)).reshape(targets.shape)
    losses = losses.mean(axis=1)
    return losses, {bits_per: losses / math.log(2)}


def nnx_gpt_experiment(m: GPTModelConfig, size, precision: str, train, held_out,
                       bits_per: str) -> Experiment:
    """The same GPT written in Flax NNX (`model.library=nnx`), through `jaxdist.from_nnx`."""
    from jaxdist import from_nnx
    from jaxdist.step.models.nnx_gpt import GPT as NnxGPT
    from jaxdist.step.models.nnx_gpt import whole

    def make_model(rngs):
        return NnxGPT(m.vocab_size, size, m.dropout, compute_dtype(precision), m.attention,
                      m.remat, rngs=rngs)

    def loss_fn(model, batch):
        return sequence_losses(lambda inputs, hidden: model(inputs, return_hidden=hidden),
                               lambda: whole(model.wte).embedding.get_value(),
                               batch["tokens"], m.loss_chunk, bits_per)

    explain = ExplainSpec(input="tokens", kind="text",
                          output=lambda model, embeddings: model(
                              None, embeddings=embeddings)[:, -1],
                          features=lambda model, tokens: model.wte.embedding.get_value()[
                              tokens[:, :-1]])
    return from_nnx(make_model, loss_fn, train_data=train, eval_data=held_out,
                    precision=precision, explain=explain, gathers_params=True)


def build(config: Config) -> Experiment:
    """The GPT, the byte windows of the text, and the next-byte loss."""
    m, d = config.model, config.data
    check_model(m, bool(d.tokens))
    size = SIZES[m.size]
    check_data(d, size.seq_len)
    precision = config.train.precision
    check_attention(m.attention, compute_dtype(precision))
    length = d.window or size.seq_len
    fix = too_short_advice(config, length)
    if d.tokens:
        print(describe_split(d.tokens, d.held_out))
        train, held_out = token_windows(d.tokens, length, d.held_out, m.vocab_size, fix)
    else:
        text = read_bytes(text_files(d.path), d.max_bytes)
        split = int(len(text) * (1 - d.held_out))
        train = byte_windows(text[:split], length, "the training text", fix)
        held_out = byte_windows(text[split:], length, "the held-out text", fix)
    bits_per = "bits_per_token" if d.tokens else "bits_per_byte"
    if m.library == "nnx":
        return nnx_gpt_experiment(m, size, precision, train, held_out, bits_per)
    model = GPT(vocab_size=m.vocab_size, size=size, dropout=m.dropout,
                dtype=compute_dtype(precision), attention=m.attention, remat=m.remat)

    def per_sequence(params, tokens, **apply):
        """Each window's mean next-token loss and its bits, from the linen model."""
        return sequence_losses(
            lambda inputs, hidden: model.apply({"params": params}, inputs,
                                               return_hidden=hidden, **apply),
            lambda: params["wte"]["embedding"], tokens, m.loss_chunk, bits_per)

    def init_params(rng):
        dummy = jnp.zeros((1, size.seq_len), jnp.int32)
        return model.init(rng, dummy, train=False)["params"]

    def outside_blocks_whole(params):
        """The params with every leaf outside the blocks whole (gathered, if in chunks).

        Under parallel.shard=params the blocks gather their own weights, one block at a
        time (jaxdist.step.models.gpt); the embeddings and the final LayerNorm are gathered here.
        """
        return {name: tree if name.startswith("block") else gather_where_used(tree)
                for name, tree in params.items()}

    def loss_fn(params, batch, rng):
        return per_sequence(outside_blocks_whole(params), batch["tokens"], train=True,
                            rngs={"dropout": rng})

    def eval_fn(params, batch):
        return per_sequence(outside_blocks_whole(params), batch["tokens"], train=False)

    def next_byte_logits(params, model_state, embeddings):
        """The logits of the byte after the window, from the window's embeddings."""
        return model.apply({"params": params}, None, train=False,
                           embeddings=embeddings)[:, -1]

    explain = ExplainSpec(input="tokens", output=next_byte_logits, kind="text",
                          features=lambda params, tokens: params["wte"]["embedding"][
                              tokens[:, :-1]])
    return Experiment(init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
                      train_data=train, eval_data=held_out, precision=precision,
                      explain=explain, gathers_params=True)
