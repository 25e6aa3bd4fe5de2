"""MLflow: one MLflow run per jaxdist run, continued on resume, its points those of metrics.jsonl.

The MLflow run's id is kept in `WORKDIR/tracking/mlflow.json` as soon as the run is made,
so a rerun of the same command (a resume, after a crash or a preemption) continues that
MLflow run, and `--restart` (which removes the file) starts a new one.

MLflow keeps every value logged for a metric, steps included, and cannot delete one. So
when a run continues, this client first reads the MLflow run's history: a point that
metrics.jsonl holds and MLflow lacks (sent while the server was down, or the tracker was
turned on only now) is sent then, and a point the resumed run logs again (the crashed run
had logged it after its last checkpoint) is not sent twice when MLflow already has the
very same value at that step. A value that differs (a resume with `--allow-change`, or on
another device count) is logged beside the old one, and said in one line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from jaxdist.loop.trackers.hook import Point, RunContext
from jaxdist.loop.trackers.run_ids import save_run_id, saved_run_id

# MLflow's limits per log_batch request.
MAX_PARAMS, MAX_METRICS = 100, 1000


class MlflowTracker:
    """Logs to the MLflow tracking server (or store) at `uri`; see the module's docstring."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str = ""):
        self.where, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id: str | None = None
        self._known: dict[tuple[str, int], set[float]] = {}  # what MLflow already holds
        self._workdir: Path | None = None
        self._differing = 0

    def open(self, context: RunContext) -> None:
        """Continue this workdir's MLflow run if it has one at this URI, else start one."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client, self._workdir = MlflowClient(tracking_uri=self.where), context.workdir
        self.run_id = saved_run_id(self._workdir, "mlflow", {"tracking_uri": self.where})
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "jaxdist.resumed_at", str(context.start_step))
            self._known = self._history()
        else:
            name = self.experiment or context.experiment or "jaxdist"
            found = self.client.get_experiment_by_name(name)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(name))
            tags = {"jaxdist.experiment": context.experiment}
            if context.workdir is not None:
                tags["jaxdist.workdir"] = str(Path(context.workdir).resolve())
            run = self.client.create_run(experiment_id, run_name=context.run_name, tags=tags)
            self.run_id = run.info.run_id
            save_run_id(self._workdir, "mlflow", {"tracking_uri": self.where}, self.run_id)
            params = [Param(key, str(value)[:6000])
                      for key, value in sorted(context.settings.items())]
            for first in range(0, len(params), MAX_PARAMS):
                self.client.log_batch(self.run_id, params=params[first:first + MAX_PARAMS])
        self.log(context.earlier)  # what MLflow may lack

    def log(self, points: list[Point]) -> None:
        """Send the points' values that MLflow does not already hold at their steps."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = []
        for step, split, values in points:
            for name, value in values.items():
                key = f"{split}/{name}"
                held = self._known.get((key, step))
                if held is not None and value in held:
                    continue
                if held:
                    self._say_differs(key, step)
                metrics.append(Metric(key, value, stamp, step))
        for first in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + MAX_METRICS])

    def _say_differs(self, key: str, step: int) -> None:
        self._differing += 1
        if self._differing == 1:
            sys.stderr.write(f"jaxdist: MLflow run {self.run_id} already holds another value "
                             f"of {key} at step {step}, from before this run resumed; MLflow "
                             f"cannot delete a point, so it keeps both (metrics.jsonl has "
                             f"this run's)\n")

    def finish(self, status: str, checkpoint: Path | None) -> None:
        """Tag the last checkpoint, attach the workdir's record, and end the MLflow run."""
        if checkpoint is not None:
            self.client.set_tag(self.run_id, "jaxdist.checkpoint",
                                str(Path(checkpoint).resolve()))
        if self._workdir is not None and status != "FAILED":
            for name in ("config.json", "metrics.jsonl"):
                if (self._workdir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self._workdir / name))
            for plot in sorted((self._workdir / "plots").glob("*.png")):
                self.client.log_artifact(self.run_id, str(plot), artifact_path="plots")
        self.client.set_terminated(self.run_id, status)

    def _history(self) -> dict[tuple[str, int], set[float]]:
        """Every (metric, step) the MLflow run holds, with its values."""
        known: dict[tuple[str, int], set[float]] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            for point in self.client.get_metric_history(self.run_id, key):
                known.setdefault((key, point.step), set()).add(point.value)
        return known
