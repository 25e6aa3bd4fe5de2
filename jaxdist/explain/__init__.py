"""Gradient-based attributions, computed data-parallel with the training backends.

What is explained is one number per example: for a classifier, the logit of a chosen class
(by default the predicted one); for a regressor, its output. Attributions are taken with
respect to the experiment's features (`ExplainSpec.features`: the input itself, or e.g. a
token's embedding), and have their shape.

- `saliency`: the gradient of that number with respect to the features.
- `grad_x_input`: gradient times features.
- `ig` (integrated gradients): `(x - x0) * integral_0^1 grad(x0 + a (x - x0)) da`, with the
  baseline `x0` zeros, the training mean or a given array, and the integral a midpoint
  Riemann sum or a Gauss-Legendre rule of `steps` points. Its attributions add up to
  `f(x) - f(x0)` (completeness).
- `smoothgrad`: the mean of another method over `samples` noisy copies of the input, the
  noise's standard deviation `noise` times each example's value range; the noise of an
  example depends only on the seed and its position, not on the devices.

The examples are split over every device as training splits a batch (pmap or shard_map);
the integration points and noise samples of each example are evaluated on its device,
`chunk` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdist.base.errors import UserError, at_least, choose_one_of
from jaxdist.base.pytree import PyTree
from jaxdist.parallel.backend import Backend
from jaxdist.step.experiment import ExplainSpec

METHODS = ("ig", "saliency", "grad_x_input", "smoothgrad")
RULES = ("riemann", "gauss")
INDEX = "example_index"  # each example's position, carried through the devices


@dataclass(frozen=True)
class Method:
    """Which attribution and its settings."""

    name: str = "ig"
    steps: int = 64  # ig: integration points
    rule: str = "riemann"  # ig: "riemann" (midpoints) or "gauss" (Gauss-Legendre)
    base: str = "saliency"  # smoothgrad: the method it averages (saliency, grad_x_input, ig)
    noise: float = 0.1  # smoothgrad: noise std as a fraction of each example's value range
    samples: int = 16  # smoothgrad: noisy copies
    seed: int = 0  # smoothgrad: the noise's root key
    chunk: int = 16  # integration points or noise samples evaluated at once

    def check(self) -> None:
        """Refuse settings that cannot work (one line)."""
        if self.name not in METHODS:
            raise UserError(choose_one_of(f"method {self.name!r}", METHODS))
        if self.name == "smoothgrad" and self.base not in ("saliency", "grad_x_input", "ig"):
            raise UserError(f"smoothgrad averages saliency, grad_x_input or ig, not "
                            f"{self.base!r}")
        if self.rule not in RULES:
            raise UserError(f"rule {self.rule!r} is unknown; choose riemann or gauss")
        for name in ("steps", "samples", "chunk"):
            if getattr(self, name) < 1:
                raise UserError(at_least(f"{name}={getattr(self, name)}", 1))
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise UserError(f"noise={self.noise} must be a finite number >= 0 (a fraction of "
                            f"each example's value range, e.g. 0.1)")


@dataclass
class Explanation:
    """Attributions of N examples, as numpy arrays with a leading axis of N."""

    features: np.ndarray  # what was attributed (float), [N, ...]
    attributions: np.ndarray  # same shape
    scores: np.ndarray  # [N] the explained number f(x)
    baseline_scores: np.ndarray  # [N] f(baseline) for ig (NaN for other methods)
    predictions: np.ndarray  # [N] the predicted class, or a regressor's output
    targets: np.ndarray  # [N] the class explained (-1 for a regressor)


def integration_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Points `a` in (0, 1) and weights summing to 1 for `integral_0^1 g(a) da`."""
    if rule == "gauss":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, weights / 2
    return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)


