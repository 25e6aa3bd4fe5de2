"""Weights & Biases: one W&B run per jaxdist run, continued on resume, never contradicted.

The W&B run's id is kept in `WORKDIR/tracking/wandb.json` as soon as the run is made, so a
rerun of the same command continues that W&B run (`resume="allow"`), and `--restart`
(which removes the file) starts a new one. Offline (`WANDB_MODE=offline`) each start writes
its own segment of the run under `wandb/` (in the workdir, unless `WANDB_DIR` says where);
`wandb sync` uploads them.

W&B cannot write to a step below its run's newest one: a point logged there is ignored.
So a resumed run first sends every point `metrics.jsonl` kept (up to its checkpoint's
step), then each point it logs, those after the checkpoint again included. Where the
crashed run had given them to W&B already they are the very same values (jaxdist's resume
is exact) and W&B keeps one; where W&B never wrote them (it writes its run file a 32 KiB
block at a time, so a SIGKILL loses the points since the last full block, all of a short
run's) they are filled in. A W&B run started only at a resume gets the earlier points
the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxdist.loop.trackers.hook import Point, RunContext
from jaxdist.loop.trackers.run_ids import save_run_id, saved_run_id


class WandbTracker:
    """Logs to the W&B `project` (of `entity`); see the module's docstring."""

    name = "W&B"

    def __init__(self, project: str, entity: str = ""):
        self.project, self.entity = project, entity
        self.where = f"project {entity + '/' if entity else ''}{project}"
        self.run: Any = None
        self._workdir: Path | None = None

    def open(self, context: RunContext) -> None:
        """Continue this workdir's W&B run of this project if it has one, else start one."""
        import wandb

        self._workdir = context.workdir
        where = {"project": self.project, "entity": self.entity}
        run_id = saved_run_id(self._workdir, "wandb", where)
        folder = None
        if context.workdir is not None and not os.environ.get("WANDB_DIR"):
            folder = str(context.workdir)  # its offline runs and logs in WORKDIR/wandb/
        # symlink=False: the saved record is a hard link or a copy, kept after a --restart.
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True,
                                  symlink=False)
        common = dict(project=self.project, entity=self.entity or None, dir=folder,
                      settings=settings)
        if run_id is not None:
            self.run = wandb.init(id=run_id, resume="allow", **common)
        else:
            config = {**context.settings, "jaxdist.experiment": context.experiment}
            if context.workdir is not None:
                config["jaxdist.workdir"] = str(Path(context.workdir).resolve())
            self.run = wandb.init(name=context.run_name, config=config, **common)
            save_run_id(self._workdir, "wandb", where, self.run.id)
        self.log(context.earlier)  # the earlier points

    def log(self, points: list[Point]) -> None:
        """Log the points at their steps, one W&B row per step."""
        rows: dict[int, dict[str, float]] = {}
        for step, split, values in points:
            rows.setdefault(step, {}).update(
                {f"{split}/{name}": value for name, value in values.items()})
        for step in sorted(rows):
            self.run.log(rows[step], step=step)

    def finish(self, status: str, checkpoint: Path | None) -> None:
        """End the W&B run, its summary naming the last checkpoint, its files the record."""
        if checkpoint is not None:
            self.run.summary["jaxdist.checkpoint"] = str(Path(checkpoint).resolve())
        if self._workdir is not None and status != "FAILED":
            for name in ("config.json", "metrics.jsonl", "plots/*.png"):
                if any(self._workdir.glob(name)):
                    self.run.save(str(self._workdir / name), base_path=str(self._workdir),
                                  policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
