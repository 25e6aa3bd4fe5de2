"""Host-side image augmentation, per example, deterministic from a numpy Generator.

The loader calls an experiment's transform with a Generator seeded from
`(seed, epoch, batch index, process)`, so a resumed run augments exactly as an
uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Pad `[N, H, W(, C)]` images with zeros by `padding` and crop each at a random offset."""
    n, height, width = images.shape[:3]
    pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad)
    top = rng.integers(0, 2 * padding + 1, size=n)
    left = rng.integers(0, 2 * padding + 1, size=n)
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each `[N, H, W(, C)]` image left-right with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip][:, :, ::-1]
    return out
