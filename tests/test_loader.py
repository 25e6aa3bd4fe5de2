"""The sharded loader: exactly-once epochs over processes and devices, resume, errors."""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdist.base.errors import UserError
from jaxdist.data import (
    DevicePrefetcher,
    Loader,
    MapSource,
    NpyFolderSource,
    RowRandom,
    class_balanced_probabilities,
    eval_batches,
    write_shards,
)


def arrays(n, features=2):
    return {"x": np.arange(n * features, dtype=np.float32).reshape(n, features),
            "id": np.arange(n)}


def split_over_devices(batch, devices):
    return [{k: v.reshape(devices, -1, *v.shape[1:])[d] for k, v in batch.items()}
            for d in range(devices)]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), processes=st.integers(1, 4), devices=st.integers(1, 8),
       per_device=st.integers(1, 6), drop=st.booleans(), seed=st.integers(0, 2**16))
def test_every_example_once_per_epoch_over_processes_and_devices(size, processes, devices,
                                                                  per_device, drop, seed):
    batch = processes * devices * per_device
    if drop and batch > size:
        with pytest.raises(UserError):
            Loader(arrays(size), batch, devices, process_count=processes)
        return
    loaders = [Loader(arrays(size), batch, devices, seed=seed, process_index=p,
                      process_count=processes, drop_remainder=drop)
               for p in range(processes)]
    steps = loaders[0].batches_per_epoch
    for epoch in range(2):
        seen = []
        for _ in range(steps):
            for loader in loaders:
                local = next(loader)
                assert local["weight"].shape == (batch // processes,)
                for device in split_over_devices(local, devices):
                    real = device["weight"] == 1
                    # padding: weight 0 exactly where no example is, rows copies of real ones
                    assert set(np.unique(device["weight"])) <= {0.0, 1.0}
                    np.testing.assert_array_equal(device["x"][:, 0], 2 * device["id"])
                    np.testing.assert_array_equal(device["x"][real][:, 0],
                                                  2 * device["id"][real])
                    seen.extend(device["id"][real].tolist())
        if drop:
            assert len(seen) == len(set(seen)) == steps * batch
        else:
            assert sorted(seen) == list(range(size))
        assert all(loader.epoch == epoch for loader in loaders)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 200), processes=st.integers(1, 3), devices=st.integers(1, 8),
       per_device=st.integers(1, 5))
def test_eval_counts_every_example_once(size, processes, devices, per_device):
    batch = processes * devices * per_device
    streams = [list(eval_batches(arrays(size), batch, devices, process_index=p,
                                 process_count=processes)) for p in range(processes)]
    assert len({len(s) for s in streams}) == 1  # every process runs the same number of steps
    ids = [i for s in streams for b in s for i in b["id"][b["weight"] == 1]]
    assert sorted(ids) == list(range(size))


def test_processes_slice_the_same_global_batches():
    one = Loader(arrays(64), 16, 8, seed=3)
    two = [Loader(arrays(64), 16, 4, seed=3, process_index=p, process_count=2)
           for p in range(2)]
    for _ in range(6):
        whole = next(one)["id"]
        np.testing.assert_array_equal(np.concatenate([next(t)["id"] for t in two]), whole)


def test_epochs_are_reshuffled_and_seeded():
    a = Loader(arrays(40), 40, 4, seed=1)
    first, second = next(a)["id"], next(a)["id"]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(next(Loader(arrays(40), 40, 4, seed=1))["id"], first)
    assert not np.array_equal(next(Loader(arrays(40), 40, 4, seed=2))["id"], first)
    in_order = Loader(arrays(40), 8, 4, shuffle=False)
    np.testing.assert_array_equal(next(in_order)["id"], np.arange(8))


