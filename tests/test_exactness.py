"""Silent wrong results found by review: each one reproduced, each one must stay fixed."""

import json
import math
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments._digits import classifier_experiment, load_split
from jaxdist import Experiment, fit
from jaxdist.base.errors import UserError
from jaxdist.base.records import to_json_line
from jaxdist.checkpoints.store import CheckpointStore
from jaxdist.data import Loader, class_balanced_probabilities
from jaxdist.data.augment import random_crop, random_flip
from jaxdist.step.losses import cross_entropy
from jaxdist.step.models.batchnorm import CrossReplicaBatchNorm
from jaxdist.step.models.mlp import MLP
from jaxdist.step.steps import NONFINITE
from tests.toy import make_data, mlp_experiment, toy_config


def read_lines(workdir):
    return (workdir / "metrics.jsonl").read_text().splitlines()


# 1. A run's learning-rate schedule is fixed when it starts.

def cosine_config(steps, **optimizer):
    config = toy_config(steps=steps, batch_size=16, log_every=2, learning_rate=0.01)
    config.optimizer.schedule = "warmup_cosine"
    config.optimizer.warmup_steps = 2
    config.optimizer.final_fraction = 0.1
    config.train.checkpoint_every = 0
    for key, value in optimizer.items():
        setattr(config.optimizer, key, value)
    return config


def test_raising_train_steps_on_resume_continues_the_schedule_instead_of_rewarming(tmp_path):
    experiment = mlp_experiment()
    fit(experiment, cosine_config(8), tmp_path / "split", stream=None)
    resumed = fit(experiment, cosine_config(16), tmp_path / "split", stream=None)
    # The reference: one run of 16 steps whose schedule was written for 8 from the start.
    reference = fit(experiment, cosine_config(16, decay_steps=8), tmp_path / "whole",
                    stream=None)
    # Every train point equals the reference's (the split run also has its first end's eval).
    train = [line for line in read_lines(tmp_path / "split") if '"train"' in line]
    assert train == [line for line in read_lines(tmp_path / "whole") if '"train"' in line]
    assert len(train) == 8
    chex.assert_trees_all_equal(resumed.params, reference.params)
    # The logged rate is the schedule's (closed form): after its end, its final rate.
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.01, 2, 8, 0.001)
    for record in resumed.records:
        if record["split"] == "train":
            assert record["lr"] == pytest.approx(float(schedule(record["step"] - 1)), rel=1e-6)
    after_end = [r["lr"] for r in resumed.records if r["step"] > 8 and r["split"] == "train"]
    assert after_end == [pytest.approx(0.001)] * 4
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert saved["optimizer"]["decay_steps"] == 8


def test_changing_the_schedule_on_resume_is_refused(tmp_path):
    experiment = mlp_experiment()
    fit(experiment, cosine_config(8), tmp_path / "run", stream=None)
    with pytest.raises(UserError, match="optimizer.decay_steps=8 there, 16 now"):
        fit(experiment, cosine_config(16, decay_steps=16), tmp_path / "run", stream=None)
    with pytest.raises(UserError, match="optimizer.warmup_steps"):
        fit(experiment, cosine_config(16, warmup_steps=3), tmp_path / "run", stream=None)


# 2 and 12. Non-finite steps are counted whether or not they are skipped.

def poisoned_config(skip):
    data = make_data(32)
    data["x"][5, 0] = np.inf
    config = toy_config(steps=50, batch_size=0, log_every=1)
    config.train.max_nonfinite = 3
    config.train.skip_nonfinite = skip
    return data, config


def test_max_nonfinite_stops_a_run_that_does_not_skip(tmp_path):
    data, config = poisoned_config(skip=False)
    config.train.checkpoint_every = 1
    with pytest.raises(UserError, match="3 steps in a row") as error:
        fit(mlp_experiment(data), config, tmp_path / "run", stream=None)
    # Every step was non-finite, so no checkpoint may exist, and the message says so.
    assert CheckpointStore(tmp_path / "run" / "checkpoints").latest() is None
    assert "intact" not in str(error.value) and "no checkpoint" in str(error.value)


