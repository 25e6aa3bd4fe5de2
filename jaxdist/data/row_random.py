"""Random numbers for host-side augmentation, one independent stream per example.

Row `r` of a batch draws from a stream that is a pure function of `(seed, epoch, position)`,
where `position` is the row's place in the epoch's global order. So a row is augmented the
same way however the global batch is split over processes and devices, and a resumed run
augments exactly as an uninterrupted one. The streams are counter-based (SplitMix64 of the
key and a draw counter), computed for the whole batch at once with numpy.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _key(words: list[np.ndarray]) -> np.ndarray:
    key = np.zeros(np.shape(words[-1]), np.uint64)
    for word in words:
        key = _mix(key ^ (np.asarray(word).astype(np.uint64) + _GOLDEN))
    return key


class RowRandom:
    """Per-row random draws for a batch: every method returns one value (or block) per row.

    `RowRandom(seed, epoch, positions)`; then e.g. `rng.integers(0, 9)` is an int array
    `[rows]`, `rng.random((2,))` a float array `[rows, 2]`. Successive calls give new values.
    """

    def __init__(self, seed: int, epoch: int, positions: np.ndarray):
        positions = np.asarray(positions, np.int64)
        with np.errstate(over="ignore"):
            self._keys = _key([np.full(len(positions), seed), np.full(len(positions), epoch),
                               positions])
        self._draws = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _bits(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        counters = np.arange(self._draws, self._draws + count, dtype=np.uint64)
        self._draws += count
        with np.errstate(over="ignore"):
            bits = _mix(self._keys[:, None] ^ _mix(counters * _GOLDEN + _GOLDEN)[None, :])
        return bits.reshape(len(self._keys), *shape)

    def random(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Uniform floats in [0, 1), shape `[rows, *shape]`."""
        return (self._bits(tuple(shape)) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def integers(self, low: int, high: int, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Uniform integers in [low, high), shape `[rows, *shape]`."""
        if high <= low:
            raise ValueError(f"integers needs low < high, got {low}, {high}")
        return low + np.floor(self.random(shape) * (high - low)).astype(np.int64)

    def normal(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Standard normal floats, shape `[rows, *shape]` (Box-Muller)."""
        u1, u2 = self.random(shape), self.random(shape)
        return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
