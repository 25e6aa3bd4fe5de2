"""Shard folders at the edges: a shard truncated while training is one line (never a bus
error), every layout numpy writes is still served, a manifest of the wrong shape is one
line naming the file and the key, and byte windows advise only what is true."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdist.base.errors import UserError
from jaxdist.data import NpyFolderSource, write_shards
from jaxdist.data.text import ByteWindows

ROOT = Path(__file__).resolve().parent.parent


def one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


def rows(n, width=8, seed=0):
    """`x` float32 `[n, width]` whose row i starts with i, and `y` int64 labels."""
    x = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return {"x": x, "y": np.arange(n, dtype=np.int64) % 7}


def shard_file(folder, fmt, number=0, name="x"):
    stem = f"shard-{number:05d}"
    return folder / (f"{stem}.npz" if fmt == "npz" else f"{stem}.{name}.npy")


# --- (a) a shard truncated while training -----------------------------------------------

@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_a_shard_that_shrank_between_batches_is_one_line_naming_it(tmp_path, fmt):
    data = rows(400)
    folder = write_shards(tmp_path / "s", data, rows_per_shard=200, fmt=fmt)
    source = NpyFolderSource(folder)
    np.testing.assert_array_equal(source.get_batch(np.array([3, 1]))["x"], data["x"][[3, 1]])
    path = shard_file(folder, fmt)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    # Rows 3 and 1 still lie inside what is left; the shrink is seen all the same.
    with pytest.raises(UserError) as error:
        source.get_batch(np.array([3, 1]))
    message = one_line(error)
    assert f"shard file {path} was truncated while training" in message
    assert f"({size} bytes when it was opened, {size // 2} now)" in message
    assert "resume from the newest checkpoint" in message


def test_a_read_past_the_new_end_is_an_error_not_a_bus_error(tmp_path):
    folder = write_shards(tmp_path / "s", rows(20_000), rows_per_shard=20_000)
    source = NpyFolderSource(folder)
    path = shard_file(folder, "npy")
    os.truncate(path, 4096)
    with pytest.raises(UserError, match="was truncated while training") as error:
        source.shards[0]["x"].read_rows(np.array([15_000]))  # the read, without the check
    assert f"{path} was truncated" in one_line(error)


@pytest.mark.parametrize("fmt", ["npy", "npz"])
@pytest.mark.parametrize("read", ["get_batch(np.arange(19_990, 20_000))", "column('x')"])
def test_reading_a_truncated_shard_in_a_fresh_process_exits_cleanly(tmp_path, fmt, read):
    """The memory-mapped reader died of SIGBUS here (status -7, nothing on stderr)."""
    folder = write_shards(tmp_path / "s", rows(20_000), rows_per_shard=20_000, fmt=fmt)
    path = shard_file(folder, fmt)
    code = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from jaxdist.data import NpyFolderSource
        from jaxdist.base.errors import UserError
        source = NpyFolderSource({str(folder)!r})
        source.get_batch(np.arange(8))
        os.truncate({str(path)!r}, 4096)
        try:
            source.{read}
        except UserError as error:
            print(error)
            sys.exit(2)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert f"{path} was truncated while training" in result.stdout


def test_the_shards_are_read_not_memory_mapped(tmp_path):
    folder = write_shards(tmp_path / "s", rows(100), rows_per_shard=50)
    source = NpyFolderSource(folder)
    source.get_batch(np.arange(100))
    source.column("y")
    maps = Path("/proc/self/maps").read_text()
    assert str(folder) not in maps


def test_a_shard_shorter_than_its_header_says_is_refused_when_opened(tmp_path):
    folder = write_shards(tmp_path / "s", rows(100), rows_per_shard=50)
    path = shard_file(folder, "npy", number=1)
    size = path.stat().st_size
    os.truncate(path, size - 8)
    with pytest.raises(UserError) as error:
        NpyFolderSource(folder)
    message = one_line(error)
    assert str(path) in message and f"{size - 8} bytes" in message and "write_shards" in message


@pytest.mark.parametrize("damage", ["not a zip", "cut short"])
def test_a_damaged_npz_shard_is_refused_when_opened(tmp_path, damage):
    folder = write_shards(tmp_path / "s", rows(100), rows_per_shard=50, fmt="npz")
    path = shard_file(folder, "npz", number=1)
    if damage == "not a zip":
        path.write_bytes(b"hello" * 100)
    else:
        # The zip directory is rewritten at the end, so the member's data is what is short.
        import zipfile
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("x.npy")
        os.truncate(path, info.header_offset + 200)
    with pytest.raises(UserError) as error:
        NpyFolderSource(folder)
    assert str(path) in one_line(error)


def test_a_shard_holding_a_single_value_is_refused(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    np.save(folder / "shard-00000.x.npy", np.float32(1.0))
    with pytest.raises(UserError, match="one row per example") as error:
        NpyFolderSource(folder)
    assert "shard-00000.x.npy" in one_line(error)


# --- (a) every layout still served, at random indices -----------------------------------

def layouts(n):
    """Arrays of every kind numpy writes to a .npy: orders, byte orders, records, dates."""
    rng = np.random.default_rng(1)
    record = np.zeros(n, [("a", "<i4"), ("b", ">f8")])
    record["a"], record["b"] = np.arange(n), rng.normal(size=n)
    return {
        "fortran": np.asfortranarray(rng.normal(size=(n, 3, 5)).astype(np.float32)),
        "big_endian": rng.normal(size=(n, 2)).astype(">f4"),
        "wide": rng.integers(0, 255, (n, 4096), dtype=np.uint8),  # rows too far apart
        "label": np.arange(n, dtype=np.int8),  # rows close enough to read in one go
        "record": record,
        "when": np.arange(n).astype("datetime64[s]"),
        "empty_rows": np.zeros((n, 0), np.float32),
    }


@pytest.mark.parametrize("fmt", ["npy", "npz"])
@pytest.mark.parametrize("rows_per_shard", [1000, 97])
def test_every_layout_is_served_as_in_memory(tmp_path, fmt, rows_per_shard):
    data = layouts(300)
    folder = write_shards(tmp_path / "s", data, rows_per_shard=rows_per_shard, fmt=fmt)
    if rows_per_shard == 1000:  # one shard: numpy writes the Fortran array in Fortran order
        header = shard_file(folder, fmt, name="fortran").read_bytes()[:4096]
        assert b"'fortran_order': True" in header
    source = NpyFolderSource(folder)
    rng = np.random.default_rng(2)
    for indices in (rng.integers(0, 300, 64), np.arange(300), rng.permutation(300)[:10],
                    np.array([5, 5, 299, 0, 5]), np.array([], np.int64)):
        got = source.get_batch(indices)
        for name, a in data.items():
            assert got[name].dtype == a.dtype and got[name].shape == a[indices].shape
            np.testing.assert_array_equal(got[name], a[indices], err_msg=name)
    for name, a in data.items():
        np.testing.assert_array_equal(source.column(name), a, err_msg=name)


def test_indices_outside_the_folder_are_refused(tmp_path):
    source = NpyFolderSource(write_shards(tmp_path / "s", rows(10), rows_per_shard=5))
    for bad in ([10], [-1]):
        with pytest.raises(IndexError):
            source.get_batch(np.array(bad))


# --- (a) more shard files than the process may open at once -----------------------------

@pytest.mark.parametrize("hard", [False, True], ids=["soft-limit", "hard-limit"])
def test_more_shards_than_open_files_allowed(tmp_path, hard):
    folder = write_shards(tmp_path / "s", rows(200), rows_per_shard=2)  # 200 files
    code = textwrap.dedent(f"""
        import resource, sys
        import numpy as np
        from jaxdist.data import NpyFolderSource
        from jaxdist.base.errors import UserError
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if {hard} else hard))
        try:
            source = NpyFolderSource({str(folder)!r})
        except UserError as error:
            print(error)
            sys.exit(2)
        print(int(source.get_batch(np.array([199]))["x"][0, 0]))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    if hard:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "ulimit -n" in result.stdout and "rows_per_shard" in result.stdout
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "199"


