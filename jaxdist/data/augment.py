"""Host-side image augmentation, per example, deterministic from per-row random streams.

The loader calls an experiment's transform with a `RowRandom` whose row `r` is seeded from
`(seed, epoch, the row's global position)`, so an example is augmented the same way on any
number of processes and devices, and a resumed run augments as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

from jaxdist.data.row_random import RowRandom


def random_crop(images: np.ndarray, rng: RowRandom, padding: int) -> np.ndarray:
    """Pad `[N, H, W(, C)]` images with zeros by `padding` and crop each at a random offset."""
    n, height, width = images.shape[:3]
    pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, pad)
    top = rng.integers(0, 2 * padding + 1)
    left = rng.integers(0, 2 * padding + 1)
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_flip(images: np.ndarray, rng: RowRandom) -> np.ndarray:
    """Mirror each `[N, H, W(, C)]` image left-right with probability 1/2."""
    flip = rng.random() < 0.5
    out = images.copy()
    out[flip] = images[flip][:, :, ::-1]
    return out
