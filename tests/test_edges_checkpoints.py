"""Checkpoints at their edges: renamed folders, damaged files of the right syntax, and
temporary folders of a live run."""

import json
import shutil

import numpy as np
import pytest

from jaxdist import fit
from jaxdist.base.errors import UserError
from jaxdist.checkpoints.integrity import MANIFEST, META, sha256_file
from jaxdist.checkpoints.store import CheckpointStore
from tests.toy import mlp_experiment, toy_config


def trained(workdir, steps=6, every=2):
    config = toy_config(steps=steps, log_every=2)
    config.train.checkpoint_every = every
    config.checkpoint.keep = 10
    fit(mlp_experiment(), config, workdir, stream=None)
    return config


def resume(workdir, steps=10):
    config = toy_config(steps=steps, log_every=2)
    config.train.checkpoint_every = 2
    config.checkpoint.keep = 10
    return fit(mlp_experiment(), config, workdir, stream=None)


def rewrite_meta(folder, change):
    """Change a checkpoint's meta.json and recompute its manifest to match (a forger's edit)."""
    meta = json.loads((folder / META).read_text())
    meta = change(meta)
    (folder / META).write_text(json.dumps(meta))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][META] = sha256_file(folder / META)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# Item 2: a checkpoint's step is not read from its folder's name alone.

def test_a_renamed_checkpoint_is_refused_naming_both_steps(tmp_path):
    trained(tmp_path)
    ck = tmp_path / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "step_00000004").rename(ck / "step_00000007")
    with pytest.raises(UserError, match=r"step_00000007 holds step 4.*renamed"):
        resume(tmp_path)


def test_a_finished_run_renamed_ahead_is_refused_and_logs_nothing(tmp_path):
    trained(tmp_path)
    ck = tmp_path / "checkpoints"
    before = (tmp_path / "metrics.jsonl").read_text()
    (ck / "step_00000006").rename(ck / "step_00000999")
    with pytest.raises(UserError, match="step_00000999 holds step 6"):
        resume(tmp_path, steps=6)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_meta_whose_step_was_forged_with_its_manifest_is_refused_by_the_state(tmp_path):
    trained(tmp_path)
    ck = tmp_path / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "step_00000004").rename(ck / "step_00000005")
    rewrite_meta(ck / "step_00000005", lambda meta: {**meta, "step": 5})
    with pytest.raises(UserError, match=r"step_00000005.*its state is at step 4"):
        resume(tmp_path)


def test_the_best_checkpoint_is_not_chosen_by_a_renamed_folder(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=5, best_metric="loss")
    for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0)):
        store.save(step, {"step": np.array(step, np.int32)}, {"eval": {"loss": loss}})
    (tmp_path / "ck" / "step_00000002").rename(tmp_path / "ck" / "step_00000009")
    fresh = CheckpointStore(tmp_path / "ck", keep=5, best_metric="loss")
    assert fresh.best_step() == 3  # the renamed one does not count
    with pytest.raises(UserError, match="step_00000009 holds step 2"):
        fresh.verify(9)


# Item 12: files of the right syntax and the wrong shape are one line each.

def damage_manifest(folder, value):
    (folder / MANIFEST).write_text(json.dumps(value))


@pytest.mark.parametrize("manifest", [[1, 2], {"format": "jaxdist-checkpoint-1", "files": [1]},
                                      {"format": "jaxdist-checkpoint-1",
                                       "files": {"meta.json": 5}}, "text", 7])
def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path, manifest):
    trained(tmp_path)
    damage_manifest(tmp_path / "checkpoints" / "step_00000006", manifest)
    with pytest.raises(UserError, match=r"step_00000006.*(damaged|not a jaxdist)"):
        resume(tmp_path)


@pytest.mark.parametrize("change,words", [
    (lambda meta: {k: v for k, v in meta.items() if k != "config"}, "its config should be"),
    (lambda meta: {k: v for k, v in meta.items() if k != "loader"}, "its loader should be"),
    (lambda meta: [meta], "it should be an object, not a list"),
    (lambda meta: {**meta, "loader": {"epoch": "abc", "index": 0}}, "its loader.epoch"),
    (lambda meta: {**meta, "window": {"totals": {"loss": "x"}, "steps": 1}},
     "its window.totals.loss"),
    (lambda meta: {**meta, "eval": [1]}, "its eval should be"),
])
def test_a_meta_of_the_wrong_shape_is_refused_naming_the_key(tmp_path, change, words):
    trained(tmp_path)
    rewrite_meta(tmp_path / "checkpoints" / "step_00000006", change)
    with pytest.raises(UserError, match=rf"meta.json is damaged: {words}"):
        resume(tmp_path)


def test_a_split_checkpoint_whose_meta_forgets_the_split_is_refused(tmp_path):
    config = toy_config(steps=4, log_every=2)
    config.parallel.shard = "optimizer"
    fit(mlp_experiment(), config, tmp_path, stream=None)
    rewrite_meta(tmp_path / "checkpoints" / "step_00000004",
                 lambda meta: {**meta, "split": {}})
    config.train.steps = 8
    with pytest.raises(UserError, match="state does not match its meta.json"):
        fit(mlp_experiment(), config, tmp_path, stream=None)


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', '{"step": "abc", "split": "train"}',
                                  '{"split": "train", "loss": 1.0}', "7"])
def test_a_damaged_metrics_line_is_refused_at_resume_naming_it(tmp_path, line):
    trained(tmp_path)
    log = tmp_path / "metrics.jsonl"
    kept = log.read_text().splitlines()
    log.write_text("\n".join([kept[0], line, *kept[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is damaged"):
        resume(tmp_path)
    assert log.read_text().splitlines()[1] == line  # not rewritten


def test_random_bytes_or_a_folder_in_place_of_metrics_are_refused(tmp_path):
    trained(tmp_path)
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="metrics.jsonl is not text"):
        resume(tmp_path)
    log.unlink()
    log.mkdir()
    with pytest.raises(UserError, match="metrics.jsonl is a folder"):
        resume(tmp_path)


def test_a_torn_last_metrics_line_is_still_dropped_as_a_crash_leaves_it(tmp_path):
    trained(tmp_path)
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 7, "spl')
    resume(tmp_path)
    assert all(json.loads(line) for line in log.read_text().splitlines())


def test_a_config_json_nested_thousands_deep_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="config.json is nested too deeply"):
        resume(tmp_path)
