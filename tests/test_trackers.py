"""Experiment trackers against the real thing: an MLflow server the tests start, read back
through MLflow's own client, and W&B offline, its run files read back."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxdist import fit
from jaxdist.base.errors import UserError
from jaxdist.base.records import read_records
from jaxdist.loop.hooks import Hook
from jaxdist.loop.trackers.sender import Sender
from tests.servers import MlflowServer, free_port
from tests.toy import mlp_experiment, toy_config
from tests.tracked_run import tracked_config
from tests.wandb_files import history, run_files

ROOT = Path(__file__).resolve().parent.parent
TRACKED_RUN = [sys.executable, str(ROOT / "tests" / "tracked_run.py")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as running:
        yield running


def client_of(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def runs_of(server, workdir):
    """The MLflow runs (of any experiment) that name `workdir` as theirs."""
    client = client_of(server)
    ids = [e.experiment_id for e in client.search_experiments()]
    where = str(Path(workdir).resolve())
    return client.search_runs(ids, filter_string=f"tags.`jaxdist.workdir` = '{where}'")


def jsonl_points(workdir):
    """{split/name: {step: value}} of metrics.jsonl's finite numbers."""
    points = {}
    for record in read_records(Path(workdir) / "metrics.jsonl", "test"):
        for name, value in record.items():
            if name not in ("step", "split") and value is not None:
                points.setdefault(f"{record['split']}/{name}", {})[record["step"]] = value
    return points


def assert_mlflow_holds_metrics_jsonl(server, workdir):
    """One MLflow run for the workdir, and each of its metrics is metrics.jsonl's, exactly,
    one value per step."""
    (run,) = runs_of(server, workdir)
    client = client_of(server)
    expected = jsonl_points(workdir)
    assert set(run.data.metrics) == set(expected)
    for key, by_step in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        steps = [point.step for point in history]
        assert len(steps) == len(set(steps)), f"{key} has a step twice: {sorted(steps)}"
        assert {point.step: point.value for point in history} == by_step, key
    return run


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_line(process, text, timeout):
    """Read `process`'s stdout until a line holds `text`; fail after `timeout` seconds."""
    seen = threading.Event()

    def read():
        for line in process.stdout:
            if text in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(timeout):
        raise AssertionError(f"timed out waiting for {text!r}")


def mlflow_steps(server, workdir, key="train/loss"):
    runs = runs_of(server, workdir)
    if not runs:
        return set()
    return {p.step for p in client_of(server).get_metric_history(runs[0].info.run_id, key)}


