"""The loop's hook interface: a user's hook sees every moment at the right step, with the
values jaxdist logs, and a hook's state rides in the checkpoint across a resume."""

import json

import pytest

from jaxdist import fit
from jaxdist.base.errors import UserError
from jaxdist.loop.hooks import Hook
from jaxdist.loop.metrics import TIMING_KEYS
from tests.toy import mlp_experiment, toy_config


class Recorder(Hook):
    """Writes down each moment it is called at, and what it was given."""

    def __init__(self):
        self.calls, self.logged = [], []

    def on_start(self, run):
        self.calls.append(("on_start", run.step))

    def after_step(self, run, sums):
        self.calls.append(("after_step", run.step))

    def after_log(self, run, split, values):
        self.calls.append((f"after_log {split}", run.step))
        self.logged.append({"step": run.step, "split": split, **values})

    def on_stop(self, run):
        self.calls.append((f"on_stop {run.stop_reason}", run.step))


class StepCounter(Hook):
    """Counts steps; its count is kept in the checkpoint."""

    key = "step_counter"

    def __init__(self):
        self.count = 0

    def after_step(self, run, sums):
        self.count += 1

    def state(self):
        return {"count": self.count}

    def restore(self, state):
        self.count = state["count"]


def run_config(steps):
    config = toy_config(steps=steps, log_every=3)
    config.train.eval_every = 5
    config.train.checkpoint_every = 4
    return config


def test_a_hook_is_called_at_every_moment_with_the_logged_values():
    recorder = Recorder()
    result = fit(mlp_experiment(), run_config(10), stream=None, hooks=[recorder])
    after_steps = [step for moment, step in recorder.calls if moment == "after_step"]
    assert after_steps == list(range(1, 11))
    assert recorder.calls[0] == ("on_start", 0) and recorder.calls[-1] == ("on_stop None", 10)
    logs = [(moment, step) for moment, step in recorder.calls if moment.startswith("after_log")]
    assert logs == [("after_log train", 3), ("after_log eval", 5), ("after_log train", 6),
                    ("after_log train", 9), ("after_log train", 10), ("after_log eval", 10)]
    # A log moment comes right after the step it belongs to, before the next step.
    order = [step for moment, step in recorder.calls if moment != "on_start"]
    assert order == sorted(order)
    seen = [{k: v for k, v in point.items() if k not in TIMING_KEYS}
            for point in recorder.logged]
    assert seen == result.records


def test_a_hooks_state_rides_in_the_checkpoint_across_a_resume(tmp_path):
    first = StepCounter()
    fit(mlp_experiment(), run_config(6), tmp_path / "run", stream=None, hooks=[first])
    assert first.count == 6
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "meta.json")
                      .read_text())
    assert meta["step_counter"] == {"count": 6}
    resumed = StepCounter()
    fit(mlp_experiment(), run_config(10), tmp_path / "run", stream=None, hooks=[resumed])
    assert resumed.count == 10  # 6 restored, 4 counted
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000010" / "meta.json")
                      .read_text())
    assert meta["step_counter"] == {"count": 10}


@pytest.mark.parametrize("key", ["window", "nonfinite"])
def test_a_hook_key_that_jaxdist_uses_is_refused_in_one_line(key):
    hook = StepCounter()
    hook.key = key
    with pytest.raises(UserError, match=f"keeps its state under key '{key}', which jaxdist "
                                        f"uses already"):
        fit(mlp_experiment(), run_config(2), stream=None, hooks=[hook])


def test_the_keys_of_jaxdists_own_hooks_are_reserved():
    from jaxdist.loop.actions import default_hooks
    from jaxdist.loop.hooks import RESERVED_KEYS

    own = {hook.key for hook in default_hooks(run_config(2), lambda *a: None, {}, None)
           if hook.key is not None}
    assert own == {"nonfinite", "early_stopping"} and own <= set(RESERVED_KEYS)


class StopAt(Hook):
    """Asks the run to stop after step `step`."""

    def __init__(self, step):
        self.step = step

    def after_step(self, run, sums):
        if run.step == self.step:
            run.request_stop("early_stopped")


def test_a_hook_that_stops_the_run_ends_it_after_that_step_and_it_stays_done(tmp_path):
    result = fit(mlp_experiment(), run_config(10), tmp_path / "run", stream=None,
                 hooks=[StopAt(4)])
    assert (result.step, result.stop_reason) == (4, "early_stopped")
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "meta.json")
                      .read_text())
    assert meta["stop_reason"] == "early_stopped"
    again = fit(mlp_experiment(), run_config(10), tmp_path / "run", stream=None)
    assert (again.step, again.stop_reason) == (4, "already_complete")
