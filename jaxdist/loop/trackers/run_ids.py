"""Which tracker run a workdir's run continues: its id, kept in `WORKDIR/tracking/NAME.json`.

The file names the tracker run's id and where that run lives (an MLflow tracking URI, a
W&B project); a rerun that reports elsewhere starts a new tracker run instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxdist.base.files import write_text_atomically

FOLDER = "tracking"


def saved_run_id(workdir: Path | None, name: str, where: dict[str, Any]) -> str | None:
    """The id kept for tracker `name` in `workdir`, if its run lives at `where`."""
    if workdir is None:
        return None
    try:
        saved = json.loads((Path(workdir) / FOLDER / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in where.items()):
        return None
    run_id = saved.get("run_id")
    return run_id if isinstance(run_id, str) else None


def save_run_id(workdir: Path | None, name: str, where: dict[str, Any], run_id: str) -> None:
    """Keep `run_id` (living at `where`) for tracker `name` in `workdir`."""
    if workdir is None:
        return
    folder = Path(workdir) / FOLDER
    folder.mkdir(exist_ok=True)
    write_text_atomically(folder / f"{name}.json", json.dumps({**where, "run_id": run_id}) + "\n")
