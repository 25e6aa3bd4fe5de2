"""What the digits experiments share: the scikit-learn split and a classifier experiment.

Not an experiment itself (the leading underscore keeps it out of `--list`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np

from experiments._sklearn_files import load_digits_rows
from jaxdist import Experiment, ExplainSpec
from jaxdist.data import as_source, column
from jaxdist.data.augment import random_crop
from jaxdist.step.losses import accuracy, check_labels, cross_entropy


def load_split() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """First half of the digits for training, second half for testing; pixels in [0, 1]."""
    images, labels = load_digits_rows()
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
    labels = labels.astype(np.int32)
    half = len(images) // 2
    return ({"image": images[:half], "label": labels[:half]},
            {"image": images[half:], "label": labels[half:]})


def classifier_experiment(model: nn.Module, train: Any, test: Any, label_smoothing: float,
                          shift: int, class_weights: np.ndarray | None = None,
                          eval_metrics: Callable | None = None,
                          precision: str = "fp32") -> Experiment:
    """A classifier over `image`/`label` data: loss, accuracy, optional shifts.

    `train` and `test` are any jaxdist data (dicts of arrays, sources, grain or Hugging Face
    map-style data sets). `model` has `outputs` classes and computes in `precision` (built
    with `dtype=compute_dtype(precision)`); labels outside its classes are refused here,
    before training. The train loss includes label smoothing; beside it, `cross_entropy`
    is the plain one, comparable to the eval loss. `eval_metrics(logits, labels) -> dict`
    of per-example metrics replaces the accuracy reported on the test split.
    """
    train_source, test_source = as_source(train, "the training data"), as_source(
        test, "the test data")
    check_labels(column(train_source, "label"), model.outputs, "the training data")
    check_labels(column(test_source, "label"), model.outputs, "the test data")
    example = train_source.get_batch(np.arange(1))["image"]
    eval_metrics = eval_metrics or (lambda logits, labels: {"accuracy": accuracy(logits,
                                                                                  labels)})

    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["image"], train=True,
                             rngs={"dropout": rng})
        losses = cross_entropy(logits, batch["label"], label_smoothing, class_weights)
        metrics = {"accuracy": accuracy(logits, batch["label"])}
        if label_smoothing:
            metrics["cross_entropy"] = cross_entropy(logits, batch["label"])
        return losses, metrics

    def eval_fn(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        return cross_entropy(logits, batch["label"]), eval_metrics(logits, batch["label"])

    def init_params(rng):
        return model.init(rng, example, train=False)["params"]

    def shifted(batch, rng):
        return {**batch, "image": random_crop(batch["image"], rng, shift)}

    explain = ExplainSpec(input="image", label="label", kind="image",
                          output=lambda params, model_state, images: model.apply(
                              {"params": params}, images, train=False))
    return Experiment(init_params=init_params, loss_fn=loss_fn, eval_fn=eval_fn,
                      train_data=train_source, eval_data=test_source,
                      train_transform=shifted if shift else None, precision=precision,
                      explain=explain)