@pytest.mark.slow
def test_mlflow_gets_every_point_config_and_checkpoint_of_a_run(server, tmp_path):
    config = tracked_config(f"tracking.mlflow={server.uri}")
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    run = assert_mlflow_holds_metrics_jsonl(server, tmp_path / "run")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.steps"] == "20"
    assert run.data.params["tracking.mlflow"] == server.uri
    assert run.data.tags["jaxdist.checkpoint"] == str(result.checkpoint.resolve())
    artifacts = {a.path for a in client_of(server).list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.jsonl"} <= artifacts
    # The step's health reaches the tracker too.
    assert {"train/grad_norm", "train/param_norm", "train/update_norm"} <= set(run.data.metrics)


@pytest.mark.slow
def test_a_sigkilled_run_resumed_continues_its_mlflow_run_without_duplicates(server,
                                                                             tmp_path):
    workdir = tmp_path / "killed"
    # Held after its train point of step 10, past its checkpoint of step 6.
    tracking = f"tracking.mlflow={server.uri}"
    process = subprocess.Popen([*TRACKED_RUN, str(workdir), tracking, "10"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: 10 in mlflow_steps(server, workdir), 120,
                 "the held run's step-10 point in MLflow")
        wait_for(lambda: (workdir / "checkpoints" / "step_00000006").exists(), 60,
                 "the checkpoint of step 6")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    (before,) = runs_of(server, workdir)
    assert before.info.status == "RUNNING"  # SIGKILL: nobody ended it
    resumed = subprocess.run([*TRACKED_RUN, str(workdir), tracking], cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert "already holds another value" not in resumed.stderr
    run = assert_mlflow_holds_metrics_jsonl(server, workdir)  # points 8 and 10 once each
    assert run.info.run_id == before.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["jaxdist.resumed_at"] == "6"
    # ...and those points are the uninterrupted run's.
    whole = tmp_path / "whole"
    fit(mlp_experiment(), tracked_config(f"tracking.mlflow={server.uri}"), whole, stream=None)
    assert jsonl_points(workdir) == jsonl_points(whole)


@pytest.mark.slow
def test_a_killed_server_leaves_training_and_metrics_jsonl_intact(tmp_path):
    workdir, go = tmp_path / "run", tmp_path / "go"
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        tracking = f"tracking.mlflow={server.uri}"
        process = subprocess.Popen([*TRACKED_RUN, str(workdir), tracking, "8", str(go)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**os.environ,
                                                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        wait_for(lambda: 8 in mlflow_steps(server, workdir), 120, "step 8 in MLflow")
    finally:
        server.stop(kill=True)  # at once, as a server that dies
    go.touch()
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-2000:]
    failed = [line for line in err.splitlines() if "MLflow at" in line]
    assert len(failed) == 1 and "training goes on without it" in failed[0], err[-2000:]
    whole = tmp_path / "whole"
    untracked = tracked_config("tracking.mlflow=")
    fit(mlp_experiment(), untracked, whole, stream=None)
    assert jsonl_points(workdir) == jsonl_points(whole)  # every point, the same values


@pytest.mark.slow
def test_turning_mlflow_on_at_a_resume_sends_the_earlier_points_and_restart_makes_a_new_run(
        server, tmp_path):
    workdir = tmp_path / "run"
    config = tracked_config("tracking.mlflow=")
    config.train.steps = 6
    fit(mlp_experiment(), config, workdir, stream=None)
    config = tracked_config(f"tracking.mlflow={server.uri}")  # 20 steps now, and MLflow on
    fit(mlp_experiment(), config, workdir, stream=None)
    first = assert_mlflow_holds_metrics_jsonl(server, workdir)
    assert sorted(mlflow_steps(server, workdir)) == list(range(2, 21, 2))
    fit(mlp_experiment(), config, workdir, stream=None, start_over=True)
    runs = runs_of(server, workdir)
    assert len(runs) == 2 and first.info.run_id in {r.info.run_id for r in runs}


@pytest.mark.slow
def test_an_unreachable_server_is_one_line_and_the_run_goes_on(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = toy_config(steps=6, log_every=2)
    config.tracking.mlflow = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    assert result.step == 6 and len(read_records(tmp_path / "run" / "metrics.jsonl",
                                                 "test")) == 4  # 3 train, 1 eval
    lines = [line for line in capfd.readouterr().err.splitlines() if "MLflow at" in line]
    assert len(lines) == 1 and "training goes on without it" in lines[0]


@pytest.mark.parametrize("tracker, value", [("mlflow", "http://127.0.0.1:5000"),
                                            ("wandb", "a-project")])
def test_a_missing_tracker_client_is_refused_before_the_first_step(tmp_path, monkeypatch,
                                                                   tracker, value):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if it were not installed
    config = toy_config(steps=2)
    setattr(config.tracking, tracker, value)
    with pytest.raises(UserError, match=rf'tracking.{tracker} needs {tracker}, which is not '
                                        rf'installed; pip install "jaxdist\[{tracker}\]"'):
        fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tracker_that_hangs_never_holds_the_run_longer_than_its_wait():
    sender = Sender("Tracker", "nowhere")
    sender.submit(lambda: time.sleep(30))
    started = time.monotonic()
    assert sender.close(timeout=0.5) is False
    assert time.monotonic() - started < 5


def test_a_tracker_failure_is_said_once_and_drops_what_follows():
    import io

    stream, ran = io.StringIO(), []
    sender = Sender("Tracker", "nowhere", stream)
    sender.submit(lambda: 1 / 0)
    for i in range(3):
        sender.submit(lambda i=i: ran.append(i))
    assert sender.close(timeout=10)
    assert ran == [] and stream.getvalue().count("\n") == 1
    assert "Tracker at nowhere failed (ZeroDivisionError" in stream.getvalue()


def test_the_mlflow_run_id_is_kept_in_the_workdir_and_restart_removes_it(tmp_path):
    from jaxdist.checkpoints.workdir import restart

    (tmp_path / "tracking").mkdir()
    (tmp_path / "tracking" / "mlflow.json").write_text(json.dumps({"run_id": "x"}))
    assert "tracking/ (1 entry)" in restart(tmp_path)
    assert not (tmp_path / "tracking" / "mlflow.json").exists()


def wandb_points(workdir, run_id):
    """{key: {step: value}} over every offline segment of the W&B run, in order, and how
    many points were in more than one segment.

    Such a point (logged after the checkpoint, then again by the resumed run) must have
    the same value in each: W&B keeps the first (it ignores a step below its newest), so
    they must not contradict.
    """
    points, repeated = {}, 0
    files = run_files(workdir, run_id)
    assert files, f"no offline W&B files of {run_id} in {workdir}"
    for path in files:
        for row in history(path):
            step = row.pop("_step")
            for key, value in row.items():
                if key.startswith("_"):
                    continue
                held = points.setdefault(key, {}).setdefault(step, value)
                assert held == value, f"{key} at step {step}: {held} and then {value}"
                repeated += held is not value
    return points, repeated


def wandb_run_id(workdir):
    return json.loads((Path(workdir) / "tracking" / "wandb.json").read_text())["run_id"]


@pytest.mark.slow
def test_wandb_offline_holds_every_point_unchanged_across_a_sigkill_and_resume(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    # A point every step, so that W&B writes some of its 32 KiB blocks before the kill.
    longer = ("train.steps=140", "train.log_every=1", "train.checkpoint_every=50",
              "train.eval_every=50")
    workdir, tracking = tmp_path / "killed", "tracking.wandb=jaxdist-test"
    process = subprocess.Popen([*TRACKED_RUN, str(workdir), tracking, "120", *longer],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "holding at step 120", 120)
        time.sleep(2)  # W&B's own process writes what filled its blocks
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    run_id = wandb_run_id(workdir)
    (first,) = run_files(workdir, run_id)
    killed_steps = {row["_step"] for row in history(first)}
    assert killed_steps and max(killed_steps) > 100  # past the checkpoint of step 100
    resumed = subprocess.run([*TRACKED_RUN, str(workdir), tracking, *longer], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert wandb_run_id(workdir) == run_id and len(run_files(workdir, run_id)) == 2
    points, repeated = wandb_points(workdir, run_id)
    assert points == jsonl_points(workdir)
    assert repeated > 0  # points after the checkpoint were in both segments, unchanged
    whole = tmp_path / "whole"
    fit(mlp_experiment(), tracked_config("tracking.wandb=", longer), whole, stream=None)
    assert jsonl_points(workdir) == jsonl_points(whole)


@pytest.mark.slow
def test_of_two_processes_only_process_0_tracks(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "jaxdist.launch", "--num-processes", "2", "--local-devices",
         "4", "linear_regression", "train.steps=10", "train.batch_size=64",
         "train.log_every=5", "tracking.wandb=jaxdist-test", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    (segment,) = (workdir / "wandb").glob("offline-run-*")
    saved = segment / "files"  # the workdir's record, saved with the run's files
    assert not (saved / "metrics.jsonl").is_symlink()  # kept if the workdir is restarted
    assert (saved / "metrics.jsonl").read_text() == (workdir / "metrics.jsonl").read_text()
    assert (saved / "config.json").read_text() == (workdir / "config.json").read_text()
    points, _ = wandb_points(workdir, wandb_run_id(workdir))
    assert points == jsonl_points(workdir)


class CrashAt(Hook):
    """Raises after the train point of `step` is logged (a crash the run does not survive)."""

    def __init__(self, step):
        self.step = step

    def after_log(self, run, split, values):
        if split == "train" and run.step == self.step:
            raise RuntimeError("crash for the test")


@pytest.mark.slow
def test_a_resume_with_another_value_keeps_both_in_mlflow_and_says_so(server, tmp_path,
                                                                      capfd):
    workdir = tmp_path / "run"
    config = tracked_config(f"tracking.mlflow={server.uri}")
    with pytest.raises(RuntimeError, match="crash for the test"):
        fit(mlp_experiment(), config, workdir, stream=None, hooks=[CrashAt(10)])
    (crashed,) = runs_of(server, workdir)
    assert crashed.info.status == "FAILED"
    config.optimizer.learning_rate *= 2  # a resume that changes the run on purpose
    fit(mlp_experiment(), config, workdir, stream=None,
        allow_changes=["optimizer.learning_rate"])
    (run,) = runs_of(server, workdir)
    assert run.info.run_id == crashed.info.run_id
    history = client_of(server).get_metric_history(run.info.run_id, "train/loss")
    by_step = {}
    for point in history:
        by_step.setdefault(point.step, []).append(point.value)
    logged = jsonl_points(workdir)["train/loss"]
    assert [len(by_step[s]) for s in (8, 10)] == [2, 2]  # the crashed run's and this one's
    assert all(logged[s] in by_step[s] for s in (8, 10))
    assert all(len(by_step[s]) == 1 for s in by_step if s not in (8, 10))
    said = [line for line in capfd.readouterr().err.splitlines() if "already holds" in line]
    assert len(said) == 1 and "MLflow cannot delete a point, so it keeps both" in said[0]