@pytest.mark.parametrize("drop", [True, False])
def test_restore_continues_bit_for_bit(drop):
    reference = Loader(arrays(30), 8, 2, seed=5, drop_remainder=drop)
    for _ in range(7):
        next(reference)
    position = reference.state()
    assert position == {"epoch": reference.epoch, "index": reference.index}
    expected = [next(reference) for _ in range(11)]
    resumed = Loader(arrays(30), 8, 2, seed=5, drop_remainder=drop)
    resumed.restore(position)
    for want in expected:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_full_batch_is_padded_and_reused():
    loader = Loader(arrays(10), 0, 4)
    batch = next(loader)
    np.testing.assert_array_equal(batch["weight"], [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(batch["id"][:10], np.arange(10))
    assert next(loader) is batch


def test_balanced_sampling_evens_out_the_classes():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    data = {"x": np.zeros((1000, 1), np.float32), "label": labels}
    probabilities = class_balanced_probabilities(labels)
    np.testing.assert_allclose([probabilities[labels == c].sum() for c in range(3)], [1 / 3] * 3)
    loader = Loader(data, 1000, 1, seed=0, probabilities=probabilities)
    drawn = np.concatenate([next(loader)["label"] for _ in range(5)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.03)


@pytest.mark.parametrize("make,fragment", [
    (lambda: Loader({"x": np.zeros(3), "y": np.zeros(4)}, 2, 1), "differ in length"),
    (lambda: Loader({"x": np.zeros(0)}, 0, 1), "empty"),
    (lambda: Loader({}, 0, 1), "no arrays"),
    (lambda: Loader(arrays(10), 6, 4), "cannot be split over 4 devices"),
    (lambda: Loader(arrays(64), 12, 4, process_count=2), "2 processes x 4 devices"),
    (lambda: Loader(arrays(10), 12, 4), "larger than the 10 training examples"),
    (lambda: Loader([], 0, 1), "empty"),
    (lambda: Loader([1, 2], 0, 1), "must be a dict"),
])
def test_bad_data_is_refused_with_one_line(make, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        make()
    assert "\n" not in str(info.value)


class ListDataset:
    """A map-style data set, as grain MapDataset or datasets.Dataset present themselves."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(3, i, np.float32), "id": i}


def test_map_style_data_sets_are_sources():
    loader = Loader(ListDataset(20), 10, 2, seed=0)
    epoch = np.concatenate([next(loader)["id"] for _ in range(2)])
    assert sorted(epoch) == list(range(20))
    batch = MapSource(ListDataset(5)).get_batch(np.array([4, 1]))
    np.testing.assert_array_equal(batch["x"][:, 0], [4, 1])


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_shard_folder_serves_the_same_rows_as_memory(tmp_path, fmt):
    data = {"x": np.random.default_rng(0).normal(size=(103, 4)).astype(np.float32),
            "label": np.arange(103) % 7}
    write_shards(tmp_path / "shards", data, rows_per_shard=25, fmt=fmt)
    source = NpyFolderSource(tmp_path / "shards")
    assert len(source) == 103 and len(source.shards) == 5
    assert not any(isinstance(a, np.ndarray) for shard in source.shards for a in shard.values())
    indices = np.array([102, 0, 50, 24, 25, 77])
    got = source.get_batch(indices)
    for name in data:
        np.testing.assert_array_equal(got[name], data[name][indices])
    folder_epoch = next(Loader(source, 100, 4, seed=9))
    memory_epoch = next(Loader(data, 100, 4, seed=9))
    for name in folder_epoch:
        np.testing.assert_array_equal(folder_epoch[name], memory_epoch[name])


def test_shard_folder_errors(tmp_path):
    data = {"x": np.zeros((20, 3), np.float32), "y": np.zeros(20, np.int32)}
    folder = write_shards(tmp_path / "a", data, rows_per_shard=10)
    (folder / "shard-00001.y.npy").unlink()
    with pytest.raises(UserError, match="shard-00001.y.npy is missing"):
        NpyFolderSource(folder)
    folder = write_shards(tmp_path / "b", data, rows_per_shard=10)
    np.save(folder / "shard-00000.x.npy", np.zeros((10, 4), np.float32))
    with pytest.raises(UserError, match="the manifest says"):
        NpyFolderSource(folder)
    folder = write_shards(tmp_path / "c", data, rows_per_shard=10)
    np.save(folder / "shard-00001.y.npy", np.zeros(10, np.float64))
    with pytest.raises(UserError, match="damaged or foreign"):
        NpyFolderSource(folder)
    np.savez_compressed(tmp_path / "d.npz", **data)
    (tmp_path / "d").mkdir()
    (tmp_path / "d.npz").rename(tmp_path / "d" / "part.npz")
    with pytest.raises(UserError, match="compressed"):
        NpyFolderSource(tmp_path / "d")
    with pytest.raises(UserError, match="does not exist"):
        NpyFolderSource(tmp_path / "nowhere")


def test_shard_folder_reads_only_the_rows_it_serves(tmp_path):
    """A 256 MiB shard: serving 64 rows copies those rows, never the file, into memory.

    RssAnon counts memory the process owns; pages of a memory-mapped file count under
    RssFile instead (and the kernel may map more of them than asked, so that is not
    measured). Loading the shard whole would add 256 MiB of RssAnon.
    """
    rows, width = 8192, 8192  # float32: 32 KiB per row
    folder = tmp_path / "big"
    folder.mkdir()
    big = np.lib.format.open_memmap(folder / "shard-00000.x.npy", mode="w+",
                                    dtype=np.float32, shape=(rows, width))
    for start in range(0, rows, 1024):
        big[start:start + 1024] = np.arange(start, start + 1024, dtype=np.float32)[:, None]
    big.flush()
    del big
    script = textwrap.dedent(f"""
        import numpy as np
        from jaxdist.data import NpyFolderSource, Loader
        def anon_mib():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        before = anon_mib()
        source = NpyFolderSource({str(folder)!r})
        batch = next(Loader(source, 64, 8, seed=0))
        assert batch["x"].shape == (64, {width})
        assert np.all(batch["x"][:, 0] == batch["x"][:, -1])
        print(anon_mib() - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    grown_mib = float(out.stdout.strip())
    assert grown_mib < 24, f"serving 64 rows (2 MiB) grew owned memory by {grown_mib:.0f} MiB"


def test_prefetcher_tracks_the_position_of_what_was_handed_out():
    loader = Loader(arrays(40), 8, 2, seed=0)
    puts = []

    def put(batch):
        puts.append(threading.current_thread().name)
        return batch

    with DevicePrefetcher(loader, put, depth=2) as batches:
        first = next(batches)
        assert batches.state() == {"epoch": 0, "index": 8}
        second = next(batches)
        assert batches.state() == {"epoch": 0, "index": 16}
        assert not np.array_equal(first["id"], second["id"])
    assert set(puts) == {"jaxdist-prefetch"}


def test_prefetcher_reraises_errors_and_ends():
    def broken():
        yield {"a": 1}
        raise RuntimeError("disk on fire")

    with DevicePrefetcher(broken(), lambda b: b) as batches:
        assert next(batches) == {"a": 1}
        with pytest.raises(RuntimeError, match="disk on fire"):
            next(batches)
    with DevicePrefetcher(iter([{"a": 1}]), lambda b: b) as batches:
        assert list(batches) == [{"a": 1}]


def test_transforms_repeat_on_resume_and_augmentations_keep_content():
    from jaxdist.data.augment import random_crop, random_flip

    images = np.arange(40 * 6 * 6, dtype=np.float32).reshape(40, 6, 6)

    def transform(batch, rng):
        return {**batch, "image": random_flip(random_crop(batch["image"], rng, 1), rng)}

    data = {"image": images, "id": np.arange(40)}
    reference = Loader(data, 8, 2, seed=3, transform=transform)
    for _ in range(6):
        next(reference)
    position = reference.state()
    expected = [next(reference) for _ in range(5)]
    resumed = Loader(data, 8, 2, seed=3, transform=transform)
    resumed.restore(position)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["image"], want["image"])
    batch = expected[0]
    assert not np.array_equal(batch["image"], images[batch["id"]])  # it did change them
    cropped = random_crop(images, RowRandom(0, 0, np.arange(40)), 2)
    for original, crop in zip(images, cropped, strict=True):  # a crop is a shifted window
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(crop[max(dy, 0):6 + min(dy, 0), max(dx, 0):6 + min(dx, 0)],
                                   original[max(-dy, 0):6 + min(-dy, 0),
                                            max(-dx, 0):6 + min(-dx, 0)])]
        assert found
    flipped = random_flip(images, RowRandom(1, 0, np.arange(40)))
    assert all(np.array_equal(f, o) or np.array_equal(f, o[:, ::-1])
               for f, o in zip(flipped, images, strict=True))
