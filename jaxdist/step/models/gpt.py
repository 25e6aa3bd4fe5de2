"""A GPT-2-style decoder-only transformer: pre-LayerNorm, causal attention, tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdist.base.errors import UserError, choose_one_of
from jaxdist.parallel.chunks import gather_where_used


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
    "gpt2_medium": GPTSize(layers=24, width=1024, heads=16, seq_len=1024),
    "gpt2_large": GPTSize(layers=36, width=1280, heads=20, seq_len=1024),
    "gpt2_xl": GPTSize(layers=48, width=1600, heads=25, seq_len=1024),
}


class Block(nn.Module):
    """x + attention(LN(x)); x + MLP(LN(x))."""

    width: int
    heads: int
    dropout: float
    dtype: Any = jnp.float32
    attention: str = "xla"  # jax.nn.dot_product_attention's implementation: xla | cudnn

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """One pre-LayerNorm transformer block over `[batch, time, width]`."""
        batch, time, _ = x.shape
        head_dim = self.width // self.heads
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="qkv")(
            nn.LayerNorm(dtype=self.dtype, name="ln1")(x))
        q, k, v = jnp.split(qkv.reshape(batch, time, 3 * self.heads, head_dim), 3, axis=2)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                implementation=self.attention)
        attended = nn.Dense(self.width, dtype=self.dtype, name="proj")(
            attended.reshape(batch, time, self.width))
        x = x + nn.Dropout(self.dropout, deterministic=not train)(attended)
        hidden = nn.gelu(nn.Dense(4 * self.width, dtype=self.dtype, name="fc")(
            nn.LayerNorm(dtype=self.dtype, name="ln2")(x)))
        out = nn.Dense(self.width, dtype=self.dtype, name="fc_proj")(hidden)
        return x + nn.Dropout(self.dropout, deterministic=not train)(out)


ATTENTIONS = ("xla", "cudnn")
REMATS = ("none", "block", "dots")


def check_attention(attention: str, dtype: Any, platform: str | None = None) -> None:
    """Refuse (one line) an attention implementation this platform or dtype cannot run.

    cuDNN's flash attention runs only on NVIDIA GPUs and only on bf16/fp16 inputs.
    `platform` defaults to that of `jax.devices()[0]` (`cpu`, `gpu`, `tpu`).
    """
    if attention not in ATTENTIONS:
        raise UserError(choose_one_of(f"model.attention={attention}", ATTENTIONS))
    if attention != "cudnn":
        return
    platform = platform or jax.devices()[0].platform
    if platform != "gpu":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU, but the devices are "
                        f"{platform}; use model.attention=xla here")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise UserError(f"model.attention=cudnn needs bf16 compute, but it is "
                        f"{jnp.dtype(dtype).name}; add train.precision=bf16 or use "
                        f"model.attention=xla")


def block_class(remat: str) -> type[nn.Module]:
    """`Block`, or `Block` recomputed in the backward pass for `model.remat`.

    `block` recomputes all of it; `dots` keeps the outputs of the matmuls without batch
    dimensions (the Dense layers) and recomputes the rest. The block gathers its params
    where it uses them when they come as chunks (`parallel.shard=params`,
    `jaxdist.parallel.chunks.gather_where_used`), inside the remat.
    """
    block = nn.map_variables(
        Block, "params", init=True,
        trans_in_fn=lambda variables: {"params": gather_where_used(variables["params"])})
    if remat == "none":
        return block
    if remat == "block":
        return nn.remat(block, static_argnums=(2,))  # counting self: `train` is static
    if remat == "dots":
        return nn.remat(block, static_argnums=(2,),
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise UserError(choose_one_of(f"model.remat={remat}", REMATS))


class GPT(nn.Module):
    """Token and position embeddings, blocks, a final LayerNorm, logits via the embedding.

    `dtype` is the compute dtype (matmuls, attention, activations); params stay float32 and
    LayerNorm statistics are computed in float32 by flax. `attention` picks
    `jax.nn.dot_product_attention`'s implementation (`xla` or `cudnn`; see `check_attention`)
    and `remat` what the backward pass recomputes (`none`, `block` or `dots`; see
    `block_class`); neither changes the params or the values computed.
    """

    vocab_size: int
    size: GPTSize
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens: jax.Array | None, train: bool,
                 embeddings: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        """Next-token logits `[batch, time, vocab]` for `tokens` `[batch, time]`.

        `embeddings` `[batch, time, width]` replace the token embeddings (e.g. to take
        gradients with respect to them); `tokens` is then unused. `return_hidden=True`
        returns the final hidden states `[batch, time, width]` (after `ln_f`) instead of the
        logits, whose product with `params["wte"]["embedding"]` transposed gives the logits
        (e.g. for `jaxdist.step.losses.chunked_cross_entropy`).
        """
        embed = nn.Embed(self.vocab_size, self.size.width, name="wte", dtype=self.dtype,
                         embedding_init=nn.initializers.normal(0.02))
        positions = self.param("wpe", nn.initializers.normal(0.01),
                               (self.size.seq_len, self.size.width))
        x = embed(tokens) if embeddings is None else embeddings.astype(embed.dtype)
        x = x + positions[: x.shape[1]].astype(embed.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        settings = (self.size.width, self.size.heads, self.dropout, self.dtype,
                    self.attention)
        block = block_class(self.remat)
        for i in range(self.size.layers):
            x = block(*settings, name=f"block{i}")(x, train)
        hidden = nn.LayerNorm(dtype=self.dtype, name="ln_f")(x)
        return hidden if return_hidden else embed.attend(hidden)
