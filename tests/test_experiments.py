"""Every experiment: a one-page module with its command, runtime and result, whose tiny
config trains for a few steps on 8 fake devices with a falling loss."""

import pytest

from jaxdist import fit
from jaxdist.discovery import list_experiments, load_experiment

EXPERIMENTS = sorted(list_experiments())


def test_the_promised_experiments_are_there():
    for name in ["linear_regression", "digits_cnn", "digits_mlp", "digits_imbalanced",
                 "cifar_resnet", "gpt_lm"]:
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
