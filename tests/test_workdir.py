"""A workdir is one run's: its lock, its identity, its log, and the end of a run."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxdist import fit
from jaxdist.base.errors import UserError
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.checkpoints.workdir import WorkdirLock
from tests.toy import make_data, mlp_experiment, toy_config, train_into, wait_for_file

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    return [sys.executable, "-m", "jaxdist.run", *args]


def run_cli(*args, timeout=300, env=None):
    return subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def lines(workdir):
    return (Path(workdir) / "metrics.jsonl").read_text().splitlines()


# 1. One run per workdir.

def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(cli("linear_regression", "--workdir", str(workdir),
                                 "train.steps=1000000", "train.checkpoint_every=0",
                                 "train.log_every=100"),
                             cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert wait_for_file(workdir / "metrics.jsonl"), first.stderr.read()
        second = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=10")
        assert second.returncode == 2
        line = one_line(second)
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
        assert "another --workdir" in line
    finally:
        first.send_signal(signal.SIGKILL)  # a killed holder releases the lock by itself
        first.wait()
    third = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=10",
                    "train.log_every=100")
    assert third.returncode == 0, third.stderr[-2000:]


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(UserError, match="in use by another run in "
                                                               "this process"):
        fit(mlp_experiment(), toy_config(steps=2), tmp_path, stream=None)
    assert fit(mlp_experiment(), toy_config(steps=2), tmp_path, stream=None).step == 2


# 2. A checkpoint is resumed only by its own experiment and data.

def test_another_experiment_with_data_of_the_same_size_is_refused(tmp_path):
    workdir = tmp_path / "run"
    train_into(workdir, "linear_regression", "train.steps=8")
    other = tmp_path / "reversed.py"
    other.write_text(textwrap.dedent('''
        """linear_regression with its columns reversed and its targets doubled."""
        from experiments import linear_regression
        from jaxdist import Experiment

        config = linear_regression.config


        def build(config):
            base = linear_regression.build(config)
            data = linear_regression.load_data()
            data = {"x": data["x"][:, ::-1].copy(), "y": 2 * data["y"]}
            return Experiment(init_params=base.init_params, loss_fn=base.loss_fn,
                              train_data=data, eval_data=data)
    '''))
    before = lines(workdir)
    again = run_cli(str(other), "--workdir", str(workdir), "train.steps=16")
    assert again.returncode == 2
    line = one_line(again)
    assert "the experiment (linear_regression there, reversed now)" in line
    assert lines(workdir) == before


def test_the_same_experiment_on_other_data_of_the_same_shape_is_refused(tmp_path):
    fit(mlp_experiment(make_data(96, seed=0)), toy_config(steps=4), tmp_path, stream=None)
    with pytest.raises(UserError, match="training data's content"):
        fit(mlp_experiment(make_data(96, seed=1)), toy_config(steps=8), tmp_path, stream=None)


# 3. The final evaluation and save are part of the run.

def test_sigterm_during_the_final_evaluation_is_honoured_and_the_rerun_finishes(tmp_path):
    workdir, marker = tmp_path / "run", tmp_path / "eval-started"
    env = dict(os.environ, SLOW_EVAL_STARTED=str(marker))
    command = cli("tests/slow_eval_experiment.py", "--workdir", str(workdir))
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for_file(marker)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM: stopped at step 6" in out
    records = [json.loads(line) for line in lines(workdir)]
    assert [r["split"] for r in records] == ["train"] * 3  # no eval line yet
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    records = [json.loads(line) for line in lines(workdir)]
    assert [(r["step"], r["split"]) for r in records][-1] == (6, "eval")
    meta = CheckpointStore(workdir / "checkpoints").verify(6)
    assert meta["stop_reason"] == "completed" and meta["eval"] == {
        k: v for k, v in records[-1].items() if k not in ("step", "split")}
    third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "already holds this run up to step 6" in third.stdout


# 4. A log is never shortened without a checkpoint that explains it.

def test_a_rerun_after_checkpoints_were_removed_keeps_the_log_and_says_so(tmp_path):
    workdir = tmp_path / "run"
    config = toy_config(steps=12, log_every=1)
    config.train.checkpoint_every = 4
    fit(mlp_experiment(), config, workdir, stream=None)
    before = lines(workdir)
    assert len(before) == 13
    for step in CheckpointStore(workdir / "checkpoints").steps():
        CheckpointStore(workdir / "checkpoints").path(step).rename(tmp_path / f"gone{step}")
    with pytest.raises(UserError, match="had a checkpoint of step 12 that is gone.*--restart"):
        fit(mlp_experiment(), config, workdir, stream=None)
    assert lines(workdir) == before
    again = fit(mlp_experiment(), config, workdir, stream=None, start_over=True)
    assert again.stop_reason == "completed" and lines(workdir) == before


def test_a_torn_last_eval_line_of_a_finished_run_is_rewritten(tmp_path):
    workdir = tmp_path / "run"
    config = toy_config(steps=6, log_every=2)
    fit(mlp_experiment(), config, workdir, stream=None)
    whole = lines(workdir)
    assert json.loads(whole[-1])["split"] == "eval"
    (workdir / "metrics.jsonl").write_text("\n".join(whole[:-1]) + "\n" + whole[-1][:25])
    again = fit(mlp_experiment(), config, workdir, stream=None)
    assert again.stop_reason == "already_complete"
    assert lines(workdir) == whole


# 10. After a divergence, the run can go on from its last checkpoint with a changed setting.

def diverging_config(step_factor):
    # lr 0.05 for 10 steps, then step_factor times that: 500 diverges within a few steps.
    config = toy_config(steps=30, batch_size=32, optimizer="sgd", learning_rate=0.05,
                        log_every=1)
    config.optimizer.schedule = "step"
    config.optimizer.step_every = 10
    config.optimizer.step_factor = step_factor
    config.train.checkpoint_every = 10
    config.train.max_nonfinite = 3
    return config


def test_a_diverged_run_goes_on_from_its_checkpoint_with_an_allowed_change(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        fit(mlp_experiment(), diverging_config(1e4), workdir, stream=None)
    message = str(error.value)
    assert "step_00000010, is intact" in message
    assert "optimizer.learning_rate=LOWER --allow-change optimizer.learning_rate" in message
    assert CheckpointStore(workdir / "checkpoints").latest() == 10
    with pytest.raises(UserError, match="optimizer.step_factor=10000.0 there, 1.0 now"):
        fit(mlp_experiment(), diverging_config(1.0), workdir, stream=None)
    result = fit(mlp_experiment(), diverging_config(1.0), workdir, stream=None,
                 allow_changes=["optimizer.step_factor"])
    assert result.stop_reason == "completed" and result.step == 30
    after = [r for r in result.records if r["split"] == "train" and r["step"] > 10]
    assert len(after) == 20 and all(r["nonfinite_steps"] == 0 for r in after)
    assert after[-1]["lr"] == pytest.approx(0.05)
    with pytest.raises(UserError, match="--allow-change names an unknown config key"):
        fit(mlp_experiment(), diverging_config(1.0), workdir, stream=None,
            allow_changes=["optimizer.step_factr"])