# --- (a) end to end: the CLI stops in one line ------------------------------------------

EXPERIMENT = '''
"""A one-weight regression on a shard folder (for a test)."""
import jax.numpy as jnp

from jaxdist import Config, Experiment, OptimizerConfig, TrainConfig
from jaxdist.data import NpyFolderSource

FOLDER = {folder!r}


def config() -> Config:
    """Plain SGD; the test sets the steps and the batch size."""
    return Config(train=TrainConfig(steps=10), optimizer=OptimizerConfig(name="sgd"))


def build(config: Config) -> Experiment:
    """Fit y from x[:, 1] with one weight."""
    def loss_fn(params, batch, rng):
        return (params["w"] * batch["x"][:, 1] - batch["y"]) ** 2, {{}}

    return Experiment(init_params=lambda rng: {{"w": jnp.zeros(())}}, loss_fn=loss_fn,
                      train_data=NpyFolderSource(FOLDER))
'''


def test_a_run_whose_shard_is_truncated_while_training_stops_in_one_line(tmp_path):
    x = rows(4000)["x"]
    data = {"x": x, "y": 2 * x[:, 1]}
    folder = write_shards(tmp_path / "s", data, rows_per_shard=1000)
    path = shard_file(folder, "npy", number=2)
    size = path.stat().st_size
    experiment = tmp_path / "shard_experiment.py"
    experiment.write_text(EXPERIMENT.format(folder=str(folder)))
    workdir = tmp_path / "run"
    stderr = (tmp_path / "stderr").open("w+")
    run = subprocess.Popen(
        [sys.executable, "-m", "jaxdist.run", str(experiment), "--workdir", str(workdir),
         "train.steps=100000", "train.batch_size=32", "train.log_every=1",
         "train.checkpoint_every=0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.time() + 240
        while not (workdir / "metrics.jsonl").exists() and run.poll() is None:
            assert time.time() < deadline, "training never logged"
            time.sleep(0.1)
        stderr.seek(0)
        assert run.poll() is None, stderr.read()[-2000:]
        os.truncate(path, 4096)
        truncated = time.time()
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    stderr.seek(0)
    lines = stderr.read().strip().splitlines()
    assert code == 2, (code, lines[-20:])
    assert len(lines) == 1, lines[-20:]
    assert lines[0].startswith(f"error: data shard file {path} was truncated while training")
    assert f"({size} bytes when it was opened, 4096 now)" in lines[0]
    assert time.time() - truncated < 60
    assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])["step"] >= 1


