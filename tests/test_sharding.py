"""ZeRO (`parallel.shard`): the split state trains exactly as the replicated one.

Every `parallel.shard` value is compared with `none`, the plain data-parallel step that the
rest of the suite checks against single-device and numpy references.
"""

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiments.digits_cnn as digits
import experiments.gpt_lm as gpt
from jaxdist.base.config import apply_overrides
from jaxdist.loop.compiled import collectives, lower_train_step, ring_traffic
from jaxdist.loop.fit import fit
from jaxdist.loop.metrics import TIMING_KEYS
from jaxdist.parallel.backend import AXIS
from jaxdist.parallel.backends import make_backend
from jaxdist.parallel.chunks import Chunks
from jaxdist.parallel.layout import SHARDS, StateLayout
from jaxdist.step.optimizers import build_optimizer, clip_by_global_norm, scale_by_trust_ratio
from jaxdist.step.steps import TrainState

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
SPLIT = [s for s in SHARDS if s != "none"]
EXPERIMENTS = {"digits_cnn": (digits, ["optimizer.clip_norm=0.5"]), "gpt_lm": (gpt, [])}
OPTIMIZERS = {"adamw_clip": [], "lamb": ["optimizer.name=lamb", "optimizer.weight_decay=0.01"]}


def run_config(experiment: str, optimizer: str, backend: str, shard: str, steps: int,
               extra: tuple[str, ...] = ()):
    """The experiment's module and the config of `run` (the HLO tests lower the same one)."""
    module, settings = EXPERIMENTS[experiment]
    return module, apply_overrides(module.tiny_config(), [
        *settings, *OPTIMIZERS[optimizer], f"train.steps={steps}", "train.log_every=20",
        f"parallel.backend={backend}", f"parallel.shard={shard}", *extra])


@functools.cache
def run(experiment: str, optimizer: str, backend: str, shard: str, steps: int = 200,
        extra: tuple[str, ...] = ()):
    """Train (no evaluation: only training is compared) and return (train history, params)."""
    module, config = run_config(experiment, optimizer, backend, shard, steps, extra)
    result = fit(dataclasses.replace(module.build(config), eval_data=None), config, stream=None)
    return result.history("train"), result.params


def assert_same_run(a, b, rtol=1e-5):
    (history_a, params_a), (history_b, params_b) = a, b
    assert history_a.keys() == history_b.keys()
    for name in set(history_a) - set(TIMING_KEYS):
        np.testing.assert_allclose(history_a[name], history_b[name], rtol=rtol, err_msg=name)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


# CI: 40 steps, AdamW + clipping on pmap for digits_cnn and LAMB on shard_map for gpt_lm
# (both optimizers and both backends, about a minute on 2 cores).
# JAXDIST_FULL_MATRIX=1: both optimizers on both backends for both experiments, 200 steps
# (about 10 minutes), the target, run before a change to the split step lands.
FULL_MATRIX = bool(os.environ.get("JAXDIST_FULL_MATRIX"))
MATRIX = ([(e, o, b) for e in EXPERIMENTS for o in OPTIMIZERS for b in ("pmap", "shard_map")]
          if FULL_MATRIX else
          [("digits_cnn", "adamw_clip", "pmap"), ("gpt_lm", "lamb", "shard_map")])
STEPS = 200 if FULL_MATRIX else 40


# The tests that share `run`'s cached reference runs go to one worker (xdist group).
@pytest.mark.xdist_group("sharding_runs")
@pytest.mark.parametrize("shard", SPLIT)
@pytest.mark.parametrize("experiment,optimizer,backend", MATRIX)
def test_every_split_trains_as_the_replicated_run(experiment, optimizer, backend, shard):
    assert_same_run(run(experiment, optimizer, backend, shard, STEPS),
                    run(experiment, optimizer, backend, "none", STEPS))


