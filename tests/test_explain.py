"""Attributions against independent references: completeness, a linear model's closed form,
SHAP where it is installed, and the same numbers on any device count or backend."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import linear_regression
from jaxdist import fit, load, make_backend
from jaxdist.explain import Method, explain, mean_features
from tests.toy import train_into

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    experiment, config = load("digits_cnn", ["train.steps=30", "train.batch_size=64",
                                             "train.eval_every=0", "optimizer.warmup_steps=0"])
    params = fit(experiment, config, stream=None).params
    return experiment, params, experiment.eval_data.get_batch(np.arange(24))


@pytest.fixture(scope="module")
def linear():
    experiment, config = load("linear_regression", ["train.steps=200"])
    params = fit(experiment, config, stream=None).params
    return experiment, params, linear_regression.load_data()


@pytest.mark.parametrize("rule", ["riemann", "gauss"])
def test_integrated_gradients_add_up_to_the_change_of_the_output(digits, rule):
    experiment, params, rows = digits
    result = explain(experiment.explain, params, None, rows, make_backend("shard_map"),
                     Method("ig", steps=128, rule=rule))
    totals = result.attributions.reshape(len(rows["label"]), -1).sum(axis=1)
    change = result.scores - result.baseline_scores
    assert np.all(np.abs(change) > 0.1)  # the output does move between baseline and input
    np.testing.assert_allclose(totals, change, rtol=0.01)


def test_a_linear_models_attributions_are_its_closed_form(linear):
    experiment, params, data = linear
    rows = {name: values[:40] for name, values in data.items()}
    w, x = np.asarray(params["w"], np.float64), rows["x"].astype(np.float64)
    backend = make_backend("pmap")
    saliency = explain(experiment.explain, params, None, rows, backend, Method("saliency"))
    np.testing.assert_array_equal(saliency.attributions, np.broadcast_to(params["w"], x.shape))
    product = explain(experiment.explain, params, None, rows, backend, Method("grad_x_input"))
    np.testing.assert_array_equal(product.attributions, params["w"] * rows["x"])
    mean = mean_features(experiment.explain, params, data)
    np.testing.assert_allclose(mean, data["x"].astype(np.float64).mean(axis=0), atol=1e-6)
    ig = explain(experiment.explain, params, None, rows, backend, Method("ig", steps=8),
                 baseline=mean)
    np.testing.assert_allclose(ig.attributions, w * (x - mean), rtol=1e-5, atol=1e-4)


def test_a_linear_models_integrated_gradients_equal_its_shap_values(linear):
    shap = pytest.importorskip("shap")  # optional: not a dependency
    experiment, params, data = linear
    rows = {name: values[:40] for name, values in data.items()}
    mean = mean_features(experiment.explain, params, data)
    ig = explain(experiment.explain, params, None, rows, make_backend("shard_map"),
                 Method("ig", steps=8), baseline=mean)
    model = (np.asarray(params["w"], np.float64), float(params["b"]))
    background = data["x"].astype(np.float64)  # all of it: shap samples 100 rows by default
    explainer = shap.LinearExplainer(model, shap.maskers.Independent(background,
                                                                     max_samples=442))
    np.testing.assert_allclose(ig.attributions, explainer.shap_values(rows["x"]), rtol=1e-4,
                               atol=1e-3)


@pytest.mark.parametrize("method", [Method("ig", steps=16), Method("smoothgrad", samples=4),
                                    Method("smoothgrad", base="ig", steps=4, samples=3)],
                         ids=["ig", "smoothgrad", "smoothgrad_of_ig"])
def test_one_device_eight_devices_pmap_and_shard_map_agree(digits, method):
    experiment, params, rows = digits
    runs = [explain(experiment.explain, params, None, rows, make_backend(name, count), method)
            for name, count in (("pmap", 1), ("pmap", 8), ("shard_map", 8), ("shard_map", 3))]
    for other in runs[1:]:
        np.testing.assert_allclose(other.attributions, runs[0].attributions, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_array_equal(other.predictions, runs[0].predictions)


def explain_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxdist.explain", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_command_writes_attributions_and_a_picture(tmp_path):
    workdir = tmp_path / "digits"
    train_into(workdir, "digits_cnn", "train.steps=20", "train.eval_every=0",
               "train.batch_size=64")
    result = explain_cli(workdir, "--examples", 12, "--method", "ig", "--steps", 16)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = np.load(workdir / "explain" / "attributions.npz")
    assert saved["inputs"].shape == saved["attributions"].shape == (12, 8, 8)
    assert saved["labels"].shape == saved["predictions"].shape == (12,)
    settings = json.loads(str(saved["method"]))
    assert settings["name"] == "ig" and settings["steps"] == 16 and settings["step"] == 20
    np.testing.assert_allclose(saved["attributions"].reshape(12, -1).sum(axis=1),
                               saved["scores"] - saved["baseline_scores"], rtol=0.05)
    png = (workdir / "explain" / "attributions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    # The first case from a started process; the others through the command's own function
    # in this process (its return value is the exit status): no interpreter and jax import each.
    from jaxdist.explain.__main__ import main

    workdir = tmp_path / "run"
    train_into(workdir, "linear_regression", "train.steps=5")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "config.json").write_text((workdir / "config.json").read_text())
    opaque = tmp_path / "opaque"
    train_into(opaque, ROOT / "tests" / "id_experiment.py")
    for args, fragment in [
        ((nothing,), "holds no checkpoint yet"),
        ((tmp_path / "absent",), "holds no config.json"),
        ((workdir, "--method", "lime"), "method 'lime' is unknown"),
        ((workdir, "--examples", 500), "the eval split has 442 examples"),
        ((opaque, "--trust-workdir"), "does not say what its input is"),
        ((opaque,), "does not run code that a workdir names"),
    ]:
        if fragment == "holds no checkpoint yet":
            result = explain_cli(*args)
            status, stderr = result.returncode, result.stderr
        else:
            status, stderr = main([str(arg) for arg in args]), capsys.readouterr().err
        assert status == 2, (args, stderr[-2000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, stderr[-2000:])