# --- (b) a manifest of the wrong shape --------------------------------------------------

def good_manifest():
    return {"format": "npy",
            "arrays": {"x": {"dtype": "<f4", "shape": [8]}, "y": {"dtype": "<i8", "shape": []}},
            "shards": [{"name": "shard-00000", "rows": 5}, {"name": "shard-00001", "rows": 5}]}


def edit(change):
    manifest = good_manifest()
    change(manifest)
    return manifest


WRONG_SHAPES = {
    "a list": ([], "it should be an object, not a list"),
    "arrays a list": (edit(lambda m: m.update(arrays=["x", "y"])),
                      "its arrays should be an object, not a list"),
    "no format": (edit(lambda m: m.pop("format")), "its format should be a string, not missing"),
    "a shard without name": (edit(lambda m: m["shards"][1].pop("name")),
                             "its shards[1].name should be a string, not missing"),
    "rows a string": (edit(lambda m: m["shards"][0].update(rows="5")),
                      "its shards[0].rows should be an integer, not the string '5'"),
    "shape a number": (edit(lambda m: m["arrays"]["x"].update(shape=8)),
                       "its arrays.x.shape should be a list, not the number 8"),
    "shards an object": (edit(lambda m: m.update(shards={"name": "shard-00000"})),
                         "its shards should be a list, not an object"),
    "unknown format": (edit(lambda m: m.update(format="parquet")),
                       "its format should be 'npy' or 'npz', not the string 'parquet'"),
    "no such dtype": (edit(lambda m: m["arrays"]["x"].update(dtype="float99")),
                      "its arrays.x.dtype should be a numpy dtype, not the string 'float99'"),
    "a name outside": (edit(lambda m: m["shards"][0].update(name="../../etc/x")),
                       "its shards[0].name should be a file name in the folder"),
    "an array name outside": (edit(lambda m: m["arrays"].update({"/etc/x": m["arrays"]["x"]})),
                              "its arrays./etc/x should be a file name in the folder"),
}