@pytest.mark.xdist_group("sharding_runs")
@pytest.mark.parametrize("extra", [
    ("parallel.grad_reduce=sum",),
    ("train.grad_accum=2",),
    ("train.precision=bf16",),
    ("loader.drop_remainder=false", "train.batch_size=200"),  # padding rows of weight 0
    ("train.skip_with=where",),
])
@pytest.mark.parametrize("shard", SPLIT)
def test_every_split_keeps_the_other_options_exact(shard, extra):
    backend = "shard_map" if "grad_accum" in extra[0] else "pmap"
    assert_same_run(run("digits_cnn", "adamw_clip", backend, shard, 20, extra),
                    run("digits_cnn", "adamw_clip", backend, "none", 20, extra))


def small_layout(shard, params, tx, backend="shard_map"):
    state = TrainState.create(params, tx, jax.random.key(0))
    return state, StateLayout(shard, jax.device_get(state), tx, make_backend(backend))


def test_chunks_pad_uneven_leaves_and_join_them_back():
    for shape in [(), (3,), (7, 5), (8,), (2, 3, 4)]:
        chunks = Chunks.of(shape, 8)
        x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1
        rows = chunks.split_host(x)
        assert rows.shape == (8, chunks.chunk) and chunks.chunk == max(1, -(-x.size // 8))
        assert np.all(rows.reshape(-1)[x.size:] == 0)
        np.testing.assert_array_equal(chunks.join_host(rows), x)


@pytest.mark.parametrize("shard", SPLIT)
def test_the_padding_of_uneven_leaves_never_enters_the_state(shard):
    # A rule that would move zero parameters: a constant update everywhere, padding included.
    push = optax.GradientTransformation(optax.init_empty_state,
                                        lambda u, s, p=None: (jax.tree.map(
                                            lambda x: jnp.ones_like(x), u), s))
    params = {"w": np.ones((3, 5), np.float32), "b": np.ones(3, np.float32)}
    state, layout = small_layout(shard, params, push)
    backend = make_backend("shard_map")

    from jaxdist.step.steps import make_train_step

    def loss(p, batch, rng):
        return batch["x"] @ p["w"].T @ p["b"] * 0 + batch["x"][:, 0], {}

    step = backend.compile(make_train_step(loss, push, layout.strategy()),
                           sharded=layout.sharded_or_none)
    placed = layout.to_devices(backend, jax.device_get(state))
    batch = {"x": np.ones((8, 5), np.float32), "weight": np.ones(8, np.float32)}
    placed, _ = step(placed, backend.put_batch(batch))
    rows = backend.to_host(placed, layout.sharded)
    if shard == "params":
        for leaf, chunks in ((rows.params["w"], Chunks.of((3, 5), 8)),
                          (rows.params["b"], Chunks.of((3,), 8))):
            assert np.all(leaf.reshape(-1)[chunks.size:] == 0)
    host = layout.to_host(backend, placed)
    np.testing.assert_array_equal(host.params["w"], params["w"] + 1)
    np.testing.assert_array_equal(host.params["b"], params["b"] + 1)


@pytest.mark.parametrize("name", ["clip", "lamb"])
def test_global_norms_on_chunks_are_the_same_bits_as_on_whole_leaves(name):
    """Clipping and LAMB's trust ratio on each device's chunks equal those on whole leaves
    bit for bit (and optax's to float tolerance)."""
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(5, 3)).astype(np.float32),
              "b": rng.normal(size=(7,)).astype(np.float32),
              "c": rng.normal(size=(300, 77)).astype(np.float32)}
    grads = jax.tree.map(lambda x: 3 * x[::-1].copy(), params)

    def build(devices, across):
        return clip_by_global_norm(1.0, devices, across) if name == "clip" else (
            scale_by_trust_ratio(devices, across))

    optax_rule = optax.clip_by_global_norm(1.0) if name == "clip" else (
        optax.scale_by_trust_ratio())
    by_optax, _ = optax_rule.update(grads, optax_rule.init(params), params)
    whole = build(8, None)
    expected, _ = jax.jit(lambda g, p: whole.update(g, whole.init(p), p))(grads, params)
    split = build(8, AXIS)
    leaf_chunks = jax.tree.map(lambda x: Chunks.of(x.shape, 8), params)

    def per_device(g, p):
        own_g, own_p = (jax.tree.map(lambda c, x: c.own(x), leaf_chunks, t) for t in (g, p))
        updates, _ = split.update(own_g, split.init(own_p), own_p)
        return jax.tree.map(lambda c, u: c.gather(u), leaf_chunks, updates)

    got = jax.pmap(lambda _, g, p: per_device(g, p), axis_name=AXIS,
                   in_axes=(0, None, None))(np.arange(8), grads, params)
    for key in params:
        for device in range(8):
            np.testing.assert_array_equal(np.asarray(got[key])[device], expected[key])
        np.testing.assert_allclose(expected[key], by_optax[key], rtol=1e-5)


