"""What a run leaves to read: TensorBoard events, the progress line, plots."""

import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from jaxdist import fit
from jaxdist.loop.metrics import MetricsLogger
from jaxdist.step.norms import NORM_KEYS
from tests.toy import mlp_experiment, toy_config

ROOT = Path(__file__).resolve().parent.parent


def read_events(folder):
    """Scalars of every event file in `folder`: {tag: [(step, value)]} (TFRecord framing)."""
    scalars = {}
    for path in Path(folder).glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        offset = 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset:offset + 8])
            data = raw[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(data)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    config = toy_config(steps=6, log_every=2)
    config.train.eval_every = 3
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    scalars = read_events(tmp_path / "run" / "tensorboard")
    train = [r for r in result.records if r["split"] == "train"]
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6]
    for (_step, value), record in zip(scalars["train/loss"], train, strict=True):
        assert abs(value - record["loss"]) <= 1e-6 * abs(record["loss"])
    assert [step for step, _ in scalars["eval/loss"]] == [3, 6]
    assert "train/steps_per_sec" in scalars
    for name in NORM_KEYS:  # the step's health, as metrics.jsonl has it (float32 there)
        assert [value for _, value in scalars[f"train/{name}"]] == pytest.approx(
            [record[name] for record in train], rel=1e-6)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_live_progress_line_and_a_pipe_plain_lines():
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        logger = MetricsLogger(None, stream, total_steps=4)
        logger.start_progress(0)
        for step in range(1, 5):
            logger.advance()
            if step % 2 == 0:
                logger.log(step, "train", {"loss": 1.0 / step, "examples": 8.0,
                                           "steps_per_sec": 10.0, "examples_per_sec": 80.0})
        logger.close()
    screen = terminal.getvalue()
    assert "\r" in screen and "4/4" in screen and "step/s" in screen  # the tqdm line
    assert "loss=0.25" in screen and "ex/s=80" in screen
    assert "train step 2/4" in screen  # the logged points are printed above it
    assert "\r" not in pipe.getvalue()
    assert pipe.getvalue().splitlines() == [
        "train step 2/4  loss 0.5  examples 8  10.0 steps/s  80 examples/s",
        "train step 4/4  loss 0.25  examples 8  10.0 steps/s  80 examples/s"]


def test_plot_writes_a_png_per_metric(tmp_path):
    config = toy_config(steps=6, log_every=2)
    config.train.eval_every = 3
    fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    result = subprocess.run([sys.executable, "-m", "jaxdist.plot", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert {p.name for p in written} >= {"loss.png", "abs_error.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert "nonfinite_steps.png" not in {p.name for p in written}  # 0 throughout: no picture
    missing = subprocess.run([sys.executable, "-m", "jaxdist.plot", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_the_learning_rate_is_drawn_from_the_schedule_the_logged_points_lie_on(tmp_path):
    from jaxdist.plot import schedule_curve

    config = toy_config(steps=12, log_every=3)
    config.optimizer.schedule, config.optimizer.warmup_steps = "warmup_cosine", 4
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    steps, rates = schedule_curve(tmp_path / "run")
    assert steps == list(range(1, 13)) and rates[0] == 0.0 and max(rates) > rates[-1]
    logged = {r["step"]: r["lr"] for r in result.records if r["split"] == "train"}
    assert logged and all(rates[step - 1] == lr for step, lr in logged.items())