@pytest.mark.parametrize("manifest", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_a_manifest_of_the_wrong_shape_is_one_line_naming_the_key(tmp_path, manifest):
    content, expected = manifest
    folder = write_shards(tmp_path / "s", rows(10), rows_per_shard=5)
    (folder / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as error:
        NpyFolderSource(folder)
    message = one_line(error)
    assert message.startswith(f"{folder / 'manifest.json'} is damaged: {expected}"), message
    assert "write_shards" in message


UNREADABLE = {
    "not JSON": (lambda p: p.write_text('{"format": "npy",'), "is not valid JSON"),
    "random bytes": (lambda p: p.write_bytes(bytes(range(256)) * 4), "is not text"),
    "a folder": (lambda p: p.mkdir(), "is a folder, not a file"),
    "nested deep": (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
}


@pytest.mark.parametrize("damage", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_manifest_is_one_line(tmp_path, damage):
    write, expected = damage
    folder = write_shards(tmp_path / "s", rows(10), rows_per_shard=5)
    (folder / "manifest.json").unlink()
    write(folder / "manifest.json")
    with pytest.raises(UserError) as error:
        NpyFolderSource(folder)
    message = one_line(error)
    assert message.startswith(f"{folder / 'manifest.json'} ") and expected in message
    assert "write_shards" in message


def test_a_good_manifest_still_opens(tmp_path):
    folder = write_shards(tmp_path / "s", rows(10), rows_per_shard=5)
    assert json.loads((folder / "manifest.json").read_text()) == good_manifest()
    assert len(NpyFolderSource(folder)) == 10


# --- (c) byte windows advise only keys that exist ---------------------------------------

def test_byte_windows_too_short_advise_nothing_untrue():
    with pytest.raises(UserError) as error:
        ByteWindows(np.zeros(10, np.uint8), 16)
    message = one_line(error)
    assert "model.seq_len" not in message
    assert message == ("the text has 10 bytes, fewer than one window of 17; give more text "
                       "or shorter windows")
    with pytest.raises(UserError, match="; set data.window=9 or less$"):
        ByteWindows(np.zeros(10, np.uint8), 16, fix="set data.window=9 or less")
    assert len(ByteWindows(np.zeros(17, np.uint8), 16)) == 1


def test_a_source_kept_until_exit_closes_its_files_quietly(tmp_path):
    """Module globals are torn down at exit; closing the files then must not print.

    (With jax imported after the source's module, `os` was gone by the time the files
    were closed: one "Exception ignored" traceback per file.)
    """
    folder = write_shards(tmp_path / "s", rows(100), rows_per_shard=10)
    code = ("import numpy as np\nfrom jaxdist.data import NpyFolderSource\nimport jax\n"
            f"source = NpyFolderSource({str(folder)!r})\nsource.get_batch(np.arange(100))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]


def test_rows_are_read_where_os_has_no_preadv(tmp_path, monkeypatch):
    import jaxdist.data.shard_files as shard_files

    monkeypatch.delattr(os, "preadv")
    monkeypatch.setattr(shard_files, "HAVE_PREADV", False)
    data = layouts(120)
    source = NpyFolderSource(write_shards(tmp_path / "s", data, rows_per_shard=50))
    indices = np.random.default_rng(3).integers(0, 120, 40)
    got = source.get_batch(indices)
    for name, a in data.items():
        np.testing.assert_array_equal(got[name], a[indices], err_msg=name)
    os.truncate(shard_file(tmp_path / "s", "npy", name="wide"), 1000)
    with pytest.raises(UserError, match="was truncated while training"):
        source.shards[0]["wide"].read_rows(np.array([40]))
