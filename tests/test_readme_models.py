"""The README's one small model in linen, NNX, equinox and plain functions: each snippet,
as printed, builds an experiment that trains, and all four are the same model."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdist import Config, OptimizerConfig, TrainConfig, fit

pytestmark = pytest.mark.slow  # trains end to end

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTION = README.split("### Your model in linen, NNX, equinox or plain functions")[1].split(
    "\n## ")[0]
SHARED, *MODELS = re.findall(r"```python\n(.*?)```", SECTION, re.DOTALL)
FORMS = ["linen", "nnx", "equinox", "plain"]


def test_the_section_holds_the_shared_part_and_four_models():
    assert len(MODELS) == 4
    for form, code, marker in zip(FORMS, MODELS, ["flax.linen", "from_nnx", "from_equinox",
                                                  "def init_params"], strict=True):
        assert marker in code, form


@pytest.mark.parametrize("form", FORMS)
def test_each_snippet_trains_the_same_model(form):
    namespace = {}
    exec(SHARED + MODELS[FORMS.index(form)], namespace)  # noqa: S102 (the README's own code)
    experiment = namespace["experiment"]
    shapes = jax.eval_shape(experiment.init_params, jax.random.key(0))
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert parameters == 64 * 32 + 32 + 32 * 10 + 10
    config = Config(train=TrainConfig(steps=150, batch_size=128, log_every=50, eval_every=0),
                    optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
    result = fit(experiment, config, stream=None)
    assert result.last("eval")["accuracy"] >= 0.85, result.last("eval")