def test_optimizer_state_that_follows_the_params_is_split_and_the_rest_is_not():
    params = {"w": np.ones((4, 4), np.float32)}
    tx = build_optimizer(apply_overrides(digits.config(), ["optimizer.decay_steps=10",
                                                           "optimizer.clip_norm=1"]).optimizer,
                         across=AXIS)
    state, layout = small_layout("optimizer", params, tx)
    split = {jax.tree_util.keystr(path): value for path, value in
             jax.tree_util.tree_flatten_with_path(layout.sharded.opt_state)[0]}
    moments = [path for path in split if "['w']" in path]
    assert moments and all(split[path] for path in moments)  # Adam's mu and nu
    assert not any(value for path, value in split.items() if path not in moments)
    assert not any(jax.tree.leaves(layout.sharded.params))


# The HLO tests read, per backend, the programs of the matrix's split runs (`run`): whichever
# of them comes second reads them back from the session's compilation cache.
RUN_OF = {backend: (experiment, optimizer) for experiment, optimizer, backend in MATRIX}


@pytest.mark.xdist_group("sharding_runs")  # reads the programs of those runs
@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_the_split_steps_reduce_scatter_and_all_gather_instead_of_all_reducing(backend):
    found, traffic = {}, {}
    for shard in SHARDS:
        compiled, params = compiled_step(backend, shard)
        text = compiled.as_text()
        traffic[shard] = ring_traffic(text, 8)
        kinds: dict[str, int] = {}
        for instruction in collectives(text):
            op = instruction.op.removesuffix("-start")
            kinds[op] = kinds.get(op, 0) + instruction.elements
        found[shard] = kinds
    allreduce = 2 * 7 / 8 * 4 * params  # bytes a ring all-reduce of the gradient sends
    for shard in SHARDS:  # the same bytes: all-reduce = reduce-scatter + all-gather
        assert traffic[shard] / allreduce == pytest.approx(1.0, rel=0.01), shard
    assert "reduce-scatter" not in found["none"] and "all-gather" not in found["none"]
    for shard in SPLIT:
        kinds = found[shard]
        assert "reduce-scatter" in kinds and "all-gather" in kinds, (shard, kinds)
        # What is still all-reduced is scalars (metric sums, norms), not the gradient.
        assert kinds.get("all-reduce", 0) < params // 100, (shard, kinds)


@functools.cache
def compiled_step(backend, shard):
    """The compiled train step of `RUN_OF[backend]`'s run with `shard`, and its parameters."""
    module, config = run_config(*RUN_OF[backend], backend, shard, STEPS)
    experiment = module.build(config)
    lowered, _ = lower_train_step(experiment, config)
    shapes = jax.eval_shape(experiment.init_params, jax.random.key(0))
    return lowered.compile(), sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.xdist_group("sharding_runs")  # reads the programs of those runs
