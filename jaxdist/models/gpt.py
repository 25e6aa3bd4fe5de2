"""A GPT-2-style decoder-only transformer: pre-LayerNorm, causal attention, tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class GPTSize:
    """The shape of a GPT."""

    layers: int
    width: int
    heads: int
    seq_len: int


SIZES = {
    "tiny": GPTSize(layers=2, width=128, heads=4, seq_len=128),
    "small": GPTSize(layers=4, width=256, heads=8, seq_len=256),
    "gpt2": GPTSize(layers=12, width=768, heads=12, seq_len=1024),
}


class Block(nn.Module):
    """x + attention(LN(x)); x + MLP(LN(x))."""

    width: int
    heads: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """One pre-LayerNorm transformer block over `[batch, time, width]`."""
        batch, time, _ = x.shape
        head_dim = self.width // self.heads
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="qkv")(
            nn.LayerNorm(dtype=self.dtype, name="ln1")(x))
        q, k, v = jnp.split(qkv.reshape(batch, time, 3 * self.heads, head_dim), 3, axis=2)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        attended = nn.Dense(self.width, dtype=self.dtype, name="proj")(
            attended.reshape(batch, time, self.width))
        x = x + nn.Dropout(self.dropout, deterministic=not train)(attended)
        hidden = nn.gelu(nn.Dense(4 * self.width, dtype=self.dtype, name="fc")(
            nn.LayerNorm(dtype=self.dtype, name="ln2")(x)))
        out = nn.Dense(self.width, dtype=self.dtype, name="fc_proj")(hidden)
        return x + nn.Dropout(self.dropout, deterministic=not train)(out)


class GPT(nn.Module):
    """Token and position embeddings, blocks, a final LayerNorm, logits via the embedding.

    `dtype` is the compute dtype (matmuls, attention, activations); params stay float32 and
    LayerNorm statistics are computed in float32 by flax.
    """

    vocab_size: int
    size: GPTSize
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array | None, train: bool,
                 embeddings: jax.Array | None = None) -> jax.Array:
        """Next-token logits `[batch, time, vocab]` for `tokens` `[batch, time]`.

        `embeddings` `[batch, time, width]` replace the token embeddings (e.g. to take
        gradients with respect to them); `tokens` is then unused.
        """
        embed = nn.Embed(self.vocab_size, self.size.width, name="wte", dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02))
        positions = self.param("wpe", nn.initializers.normal(0.01),
                               (self.size.seq_len, self.size.width))
        x = embed(tokens) if embeddings is None else embeddings.astype(embed.dtype)
        x = x + positions[: x.shape[1]].astype(embed.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.size.layers):
            x = Block(self.size.width, self.size.heads, self.dropout, self.dtype,
                      name=f"block{i}")(x, train)
        return embed.attend(nn.LayerNorm(dtype=self.dtype, name="ln_f")(x))