class Explainer:
    """One attribution method of one experiment, compiled once for a backend's devices.

    `target` (a classifier) is "predicted", "label" (the `spec.label` column) or a class
    index in `[0, classes)`. Call it with the params (and model state) and the rows to explain.
    """

    def __init__(self, spec: ExplainSpec, backend: Backend, method: Method = Method(),
                 target: str | int = "predicted"):
        method.check()
        is_class = isinstance(target, (int, np.integer)) and not isinstance(target, bool)
        if target not in ("predicted", "label") and not is_class:
            raise UserError(f"--target {target} is not predicted, label or a class number")
        if target == "label" and spec.label is None:
            raise UserError("--target label needs the experiment's ExplainSpec.label")
        self.spec, self.backend, self.target = spec, backend, target
        self._mapped = backend.compile_per_example(_per_device(spec, method, target))

    def __call__(self, params: PyTree, model_state: PyTree, rows: dict[str, Any],
                 baseline: Any = "zeros") -> Explanation:
        """Attributions for every row of `rows` (a dict of host arrays), over the devices.

        `baseline` (ig) is "zeros" or an array of one example's features (e.g. the training
        mean, `mean_features`), or one that broadcasts to that shape (e.g. a single value).
        """
        spec, backend = self.spec, self.backend
        for name in (spec.input, spec.label if self.target == "label" else None):
            if name is not None and name not in rows:
                raise UserError(f"the data has no {name!r} (named by the experiment's "
                                f"ExplainSpec); it has {', '.join(rows)}")
        if isinstance(baseline, str):
            if baseline != "zeros":
                raise UserError(f"baseline {baseline!r} is not 'zeros' or an array")
        else:
            baseline = np.asarray(baseline)
            check_baseline(baseline, features_shape(spec, params, rows), "the baseline")
        size = len(rows[spec.input])
        padded = -(-size // backend.num_devices) * backend.num_devices
        batch = {name: np.asarray(rows[name]) for name in (spec.input, spec.label)
                 if name is not None and name in rows}
        batch[INDEX] = np.arange(size, dtype=np.int32)
        batch = {name: np.concatenate([values, np.repeat(values[:1], padded - size, axis=0)])
                 for name, values in batch.items()}  # padding: copies of row 0, dropped
        x0 = None if isinstance(baseline, str) else jnp.asarray(baseline, jnp.float32)
        outputs = self._mapped(backend.replicate((params, model_state, x0)),
                               backend.put_batch(batch))
        host = jax.tree.map(lambda x: x[:size], backend.examples_to_host(outputs))
        return Explanation(**host)


def explain(spec: ExplainSpec, params: PyTree, model_state: PyTree, rows: dict[str, Any],
            backend: Backend, method: Method = Method(), baseline: Any = "zeros",
            target: str | int = "predicted") -> Explanation:
    """Attributions for every row of `rows`, split over `backend` (see `Explainer`)."""
    return Explainer(spec, backend, method, target)(params, model_state, rows, baseline)


def features_shape(spec: ExplainSpec, params: PyTree, rows: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one example's features (what attributions and a baseline have)."""
    first = np.asarray(rows[spec.input][:1])
    return tuple(jax.eval_shape(_features_fn(spec), params, first).shape[1:])


def check_baseline(baseline: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    """Refuse a baseline that is not finite numbers broadcasting to one example's `shape`."""
    wanted = (f"give one example's features, shape {shape}, or an array that broadcasts to "
              f"it (e.g. a single value)")
    if baseline.dtype.kind not in "iuf":
        raise UserError(f"{what} holds an array of dtype {baseline.dtype}, not numbers; {wanted}")
    try:
        fits = np.broadcast_shapes(baseline.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise UserError(f"{what} holds an array of shape {baseline.shape}; {wanted}")
    if not np.isfinite(baseline).all():
        raise UserError(f"{what} holds values that are not finite (NaN or inf); {wanted}")


def mean_features(spec: ExplainSpec, params: PyTree, rows: dict[str, Any],
                  chunk: int = 512) -> np.ndarray:
    """The mean of the features over `rows` (e.g. the training data): a baseline."""
    features = _features_fn(spec)
    values = rows[spec.input]
    total, count = None, 0
    for start in range(0, len(values), chunk):
        part = np.asarray(features(params, jnp.asarray(values[start:start + chunk])),
                          np.float64)
        total = part.sum(axis=0) if total is None else total + part.sum(axis=0)
        count += len(part)
    return (total / count).astype(np.float32)


def _weighted_sum(fn: Callable, points: np.ndarray, weights: np.ndarray,
                  chunk: int) -> jax.Array:
    """`sum_k weights[k] * fn(points[k])`, `fn` vmapped over `chunk` points at a time.

    The chunks are unrolled, not looped: on XLA:CPU a `lax.scan` over chunks was slower (the
    README's "Why did the model decide that?" gives the figure).
    """
    total = None
    for start in range(0, len(points), chunk):
        values = jax.vmap(fn)(jnp.asarray(points[start:start + chunk]))
        part = jnp.tensordot(jnp.asarray(weights[start:start + chunk], values.dtype), values,
                             axes=1)
        total = part if total is None else total + part
    return total


def _features_fn(spec: ExplainSpec) -> Callable:
    if spec.features is not None:
        return spec.features
    return lambda params, raw: jnp.asarray(raw, jnp.float32)


def _check_class(target: int, classes: int | None) -> None:
    """Refuse a class number the model does not output (`classes` None: a regressor)."""
    if classes is None:
        raise UserError(f"--target {target} names a class, but the model is a regressor (one "
                        f"number per example); leave --target at predicted")
    if not 0 <= target < classes:
        raise UserError(f"--target {target} is not a class of this model: it has {classes} "
                        f"classes, 0 to {classes - 1}; give one of those, predicted or label")


def _per_device(spec: ExplainSpec, method: Method, target: str | int) -> Callable:
    """The attribution of one device's examples: `(replicated, batch) -> dict of [b, ...]`."""
    features_of = _features_fn(spec)

    def run(replicated, batch):
        params, model_state, given_baseline = replicated
        features = features_of(params, batch[spec.input])
        outputs = spec.output(params, model_state, features)
        classifier = outputs.ndim == 2
        if not isinstance(target, str):  # shapes are known while tracing: refused before a step
            _check_class(target, outputs.shape[-1] if classifier else None)
        if classifier:
            predictions = jnp.argmax(outputs, axis=-1)
            if target == "predicted":
                targets = predictions
            elif target == "label":
                targets = batch[spec.label].astype(jnp.int32).reshape(-1)
            else:
                targets = jnp.full(predictions.shape, int(target), jnp.int32)
        else:
            predictions = outputs.astype(jnp.float32)
            targets = jnp.full(outputs.shape[:1], -1, jnp.int32)

        def score(x):
            out = spec.output(params, model_state, x)
            if classifier:
                out = jnp.take_along_axis(out, targets[:, None], axis=1)[:, 0]
            return out.astype(jnp.float32)

        def gradient(x):
            return jax.grad(lambda x: jnp.sum(score(x)))(x)

        x0 = (jnp.zeros_like(features) if given_baseline is None
              else jnp.broadcast_to(given_baseline, features.shape).astype(features.dtype))

        def attribute(name, x):
            if name == "saliency":
                return gradient(x)
            if name == "grad_x_input":
                return gradient(x) * x
            alphas, weights = integration_points(method.steps, method.rule)
            path = _weighted_sum(lambda a: gradient(x0 + a * (x - x0)), alphas, weights,
                                 method.chunk)
            return (x - x0) * path

        if method.name == "smoothgrad":
            axes = tuple(range(1, features.ndim))
            spread = (jnp.max(features, axis=axes) - jnp.min(features, axis=axes))
            sigma = (method.noise * spread).reshape(-1, *([1] * (features.ndim - 1)))
            root = jax.random.key(method.seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(batch[INDEX])

            def noisy(sample):
                noise = jax.vmap(lambda k: jax.random.normal(
                    jax.random.fold_in(k, sample), features.shape[1:], features.dtype))(keys)
                return attribute(method.base, features + sigma * noise)

            samples = np.arange(method.samples)
            attributions = _weighted_sum(noisy, samples, np.full(len(samples), 1 / len(samples)),
                                         method.chunk)
        else:
            attributions = attribute(method.name, features)
        baseline_scores = (score(x0) if method.name == "ig"
                           else jnp.full(targets.shape, jnp.nan, jnp.float32))
        return {"features": features, "attributions": attributions, "scores": score(features),
                "baseline_scores": baseline_scores, "predictions": predictions,
                "targets": targets}

    return run
