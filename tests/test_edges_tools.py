"""The tools at their edges: CIFAR files read without running code, plot's file names and
damaged records, explain's class numbers and baselines, scaling's numbers."""

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import linear_regression
from experiments.cifar_resnet import load_cifar
from jaxdist import fit, load, make_backend
from jaxdist.base.errors import UserError
from jaxdist.explain import Method, explain
from jaxdist.explain.__main__ import main as explain_main
from jaxdist.plot import main as plot_main
from jaxdist.scaling.__main__ import main as scaling_main
from tests.toy import train_into

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
PNG = b"\x89PNG\r\n\x1a\n"
MATH = r"cost $\frac{$"  # not valid mathtext: drawn as it is written


def one_error_line(capsys) -> str:
    """The single `error: ` line a refused command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    return lines[0]


# --- CIFAR-10 -------------------------------------------------------------------------

def fake_cifar(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` random HWC uint8 images and their labels, one batch's worth."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, size=count))


def planar(images: np.ndarray) -> np.ndarray:
    """Rows as CIFAR-10 stores them: 1024 red, then 1024 green, then 1024 blue bytes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def py2_pickle(data: np.ndarray, labels: np.ndarray) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for a CIFAR-10 batch dict, by hand:
    `numpy.core.multiarray._reconstruct`, py2 strings, and what encoding="bytes" reads."""
    def string(b):
        return (b"U" + bytes([len(b)]) + b if len(b) < 256
                else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    rows, cols = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85"
             + string(b"b") + b"\x87R("
             + integer(1) + integer(rows) + integer(cols) + b"\x86"
             + b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R("
             + integer(3) + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
             + integer(0) + b"tb"
             + b"\x89" + string(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + string(b"batch_label") + string(b"training batch")
            + string(b"labels") + b"](" + b"".join(integer(int(v)) for v in labels) + b"e"
            + string(b"filenames") + b"](" + string(b"a.png") + b"e"
            + string(b"data") + array + b"u.")


def write_python_batches(folder: Path, batches: dict, protocol) -> None:
    """The CIFAR-10 python version: one pickled dict per batch."""
    folder.mkdir()
    for name, (images, labels) in batches.items():
        if protocol == "py2":
            raw = py2_pickle(planar(images), labels)
        else:
            raw = pickle.dumps({b"batch_label": b"batch", b"labels": [int(v) for v in labels],
                                b"data": planar(images), b"filenames": [b"a.png"]},
                               protocol=protocol)
        (folder / name).write_bytes(raw)


def write_binary_batches(folder: Path, batches: dict) -> None:
    """The CIFAR-10 binary version: records of 1 label byte and 3072 planar pixel bytes."""
    folder.mkdir()
    for name, (images, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], planar(images)], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())


def check_loaded(loaded: tuple[dict, dict], batches: dict) -> None:
    """The train split is the five batches in order, the test split the test batch."""
    train, test = loaded
    parts = [batches[name] for name in PYTHON_BATCHES[:5]]
    np.testing.assert_array_equal(train["image"], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(train["label"], np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(test["image"], batches["test_batch"][0])
    np.testing.assert_array_equal(test["label"], batches["test_batch"][1])
    assert train["image"].dtype == np.uint8 and train["image"].shape[1:] == (32, 32, 3)
    assert np.issubdtype(train["label"].dtype, np.integer)


@pytest.fixture
def batches():
    return {name: fake_cifar(3 + i, seed=i) for i, name in enumerate(PYTHON_BATCHES)}


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar_python_batches_load_what_was_written(tmp_path, batches, protocol):
    write_python_batches(tmp_path / "cifar-10-batches-py", batches, protocol)
    check_loaded(load_cifar(str(tmp_path / "cifar-10-batches-py")), batches)


def test_cifar_binary_batches_load_what_was_written(tmp_path, batches):
    write_binary_batches(tmp_path / "cifar-10-batches-bin", batches)
    (tmp_path / "cifar-10-batches-bin" / "batches.meta.txt").write_text("airplane\n")
    check_loaded(load_cifar(str(tmp_path / "cifar-10-batches-bin")), batches)


class WritesAMarker:
    """A pickle that, when loaded by plain `pickle`, runs code (writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["whole_file", "inside_the_dict"])
