"""python -m jaxdist.scaling: what it times, its plan's checks, and the command itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jaxdist
from jaxdist.base.errors import UserError
from jaxdist.loop.compiled import collectives
from jaxdist.parallel.backend import AXIS
from jaxdist.scaling.measure import ComputeOnly, allreduce_program, run_in_rounds, step_programs
from jaxdist.scaling.study import make_plan
from jaxdist.step.steps import TrainState, make_train_step
from tests.toy import make_data, mlp_experiment

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
SMALL_MLP = ["model.width=16", "model.depth=1"]


def run_scaling(*args, timeout=240):
    env = dict(os.environ)  # conftest has set the 8 fake CPU devices
    return subprocess.run([sys.executable, "-m", "jaxdist.scaling", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_allreduce_benchmark_carries_the_gradient_bytes():
    experiment, _ = jaxdist.load("digits_mlp", SMALL_MLP)
    params = experiment.init_params(jax.random.key(0))
    count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(params))
    program, nbytes = allreduce_program(params, jax.devices()[:4])
    assert nbytes == 4 * count
    # ... and the compiled program all-reduces exactly that: float32, one element per param
    reduced = [i for i in collectives(program.compiled.as_text()) if "all-reduce" in i.op]
    assert sum(i.elements for i in reduced) == count
    assert {dtype for i in reduced for dtype, _ in i.arrays} == {"f32"}
    assert program.run(2) > 0 and program.compile_seconds > 0


def test_the_compute_program_is_the_step_without_its_collectives():
    experiment, config = jaxdist.load("digits_mlp", SMALL_MLP)
    programs, _ = step_programs(experiment, config, 2, 32)
    assert collectives(programs["step"].compiled.as_text())
    assert not collectives(programs["compute"].compiled.as_text())
    assert programs["step"].run(2) > 0 and programs["compute"].run(2) > 0


def test_without_the_reduction_each_device_steps_on_its_own_rows():
    # Device 1's update under ComputeOnly (no reduction) is a 1-device step on its rows.
    data = make_data(n=32)
    experiment, tx = mlp_experiment(data), optax.sgd(0.1)
    state = TrainState.create(experiment.init_params(jax.random.key(0)), tx,
                              jax.random.key(1))
    batch = {"x": data["x"][:16], "y": data["y"][:16], "weight": np.ones(16, np.float32)}

    def mapped(reduce, devices, state, batch):
        step = make_train_step(experiment.loss_fn, tx, None if reduce else ComputeOnly())
        n = len(devices)
        stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), state)
        split = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)
        return jax.pmap(step, axis_name=AXIS, devices=devices)(stacked, split)

    local_state, local_sums = mapped(False, jax.devices()[:2], state, batch)
    second = jax.tree.map(lambda x: x[8:], batch)
    alone_state, alone_sums = mapped(True, jax.devices()[:1], state, second)
    for a, b in zip(jax.tree.leaves(local_state.params), jax.tree.leaves(alone_state.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[0])
    assert float(local_sums["weight"][1]) == 8.0
    assert float(local_sums["loss"][0]) != float(local_sums["loss"][1])
    # With the reduction (the default) every device holds the same result.
    shared_state, _ = mapped(True, jax.devices()[:2], state, batch)
    for leaf in jax.tree.leaves(shared_state.params):
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])


def test_rounds_run_every_program_once_per_round_in_shuffled_orders():
    calls = []
    runners = {name: (lambda steps, name=name: calls.append((name, steps)) or 1.0)
               for name in "abcd"}
    seconds = run_in_rounds(runners, rounds=6, steps=8)
    assert all(values == [1.0] * 6 for values in seconds.values())
    warmup, timed = calls[:4], calls[4:]
    assert sorted(warmup) == [(name, 2) for name in "abcd"]
    orders = {tuple(name for name, _ in timed[i:i + 4]) for i in range(0, 24, 4)}
    assert all(sorted(order) == list("abcd") for order in orders) and len(orders) > 1


def test_plan_defaults_and_refusals():
    _, config = jaxdist.load("digits_cnn")
    plan = make_plan(config, 898, [8, 1, 4, 2], None, None, None, 3, 5, 8, "cpu")
    assert plan.counts == (1, 2, 4, 8) and plan.fit_counts == (1, 2, 4)
    assert (plan.global_batch, plan.per_device_batch) == (128, 16)
    assert plan.batch("weak", 4) == 16 and plan.batch("strong", 4) == 32
    # 1, 2, 4: holding 4 out would leave one count to fit the all-reduce to
    assert make_plan(config, 898, [1, 2, 4], None, None, None, 3, 5, 8, "cpu").fit_counts == (
        1, 2, 4)
    refusals = [
        (([1, 2, 16], None, None, None), "only 8 cpu device(s)"),
        (([1], None, None, None), "two counts or more"),
        (([1, 2, 4], [1, 8], None, None), "must be among --devices"),
        (([1, 2, 3], None, None, 128), "multiple of 6"),
        (([1, 2], None, 1000, None), "more than the 898 training examples"),
    ]
    for (counts, fit, per_device, global_batch), fragment in refusals:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            make_plan(config, 898, counts, fit, per_device, global_batch, 3, 5, 8, "cpu")


@pytest.mark.parametrize("args,fragment", [
    (["--devices", "1,2,16"], "only 8 cpu device(s) are available"),
    (["--interconnect", "warp-drive"], "--interconnect warp-drive is not a known interconnect"),
    (["--target-efficiency", "1.5"], "must be in (0, 1]"),
    (["--target-efficiency", "0"], "must be in (0, 1]"),
    (["--devices", "1,x"], "not a list of device counts"),
    (["--devices-per-host", "4", "--inter-host", "smoke"], "--inter-host smoke is not a known"),
])
def test_bad_input_exits_2_with_one_line(args, fragment, tmp_path, capsys):
    # The device count from a started process (it reads the workdir and the devices); the
    # others, refused while the arguments are read, through the command's own function in
    # this process (its return value is the exit status).
    from jaxdist.scaling.__main__ import main

    argv = ["digits_mlp", *args, "--workdir", str(tmp_path / "w")]
    if fragment.startswith("only 8 cpu"):
        result = run_scaling(*argv, timeout=120)
        status, stderr = result.returncode, result.stderr
    else:
        status, stderr = main(argv), capsys.readouterr().err
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert not (tmp_path / "w" / "scaling.json").exists()


def test_the_command_measures_fits_predicts_and_writes(tmp_path):
    workdir = tmp_path / "study"
    result = run_scaling("digits_mlp", *SMALL_MLP, "train.batch_size=32", "--devices", "1,2",
                         "--rounds", "2", "--window-steps", "3", "--interconnect", "pcie5",
                         "--devices-per-host", "4", "--max-devices", "16", "--epochs", "2",
                         "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "scaling.json").read_text())
    assert (workdir / "scaling.png").stat().st_size > 10_000
    assert report["gradient_bytes"] == 4 * report["parameters"]
    assert report["plan"]["counts"] == [1, 2] and report["plan"]["global_batch"] == 32
    assert {(m["mode"], m["devices"]) for m in report["measured"]} == {
        ("weak", 1), ("weak", 2), ("strong", 1), ("strong", 2)}
    assert all(m["step"]["median"] > 0 and len(m["step"]["rounds"]) == 2
               for m in report["measured"])
    assert [s["name"] for s in report["scenarios"]][1].startswith("PCIe 5.0")
    named = report["scenarios"][1]["modes"]["weak"]
    assert [r["devices"] for r in named["rows"]] == [1, 2, 4, 8, 16]
    assert [r["hosts"] for r in named["rows"]] == [1, 1, 1, 2, 4]
    assert named["rows"][0]["efficiency"] == 1.0
    assert named["rows"][0]["steps"] == 2 * report["dataset_size"] // 16 + 1  # 898 / 16
    assert 1 <= named["largest_count"] <= 16
    assert report["assumptions"] in " ".join(result.stdout.split("\n"))
    assert "largest count with efficiency >= 0.8" in result.stdout
    assert str(workdir / "scaling.json") in result.stdout


def test_a_split_state_is_measured_and_its_collective_volume_read(tmp_path):
    workdir = tmp_path / "study"
    # No norms: their all-reduce (once per log window) would add 2% to this small model's.
    result = run_scaling("digits_mlp", *SMALL_MLP, "train.batch_size=32", "parallel.shard=params",
                         "train.log_norms=false", "--devices", "1,2", "--rounds", "2",
                         "--window-steps", "3",
                         "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "scaling.json").read_text())
    # A reduce-scatter of the gradient and one all-gather of the params: an all-reduce's bytes
    # (padding of uneven leaves over 2 devices and the metric sums add a little).
    assert report["fitted"]["volume"] == pytest.approx(1.0, rel=0.02)
    assert "the step's collectives move" in result.stdout