def test_split_state_takes_less_memory_per_device():
    sizes = {shard: compiled_step("shard_map", shard)[0].memory_analysis()
             .argument_size_in_bytes for shard in SHARDS}
    params = 4 * compiled_step("shard_map", "none")[1]  # bytes of float32 parameters
    # AdamW or LAMB: params + 2 moments = 3 copies; split over 8 devices as the shard says.
    assert sizes["none"] - sizes["optimizer"] == pytest.approx(2 * params * 7 / 8, rel=0.02)
    assert sizes["gradients"] == sizes["optimizer"]
    assert sizes["optimizer"] - sizes["params"] == pytest.approx(params * 7 / 8, rel=0.02)


@pytest.mark.parametrize("first,second", [("params", "optimizer"), ("none", "params")])
def test_a_run_resumes_with_another_split_and_device_count_exactly(tmp_path, first, second):
    # No dropout: its per-device keys depend on the device count, which the resume changes;
    # a constant rate: a decay's horizon is the first run's train.steps.
    settings = ["optimizer.clip_norm=0.5", "train.log_every=5", "train.checkpoint_every=10",
                "model.dropout=0", "optimizer.schedule=constant"]
    config = apply_overrides(digits.tiny_config(), [*settings, f"parallel.shard={first}",
                                                    "train.steps=10"])
    fit(digits.build(config), config, tmp_path / "split", stream=None)
    resumed = apply_overrides(config, [f"parallel.shard={second}", "train.steps=20",
                                       "parallel.devices=4", "parallel.backend=shard_map"])
    after = fit(digits.build(resumed), resumed, tmp_path / "split", stream=None)
    whole = apply_overrides(config, ["parallel.shard=none", "train.steps=20"])
    reference = fit(digits.build(whole), whole, tmp_path / "whole", stream=None)
    a = [r for r in after.records if r["step"] > 10]
    b = [r for r in reference.records if r["step"] > 10]
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert [r["step"] for r in a if r["split"] == "train"] == [15, 20]
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key not in ("split", "step", *TIMING_KEYS):
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, err_msg=key)


def test_a_checkpoint_holds_the_split_state_as_chunks_never_joined_on_the_host(
        tmp_path, monkeypatch):
    from jaxdist.checkpoints.store import CheckpointStore
    from jaxdist.parallel.backend import Backend

    def refuse(*args, **kwargs):
        raise AssertionError("the split state was joined on the host")

    config = apply_overrides(digits.tiny_config(), ["train.steps=4", "parallel.shard=params",
                                                    "train.checkpoint_every=2"])
    with monkeypatch.context() as patch:  # saving must not read the whole split state back
        for backend in (type(make_backend("pmap")), type(make_backend("shard_map"))):
            patch.setattr(backend, "to_host", refuse)
        patch.setattr(Backend, "to_host", refuse)
        result = fit(digits.build(config), config, tmp_path / "run", stream=None)
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    meta = store.verify(4)
    logical = jax.tree_util.tree_flatten_with_path(result.params)[0]
    assert set(meta["split"]) >= {f".params{jax.tree_util.keystr(p)}" for p, _ in logical}
    assert set(meta["split"].values()) == {8}
    raw = store._checkpointer.restore(store.path(4) / "state")  # as written: flat chunks
    for path, whole in logical:
        chunks = Chunks.of(whole.shape, 8)
        flat = np.asarray(functools.reduce(lambda t, k: t[k.key], path, raw["params"]))
        assert flat.shape == (8 * chunks.chunk,)
        np.testing.assert_array_equal(flat, chunks.split_host(whole).reshape(-1))
    # A tool that wants the logical state back (jaxdist.loop.restore) gets it whole.
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), result.layout.logical)
    restored, _ = store.restore(4, target)
    store.close()
    for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(result.params),
                    strict=True):
        assert isinstance(x, np.ndarray)
        np.testing.assert_array_equal(x, y)


