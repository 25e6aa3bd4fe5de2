"""The checkpoint store: atomic saves, keep-k plus best, integrity checks."""

import json

import numpy as np
import pytest

from jaxdist.base.errors import UserError
from jaxdist.checkpoints.store import CheckpointStore


def tree(value=1.0):
    return {"w": np.full((3, 2), value, np.float32), "step": np.array(int(value), np.int32)}


def save(store, step, loss=None):
    return store.save(step, tree(step), {"eval": None if loss is None else {"loss": loss}})


def test_save_and_restore_round_trip(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    save(store, 5)
    state, meta = store.restore(5, tree(0))
    np.testing.assert_array_equal(state["w"], tree(5)["w"])
    assert meta["step"] == 5 and store.steps() == [5] and store.latest() == 5


def test_keeps_the_last_k_and_the_best(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=2, best_metric="loss", best_mode="min")
    for step, loss in zip(range(1, 7), [5.0, 3.0, 4.0, 6.0, 7.0, 8.0], strict=True):
        save(store, step, loss)
    assert store.steps() == [2, 5, 6]
    assert store.best_step() == 2
    assert store.improves({"loss": 2.5}) and not store.improves({"loss": 3.5})
    maximize = CheckpointStore(tmp_path / "max", keep=1, best_metric="loss", best_mode="max")
    for step, loss in [(1, 1.0), (2, 9.0), (3, 2.0)]:
        save(maximize, step, loss)
    assert maximize.steps() == [2, 3]


def test_an_interrupted_save_is_never_listed_and_is_cleaned(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ck")
    save(store, 1)

    def crash(*args):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr("jaxdist.checkpoints.store.os.rename", crash)
    with pytest.raises(RuntimeError):
        save(store, 2)
    monkeypatch.undo()
    assert store.steps() == [1]
    assert not list((tmp_path / "ck").glob("tmp-*"))  # a failed save removes its folder
    # A process killed mid-save cannot: what it leaves is never listed, and is cleaned.
    leftover = tmp_path / "ck" / "tmp-step_00000002-123-456" / "state"
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_bytes(b"\0" * 100)
    assert store.steps() == [1] and store.latest() == 1
    store.clean_incomplete()
    assert not list((tmp_path / "ck").glob("tmp-*"))
    state, _ = store.restore(1, tree(0))
    np.testing.assert_array_equal(state["w"], tree(1)["w"])


def data_files(folder):
    return [p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"]


@pytest.mark.parametrize("damage,fragment", [
    ("flip", "does not match its sha256"),
    ("truncate", "does not match its sha256"),
    ("delete", "lacks its file"),
    ("extra", "does not list"),
    ("no_manifest", "not a jaxdist checkpoint"),
    ("foreign", "is not a jaxdist-checkpoint-1 checkpoint"),
])
def test_a_damaged_checkpoint_is_refused(tmp_path, damage, fragment):
    store = CheckpointStore(tmp_path / "ck")
    folder = save(store, 3)
    victim = max(data_files(folder), key=lambda p: p.stat().st_size)
    if damage == "flip":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif damage == "delete":
        victim.unlink()
    elif damage == "extra":
        (folder / "state" / "stray.bin").write_bytes(b"x")
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text(json.dumps({"format": "other", "files": {}}))
    with pytest.raises(UserError, match=fragment) as info:
        store.restore(3, tree(0))
    assert "\n" not in str(info.value) and "delete" in str(info.value)


def test_a_checkpoint_of_another_shape_is_refused_naming_the_leaf(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    save(store, 1)
    other = {"w": np.zeros((3, 4), np.float32), "step": np.array(0, np.int32)}
    with pytest.raises(UserError, match=r"\['w'\]: float32\[3, 2\] there, float32\[3, 4\] now"):
        store.restore(1, other)
