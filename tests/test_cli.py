"""The CLI contract, exercised as a user would: in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ)  # conftest has set the 8 fake CPU devices
    return subprocess.run([sys.executable, "-m", "jaxdist.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    (["linear_regression", "train.stepz=5"], "did you mean train.steps"),
    (["linear_regression", "train.steps=many"], "not an integer"),
    (["linear_regression", "parallel.backend=mpi"], "choose one of"),
    (["linear_regression", "train.batch_size=10"], "cannot be split over 8 devices"),
    (["linear_regression", "parallel.devices=9"], "only 8 cpu device(s)"),
    (["linear_regression", "train.steps"], "not KEY=VALUE"),
    (["linear_regression", "--no-such-flag"], "unrecognized arguments"),
    ([], "name an experiment"),
])
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path):
    result = run_cli(*args, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_list_and_help():
    listed = run_cli("--list")
    assert listed.returncode == 0
    assert any(line.startswith("linear_regression ") and "diabetes" in line
               for line in listed.stdout.splitlines())
    shown = run_cli("--help")
    assert shown.returncode == 0 and "KEY=VALUE" in shown.stdout


def test_a_run_writes_its_config_and_metrics_and_keeps_them(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=30",
                     "train.log_every=10", "parallel.backend=shard_map")
    assert result.returncode == 0, result.stderr
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == 30 and config["parallel"]["backend"] == "shard_map"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (10, "train"), (20, "train"), (30, "train"), (30, "eval")]
    assert all(r["loss"] > 0 for r in records)
    assert records[2]["loss"] < records[0]["loss"]
    assert "eval" in result.stdout and "loss" in result.stdout

    lines = (workdir / "metrics.jsonl").read_text()
    again = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=5")
    assert again.returncode == 0 and "already holds this run up to step 30" in again.stdout
    other = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=40",
                    "optimizer.learning_rate=0.05")
    assert other.returncode == 2
    assert "optimizer.learning_rate=0.2 there, 0.05 now" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (workdir / "metrics.jsonl").read_text() == lines


def test_default_workdir_is_a_new_folder_under_runs(tmp_path):
    result = run_cli(str(ROOT / "experiments" / "linear_regression.py"), "train.steps=2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("linear_regression-")
    assert (runs[0] / "metrics.jsonl").exists()