def test_the_nonfinite_stop_names_the_checkpoint_that_exists(tmp_path):
    data, config = poisoned_config(skip=True)
    with pytest.raises(UserError, match="no checkpoint") as error:
        fit(mlp_experiment(data), config, stream=None)
    assert "intact" not in str(error.value)
    config.train.checkpoint_every = 2
    with pytest.raises(UserError, match=r"step_00000002.*intact"):
        fit(mlp_experiment(data), config, tmp_path / "run", stream=None)


def test_skipping_by_cond_and_by_where_give_the_same_run():
    """The non-finite guard's two forms (a branch, a select) are bit-identical."""
    data = make_data(64)
    data["x"][5, 0] = np.inf  # one batch in four holds it
    runs = []
    for skip_with in ("cond", "where"):
        config = toy_config(steps=12, batch_size=16, log_every=1)
        config.train.max_nonfinite = 0
        config.train.skip_with = skip_with
        runs.append(fit(mlp_experiment(data), config, stream=None))
    cond, where = runs
    assert 0 < sum(r["nonfinite_steps"] for r in cond.records if r["split"] == "train") < 12
    # As metrics.jsonl has them: a skipped step's grad_norm is NaN (null), never equal to itself.
    assert [to_json_line(r) for r in cond.records] == [to_json_line(r) for r in where.records]
    for a, b in zip(jax.tree.leaves(cond.params), jax.tree.leaves(where.params), strict=True):
        np.testing.assert_array_equal(a, b)


# 3. Padding rows are copies of real rows and never reach a loss.

def relative_error_experiment(data):
    def init_params(rng):
        return {"w": 0.1 * jax.random.normal(rng, (data["x"].shape[1],)), "b": jnp.ones(())}

    def loss_fn(params, batch, rng):
        prediction = batch["x"] @ params["w"] + params["b"]
        return ((prediction - batch["y"]) / batch["y"]) ** 2, {}

    return Experiment(init_params=init_params, loss_fn=loss_fn, train_data=data,
                      eval_data=data)


def test_a_loss_that_divides_by_its_target_gives_the_same_run_on_1_2_3_and_8_devices():
    data = make_data(98)
    data["y"] = 1.0 + np.abs(data["y"])
    runs = {}
    for devices in (1, 2, 3, 8):  # 98 rows: no padding on 1 and 2, some on 3 and 8
        config = toy_config(steps=12, batch_size=0, devices=devices, optimizer="sgd",
                            learning_rate=0.05, log_every=4)
        runs[devices] = fit(relative_error_experiment(data), config, stream=None)
    for devices, run in runs.items():
        for a, b in zip(runs[1].records, run.records, strict=True):
            assert math.isfinite(b["loss"]) and b.get(NONFINITE, 0) == 0, (devices, b)
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            assert a["examples"] == b["examples"]


def test_padding_rows_are_copies_of_real_rows_with_weight_zero():
    data = {"y": np.arange(1.0, 11.0, dtype=np.float32)}
    batch = next(Loader(data, 16, 8, shuffle=False, drop_remainder=False))
    assert batch["weight"].tolist() == [1.0] * 10 + [0.0] * 6
    assert set(batch["y"][10:]) <= set(data["y"])  # no zeros: every row is a real one


# 5. A value that differs across devices is refused by both backends.

def per_device_state_experiment():
    data = make_data(64)

    def loss_fn(params, model_state, batch, rng):
        error = batch["x"] @ params["w"] - batch["y"]
        # The mean of this device's rows only: a different value on every device.
        return error**2, {}, {"seen": jnp.mean(batch["x"], axis=0)}

    def eval_fn(params, model_state, batch):
        return (batch["x"] @ params["w"] - batch["y"]) ** 2, {}

    return Experiment(init_params=lambda rng: {"w": jnp.zeros(5)}, loss_fn=loss_fn,
                      eval_fn=eval_fn, init_model_state=lambda rng: {"seen": jnp.zeros(5)},
                      train_data=data)


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_a_per_device_model_state_is_refused_by_name(backend):
    with pytest.raises(UserError, match=r"model_state\['seen'\].*differs across devices"):
        fit(per_device_state_experiment(), toy_config(steps=2, backend=backend), stream=None)


