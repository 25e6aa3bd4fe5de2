"""Per-example losses: one value per example, for the core's exact weighted means."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """`(prediction - target)^2` per example, summed over any trailing axes."""
    error = (predictions - targets) ** 2
    return error.reshape(error.shape[0], -1).sum(axis=1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  class_weights: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy per example, with optional label smoothing and class weights.

    `labels` are integer classes. Label smoothing puts `1 - label_smoothing` on the label and
    spreads `label_smoothing` evenly over all classes. `class_weights[c]` multiplies the loss
    of every example of class `c` (e.g. `class_weights_for(counts)` to balance classes).
    """
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if class_weights is not None:
        losses = losses * jnp.asarray(class_weights, jnp.float32)[labels]
    return losses


def class_weights_for(counts: jax.Array) -> jax.Array:
    """Weights `n / (classes * count_c)`: every class contributes as if it were balanced."""
    counts = jnp.asarray(counts, jnp.float32)
    return counts.sum() / (counts.shape[0] * jnp.maximum(counts, 1.0))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where the arg-max class is the label, per example."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
