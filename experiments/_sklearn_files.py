"""scikit-learn's bundled diabetes and digits data, read from its files without importing it.

Importing scikit-learn costs a process about 1.5 s (it imports scipy.stats), more than a
small experiment's training. Its data sets are gzip'ed CSV files inside the package that
its own loaders read with `np.loadtxt`; reading them the same way gives the same arrays,
bit for bit (tests/test_experiments.py compares them with scikit-learn's loaders). Where a
scikit-learn release keeps them elsewhere, its loaders are used.

Not an experiment itself (the leading underscore keeps it out of `--list`).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np


def _data_file(name: str) -> Path | None:
    """`sklearn/datasets/data/<name>` of the installed scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _read_csv(path: Path, delimiter: str | None = None) -> np.ndarray:
    with gzip.open(path, mode="rt", encoding="utf-8") as lines:
        return np.loadtxt(lines, delimiter=delimiter)


DIABETES_FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def load_diabetes_rows() -> tuple[np.ndarray, np.ndarray]:
    """The 442 diabetes rows, unscaled: features `[442, 10]` and target `[442]` (float64).

    The features' columns are named in `DIABETES_FEATURES`.
    """
    data, target = _data_file("diabetes_data_raw.csv.gz"), _data_file("diabetes_target.csv.gz")
    if data is None or target is None:
        from sklearn.datasets import load_diabetes

        return load_diabetes(return_X_y=True, scaled=False)
    return _read_csv(data), _read_csv(target)


def load_digits_rows() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits: pixels `[1797, 64]` in 0..16 (float64) and labels `[1797]` (int)."""
    path = _data_file("digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        return load_digits(return_X_y=True)
    data = _read_csv(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)