# 6. A micro-batch that is all padding leaves BatchNorm's running statistics alone.

def batchnorm_experiment(rows):
    bn = CrossReplicaBatchNorm(momentum=0.9)
    data = {"x": np.ones((rows, 3), np.float32)}

    def init(rng):
        return CrossReplicaBatchNorm(axis_name=None).init(rng, data["x"][:1], jnp.ones(1),
                                                          train=False)

    def loss_fn(params, model_state, batch, rng):
        y, updated = bn.apply({"params": params, "batch_stats": model_state}, batch["x"],
                              batch["weight"], train=True, mutable=["batch_stats"])
        return jnp.sum(y**2, axis=1), {}, updated["batch_stats"]

    def eval_fn(params, model_state, batch):
        return jnp.zeros(batch["x"].shape[0]), {}

    return Experiment(init_params=lambda rng: init(rng)["params"],
                      init_model_state=lambda rng: init(rng)["batch_stats"],
                      loss_fn=loss_fn, eval_fn=eval_fn, train_data=data)


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_an_all_padding_micro_batch_leaves_running_statistics_alone(backend):
    config = toy_config(steps=2, batch_size=32, optimizer="sgd", backend=backend)
    config.train.grad_accum = 2
    config.loader.drop_remainder = False
    config.loader.shuffle = False
    result = fit(batchnorm_experiment(33), config, stream=None)
    # Step 1: two real micro-batches; step 2: one row in its first micro-batch, the second
    # all padding. Every real micro-batch has mean 1: running mean = 1 - 0.9^updates.
    mean = result.backend.first_copy(result.state.model_state)["mean"]
    np.testing.assert_allclose(mean, np.full(3, 1 - 0.9**3), rtol=1e-6)


# 7. Balanced sampling is never silently ignored.

def test_balanced_sampling_with_a_full_batch_is_refused():
    data = {"x": np.zeros((20, 2), np.float32), "label": np.arange(20) % 2}
    experiment = Experiment(init_params=lambda rng: {"w": jnp.zeros(2)},
                            loss_fn=lambda p, b, r: (b["x"] @ p["w"], {}), train_data=data)
    config = toy_config(steps=2, batch_size=0)
    config.loader.sampling = "balanced"
    with pytest.raises(UserError, match="loader.sampling=balanced.*train.batch_size"):
        fit(experiment, config, stream=None)


def test_one_hot_labels_are_balanced_by_their_class():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    one_hot = np.eye(3)[labels]
    p = class_balanced_probabilities(one_hot)
    for c in range(3):
        assert p[labels == c].sum() == pytest.approx(1 / 3)


# 8. The final checkpoint holds the final evaluation.

def test_the_final_checkpoint_holds_the_final_evaluation(tmp_path):
    config = toy_config(steps=8)
    config.train.checkpoint_every = 4  # divides train.steps
    result = fit(mlp_experiment(), config, tmp_path / "run", stream=None)
    store = CheckpointStore(tmp_path / "run" / "checkpoints", best_metric="loss")
    meta = store.verify(8)
    assert meta["eval"] is not None
    assert meta["eval"]["loss"] == result.last("eval")["loss"]
    assert store.best_step() == 8


# 9. Augmentation does not depend on how the batch is split over processes.

def test_augmentation_is_the_same_on_2x4_and_1x8():
    images = np.random.default_rng(0).integers(0, 255, (64, 6, 6)).astype(np.float32)
    data = {"image": images, "id": np.arange(64)}

    def augment(batch, rng):
        return {**batch, "image": random_flip(random_crop(batch["image"], rng, 2), rng)}

    def batches(processes, devices):
        loaders = [Loader(data, 32, devices, seed=3, process_index=p,
                          process_count=processes, transform=augment)
                   for p in range(processes)]
        out = []
        for _ in range(4):
            parts = [next(loader) for loader in loaders]
            out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        return out

    for one, two in zip(batches(1, 8), batches(2, 4), strict=True):
        np.testing.assert_array_equal(one["id"], two["id"])
        np.testing.assert_array_equal(one["image"], two["image"])
    assert not np.array_equal(batches(1, 8)[0]["image"], images[batches(1, 8)[0]["id"]])


