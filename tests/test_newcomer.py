"""What a newcomer meets first: the help's defaults, the console script, the errors' hints,
and scripts that leave nothing behind (issue 27, item 7)."""

import io
import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from jaxdist.base.config import Config, describe_keys
from jaxdist.base.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def help_line(key):
    (line,) = [line for line in describe_keys(Config()) if line.split()[0] == key]
    return line


def test_the_help_shows_a_default_by_the_word_the_readme_uses():
    assert help_line("parallel.devices").split()[-1] == "all"  # not 0
    assert help_line("train.batch_size").split()[-1] == "full"
    assert help_line("train.steps").split()[-1] == "100"  # no alias: the value


def test_asking_for_more_cpu_devices_than_there_are_names_cpu_devices():
    from jaxdist.parallel.devices import select_devices

    with pytest.raises(UserError, match=r"--cpu-devices 16"):
        select_devices(16)  # the tests have 8 CPU devices


@pytest.mark.slow
def test_the_jaxdist_console_script_is_the_command_line():
    script = Path(sysconfig.get_path("scripts")) / "jaxdist"
    shown = subprocess.run([str(script), "--list"], capture_output=True, text=True, timeout=120)
    module = subprocess.run([sys.executable, "-m", "jaxdist.run", "--list"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout == module.stdout
    assert "linear_regression" in shown.stdout


@pytest.mark.slow
def test_bench_checkpoint_leaves_nothing_in_the_temporary_folder(tmp_path):
    done = subprocess.run([sys.executable, "scripts/bench_checkpoint.py", "--size", "tiny",
                           "--saves", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "background: the whole save" in done.stdout
    assert not list(tmp_path.glob("bench_checkpoint-*"))


def test_train_points_count_nonfinite_steps_and_eval_points_have_none(tmp_path):
    from jaxdist import fit
    from tests.toy import mlp_experiment, toy_config

    records = fit(mlp_experiment(), toy_config(steps=4, log_every=2), None, stream=None).records
    assert all("nonfinite_steps" in r and "lr" in r for r in records if r["split"] == "train")
    evals = [r for r in records if r["split"] == "eval"]
    assert evals and all("nonfinite_steps" not in r and "lr" not in r for r in evals)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def logged_screen(points):
    """What a terminal shows of a 4-step run logging `points` at steps 2 and 4."""
    from jaxdist.loop.metrics import MetricsLogger

    terminal = Terminal()
    logger = MetricsLogger(None, terminal, total_steps=4)
    logger.start_progress(0)
    logger.progress.note("compiling the first step")
    for step in range(1, 5):
        logger.advance()
        if step == 1:
            logger.progress.note("")
        if step % 2 == 0:
            logger.log(step, "train", points(step))
    logger.close()
    return terminal.getvalue()


def test_the_bar_says_it_compiles_until_the_first_step_and_ends_on_the_last_loss():
    screen = logged_screen(lambda step: {"loss": 1.0 / step, "examples": 8.0})
    before_first = screen.split("1/4")[0]
    assert "compiling the first step" in before_first
    final = screen.rsplit("\r", 1)[-1]  # the bar as the run left it
    assert "4/4" in final and "loss=0.25" in final  # step 4's loss, not step 2's


def test_a_long_point_is_wrapped_to_the_terminal_not_cut_or_left_to_wrap():
    values = {f"metric_{i}": 0.123456 * i for i in range(20)}
    screen = logged_screen(lambda step: dict(values, loss=1.0))
    lines = [line for line in screen.replace("\r", "\n").splitlines() if "metric_" in line]
    assert len(lines) >= 4 and all(len(line) <= 100 for line in lines)  # FALLBACK_SIZE
    shown = " ".join(lines)
    assert all(f"metric_{i} " in shown for i in range(20))  # nothing cut


# The command line in a process where importing jax, jaxlib or flax raises.
NO_JAX = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax"):
            raise ImportError(f"the test forbids importing {name} here")
sys.meta_path.insert(0, Refuse())
from jaxdist.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("override, told", [
    ("train.stpes=10", "unknown config key 'train.stpes'; did you mean train.steps?"),
    ("parallel.backend=pmapp", "parallel.backend=pmapp is not allowed"),
    ("train.steps=ten", "train.steps=ten is not an integer"),
])
def test_a_core_config_error_is_told_before_jax_is_imported(override, told):
    done = subprocess.run([sys.executable, "-c", NO_JAX, "digits_cnn", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]  # importing jax would have raised
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {told}")


@pytest.mark.slow
def test_the_imbalanced_table_says_what_it_trains_before_it_trains():
    process = subprocess.Popen([sys.executable, "-m", "experiments.digits_imbalanced"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = threading.Timer(120, process.kill)  # a silent process fails, not hangs
    deadline.start()
    try:
        first = process.stdout.readline()
    finally:
        deadline.cancel()
        process.kill()
        process.wait(timeout=30)
    assert first.startswith("training 1/3, plain: ")
