"""Per-example losses: one value per example, for the core's exact weighted means.

Losses are computed in float32 whatever dtype the model computed in (see
`jaxdist.step.precision`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdist.base.errors import UserError


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """`(prediction - target)^2` per example, summed over any trailing axes, in float32."""
    error = (predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2
    return error.reshape(error.shape[0], -1).sum(axis=1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  class_weights: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy per example, with optional label smoothing and class weights.

    `labels` are integer classes in `[0, classes)`; an example whose label is outside gets a
    NaN loss (whatever the smoothing), which the non-finite guard reports, rather than a
    quietly wrong finite one. Check labels on the host with `check_labels` when the data is
    loaded. Label smoothing puts `1 - label_smoothing` on the label and spreads
    `label_smoothing` evenly over all classes. `class_weights[c]` multiplies the loss of
    every example of class `c` (e.g. `class_weights_for(counts)` to balance classes).
    """
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if class_weights is not None:
        weights = jnp.asarray(class_weights, jnp.float32)
        losses = losses * weights[jnp.clip(labels, 0, num_classes - 1)]
    in_range = (labels >= 0) & (labels < num_classes)
    return jnp.where(in_range, losses, jnp.nan)


def chunked_cross_entropy(hidden: jax.Array, embedding: jax.Array, labels: jax.Array,
                          chunk: int) -> jax.Array:
    """`cross_entropy(hidden @ embedding.T, labels)`, `chunk` positions' logits at a time.

    For a language model's tied output layer: `hidden` `[..., width]` are the final hidden
    states, `embedding` `[vocab, width]` the token embedding and `labels` `[...]` integer
    tokens; the result has `labels`' shape, in float32. The logits are computed in
    `hidden`'s dtype (the compute dtype, as `flax.linen.Embed.attend` does) and their
    log-softmax in float32, but never for more than `chunk` positions at once: the backward
    pass recomputes each chunk's logits rather than keeping `[positions, vocab]` of them.
    A position count that `chunk` does not divide is padded, and the padding dropped.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, not {chunk}")
    width = hidden.shape[-1]
    flat_hidden, flat_labels = hidden.reshape(-1, width), labels.reshape(-1)
    positions = flat_labels.shape[0]
    chunks = -(-positions // chunk)
    pad = chunks * chunk - positions
    # Zero hidden states and label 0 give finite losses, which the slice below drops.
    flat_hidden = jnp.pad(flat_hidden, ((0, pad), (0, 0))).reshape(chunks, chunk, width)
    flat_labels = jnp.pad(flat_labels, (0, pad)).reshape(chunks, chunk)

    # prevent_cse=False: inside lax.map's scan, CSE cannot undo the recomputation.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_losses(h: jax.Array, y: jax.Array, table: jax.Array) -> jax.Array:
        # The cast is inside so that the embedding's gradient adds up over chunks in float32.
        logits = h @ table.astype(h.dtype).T
        return cross_entropy(logits, y)

    losses = jax.lax.map(lambda xs: chunk_losses(*xs, embedding), (flat_hidden, flat_labels))
    return losses.reshape(-1)[:positions].reshape(labels.shape)


def check_labels(labels: np.ndarray, num_classes: int, what: str = "data") -> None:
    """Refuse (one line) integer labels outside `[0, num_classes)`; cheap, on the host."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{what} labels are {labels.dtype}; a classifier needs integer "
                        f"classes in [0, {num_classes})")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        first = int(np.argmax(outside.reshape(-1)))
        raise UserError(f"{what} has {int(outside.sum())} label(s) outside [0, {num_classes}) "
                        f"(e.g. {int(labels.reshape(-1)[first])} at row {first}); the model "
                        f"has {num_classes} classes: fix the labels or the number of classes")


def class_weights_for(counts: jax.Array) -> jax.Array:
    """Weights `n / (classes * count_c)`: every class contributes as if it were balanced."""
    counts = jnp.asarray(counts, jnp.float32)
    return counts.sum() / (counts.shape[0] * jnp.maximum(counts, 1.0))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the arg-max class is the label, per example."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