# 10 and 11. What a resumed run leaves in TensorBoard and metrics.jsonl.

def test_tensorboard_holds_exactly_the_points_of_metrics_jsonl_after_a_crash(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = toy_config(steps=10, log_every=1)
    config.train.checkpoint_every = 4
    config.train.eval_every = 3
    workdir = tmp_path / "run"
    fit(mlp_experiment(input_noise=0.1), config, workdir, stream=None)
    # A crash after step 10 that lost every checkpoint after step 4:
    for step in (8, 10):
        shutil.rmtree(CheckpointStore(workdir / "checkpoints").path(step))
    other = toy_config(steps=10, log_every=1, seed=0)
    other.train.checkpoint_every = 4
    other.train.eval_every = 3
    fit(mlp_experiment(input_noise=0.1), other, workdir, stream=None)
    records = [json.loads(line) for line in read_lines(workdir)]
    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for split in ("train", "eval"):
        mine = [r for r in records if r["split"] == split]
        for name in ("loss", "abs_error"):
            scalars = events.Scalars(f"{split}/{name}")
            assert [s.step for s in scalars] == [r["step"] for r in mine]
            np.testing.assert_allclose([s.value for s in scalars], [r[name] for r in mine],
                                       rtol=1e-6)


def test_metrics_jsonl_is_strict_json_when_a_value_is_not_finite(tmp_path):
    data, config = poisoned_config(skip=True)
    config.train.max_nonfinite = 0  # never stop
    config.train.steps = 3
    fit(mlp_experiment(data), config, tmp_path / "run", stream=None)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=refuse) for line in read_lines(tmp_path / "run")]
    train = [r for r in records if r["split"] == "train"]
    assert [r["loss"] for r in train] == [None, None, None]
    assert [r[NONFINITE] for r in train] == [1.0, 1.0, 1.0]


# 13. Labels outside the classifier's classes are refused.

def test_cross_entropy_of_an_out_of_range_label_is_not_finite_even_with_smoothing():
    logits = jnp.zeros((2, 10))
    for smoothing in (0.0, 0.1):
        losses = cross_entropy(logits, jnp.array([3, 12]), label_smoothing=smoothing)
        assert math.isfinite(float(losses[0])) and not math.isfinite(float(losses[1]))


def test_a_classifier_refuses_labels_outside_its_classes_before_training():
    train, test = load_split()
    shifted = {**train, "label": train["label"] + 10}
    model = MLP(hidden=[8], outputs=10)
    with pytest.raises(UserError, match=r"label.*\[0, 10\)"):
        classifier_experiment(model, shifted, test, label_smoothing=0.1, shift=0)


# 14. Under grad_reduce=sum the device count is part of the run.

def test_grad_reduce_sum_refuses_a_resume_on_another_device_count(tmp_path):
    experiment = mlp_experiment()
    config = toy_config(steps=4, batch_size=16, grad_reduce="sum", optimizer="sgd")
    fit(experiment, config, tmp_path / "run", stream=None)
    fewer = toy_config(steps=8, batch_size=16, grad_reduce="sum", optimizer="sgd", devices=2)
    with pytest.raises(UserError, match="grad_reduce=sum.*8 devices.*2"):
        fit(experiment, fewer, tmp_path / "run", stream=None)
    mean = toy_config(steps=4, batch_size=16, optimizer="sgd")
    fit(experiment, mean, tmp_path / "mean", stream=None)
    mean_fewer = toy_config(steps=8, batch_size=16, optimizer="sgd", devices=2)
    assert fit(experiment, mean_fewer, tmp_path / "mean", stream=None).step == 8