def test_a_checkpoint_whose_meta_names_a_foreign_split_leaf_is_refused_in_one_line(tmp_path):
    from jaxdist.base.errors import UserError
    from jaxdist.checkpoints.store import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints")
    state = {"w": np.arange(6.0, dtype=np.float32)}
    pending = store.begin(1, state, {"eval": None}, split={"['v']": 8})
    pending.commit()
    with pytest.raises(UserError, match=r"split leaves .*\['v'\].* damaged") as error:
        store.restore(1, state)
    assert "\n" not in str(error.value)
    store.close()


def test_an_unknown_shard_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxdist.run", "digits_cnn",
                             "parallel.shard=zero3", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.shard" in lines[0] and "params" in lines[0]


# Adam, so that the optimizer state has leaves to split; clipping, so that the global norm
# is taken over chunks on two processes; a constant rate, because a decay's horizon would
# be the first run's train.steps.
SPLIT_CLI = ["linear_regression", "optimizer.name=adam", "optimizer.learning_rate=0.05",
             "optimizer.clip_norm=0.5", "optimizer.schedule=constant", "train.batch_size=64",
             "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=10"]


def test_two_processes_of_four_devices_split_and_resume_as_one_of_eight(tmp_path):
    # pmap with the params split writes the checkpoint that shard_map with the optimizer
    # state split resumes from: both backends, both kinds of split leaf, in two processes.
    from tests.test_multihost import launch, records, single_records

    for steps, backend, shard in ((10, "pmap", "params"), (20, "shard_map", "optimizer")):
        two = launch(*SPLIT_CLI, f"parallel.backend={backend}", f"parallel.shard={shard}",
                     f"train.steps={steps}", "--workdir", str(tmp_path / "two"))
        assert two.returncode == 0, two.stderr[-2000:]
        state = next((tmp_path / "two" / "checkpoints").glob(f"step_*{steps}")) / "state"
        assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    assert "resumed from" in two.stdout
    a = records(tmp_path / "two")
    b = single_records(*SPLIT_CLI, "parallel.shard=none", "train.steps=20",
                       workdir=tmp_path / "one")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key not in ("step", "split", *TIMING_KEYS):
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, err_msg=key)


def test_leaves_travel_in_buckets_of_one_dtype_and_bounded_size(monkeypatch):
    import jaxdist.parallel.layout as sharding

    leaves = [jnp.zeros(s, d) for s, d in [((100,), jnp.float32), ((8,), jnp.int32),
                                            ((300,), jnp.float32), ((50,), jnp.float32)]]
    leaf_chunks = [Chunks.of(leaf.shape, 8) for leaf in leaves]
    monkeypatch.setattr(sharding, "BUCKET_BYTES", 4 * 400)  # leaf 2 (1216 bytes) fits
    assert sorted(sharding._buckets(leaves, leaf_chunks)) == [[0], [1], [2, 3]]
    monkeypatch.setattr(sharding, "BUCKET_BYTES", 4 * 300)  # leaf 2 travels alone
    assert sorted(sharding._buckets(leaves, leaf_chunks)) == [[0, 3], [1], [2]]
    monkeypatch.setattr(sharding, "BUCKET_BYTES", 1 << 20)
    assert sorted(sharding._buckets(leaves, leaf_chunks)) == [[0, 2, 3], [1]]
    # Buckets of one leaf each train exactly as the default ones do.
    monkeypatch.setattr(sharding, "BUCKET_BYTES", 1)
    assert_same_run(run("digits_cnn", "adamw_clip", "shard_map", "optimizer", 12),
                    run("digits_cnn", "adamw_clip", "shard_map", "none", 12))


def test_on_one_device_every_split_is_the_unsplit_step():
    params = {"w": np.ones((4, 4), np.float32)}
    tx = optax.adam(1e-3)
    state = jax.device_get(TrainState.create(params, tx, jax.random.key(0)))
    for shard in SPLIT:
        layout = StateLayout(shard, state, tx, make_backend("shard_map", 1))
        assert layout.shard == "none" and layout.sharded_or_none is None
