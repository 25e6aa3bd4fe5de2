"""The record of a run's logged points, `metrics.jsonl`: one strict-JSON object per line.

Each point is `{"step": int, "split": str, NAME: number or null, ...}`; a value that is not
finite is written `null` and read back as NaN. Reading it needs no jax (the plot tool).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxdist.base.errors import UserError
from jaxdist.base.schema import Each, check, parse_json, read_text

METRICS_FILE = "metrics.jsonl"
RECORD_SHAPE = {"step": int, "split": str}


def to_json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line: a non-finite value is written as null."""
    finite = {name: (None if isinstance(value, float) and not math.isfinite(value) else value)
              for name, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def from_json_line(line: str) -> dict[str, Any]:
    """A record from `to_json_line`: null reads back as NaN."""
    return {name: math.nan if value is None else value
            for name, value in json.loads(line).items()}


def read_records(path: Path, fix: str) -> list[dict[str, Any]]:
    """The logged points of a `metrics.jsonl` (null read back as NaN).

    A last line cut short (no newline: a crash while it was written) is dropped; any other
    line that is not a logged point is refused with one line naming it and `fix`.
    """
    lines = read_text(path, fix).split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        what = f"{path} line {number}"
        try:
            record = check(parse_json(line, what, fix), RECORD_SHAPE, what, fix)
            values = {k: v for k, v in record.items() if k not in RECORD_SHAPE}
            check(values, Each((float, None)), what, fix)
        except UserError:
            if number == len(lines):  # the text after the last newline: torn by a crash
                continue
            raise
        records.append({name: math.nan if value is None else value
                        for name, value in record.items()})
    return records
