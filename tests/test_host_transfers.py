"""The training loop never waits for the devices between log points.

On a GPU or TPU, `jax.transfer_guard_device_to_host("disallow_explicit")` turns every
device-to-host copy into an error. XLA:CPU reads its buffers without a copy and ignores the
guard, so these tests make the CPU honour it: every read of a device array's value (all of
`np.asarray`, `float`, `jax.device_get` go through `ArrayImpl._value`) is checked against the
guard in force and counted.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax._src import array as jax_array
from jax._src import config as jax_config
from toy import mlp_experiment, toy_config

from jaxdist import fit
from jaxdist.loop.metrics import MetricWindow
from jaxdist.parallel.backends import make_backend
from jaxdist.parallel.dispatch import InFlightLimit


class HostReads:
    """Counts reads of device values, refusing those the transfer guard disallows."""

    def __init__(self) -> None:
        self.count = 0


def _guard_refuses() -> str | None:
    level = jax_config.transfer_guard_device_to_host.value
    return level if level in ("disallow", "disallow_explicit") else None


@pytest.fixture
def host_reads(monkeypatch) -> HostReads:
    """Make the CPU honour the device-to-host transfer guard, and count the reads.

    A read is `ArrayImpl._value` (float(), .item(), jax.device_get, __array__) or numpy's
    `asarray`/`array`/`asanyarray` of a jax array (which on the CPU take the buffer
    protocol, past `_value`).
    """
    reads = HostReads()

    def check(x) -> None:
        level = _guard_refuses()
        if level:
            raise RuntimeError(f"device-to-host transfer of {x.shape} {x.dtype} under "
                               f"transfer guard {level}")
        reads.count += 1

    original = jax_array.ArrayImpl._value

    def guarded(self):
        if self._npy_value is None:  # a read that would copy from the device
            check(self)
        return original.fget(self)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guarded))
    for name in ("asarray", "array", "asanyarray"):
        convert = getattr(np, name)

        def checked(x, *args, convert=convert, **kwargs):
            if isinstance(x, jax.Array):
                check(x)
            return convert(x, *args, **kwargs)

        monkeypatch.setattr(np, name, checked)
    return reads


def _config(backend: str, **train):
    config = toy_config(steps=12, batch_size=32, backend=backend, log_every=4)
    config.train = dataclasses.replace(config.train, **train)
    return config


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_no_transfer_between_log_points(backend, host_reads, tmp_path):
    """A run with logs, evaluations and checkpoints passes under a disallowing guard."""
    config = _config(backend, eval_every=8, checkpoint_every=4)
    reference = fit(mlp_experiment(), config, tmp_path / "free", stream=None)
    with jax.transfer_guard_device_to_host("disallow_explicit"):
        guarded = fit(mlp_experiment(), config, tmp_path / "guarded", stream=None)
    assert guarded.stop_reason == "completed"
    assert guarded.records == reference.records
    assert host_reads.count > 0  # the reads that are allowed did happen, and were seen


def test_a_read_inside_the_loop_is_caught(host_reads, tmp_path, monkeypatch):
    """The check can fail: a per-step read (as a careless loop would make) is refused."""
    original_add = InFlightLimit.add

    def add_and_read(self, outputs):
        original_add(self, outputs)
        float(jax.tree.leaves(outputs)[0].reshape(-1)[0])

    monkeypatch.setattr(InFlightLimit, "add", add_and_read)
    with jax.transfer_guard_device_to_host("disallow_explicit"), \
            pytest.raises(RuntimeError, match="transfer guard"):
        fit(mlp_experiment(), _config("pmap"), tmp_path, stream=None)


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_a_log_window_comes_back_in_one_transfer(backend, host_reads):
    """Steps x metrics scalars and the learning rate: one read, the same values."""
    b = make_backend(backend)
    rng = np.random.default_rng(0)
    steps = [{name: rng.normal(size=()).astype(np.float32) for name in ("loss", "weight", "a")}
             for _ in range(5)]
    window = MetricWindow()
    for sums in steps:
        window.add(b.replicate(sums))
    lr = b.replicate(np.float32(3e-4))
    before = host_reads.count
    rows, lr_host = window.sync(b, also=lr)
    assert host_reads.count - before == 1
    assert rows == [{name: float(value) for name, value in sums.items()} for sums in steps]
    assert lr_host == np.float32(3e-4) and np.shape(lr_host) == ()
    assert window.totals["loss"] == sum(float(s["loss"]) for s in steps)


@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_small_values_of_mixed_dtypes_and_shapes(backend):
    """Each dtype's leaves come back exactly, in their shapes."""
    b = make_backend(backend)
    tree = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.int32(7),
            "g": [np.float32(-1.5), np.arange(3, dtype=np.int32)]}
    host = b.small_values_to_host(b.replicate(tree))
    for got, want in zip(jax.tree.leaves(host), jax.tree.leaves(tree), strict=True):
        assert got.dtype == want.dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(got, want)
