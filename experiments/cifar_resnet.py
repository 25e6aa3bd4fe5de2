"""CIFAR-10 with a ResNet-18-style network and cross-replica BatchNorm.

Data: `data.path` names either the folder of the standard CIFAR-10 python batches
(`data_batch_1` .. `data_batch_5`, `test_batch`) or an `.npz` with `x_train` `[N, 32, 32,
3]` uint8, `y_train`, `x_test`, `y_test`. Without it, a small learnable synthetic set in
the same format is generated (and one line says so): 10 classes, each a fixed random
smooth colour pattern, every image a randomly shifted, noisy copy of its class's pattern.
Training images are randomly cropped (4-pixel padding) and flipped on the host, per
example, deterministically from the seed. BatchNorm statistics are averaged over all
devices with the core's exact weighting (padding excluded), so the running statistics are
the same on every device.

Command:   python -m jaxdist.run cifar_resnet       # synthetic, CPU-sized
           python -m jaxdist.run cifar_resnet data.path=/data/cifar-10-batches-py
               model.width=64 train.steps=20000 train.batch_size=512     # CIFAR-10, a GPU
Runtime:   about 80 s on a 2-core CPU with 8 fake devices (width 8, 300 steps of 64),
           compilation included (measured 2026-11-27 by `python scripts/bench_experiments.py`).
Result:    synthetic set: test accuracy 0.97 (the final `eval` line).
           CIFAR-10 itself was not run here (no GPU and no download on this machine).
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxdist import Config, Experiment, ExplainSpec, OptimizerConfig, TrainConfig
from jaxdist.config import apply_overrides
from jaxdist.data.augment import random_crop, random_flip
from jaxdist.errors import UserError
from jaxdist.losses import accuracy, check_labels, cross_entropy
from jaxdist.models.resnet import ResNet
from jaxdist.precision import compute_dtype

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


@dataclass
class ResNetConfig:
    """The network's size and the loss."""

    width: int = 8  # 64 is ResNet-18
    blocks: int = 2  # per stage
    label_smoothing: float = 0.0


@dataclass
class CifarDataConfig:
    """Where the images come from."""

    path: str = ""  # CIFAR-10 python batches folder or .npz; empty: synthetic
    synthetic_train: int = 2048
    synthetic_test: int = 512


def config() -> Config:
    """A CPU-sized run on the synthetic set: 300 steps of 64 images."""
    return Config(
        train=TrainConfig(steps=300, batch_size=64, log_every=50, eval_every=150,
                          checkpoint_every=150),
        optimizer=OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.9,
                                  weight_decay=5e-4, schedule="warmup_cosine",
                                  warmup_steps=30),
        model=ResNetConfig(),
        data=CifarDataConfig(),
    )


def tiny_config() -> Config:
    """A few seconds' version for the test suite (8 fake CPU devices)."""
    return apply_overrides(config(), [
        "train.steps=12", "train.batch_size=32", "train.log_every=4", "train.eval_every=0",
        "model.width=4", "model.blocks=1", "data.synthetic_train=256",
        "data.synthetic_test=64", "optimizer.warmup_steps=0", "optimizer.learning_rate=0.05"])


def load_cifar(path: str) -> tuple[dict, dict]:
    """Train and test arrays from a CIFAR-10 python-batches folder or an .npz file."""
    root = Path(path)
    if root.is_file() and root.suffix == ".npz":
        with np.load(root, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise UserError(f"{root} lacks {', '.join(sorted(missing))}")
            return ({"image": f["x_train"], "label": f["y_train"]},
                    {"image": f["x_test"], "label": f["y_test"]})
    if not (root / "data_batch_1").exists():
        raise UserError(f"data.path={path} is neither an .npz nor a folder holding the "
                        f"CIFAR-10 python batches (data_batch_1 .. data_batch_5, test_batch)")

    def batch(name):
        # The CIFAR-10 python format is a pickle by definition; read only files you trust.
        with (root / name).open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
        images = raw[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return images, np.asarray(raw[b"labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = batch("test_batch")
    return ({"image": np.concatenate([p[0] for p in parts]),
             "label": np.concatenate([p[1] for p in parts])},
            {"image": test_images, "label": test_labels})


def synthetic(train_size: int, test_size: int, seed: int = 0) -> tuple[dict, dict]:
    """A learnable CIFAR-format set: shifted, noisy copies of 10 smooth class patterns."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(64, 192, size=(10, 4, 4, 3))
    patterns = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)  # [10, 32, 32, 3]

    def make(n):
        labels = rng.integers(0, 10, size=n)
        shifts = rng.integers(-16, 16, size=(n, 2))  # anywhere: only the pattern tells
        images = np.stack([np.roll(patterns[c], tuple(s), axis=(0, 1))
                           for c, s in zip(labels, shifts, strict=True)])
        images = images + rng.normal(0, 100, size=images.shape)
        return {"image": np.clip(images, 0, 255).astype(np.uint8),
                "label": labels.astype(np.int32)}

    return make(train_size), make(test_size)


def build(config: Config) -> Experiment:
    """The ResNet, its BatchNorm state, the images and their augmentation."""
    m, d = config.model, config.data
    if d.path:
        train, test = load_cifar(d.path)
    else:
        print(f"cifar_resnet: no data.path given, using a synthetic CIFAR-format set "
              f"({d.synthetic_train} train / {d.synthetic_test} test images), not CIFAR-10",
              file=sys.stderr)
        train, test = synthetic(d.synthetic_train, d.synthetic_test)
    check_labels(train["label"], 10, "the CIFAR training data")
    check_labels(test["label"], 10, "the CIFAR test data")
    precision = config.train.precision
    dtype = compute_dtype(precision)
    model = ResNet(outputs=10, width=m.width, blocks=m.blocks, dtype=dtype)
    init_model = ResNet(outputs=10, width=m.width, blocks=m.blocks, axis_name=None)

    def normalize(images):
        return (images.astype(jnp.float32) / 255.0 - MEAN) / STD

    def init_variables(rng):
        dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
        return init_model.init(rng, dummy, jnp.ones(1), train=False)

    def loss_fn(params, model_state, batch, rng):
        logits, updated = model.apply(
            {"params": params, "batch_stats": model_state}, normalize(batch["image"]),
            batch["weight"], train=True, mutable=["batch_stats"])
        losses = cross_entropy(logits, batch["label"], m.label_smoothing)
        return losses, {"accuracy": accuracy(logits, batch["label"])}, updated["batch_stats"]

    def eval_fn(params, model_state, batch):
        logits = model.apply({"params": params, "batch_stats": model_state},
                             normalize(batch["image"]), batch["weight"], train=False)
        return cross_entropy(logits, batch["label"]), {"accuracy": accuracy(logits,
                                                                             batch["label"])}

    def logits(params, model_state, images):
        """Eval-mode logits of normalized images (what attributions are taken on)."""
        return model.apply({"params": params, "batch_stats": model_state}, images,
                           jnp.ones(images.shape[0]), train=False)

    def augment(batch, rng):
        return {**batch, "image": random_flip(random_crop(batch["image"], rng, 4), rng)}

    return Experiment(init_params=lambda rng: init_variables(rng)["params"],
                      init_model_state=lambda rng: init_variables(rng)["batch_stats"],
                      loss_fn=loss_fn, eval_fn=eval_fn, train_data=train, eval_data=test,
                      train_transform=augment, precision=precision,
                      explain=ExplainSpec(input="image", label="label", kind="image",
                                          features=lambda params, raw: normalize(raw),
                                          output=logits))