def test_a_crafted_cifar_pickle_runs_nothing_and_is_refused(tmp_path, batches, where):
    folder = tmp_path / "cifar-10-batches-py"
    write_python_batches(folder, batches, 4)
    marker = tmp_path / "marker"
    payload = (WritesAMarker(marker) if where == "whole_file"
               else {b"data": planar(batches["data_batch_1"][0]),
                     b"labels": [WritesAMarker(marker)]})
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR-10 batch") as error:
        load_cifar(str(folder))
    assert not marker.exists()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage,fragment", [
    ("missing", "lacks data_batch_3"),
    ("truncated", "data_batch_3 is not a CIFAR-10 batch"),
    ("a_list", "data_batch_3 is not a CIFAR-10 batch"),
    ("short_rows", "data_batch_3 is not a CIFAR-10 batch"),
    ("object_array", "data_batch_3 is not a CIFAR-10 batch"),
])
def test_a_damaged_python_batch_is_one_line(tmp_path, batches, damage, fragment):
    folder = tmp_path / "py"
    write_python_batches(folder, batches, 4)
    path = folder / "data_batch_3"
    images, labels = batches["data_batch_3"]
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "a_list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "short_rows":
        path.write_bytes(pickle.dumps({b"data": planar(images)[:, :100],
                                       b"labels": list(labels)}))
    else:
        path.write_bytes(pickle.dumps({b"data": planar(images).astype(object),
                                       b"labels": [int(v) for v in labels]}))
    with pytest.raises(UserError, match=fragment) as error:
        load_cifar(str(folder))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage,fragment", [
    ("missing", "lacks test_batch.bin"),
    ("cut", "test_batch.bin is not a CIFAR-10 binary batch"),
    ("empty", "test_batch.bin is not a CIFAR-10 binary batch"),
])
def test_a_damaged_binary_batch_is_one_line(tmp_path, batches, damage, fragment):
    folder = tmp_path / "bin"
    write_binary_batches(folder, batches)
    path = folder / "test_batch.bin"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:3073 + 5] if damage == "cut" else b"")
    with pytest.raises(UserError, match=fragment):
        load_cifar(str(folder))


def test_a_folder_of_neither_format_names_both(tmp_path):
    with pytest.raises(UserError, match="python batches.*binary batches"):
        load_cifar(str(tmp_path))


# --- plot ---------------------------------------------------------------------------------

