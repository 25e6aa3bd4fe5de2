"""Training you can leave running: exact resume, crashes, signals, NaN, early stopping."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdist import fit, make_backend, make_train_step
from jaxdist.base.errors import UserError
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.step.steps import NONFINITE, TrainState
from tests.toy import make_data, mlp_experiment, toy_config, train_into, wait_for_file

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


def resumable_config(steps, **train):
    config = toy_config(steps=steps, batch_size=16, log_every=3)
    config.train.eval_every = 5
    config.train.checkpoint_every = 4
    config.train.early_stopping.patience = 100  # on, so its state must survive the resume
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def lines(workdir):
    return (Path(workdir) / "metrics.jsonl").read_text().splitlines()


def test_resumed_run_logs_bit_identical_lines(tmp_path):
    experiment = mlp_experiment(input_noise=0.2)
    whole = fit(experiment, resumable_config(26), tmp_path / "whole", stream=None)
    first = fit(experiment, resumable_config(13), tmp_path / "split", stream=None)
    assert first.step == 13
    second = fit(experiment, resumable_config(26), tmp_path / "split", stream=None)
    assert second.stop_reason == "completed"
    after = [line for line in lines(tmp_path / "split") if json.loads(line)["step"] > 13]
    expected = [line for line in lines(tmp_path / "whole") if json.loads(line)["step"] > 13]
    assert after == expected and len(after) >= 6
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert second.loader_state == whole.loader_state


def test_a_finished_run_is_not_redone_and_a_foreign_model_is_refused(tmp_path):
    experiment = mlp_experiment()
    fit(experiment, resumable_config(8), tmp_path / "run", stream=None)
    before = lines(tmp_path / "run")
    again = fit(experiment, resumable_config(8), tmp_path / "run", stream=None)
    assert again.stop_reason == "already_complete" and lines(tmp_path / "run") == before
    wider = mlp_experiment(hidden=32)
    with pytest.raises(UserError, match=r"does not fit this model/optimizer .*\['w1'\]"):
        fit(wider, resumable_config(12), tmp_path / "run", stream=None)


def test_nan_in_one_devices_batch_is_skipped_on_every_device():
    for backend_name in ["pmap", "shard_map"]:
        backend = make_backend(backend_name)
        experiment = mlp_experiment()
        import optax

        tx = optax.adam(0.01)
        params = experiment.init_params(jax.random.key(0))
        state = backend.replicate(TrainState.create(params, tx, jax.random.key(1)))
        step = backend.compile(make_train_step(experiment.loss_fn, tx), donate_state=False)
        data = make_data(64)
        batch = {**data, "weight": np.ones(64, np.float32)}
        poisoned = {k: v.copy() for k, v in batch.items()}
        poisoned["x"][3 * 8 + 2, 1] = np.nan  # a row of device 3's slice
        after, sums = step(state, backend.put_batch(poisoned))
        assert float(backend.first_copy(sums)[NONFINITE]) == 1.0
        assert float(backend.first_copy(sums)["loss"]) == 0.0
        assert int(backend.first_copy(after.step)) == 1
        before_copies = backend.device_copies(state.params)
        for copy in backend.device_copies(after.params):
            for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(before_copies[0]),
                            strict=True):
                np.testing.assert_array_equal(a, b)
        clean, sums = step(after, backend.put_batch(batch))
        assert float(backend.first_copy(sums)[NONFINITE]) == 0.0
        assert not np.array_equal(backend.first_copy(clean.params)["w1"], params["w1"])


def test_too_many_nonfinite_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    data = make_data(32)
    data["x"][5, 0] = np.inf
    config = toy_config(steps=50, batch_size=0, log_every=1)
    config.train.max_nonfinite = 3
    config.train.checkpoint_every = 1
    with pytest.raises(UserError, match="3 steps in a row"):
        fit(mlp_experiment(data), config, tmp_path / "run", stream=None)
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    assert store.latest() == 2
    store.verify(2)
    records = [json.loads(line) for line in lines(tmp_path / "run")]
    assert [r[NONFINITE] for r in records] == [1.0, 1.0]


def test_early_stopping_ends_the_run_at_the_right_step(tmp_path):
    config = toy_config(steps=50, log_every=1)
    config.train.eval_every = 2
    # The eval loss falls, so under mode=max it never improves after the first evaluation.
    config.train.early_stopping.patience = 2
    config.train.early_stopping.mode = "max"
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    assert result.stop_reason == "early_stopped" and result.step == 6
    assert CheckpointStore(tmp_path / "run" / "checkpoints").latest() == 6
    assert [r["step"] for r in result.records if r["split"] == "eval"] == [2, 4, 6]


def cli(workdir, *overrides):
    return [sys.executable, "-m", "jaxdist.run", "linear_regression", "--workdir", str(workdir),
            "train.batch_size=64", "train.log_every=4", "train.eval_every=8", *overrides]


def test_sigkill_at_random_moments_never_breaks_a_run(tmp_path):
    # Start-up, then 200 steps with a save every 2 steps: kills land in start-up, in steps
    # and in saves. Kill times are drawn relative to this machine's uninterrupted run. Each
    # trial is killed a fixed number of times and then left to finish: a resume pays start-up
    # again, so on a loaded machine a run killed forever at these times might never finish.
    settings = ["train.steps=200", "train.checkpoint_every=2"]
    started = time.perf_counter()
    reference = subprocess.run(cli(tmp_path / "reference", *settings), cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    whole = time.perf_counter() - started
    assert reference.returncode == 0, reference.stderr
    expected = lines(tmp_path / "reference")
    chooser = random.Random(1234)
    kills = 0
    for trial in range(2):
        workdir = tmp_path / f"trial{trial}"
        for _ in range(3):
            process = subprocess.Popen(cli(workdir, *settings), cwd=ROOT, text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                process.wait(timeout=chooser.uniform(0.3, 0.75) * whole)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                kills += 1
                continue
            assert process.returncode == 0, process.stderr.read()
            break
        finished = subprocess.run(cli(workdir, *settings), cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
        assert lines(workdir) == expected
    assert kills >= 3


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(cli(workdir, "train.steps=1000000", "train.checkpoint_every=0"),
                               cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    wait_for_file(workdir / "metrics.jsonl")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "SIGTERM: stopped at step" in out
    step = int(out.split("stopped at step ")[1].split()[0])
    store = CheckpointStore(workdir / "checkpoints")
    assert store.latest() == step > 0
    store.verify(step)
    resumed = subprocess.run(cli(workdir, f"train.steps={step + 4}", "train.checkpoint_every=0"),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert store.latest() == step + 4


def test_a_second_signal_exits_at_once_from_the_command_line():
    script = ("import os, signal, time\n"
              "from jaxdist.loop.preemption import PreemptionWatch\n"
              "PreemptionWatch.exit_on_second_signal = True  # as jaxdist.run sets it\n"
              "with PreemptionWatch() as watch:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert watch.requested and watch.signal_name == 'SIGTERM'\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n")
    start = time.time()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    assert time.time() - start < 20


def test_a_tampered_checkpoint_is_refused_with_exit_2(tmp_path):
    workdir = tmp_path / "run"
    train_into(workdir, "linear_regression", "train.batch_size=64", "train.log_every=4",
               "train.eval_every=8", "train.steps=8")  # as `cli` gives them
    folder = CheckpointStore(workdir / "checkpoints").path(8)
    victim = max((p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01
    victim.write_bytes(bytes(raw))
    again = subprocess.run(cli(workdir, "train.steps=16"), cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1
    assert "does not match its sha256" in again.stderr
    assert os.path.exists(victim)  # nothing was deleted or overwritten


def test_resuming_on_other_data_is_refused(tmp_path):
    fit(mlp_experiment(make_data(96)), resumable_config(8), tmp_path / "run", stream=None)
    with pytest.raises(UserError, match=r"the number of training examples \(96 there, 80 now\)"):
        fit(mlp_experiment(make_data(80)), resumable_config(12), tmp_path / "run", stream=None)
