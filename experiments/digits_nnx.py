"""Digits in Flax NNX: a CNN with BatchNorm and Dropout, trained through `jaxdist.from_nnx`.

The scikit-learn digits split of `digits_cnn` (first half for training, second half for
testing) and its recipe (AdamW with warmup + cosine decay, label smoothing 0.1, random
+-1 pixel shifts on the host), with the model written as an NNX module: two 3x3
convolutions (16, 32 channels), each followed by BatchNorm whose statistics are shared
across the devices, max-pool, dense 128 with dropout 0.2. The module is written as an NNX
user writes it; `from_nnx` splits it into params and BatchNorm statistics and gives the
loss the module back on each device.

Command:   python -m jaxdist.run digits_nnx
Runtime:   about 29 s on a 2-core CPU with 8 fake devices, compilation included
           (measured 2026-12-04 by `python scripts/bench_experiments.py digits_nnx`).
Result:    test accuracy 0.992 (final `eval` line, `accuracy`; same command and date);
           target >= 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from experiments._digits import load_split
from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig, from_nnx
from jaxdist.base.config import apply_overrides
from jaxdist.data.augment import random_crop
from jaxdist.step.losses import accuracy, check_labels, cross_entropy
from jaxdist.step.models.nnx_layers import CrossReplicaBatchNorm
from jaxdist.step.precision import compute_dtype


@dataclass
class DigitsNnxConfig:
    """The CNN and its regularization."""

    channels1: int = 16
    channels2: int = 32
    dense: int = 128
    dropout: float = 0.2
    label_smoothing: float = 0.1
    shift: int = 1  # random shift of training images, in pixels (0: none)


class CNN(nnx.Module):
    """conv-BN-relu twice, max-pool, dense-relu, dropout, logits.

    The convolutions have no bias: BatchNorm's own shift replaces it (a bias before it has
    a gradient of exactly zero in exact arithmetic, and Adam would amplify its rounding).
    """

    def __init__(self, m: DigitsNnxConfig, dtype, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, m.channels1, (3, 3), use_bias=False, dtype=dtype,
                              rngs=rngs)
        self.bn1 = CrossReplicaBatchNorm(m.channels1)
        self.conv2 = nnx.Conv(m.channels1, m.channels2, (3, 3), use_bias=False, dtype=dtype,
                              rngs=rngs)
        self.bn2 = CrossReplicaBatchNorm(m.channels2)
        self.dense = nnx.Linear(16 * m.channels2, m.dense, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(m.dropout, rngs=rngs)
        self.out = nnx.Linear(m.dense, 10, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, weight: jax.Array) -> jax.Array:
        """Logits `[b, 10]` of images `[b, 8, 8]`; `weight` weighs each in BatchNorm."""
        x = images[..., None]
        x = nnx.relu(self.bn1(self.conv1(x), weight))
        x = nnx.relu(self.bn2(self.conv2(x), weight))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.dropout(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))
        return self.out(x)


def config() -> Config:
    """1200 steps of batch 128 (about 171 epochs of the 898 training images)."""
    return Config(
        train=TrainConfig(steps=1200, batch_size=128, log_every=100, eval_every=600,
                          checkpoint_every=600),
        optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, weight_decay=1e-4,
                                  schedule="warmup_cosine", warmup_steps=100),
        model=DigitsNnxConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=20", "train.batch_size=64", "train.log_every=5", "train.eval_every=0",
        "model.channels1=8", "model.channels2=16", "optimizer.warmup_steps=0"])


def build(config: Config) -> Experiment:
    """The NNX CNN on the digits split."""
    m = config.model
    train, test = load_split()
    check_labels(train["label"], 10, "the training data")
    precision = config.train.precision
    dtype = compute_dtype(precision)

    def loss_fn(model: CNN, batch):
        logits = model(batch["image"], batch["weight"])
        metrics = {"accuracy": accuracy(logits, batch["label"]),
                   "cross_entropy": cross_entropy(logits, batch["label"])}
        return cross_entropy(logits, batch["label"], m.label_smoothing), metrics

    def eval_fn(model: CNN, batch):
        logits = model(batch["image"], batch["weight"])
        return cross_entropy(logits, batch["label"]), {"accuracy": accuracy(logits,
                                                                             batch["label"])}

    def shifted(batch, rng):
        return {**batch, "image": random_crop(batch["image"], rng, m.shift)}

    explain = ExplainSpec(input="image", label="label", kind="image",
                          output=lambda model, images: model(images,
                                                             jnp.ones(images.shape[0])))
    return from_nnx(lambda rngs: CNN(m, dtype, rngs), loss_fn, eval_fn, train_data=train,
                    eval_data=test, train_transform=shifted if m.shift else None,
                    precision=precision, explain=explain)
