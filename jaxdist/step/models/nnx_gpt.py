"""The GPT of `jaxdist.step.models.gpt` written in Flax NNX, for `gpt_lm model.library=nnx`.

The same pre-LayerNorm blocks, causal attention through `jax.nn.dot_product_attention`,
tied embeddings, sizes (`SIZES`) and levers (`attention`, `remat`); params stay float32
and `dtype` is the compute dtype. Under `parallel.shard=params` (`gathers_params`) each
parameter arrives as this device's `Chunk`: every block gathers its own weights where it
runs (`call_block`), inside `jax.checkpoint` when it is recomputed, so at most one block's
weights are whole at a time; the embeddings and the final LayerNorm are gathered
(`whole`) where they are used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdist.base.errors import UserError, choose_one_of
from jaxdist.parallel.chunks import gather_where_used
from jaxdist.step.models.gpt import REMATS, GPTSize


def whole(module: nnx.Module) -> nnx.Module:
    """A copy of `module` whose params are whole (gathered where they came as chunks)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, gather_where_used(state))


def call_block(block: nnx.Module, x: jax.Array, remat: str) -> jax.Array:
    """`block(x)` with the block's weights gathered inside it (and recomputed, per `remat`).

    The block runs as a pure function of its state, so `jax.checkpoint` recomputes the
    gathering too in the backward pass; its RNG streams' advance is written back.
    """
    graphdef, state = nnx.split(block)

    def apply(state, x):
        module = nnx.merge(graphdef, gather_where_used(state))
        return module(x), nnx.state(module, nnx.RngState)

    if remat == "block":
        apply = jax.checkpoint(apply)
    elif remat == "dots":
        apply = jax.checkpoint(apply, policy=jax.checkpoint_policies
                               .dots_with_no_batch_dims_saveable)
    elif remat != "none":
        raise UserError(choose_one_of(f"model.remat={remat}", REMATS))
    y, rng_state = apply(state, x)
    nnx.update(block, rng_state)
    return y


class Block(nnx.Module):
    """x + attention(LN(x)); x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float, dtype: Any, attention: str,
                 rngs: nnx.Rngs):
        self.heads, self.attention = heads, attention
        self.ln1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.fc_proj = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """One pre-LayerNorm transformer block over `[batch, time, width]`."""
        batch, time, width = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(batch, time, 3 * self.heads, width // self.heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                implementation=self.attention)
        x = x + self.dropout(self.proj(attended.reshape(batch, time, width)))
        return x + self.dropout(self.fc_proj(nnx.gelu(self.fc(self.ln2(x)))))


class GPT(nnx.Module):
    """Token and position embeddings, blocks, a final LayerNorm, logits via the embedding."""

    def __init__(self, vocab_size: int, size: GPTSize, dropout: float = 0.0,
                 dtype: Any = jnp.float32, attention: str = "xla", remat: str = "none", *,
                 rngs: nnx.Rngs):
        self.remat = remat
        self.wte = nnx.Embed(vocab_size, size.width, dtype=dtype,
                             embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.wpe = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(),
                                                           (size.seq_len, size.width)))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([Block(size.width, size.heads, dropout, dtype, attention, rngs)
                                for _ in range(size.layers)])
        self.ln_f = nnx.LayerNorm(size.width, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array | None, embeddings: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        """Next-token logits `[batch, time, vocab]` for `tokens` `[batch, time]`.

        `embeddings` replace the token embeddings (`tokens` is then unused);
        `return_hidden=True` returns the final hidden states instead of the logits.
        """
        wte = whole(self.wte)
        x = wte(tokens) if embeddings is None else embeddings.astype(wte.dtype or jnp.float32)
        positions = gather_where_used(self.wpe.get_value())
        x = self.dropout(x + positions[: x.shape[1]].astype(x.dtype))
        for block in self.blocks:
            x = call_block(block, x, self.remat)
        hidden = whole(self.ln_f)(x)
        return hidden if return_hidden else wte.attend(hidden)
