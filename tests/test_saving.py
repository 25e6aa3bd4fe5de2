"""Checkpoints written in the background: the same checkpoints, while training goes on."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest
from toy import mlp_experiment, toy_config

from jaxdist import fit
from jaxdist.checkpoints.saving import CheckpointWriter, host_copy
from jaxdist.checkpoints.store import CheckpointStore, PendingSave
from jaxdist.loop.metrics import MetricWindow


def _config(background: bool, steps: int = 8):
    config = toy_config(steps=steps, batch_size=32, log_every=2)
    config.train.checkpoint_every = 2
    config.train.eval_every = 4
    config.checkpoint.keep = 10
    config.checkpoint.background = background
    return config


def _checkpoints(workdir):
    store = CheckpointStore(workdir / "checkpoints")
    found = {}
    for step in store.steps():
        meta = store.verify(step)
        state = store._checkpointer.restore(store.path(step) / "state")
        found[step] = (meta, state)
    store.close()
    return found


def test_background_saves_write_the_same_checkpoints_and_metrics(tmp_path):
    runs = {}
    for background in (True, False):
        workdir = tmp_path / str(background)
        fit(mlp_experiment(), _config(background), workdir, stream=None)
        runs[background] = ((workdir / "metrics.jsonl").read_text(), _checkpoints(workdir))
    (lines_bg, saved_bg), (lines_fg, saved_fg) = runs[True], runs[False]
    assert lines_bg == lines_fg
    assert sorted(saved_bg) == sorted(saved_fg) == [2, 4, 6, 8]
    for step in saved_bg:
        meta_bg, state_bg = saved_bg[step]
        meta_fg, state_fg = saved_fg[step]
        assert meta_bg["config"]["checkpoint"].pop("background") is True
        assert meta_fg["config"]["checkpoint"].pop("background") is False
        assert meta_bg == meta_fg
        chex_equal = jax.tree.map(np.array_equal, state_bg, state_fg)
        assert all(jax.tree.leaves(chex_equal))
    assert json.loads((tmp_path / "True" / "saved.json").read_text()) == {
        "newest_checkpoint": 8}


@pytest.mark.parametrize("background", [True, False])
def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch, background):
    """A save of step 2 waits to see step 4 dispatched: only the background one can."""
    later_step = threading.Event()
    seen = {}
    original_commit = PendingSave.commit
    original_add = MetricWindow.add
    steps = {"count": 0}

    def counting_add(self, sums):
        steps["count"] += 1
        if steps["count"] >= 4:
            later_step.set()
        original_add(self, sums)

    def slow_commit(self):
        if self.final.name == "step_00000002":
            seen["overlapped"] = later_step.wait(timeout=3 if background else 1)
        return original_commit(self)

    monkeypatch.setattr(MetricWindow, "add", counting_add)
    monkeypatch.setattr(PendingSave, "commit", slow_commit)
    config = _config(background)
    config.train.eval_every = 0
    result = fit(mlp_experiment(), config, tmp_path, stream=None)
    assert result.stop_reason == "completed"
    assert seen["overlapped"] is background


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    writer = CheckpointWriter(store, background=True)
    state = {"w": np.arange(4.0)}
    written = []
    writer.save(1, state, {"eval": None}, lambda path, seconds: written.append(path))
    writer.wait()
    assert [p.name for p in written] == ["step_00000001"]

    def fail(path, seconds):
        raise OSError("disk on fire")

    writer.save(2, state, {"eval": None}, fail)
    with pytest.raises(OSError, match="disk on fire"):
        writer.save(3, state, {"eval": None}, lambda path, seconds: None)
    writer.wait()
    store.close()


def test_the_background_copy_owns_its_memory():
    """The host copy does not share the buffer the next step may reuse."""
    device_value = jax.numpy.arange(8.0)
    view = np.asarray(device_value)
    copied = host_copy({"x": view})["x"]
    assert not np.shares_memory(copied, view)
    np.testing.assert_array_equal(copied, view)
