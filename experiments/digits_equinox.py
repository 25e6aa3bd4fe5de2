"""Digits in equinox: the `digits_cnn` network as an equinox module, via `jaxdist.from_equinox`.

The scikit-learn digits split of `digits_cnn` (first half for training, second half for
testing) and its recipe (AdamW with warmup + cosine decay, label smoothing 0.1, random
+-1 pixel shifts on the host), with the model written as an equinox user writes it: a
module that maps one image to its logits, `jax.vmap`ed over the batch, two 3x3
convolutions (16, 32 channels), max-pool, dense 256 with dropout 0.2. `from_equinox`
trains its arrays and keeps the rest static. For `train.precision=bf16` the loss casts
the module's float32 arrays to bfloat16 (differentiably: the gradients stay float32).

Command:   python -m jaxdist.run digits_equinox
Runtime:   about 25 s on a 2-core CPU with 8 fake devices, compilation included
           (measured 2026-12-04 by `python scripts/bench_experiments.py digits_equinox`).
Result:    test accuracy 0.992 (final `eval` line, `accuracy`; same command and date);
           target >= 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp

from experiments._digits import load_split
from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig, from_equinox
from jaxdist.base.config import apply_overrides
from jaxdist.data.augment import random_crop
from jaxdist.step.losses import accuracy, check_labels, cross_entropy
from jaxdist.step.precision import compute_dtype


@dataclass
class DigitsEquinoxConfig:
    """The CNN and its regularization."""

    channels1: int = 16
    channels2: int = 32
    dense: int = 256
    dropout: float = 0.2
    label_smoothing: float = 0.1
    shift: int = 1  # random shift of training images, in pixels (0: none)


class CNN(eqx.Module):
    """conv-relu twice, 2x2 max-pool, dense-relu, dropout, logits; one image at a time."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    dense: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, m: DigitsEquinoxConfig, key: jax.Array):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, m.channels1, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(m.channels1, m.channels2, 3, padding=1, key=k2)
        self.pool = eqx.nn.MaxPool2d(2, stride=2)
        self.dense = eqx.nn.Linear(16 * m.channels2, m.dense, key=k3)
        self.dropout = eqx.nn.Dropout(m.dropout)
        self.out = eqx.nn.Linear(m.dense, 10, key=k4)

    def __call__(self, image: jax.Array, key: jax.Array | None) -> jax.Array:
        """Logits `[10]` of one image `[8, 8]`; `key` drives Dropout (None in inference)."""
        x = jax.nn.relu(self.conv1(image[None]))
        x = self.pool(jax.nn.relu(self.conv2(x)))
        x = self.dropout(jax.nn.relu(self.dense(x.reshape(-1))), key=key)
        return self.out(x)


def compute_in(tree, dtype):
    """`tree` (a module, images) with its float32 arrays cast to `dtype`; the rest as it is."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_array(x) and x.dtype == jnp.float32
                        else x, tree)


def config() -> Config:
    """1200 steps of batch 128 (about 171 epochs of the 898 training images)."""
    return Config(
        train=TrainConfig(steps=1200, batch_size=128, log_every=100, eval_every=600,
                          checkpoint_every=600),
        optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, weight_decay=1e-4,
                                  schedule="warmup_cosine", warmup_steps=100),
        model=DigitsEquinoxConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=20", "train.batch_size=64", "train.log_every=5", "train.eval_every=0",
        "model.channels1=8", "model.channels2=16", "optimizer.warmup_steps=0"])


def build(config: Config) -> Experiment:
    """The equinox CNN on the digits split."""
    m = config.model
    train, test = load_split()
    check_labels(train["label"], 10, "the training data")
    precision = config.train.precision
    dtype = compute_dtype(precision)

    def logits_of(model: CNN, images, key=None):
        keys = None if key is None else jax.random.split(key, images.shape[0])
        model, images = compute_in((model, images), dtype)
        return jax.vmap(model)(images, keys)

    def loss_fn(model: CNN, batch, key):
        logits = logits_of(model, batch["image"], key)
        metrics = {"accuracy": accuracy(logits, batch["label"]),
                   "cross_entropy": cross_entropy(logits, batch["label"])}
        return cross_entropy(logits, batch["label"], m.label_smoothing), metrics

    def eval_fn(model: CNN, batch):
        logits = logits_of(model, batch["image"])
        return cross_entropy(logits, batch["label"]), {"accuracy": accuracy(logits,
                                                                             batch["label"])}

    def shifted(batch, rng):
        return {**batch, "image": random_crop(batch["image"], rng, m.shift)}

    explain = ExplainSpec(input="image", label="label", kind="image", output=logits_of)
    return from_equinox(lambda key: CNN(m, key), loss_fn, eval_fn, train_data=train,
                        eval_data=test, train_transform=shifted if m.shift else None,
                        precision=precision, explain=explain)
