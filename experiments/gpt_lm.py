"""GPT language model: a GPT-2-style decoder, byte-level, on Python's own standard library.

Pre-LayerNorm blocks, causal attention through `jax.nn.dot_product_attention`, tied input
and output embeddings. The text is `data.path` (a file, or every file under a folder) or,
by default, the top-level `.py` files of the standard library of the Python running it
(about 4.7 MB on Python 3.11; real text that is always there). The last 5% of the bytes
are held out. Reported: loss (nats per byte) and `bits_per_byte` on train and held-out.

Sizes (`model.size`): `tiny` (2 layers, width 128, 128-byte context) for the CPU; `small`;
`gpt2` (12 layers, width 768, 12 heads, 1024-byte context: GPT-2 small's shape; with a
256-byte vocabulary it has 86M parameters, `model.vocab_size=50257` gives GPT-2's 124M) for
a GPU, e.g. `model.size=gpt2 train.batch_size=16 train.precision=bf16`.

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

import jax.numpy as jnp

from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig
from jaxdist.config import apply_overrides
from jaxdist.data.text import ByteWindows, read_bytes, text_files
from jaxdist.errors import UserError
from jaxdist.losses import cross_entropy
from jaxdist.models.gpt import GPT, SIZES
from jaxdist.precision import compute_dtype


@dataclass
class GPTModelConfig:
    """The model's size."""

    size: str = "tiny"  # tiny | small | gpt2
    vocab_size: int = 256
    dropout: float = 0.0


@dataclass
class TextDataConfig:
    """Where the text comes from."""

    path: str = ""  # a file or a folder; empty: the Python standard library's .py files
    max_bytes: int = 0  # read at most this many bytes (0: all)
    held_out: float = 0.05  # the last fraction of the bytes, for evaluation


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


def build(config: Config) -> Experiment:
    """The GPT, the byte windows of the text, and the next-byte loss."""
    m, d = config.model, config.data
    if m.size not in SIZES:
        raise UserError(f"model.size={m.size} is unknown; choose one of: {', '.join(SIZES)}")
    size = SIZES[m.size]
    text = read_bytes(text_files(d.path), d.max_bytes)
    split = int(len(text) * (1 - d.held_out))
    train, held_out = ByteWindows(text[:split], size.seq_len), ByteWindows(text[split:],
                                                                            size.seq_len)
    precision = config.train.precision
    model = GPT(vocab_size=m.vocab_size, size=size, dropout=m.dropout,
                dtype=compute_dtype(precision))

    def per_sequence(logits, tokens):
        targets = tokens[:, 1:]
        losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        losses = losses.reshape(targets.shape).mean(axis=1)
        return losses, {"bits_per_byte": losses / math.log(2)}

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]
        logits = model.apply({"params": params}, tokens[:, :-1], train=True,
                             rngs={"dropout": rng})
        return per_sequence(logits, tokens)

    def eval_fn(params, batch):
        tokens = batch["tokens"]
        return per_sequence(model.apply({"params": params}, tokens[:, :-1], train=False),
                            tokens)

    def init_params(rng):
        dummy = jnp.zeros((1, size.seq_len), jnp.int32)
        return model.init(rng, dummy, train=False)["params"]

    def next_byte_logits(params, model_state, embeddings):
        """The logits of the byte after the window, from the window's embeddings."""
        return model.apply({"params": params}, None, train=False,
                           embeddings=embeddings)[:, -1]

    explain = ExplainSpec(input="tokens", output=next_byte_logits, kind="text",
                          features=lambda params, tokens: params["wte"]["embedding"][
                              tokens[:, :-1]])
    return Experiment(init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
                      train_data=train, eval_data=held_out, precision=precision,
                      explain=explain)
