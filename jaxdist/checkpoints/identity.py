"""What a run was trained on: the experiment's name and a cheap fingerprint of its data.

A checkpoint records both, and a resume that differs is refused by name, so that two
experiments (or two data sets of the same size) never mix in one workdir.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from jaxdist.data.sources import Source

SAMPLE_ROWS = 64


def data_fingerprint(source: Source) -> dict[str, Any]:
    """Rows, each array's dtype and row shape, and a sha256 of a fixed sample of rows.

    The sample is up to 64 rows spread evenly from the first to the last, so reading it
    costs the same whatever the size of the data.
    """
    size = len(source)
    rows = np.unique(np.linspace(0, size - 1, min(size, SAMPLE_ROWS)).round().astype(np.int64))
    sample = source.get_batch(rows)
    digest = hashlib.sha256()
    for name in sorted(sample):
        values = np.ascontiguousarray(sample[name])
        digest.update(f"{name}:{values.dtype.str}:{values.shape}".encode())
        digest.update(values.tobytes())
    return {"rows": size,
            "arrays": {name: f"{sample[name].dtype}{list(sample[name].shape[1:])}"
                       for name in sorted(sample)},
            "sample_sha256": digest.hexdigest()}


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words (empty if they agree).

    An experiment without a name (one built in Python and never named) matches any name.
    """
    differences = []
    old_name, new_name = saved.get("experiment", ""), current.get("experiment", "")
    if old_name and new_name and old_name != new_name:
        differences.append(f"the experiment ({old_name} there, {new_name} now)")
    old, new = saved.get("train_data", {}), current.get("train_data", {})
    if old.get("rows") != new.get("rows"):
        differences.append(f"the number of training examples ({old.get('rows')} there, "
                           f"{new.get('rows')} now)")
    elif old.get("arrays") != new.get("arrays"):
        differences.append(f"the training arrays ({old.get('arrays')} there, "
                           f"{new.get('arrays')} now)")
    elif old.get("sample_sha256") != new.get("sample_sha256"):
        differences.append("the training data's content (a sample of its rows differs)")
    return differences
