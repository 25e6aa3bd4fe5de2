"""What is refused before the first step: params that are not arrays, a model state that
changes shape, a loss that closes over a module. Each is one line naming the fix."""

import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdist import Experiment, fit, from_equinox, from_nnx
from jaxdist.base.errors import UserError
from jaxdist.step.leaves import check_params, closed_over_module
from tests.toy import toy_config

ROOT = Path(__file__).resolve().parent.parent
DATA = {"x": np.linspace(-1, 1, 96, dtype=np.float32).reshape(32, 3),
        "y": np.linspace(0, 1, 32, dtype=np.float32)}


def squared_error(predictions, batch):
    return (predictions - batch["y"]) ** 2, {}


def test_an_nnx_module_as_params_names_from_nnx():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match=r"NNX Linear at \(the root\).*jaxdist\.from_nnx"):
        check_params(model)
    with pytest.raises(UserError, match=r"NNX Param at \['kernel'\].*jaxdist\.from_nnx"):
        check_params({"kernel": model.kernel})


def test_an_equinox_module_with_static_fields_names_the_leaf_and_from_equinox():
    mlp = eqx.nn.MLP(3, 1, 8, 1, key=jax.random.key(0))
    with pytest.raises(UserError) as refused:
        check_params(mlp)
    message = str(refused.value)
    assert "\n" not in message and "jaxdist.from_equinox" in message
    # The first leaf that is not an array: MLP's activation function.
    assert ".activation" in message, message


def test_a_python_number_or_an_integer_array_is_named_by_its_path():
    with pytest.raises(UserError, match=r"a float at \['b'\], not an array"):
        check_params({"w": jnp.zeros(3), "b": 0.0})
    with pytest.raises(UserError, match=r"int32 array at \['count'\].*init_model_state"):
        check_params({"w": jnp.zeros(3), "count": jnp.zeros((), jnp.int32)})
    check_params({"w": jnp.zeros(3), "b": np.float32(0.0)})  # a numpy scalar is an array


class Growing(nnx.Module):
    """A linear model that adds a variable as it runs: one that appears in the step."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 1, rngs=rngs)
        self.count = nnx.BatchStat(jnp.zeros(()))

    def __call__(self, x):
        y = self.linear(x)[:, 0]
        self.count[...] = self.count[...] + 1
        if not hasattr(self, "last"):
            self.last = nnx.BatchStat(y.mean())
        return y


def test_a_model_state_that_grows_in_the_step_is_refused_naming_the_entry():
    experiment = from_nnx(Growing, lambda model, batch: squared_error(model(batch["x"]), batch),
                          train_data=DATA)
    with pytest.raises(UserError, match=r"not shaped as init_model_state made it: "
                                        r"\['last'\] appeared"):
        fit(experiment, toy_config(steps=2, batch_size=16), stream=None)


def test_a_loss_that_closes_over_an_nnx_module_is_refused_naming_it():
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def loss_fn(params, batch, rng):  # uses `model`, not the params it is given
        return squared_error(model(batch["x"])[:, 0], batch)

    experiment = Experiment(init_params=lambda rng: params, loss_fn=loss_fn, train_data=DATA)
    with pytest.raises(UserError, match=r"loss_fn closes over 'model', an NNX module.*"
                                        r"jaxdist\.from_nnx"):
        fit(experiment, toy_config(steps=2, batch_size=16), stream=None)


def test_a_loss_that_closes_over_an_equinox_module_is_found_through_a_helper():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))

    def predict(x):
        return jax.vmap(model)(x)[:, 0]

    def loss_fn(params, batch, rng):
        return squared_error(predict(batch["x"]), batch)

    assert closed_over_module(loss_fn) == ("model", "equinox")
    # The adapters' own losses close over no module with arrays.
    for experiment in (from_nnx(lambda rngs: nnx.Linear(3, 1, rngs=rngs),
                                lambda m, b: squared_error(m(b["x"])[:, 0], b),
                                train_data=DATA),
                       from_equinox(lambda key: eqx.nn.Linear(3, 1, key=key),
                                    lambda m, b, key: squared_error(jax.vmap(m)(b["x"])[:, 0],
                                                                    b), train_data=DATA)):
        assert closed_over_module(experiment.loss_fn) is None


@pytest.mark.slow  # starts a process
def test_the_command_refuses_a_module_as_params_with_one_line_and_exit_2(tmp_path):
    script = ("import sys\nfrom jaxdist.run import main\n"
              "for i, name in enumerate(sys.argv[2:]):\n"
              "    print(name, main([name, '--workdir', f'{sys.argv[1]}/{i}']), flush=True)\n")
    files = [str(ROOT / "tests" / f"{library}_module_as_params.py")
             for library in ("nnx", "equinox")]
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), *files], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [files[0], "2", files[1], "2"], result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr[-2000:]
    assert lines[0].startswith("error: init_params returned an NNX Linear at (the root)")
    assert "jaxdist.from_nnx" in lines[0]
    assert lines[1].startswith("error: init_params returned a ") and ".activation" in lines[1]
    assert "jaxdist.from_equinox" in lines[1]
