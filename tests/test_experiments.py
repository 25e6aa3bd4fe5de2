"""Every experiment: a one-page module with its command, runtime and result, whose tiny
config trains for a few steps on 8 fake devices with a falling loss."""

import pytest

from jaxdist import fit
from jaxdist.loop.discovery import list_experiments, load_experiment

pytestmark = pytest.mark.slow  # starts processes or trains end to end

EXPERIMENTS = sorted(list_experiments())


def test_the_promised_experiments_are_there():
    for name in ["linear_regression", "digits_cnn", "digits_nnx", "digits_equinox",
                 "digits_mlp", "digits_imbalanced", "cifar_resnet", "gpt_lm"]:
        assert name in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_docstring_gives_command_runtime_and_result(name):
    doc = load_experiment(name).__doc__
    for field in ("Command:", "Runtime:", "Result:"):
        assert field in doc, f"{name} docstring lacks {field}"
    assert f"python -m jaxdist.run {name}" in doc


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_tiny_config_trains_and_the_loss_falls(name):
    module = load_experiment(name)
    config = module.tiny_config()
    result = fit(module.build(config), config, stream=None)
    train = [r for r in result.records if r["split"] == "train"]
    assert len(train) >= 2 and result.backend.num_devices == 8
    assert train[-1]["loss"] < train[0]["loss"], train
    assert all(r["nonfinite_steps"] == 0 for r in train)
    if name.startswith("digits"):  # smoothed train loss: the plain cross-entropy beside it
        assert all(0 < r["cross_entropy"] != r["loss"] for r in train)
        assert "cross_entropy" not in result.last("eval")  # whose loss is the plain one


def test_cifar_reads_the_python_batches_and_npz(tmp_path):
    import pickle

    import numpy as np

    from experiments.cifar_resnet import load_cifar
    from jaxdist.base.errors import UserError

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    planes = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3 * 32 * 32), dtype=np.uint8)
        planes[name] = data
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(4))}, f)
    train, test = load_cifar(str(folder))
    assert train["image"].shape == (20, 32, 32, 3) and test["image"].shape == (4, 32, 32, 3)
    # channel-planar rows become height x width x channel images
    first = planes["data_batch_1"][0]
    assert train["image"][0, 0, 1, 2] == first[2 * 1024 + 1]
    np.testing.assert_array_equal(test["label"], [0, 1, 2, 3])
    np.savez(tmp_path / "small.npz", x_train=train["image"], y_train=train["label"],
             x_test=test["image"], y_test=test["label"])
    again, _ = load_cifar(str(tmp_path / "small.npz"))
    np.testing.assert_array_equal(again["image"], train["image"])
    with pytest.raises(UserError, match="CIFAR-10 python batches"):
        load_cifar(str(tmp_path))


@pytest.mark.parametrize("without_files", [False, True])
def test_the_bundled_data_sets_are_scikit_learns_bits(monkeypatch, without_files):
    import numpy as np
    from sklearn.datasets import load_diabetes, load_digits

    import experiments._sklearn_files as files

    if without_files:  # a release that keeps its files elsewhere: its own loaders
        monkeypatch.setattr(files, "_data_file", lambda name: None)
    pairs = [(files.load_diabetes_rows(), load_diabetes(return_X_y=True, scaled=False)),
             (files.load_digits_rows(), load_digits(return_X_y=True))]
    for ours, theirs in pairs:
        for a, b in zip(ours, theirs, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    assert files.DIABETES_FEATURES == tuple(load_diabetes().feature_names)


def test_the_bundled_experiments_load_without_importing_scikit_learn():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, experiments.linear_regression, experiments.digits_cnn\n"
            "print('sklearn' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"

