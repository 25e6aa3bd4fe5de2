"""Reading W&B's offline run files back: each `.wandb` file's history rows, decoded with
wandb's own protobuf `Record`.

A `.wandb` file is a 7-byte header (`:W&B`, a magic number, a version) and then records in
LevelDB's log format: 32 KiB blocks, each record a 7-byte header (checksum, length, type:
1 whole, 2 first, 3 middle, 4 last part) and its bytes, a block's tail of under 7 bytes
left as zeros.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    """Every record of one `.wandb` file, as wandb's `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, parts = HEADER, []
    while offset + HEADER <= len(raw):
        left = BLOCK - offset % BLOCK
        if left < HEADER:
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[offset:offset + HEADER])
        data = raw[offset + HEADER:offset + HEADER + length]
        offset += HEADER + length
        if kind == 0:  # the zeros after the last record of a block
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        parts.append(data)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def history(path: Path) -> list[dict]:
    """The history rows of one `.wandb` file: {key: value}, `_step` included."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            rows.append(row)
    return rows


def run_files(folder: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of one run's offline segments (one per start), in order."""
    return sorted(Path(folder).glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