def write_metrics(workdir: Path, lines: list[str], newline_at_end: bool = True) -> Path:
    """A workdir whose metrics.jsonl holds `lines` as they are."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if newline_at_end else "")
    (workdir / "metrics.jsonl").write_text(text)
    return workdir


def point(step: int, **values) -> str:
    return json.dumps({"step": step, "split": "train", "loss": 1.0 / step, **values})


def plotted(capsys, workdir: Path) -> list[Path]:
    """Plot `workdir`, expecting success; the paths it printed."""
    assert plot_main([str(workdir)]) == 0, capsys.readouterr().err
    return [Path(line) for line in capsys.readouterr().out.splitlines()]


def test_plot_keeps_every_file_inside_the_plots_folder(tmp_path, capsys):
    workdir = write_metrics(tmp_path / "deep" / "er" / "run", [
        point(1, **{"../../../x": 1.0, "top/1": 0.5, "top_1": 0.25, ".": 1, "..": 2, "": 3,
                    MATH: 4}),
        point(2, **{"../../../x": 2.0, "top/1": 0.6, "top_1": 0.35, ".": 1.5, "..": 2.5,
                    "": 3.5, MATH: 5})])  # each changes: a flat metric gets no picture
    written = plotted(capsys, workdir)
    plots = (workdir / "plots").resolve()
    assert len(written) == 8 and len({p.name for p in written}) == 8  # none overwrote another
    for path in written:
        assert path.resolve().parent == plots, path
        assert path.name not in (".png", "..png") and path.read_bytes()[:8] == PNG
    assert not (tmp_path / "deep" / "x.png").exists()
    names = {p.name for p in written}
    assert {"loss.png", "top_1.png", "top_1-2.png", "___.._.._x.png", "__.png"} <= names
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(names)


def test_plot_does_not_write_through_a_link(tmp_path, capsys):
    workdir = write_metrics(tmp_path / "run", [point(1), point(2)])
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep")
    (workdir / "plots").mkdir()
    (workdir / "plots" / "loss.png").symlink_to(outside)
    [path] = plotted(capsys, workdir)
    assert outside.read_bytes() == b"keep"
    assert not path.is_symlink() and path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("plots", ["file", "link_outside"])
def test_plot_refuses_a_plots_that_is_not_a_folder_of_the_workdir(tmp_path, capsys, plots):
    workdir = write_metrics(tmp_path / "run", [point(1), point(2)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if plots == "file":
        (workdir / "plots").write_text("not a folder")
    else:
        (workdir / "plots").symlink_to(elsewhere)
    assert plot_main([str(workdir)]) == 2
    assert f"{workdir / 'plots'}" in one_error_line(capsys)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("bad,fragment", [
    ('{"split": "train", "loss": 1.0}', "line 2"),
    ("[1, 2, 3]", "line 2"),
    ('{"step": "2", "loss": 1.0}', "line 2"),
    ('{"step": 2.5, "loss": 1.0}', "line 2"),
    ('{"step": 2, "split": ["train"], "loss": 1.0}', "line 2"),
    ('{"step": 2, "loss"', "line 2"),  # cut short, but not the last line
])
def test_plot_refuses_a_damaged_record_naming_its_line(tmp_path, capsys, bad, fragment):
    workdir = write_metrics(tmp_path / "run", [point(1), bad, point(3)])
    assert plot_main([str(workdir)]) == 2
    line = one_error_line(capsys)
    assert str(workdir / "metrics.jsonl") in line and fragment in line
    assert not (workdir / "plots").exists()


@pytest.mark.parametrize("last", ['{"step": 3, "loss": 0.', '{"step": 3, "lo', '{'])
def test_plot_tolerates_a_last_line_cut_short(tmp_path, capsys, last):
    workdir = write_metrics(tmp_path / "run", [point(1), point(2), last], newline_at_end=False)
    assert [p.name for p in plotted(capsys, workdir)] == ["loss.png"]


def test_plot_refuses_a_last_line_that_is_whole_but_not_a_point(tmp_path, capsys):
    workdir = write_metrics(tmp_path / "run", [point(1), point(2), '{"loss": 1.0}'])
    assert plot_main([str(workdir)]) == 2
    assert "line 3" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["binary", "folder"])
def test_plot_refuses_a_metrics_file_that_is_not_one(tmp_path, capsys, kind):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "binary":
        (workdir / "metrics.jsonl").write_bytes(PNG + bytes(range(256)) * 4)
    else:
        (workdir / "metrics.jsonl").mkdir()
    assert plot_main([str(workdir)]) == 2
    line = one_error_line(capsys)
    assert str(workdir / "metrics.jsonl") in line
    assert ("not text" if kind == "binary" else "is a folder") in line


# --- explain ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("explain") / "digits"
    train_into(workdir, "digits_mlp", "train.steps=5", "train.eval_every=0")
    return workdir


@pytest.mark.parametrize("target", ["99", "10", "-1"])
def test_explain_refuses_a_class_the_model_does_not_have(digits_workdir, capsys, target):
    assert explain_main([str(digits_workdir), "--examples", "8", "--method", "saliency",
                         "--target", target]) == 2
    line = one_error_line(capsys)
    assert f"--target {target}" in line and "0 to 9" in line
    assert not (digits_workdir / "explain" / "attributions.npz").exists()


def test_explain_explains_a_class_in_range(digits_workdir, capsys):
    assert explain_main([str(digits_workdir), "--examples", "8", "--method", "saliency",
                         "--target", "9"]) == 0, capsys.readouterr().err
    saved = np.load(digits_workdir / "explain" / "attributions.npz")
    np.testing.assert_array_equal(saved["targets"], np.full(8, 9))


def test_a_class_number_for_a_regressor_is_refused():
    experiment, config = load("linear_regression", ["train.steps=2"])
    params = fit(experiment, config, stream=None).params
    rows = {name: values[:8] for name, values in linear_regression.load_data().items()}
    with pytest.raises(UserError, match="regressor"):
        explain(experiment.explain, params, None, rows, make_backend("pmap"),
                Method("saliency"), target=3)


def write_baseline(path: Path, kind: str) -> Path:
    """A --baseline file that is not a features-shaped array."""
    if kind == "pickled":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("0 0 0 0\n")
    elif kind == "npz":
        with path.open("wb") as f:
            np.savez(f, a=np.zeros((8, 8)))
    elif kind == "shape":
        np.save(path, np.zeros((8, 8, 2), np.float32))
    elif kind == "batch":
        np.save(path, np.zeros((8, 8, 8), np.float32))  # a batch, not one example
    elif kind == "strings":
        np.save(path, np.full((8, 8), "a"))
    else:
        np.save(path, np.full((8, 8), np.nan, np.float32))
    return path


@pytest.mark.parametrize("kind,fragment", [
    ("pickled", "pickled Python objects"),
    ("text", "not a .npy array"),
    ("npz", "not a .npy array"),
    ("shape", "shape (8, 8, 2)"),
    ("batch", "shape (8, 8, 8)"),
    ("strings", "dtype <U1"),
    ("nan", "not finite"),
])
def test_explain_refuses_a_baseline_that_is_not_one_examples_features(
        digits_workdir, tmp_path, capsys, kind, fragment):
    path = write_baseline(tmp_path / "baseline.npy", kind)
    assert explain_main([str(digits_workdir), "--examples", "8", "--baseline", str(path),
                         "--steps", "4"]) == 2
    line = one_error_line(capsys)
    assert f"--baseline {path}" in line and fragment in line
    assert "(8, 8)" in line  # the shape it should have


def test_a_baseline_that_broadcasts_equals_the_full_one(digits_workdir, tmp_path, capsys):
    runs = []
    for name, value in [("scalar", np.float32(0.5)), ("row", np.full(8, 0.5, np.float32)),
                        ("full", np.full((8, 8), 0.5, np.float32))]:
        path = tmp_path / f"{name}.npy"
        np.save(path, value)
        assert explain_main([str(digits_workdir), "--examples", "8", "--baseline", str(path),
                             "--steps", "4"]) == 0, capsys.readouterr().err
        runs.append(dict(np.load(digits_workdir / "explain" / "attributions.npz")))
    for other in runs[1:]:
        np.testing.assert_array_equal(other["attributions"], runs[0]["attributions"])
    # the baseline did reach the model: f(0.5 everywhere) is not f(zeros)
    capsys.readouterr()
    assert explain_main([str(digits_workdir), "--examples", "8", "--steps", "4"]) == 0
    zeros = np.load(digits_workdir / "explain" / "attributions.npz")
    assert not np.allclose(zeros["baseline_scores"], runs[0]["baseline_scores"])


@pytest.mark.parametrize("args,fragment", [
    (["--noise", "inf", "--method", "smoothgrad"], "noise"),
    (["--noise", "nan", "--method", "smoothgrad"], "noise"),
    (["--noise", "-0.1", "--method", "smoothgrad"], "noise"),
    (["--steps", "0"], "steps"),
    (["--steps", "nan"], "--steps"),
    (["--samples", "0", "--method", "smoothgrad"], "samples"),
    (["--samples", "inf", "--method", "smoothgrad"], "--samples"),
    (["--examples", "0"], "--examples"),
    (["--examples", "inf"], "--examples"),
    (["--target", "²"], "--target"),
])
def test_explain_refuses_numbers_that_make_no_sense(tmp_path, capsys, args, fragment):
    # refused before the workdir is read: it does not even exist
    assert explain_main([str(tmp_path / "absent"), *args]) == 2
    assert fragment in one_error_line(capsys)


# --- scaling -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "inf"], "--epochs inf"),
    (["--epochs", "1e400"], "--epochs inf"),
    (["--epochs", "nan"], "--epochs nan"),
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", "-2"], "--epochs -2"),
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--steps", "1e400"], "--steps"),
    (["--steps", "nan"], "--steps"),
    (["--steps", str(2**31)], f"--steps {2**31}"),
    (["--steps", "9" * 400], "--steps 999"),
    (["--target-efficiency", "nan"], "--target-efficiency"),
    (["--target-efficiency", "inf"], "--target-efficiency"),
    (["--max-devices", "0"], "--max-devices 0"),
    (["--devices-per-host", "-1"], "--devices-per-host -1"),
    (["--rounds", "0"], "--rounds 0"),
    (["--window-steps", "-1"], "--window-steps -1"),
    (["--per-device-batch", "0"], "--per-device-batch 0"),
    (["--global-batch", "-8"], "--global-batch -8"),
    (["--cpu-devices", "0"], "--cpu-devices 0"),
])
def test_scaling_refuses_numbers_that_make_no_sense(tmp_path, capsys, args, fragment):
    workdir = tmp_path / "w"
    assert scaling_main(["digits_mlp", "--devices", "1,2", "--rounds", "1", "--window-steps",
                         "1", "--workdir", str(workdir), "model.width=16", "model.depth=1",
                         *args]) == 2
    assert fragment in one_error_line(capsys)
    assert not (workdir / "scaling.json").exists()


def test_scaling_refuses_a_goal_beyond_the_step_counter(tmp_path, capsys):
    assert scaling_main(["digits_mlp", "--epochs", "1e300", "--devices", "1,2", "--rounds",
                         "1", "--window-steps", "1", "--workdir", str(tmp_path / "w"),
                         "model.width=16", "model.depth=1"]) == 2
    assert "--epochs 1e+300" in one_error_line(capsys)
    assert not (tmp_path / "w" / "scaling.json").exists()


def test_commands_refuse_in_one_line_from_a_process_too(tmp_path):
    workdir = write_metrics(tmp_path / "run", [point(1), "[1]", point(3)])
    result = subprocess.run([sys.executable, "-m", "jaxdist.plot", str(workdir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
