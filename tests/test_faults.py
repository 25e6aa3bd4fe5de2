"""Every fault a user can cause or meet: one line on stderr, exit 2, nothing lost."""

import io
import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdist import Experiment, fit
from jaxdist.base.errors import UserError
from jaxdist.loop.metrics import MetricsLogger
from tests.toy import make_data, mlp_experiment, toy_config, train_into

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT, timeout=300, **popen):
    return subprocess.run([sys.executable, "-m", "jaxdist.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **popen)


def one_line(result, status=2):
    assert result.returncode == status, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def write_experiment(path, body):
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line(run_cli("linear_regression", "--workdir", str(tmp_path / "file")))
    assert "is a file, not a folder" in line
    line = one_line(run_cli("linear_regression", "--workdir", str(tmp_path / "file" / "run")))
    assert "a part of that path is a file" in line


@pytest.mark.parametrize("content,fragment", [("{not json", "is not valid JSON"),
                                              ("[1, 2]", "is damaged: it should be an object")])
def test_a_damaged_config_json_is_refused(tmp_path, content, fragment):
    (tmp_path / "config.json").write_text(content)
    line = one_line(run_cli("linear_regression", "--workdir", str(tmp_path), "train.steps=2"))
    assert fragment in line and "config.json" in line


def test_an_experiment_file_with_a_syntax_error_names_file_and_line(tmp_path):
    path = write_experiment(tmp_path / "broken.py", '''
        """Broken."""
        def config(:
            pass
    ''')
    line = one_line(run_cli(path, "--workdir", str(tmp_path / "run")))
    assert "broken.py, line 3" in line


def test_an_experiment_file_with_an_import_error_names_file_and_line(tmp_path):
    path = write_experiment(tmp_path / "missing.py", '''
        """Imports something that is not there."""
        import os
        import no_such_module_anywhere
    ''')
    line = one_line(run_cli(path, "--workdir", str(tmp_path / "run")))
    assert "missing.py, line 4" in line and "no_such_module_anywhere" in line


def test_a_loss_that_returns_its_mean_is_one_line_before_any_step(tmp_path):
    path = write_experiment(tmp_path / "mean_loss.py", '''
        """A loss_fn that returns the batch mean instead of per-example losses."""
        import jax.numpy as jnp
        import numpy as np
        from jaxdist import Config, Experiment, TrainConfig

        def config():
            return Config(train=TrainConfig(steps=5, batch_size=16))

        def build(config):
            data = {"x": np.ones((32, 3), np.float32), "y": np.ones(32, np.float32)}
            def loss_fn(params, batch, rng):
                return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}
            return Experiment(init_params=lambda rng: {"w": jnp.zeros(3)}, loss_fn=loss_fn,
                              train_data=data)
    ''')
    line = one_line(run_cli(path, "--workdir", str(tmp_path / "run")))
    assert "one loss per example" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    debug = run_cli(path, "--workdir", str(tmp_path / "run"), "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("sent,delays", [(signal.SIGINT, (0.2, 0.7, 1.5, 2.5, 4.0)),
                                          (signal.SIGTERM, (0.5, 2.5))])
def test_a_signal_during_start_up_is_one_line(tmp_path, sent, delays):
    # From the first imports (where an exception inside jaxlib's can crash the interpreter)
    # to the first step. On a loaded machine a late signal may land in the training loop
    # instead, which stops at a step and saves: either way, never lost and never a traceback.
    for delay in delays:
        workdir = tmp_path / f"run{delay}"
        process = subprocess.Popen([sys.executable, "-m", "jaxdist.run", "gpt_lm",
                                    "--workdir", str(workdir)], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        process.send_signal(sent)
        out, err = process.communicate(timeout=60)
        if process.returncode == 0:
            assert f"{sent.name}: stopped at step" in out and not err.strip(), (delay, err)
            continue
        assert process.returncode == 128 + sent, (delay, err[-3000:])
        assert err.strip().splitlines() == [
            f"error: interrupted by {sent.name} during start-up; nothing was saved"], delay
        assert not (workdir / "checkpoints").exists() or not any(
            (workdir / "checkpoints").iterdir())


def test_a_start_up_signal_that_library_code_swallows_still_stops_the_run():
    # jax's garbage-collection callback cannot raise: the interrupt is printed as "ignored"
    # and lost, unless the training loop checks for it before its first step.
    script = textwrap.dedent("""
        import gc, os, signal, sys
        from jaxdist.loop.preemption import Interrupted, PreemptionWatch, StartupSignals
        StartupSignals.install()
        StartupSignals.deliver()
        gc.callbacks.append(lambda phase, info: phase == "start" and os.kill(os.getpid(),
                                                                             signal.SIGINT))
        gc.collect()
        gc.callbacks.clear()
        print("swallowed", flush=True)
        try:
            with PreemptionWatch():
                print("the loop started", flush=True)
        except Interrupted as error:
            print("stopped by", error, flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.splitlines() == ["swallowed", "stopped by SIGINT"], result.stderr
    assert result.stderr == ""


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    args = ["digits_mlp", "--workdir", str(workdir), "train.checkpoint_every=1",
            "train.eval_every=0"]
    train_into(workdir, "digits_mlp", "train.checkpoint_every=1", "train.eval_every=0",
               "train.steps=1")
    # Files of at most 1 MiB (ulimit counts KiB): logs fit, the MLP's 3.6 MB of Adam state
    # does not; SIGXFSZ ignored, so a write past the limit fails with EFBIG instead.
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "jaxdist.run", *args,
                                                 "train.steps=3"])
    capped = subprocess.run(["bash", "-c", f"ulimit -f 1024; trap '' XFSZ; exec {command}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_line(capped)
    assert "could not write checkpoint" in line and "step_00000002" in line
    assert "file-size limit" in line and "MB" in line
    assert "the previous checkpoint" in line and "step_00000001 is intact" in line
    assert not list((workdir / "checkpoints").glob("tmp-*"))
    again = run_cli(*args, "train.steps=3")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]


def test_empty_eval_data_and_unknown_eval_metrics_are_refused_before_any_step(tmp_path):
    empty = Experiment(init_params=lambda rng: {"w": jnp.zeros(5)},
                       loss_fn=lambda p, b, r: ((b["x"] @ p["w"] - b["y"]) ** 2, {}),
                       train_data=make_data(32), eval_data={"x": np.zeros((0, 5)),
                                                            "y": np.zeros(0)})
    with pytest.raises(UserError, match="evaluation data is empty"):
        fit(empty, toy_config(steps=2), tmp_path / "a", stream=None)
    config = toy_config(steps=50)
    config.train.early_stopping.patience = 2
    config.train.early_stopping.metric = "abs_eror"
    with pytest.raises(UserError, match="train.early_stopping.metric=abs_eror is not an eval "
                                        "metric.*abs_error, loss"):
        fit(mlp_experiment(), config, tmp_path / "b", stream=None)
    config = toy_config(steps=50)
    config.checkpoint.best_metric = "los"
    with pytest.raises(UserError, match="checkpoint.best_metric=los is not an eval metric"):
        fit(mlp_experiment(), config, tmp_path / "c", stream=None)
    for name in "abc":
        assert not (tmp_path / name / "metrics.jsonl").exists()


def test_a_nan_run_prints_no_tensorboard_warnings(tmp_path):
    path = write_experiment(tmp_path / "nan_data.py", '''
        """linear_regression with one NaN feature: every step is skipped."""
        import numpy as np
        from experiments import linear_regression
        from jaxdist import Experiment

        config = linear_regression.config

        def build(config):
            base = linear_regression.build(config)
            data = linear_regression.load_data()
            data["x"][0, 0] = np.nan
            return Experiment(init_params=base.init_params, loss_fn=base.loss_fn,
                              train_data=data, eval_data=data)
    ''')
    result = run_cli(path, "--workdir", str(tmp_path / "run"), "train.steps=4",
                     "train.log_every=2", "train.max_nonfinite=0")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert records[0]["loss"] is None and records[0]["nonfinite_steps"] == 2


def test_experiment_help_shows_its_keys_types_and_defaults():
    result = run_cli("digits_cnn", "--help")
    assert result.returncode == 0, result.stderr
    keys = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith("  ") and "." in line.split()[0]}
    assert keys["model.channels1"] == ["int", "16"]
    assert keys["optimizer.name"][0] == "sgd|momentum|adam|adamw|lamb"
    assert keys["train.batch_size"][-1] == "128"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_keeps_the_train_loss_after_an_evaluation():
    terminal = Terminal()
    logger = MetricsLogger(None, terminal, total_steps=4)
    logger.start_progress(0)
    logger.advance()
    logger.log(1, "train", {"loss": 0.5, "examples": 8.0})
    logger.log(1, "eval", {"loss": 9.0, "examples": 8.0})
    logger.advance()
    logger.close()
    bar = terminal.getvalue().split("\r")[-1]
    assert "loss=0.5" in bar and "loss=9" not in bar


def test_the_progress_line_shows_on_a_terminal_that_reports_no_width(tmp_path):
    command = (f"stty cols 0 rows 0; {sys.executable} -m jaxdist.run linear_regression "
               f"--workdir {tmp_path / 'run'} train.steps=40 train.log_every=20")
    result = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "40/40" in result.stdout and "step/s" in result.stdout


def test_a_clone_named_jaxdist_does_not_hide_the_package(tmp_path):
    (tmp_path / "jaxdist").symlink_to(ROOT)
    result = run_cli("linear_regression", "train.steps=2", "--workdir",
                     str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_map_style_data_set_feeds_the_digits_helper_a_batch_at_a_time():
    from experiments._digits import classifier_experiment, load_split
    from jaxdist.step.models.mlp import MLP

    class MapDataset:  # the shape of a grain MapDataset or a Hugging Face Dataset
        def __init__(self, arrays):
            self.arrays, self.batched_reads = arrays, 0

        def __len__(self):
            return len(self.arrays["label"])

        def __getitem__(self, index):
            return {name: values[index] for name, values in self.arrays.items()}

        def __getitems__(self, indices):
            self.batched_reads += 1
            return [self[i] for i in indices]

    train, test = load_split()
    train_set, test_set = MapDataset(train), MapDataset(test)
    experiment = classifier_experiment(MLP(hidden=[16], outputs=10), train_set, test_set,
                                       label_smoothing=0.0, shift=0)
    result = fit(experiment, toy_config(steps=4, batch_size=64, log_every=2), stream=None)
    reads = train_set.batched_reads
    assert result.last("eval")["examples"] == len(test["label"]) and reads >= 4
    assert result.last("train")["loss"] < result.records[0]["loss"] * 1.5


def test_a_signal_right_after_the_package_import_is_one_line(tmp_path):
    # The moment before jaxdist.run's own imports (the command's module, then jax): the
    # package itself holds the signal from its first line when it is the run command.
    script = textwrap.dedent(f"""
        import os, runpy, signal, sys
        sys.orig_argv = [sys.executable, "-m", "jaxdist.run"]
        import jaxdist
        os.kill(os.getpid(), signal.SIGINT)
        sys.argv = ["jaxdist.run", "linear_regression", "--workdir", {str(tmp_path / "run")!r}]
        runpy.run_module("jaxdist.run", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: interrupted by SIGINT during start-up; nothing was saved"]
