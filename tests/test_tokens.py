"""Token files (nanoGPT's raw .bin, llm.c's shards): windows as numpy slicing cuts them,
never across a shard, held-out files and tails, one-line refusals, and gpt_lm training
from a file that scripts/make_tokens.py wrote."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import gpt_lm
from jaxdist import fit
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.checkpoints.identity import data_fingerprint
from jaxdist.data.tokens import (
    LLMC_MAGIC,
    TokenShard,
    TokenWindows,
    open_token_file,
    read_token_files,
    token_windows,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_tokens.py"


def load_make_tokens():
    spec = importlib.util.spec_from_file_location("make_tokens", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_raw(path, tokens):
    np.asarray(tokens, "<u2").tofile(path)
    return path


def write_llmc(path, tokens, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = LLMC_MAGIC, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes())
    return path


def reference_windows(tokens, length):
    """Window i = tokens[i * length : i * length + length + 1], by plain slicing."""
    n = (len(tokens) - 1) // length
    return np.stack([np.asarray(tokens[i * length:i * length + length + 1], np.int32)
                     for i in range(n)]).reshape(n, length + 1)


def random_tokens(n, seed, vocab=50257):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def test_raw_and_llmc_files_give_the_same_windows_as_slicing(tmp_path):
    tokens = random_tokens(1000, 0)
    raw = open_token_file(write_raw(tmp_path / "a.bin", tokens))
    llmc = open_token_file(write_llmc(tmp_path / "b.bin", tokens))
    assert isinstance(raw, TokenShard) and isinstance(llmc, TokenShard)  # opened, not loaded
    expected = reference_windows(tokens, 16)
    for shard in (raw, llmc):
        windows = TokenWindows([shard], 16)
        assert len(windows) == len(expected) == 62
        order = np.random.default_rng(1).permutation(len(windows))
        got = windows.get_batch(order)["tokens"]
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected[order])


def test_a_folder_of_shards_gives_each_shards_windows_and_none_across(tmp_path):
    lengths, length = [48, 33, 72], 8  # 48: the last token ends no window
    shards = [random_tokens(n, seed) for seed, n in enumerate(lengths)]
    write_raw(tmp_path / "shard_00.bin", shards[0])
    write_llmc(tmp_path / "shard_01.bin", shards[1])
    write_raw(tmp_path / "shard_02.bin", shards[2])
    train, held_out = read_token_files(tmp_path, 0.0)
    assert [len(s) for s in train] == lengths and held_out == []
    windows = TokenWindows(train, length)
    expected = np.concatenate([reference_windows(s, length) for s in shards])
    assert len(windows) == len(expected) == 5 + 4 + 8
    order = np.random.default_rng(0).permutation(len(windows))
    np.testing.assert_array_equal(windows.get_batch(order)["tokens"], expected[order])
    fingerprint = data_fingerprint(windows)
    assert fingerprint["rows"] == 17 and fingerprint["arrays"] == {"tokens": "int32[9]"}


@pytest.mark.parametrize("names", [("train.bin", "val.bin"),
                                   ("fineweb_train_000001.bin", "fineweb_val_000000.bin")])
def test_val_files_are_the_held_out_set(tmp_path, names):
    train_tokens, val_tokens = random_tokens(300, 0), random_tokens(200, 1)
    write_raw(tmp_path / names[0], train_tokens)
    write_llmc(tmp_path / names[1], val_tokens)
    (tmp_path / "notes.txt").write_text("not a shard")
    train, held_out = read_token_files(tmp_path, 0.5)  # the fraction is for folders without val
    assert len(train) == 1 and len(held_out) == 1
    np.testing.assert_array_equal(train[0], train_tokens)
    np.testing.assert_array_equal(held_out[0], val_tokens)


def test_without_val_files_the_last_fraction_of_the_tokens_is_held_out(tmp_path):
    shards = [random_tokens(n, seed) for seed, n in enumerate([100, 60, 40])]
    for number, shard in enumerate(shards):
        write_raw(tmp_path / f"part{number}.bin", shard)
    train, held_out = read_token_files(tmp_path, 0.25)  # tokens 150..200: in the last shards
    everything = np.concatenate(shards)
    assert [len(s) for s in train] == [100, 50] and [len(s) for s in held_out] == [10, 40]
    np.testing.assert_array_equal(np.concatenate(train), everything[:150])
    np.testing.assert_array_equal(np.concatenate(held_out), everything[150:])
    single_train, single_held = read_token_files(tmp_path / "part0.bin", 0.1)
    np.testing.assert_array_equal(single_train[0], shards[0][:90])
    np.testing.assert_array_equal(single_held[0], shards[0][90:])


def header_cut_short(path):
    path.write_bytes(np.array([LLMC_MAGIC, 1, 10], "<i4").tobytes() + bytes(20))


@pytest.mark.parametrize("write, message", [
    (header_cut_short, "header is cut short"),
    (lambda p: write_llmc(p, random_tokens(10, 0), version=2), "version 2"),
    (lambda p: write_llmc(p, random_tokens(10, 0), count=12), "says 12 tokens"),
    (lambda p: write_llmc(p, random_tokens(10, 0), count=-1), "says -1 tokens"),
    (lambda p: p.write_bytes(bytes(21)), "odd size"),
], ids=["cut-header", "version", "size-mismatch", "negative-count", "odd-size"])
def test_bad_files_are_refused_in_one_line(tmp_path, write, message):
    path = tmp_path / "bad.bin"
    write(path)
    with pytest.raises(UserError, match=message) as error:
        open_token_file(path)
    assert "\n" not in str(error.value)


def test_tokens_beyond_the_vocabulary_are_refused_naming_the_size(tmp_path):
    tokens = np.arange(600) % 300
    path = write_raw(tmp_path / "t.bin", tokens)
    with pytest.raises(UserError, match="model.vocab_size=300 or more") as error:
        token_windows(path, 8, 0.1, 299)
    assert "\n" not in str(error.value)
    train, held_out = token_windows(path, 8, 0.1, 300)
    assert len(train) == 67 and len(held_out) == 7


def test_gpt_lm_refuses_path_and_tokens_together_and_too_few_tokens(tmp_path):
    path = write_raw(tmp_path / "t.bin", random_tokens(200, 0, vocab=256))
    both = apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={path}",
                                                  f"data.path={tmp_path}"])
    with pytest.raises(UserError, match="both given") as error:
        gpt_lm.build(both)
    assert "\n" not in str(error.value)
    short = apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={path}"])
    with pytest.raises(UserError, match="no window of 129 tokens"):
        gpt_lm.build(short)  # 190 training tokens: one window; 10 held out: none


def test_make_tokens_is_deterministic_and_writes_the_llmc_header(tmp_path):
    make = [sys.executable, str(SCRIPT), "--tokens", "5000", "--vocab", "100"]
    for name, args in [("a.bin", []), ("b.bin", []), ("c.bin", ["--seed", "1"]),
                       ("d.bin", ["--format", "llmc"])]:
        subprocess.run([*make[:2], str(tmp_path / name), *make[2:], *args], check=True,
                       capture_output=True, timeout=120)
    a, b, c, d = (tmp_path / n for n in ["a.bin", "b.bin", "c.bin", "d.bin"])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.stat().st_size == 10000 and d.stat().st_size == 1024 + 10000
    header = np.fromfile(d, "<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5000] and not header[3:].any()
    assert d.read_bytes()[1024:] == a.read_bytes()  # same tokens, with llm.c's header
    tokens = np.fromfile(a, "<u2").astype(np.int64)
    assert tokens.max() < 100
    assert 0.4 < np.mean(np.diff(tokens) % 100 == 1) < 0.6  # the learnable "plus one" rule
    assert np.mean(tokens < 10) > 0.3  # Zipf-like: the low tokens are frequent


def test_make_tokens_does_not_depend_on_its_chunk_size():
    make_tokens = load_make_tokens()
    whole = np.concatenate(list(make_tokens.synthetic_tokens(1000, 50, 3, chunk=1000)))
    pieces = np.concatenate(list(make_tokens.synthetic_tokens(1000, 50, 3, chunk=97)))
    assert len(whole) == 1000 and np.array_equal(whole, pieces)


@pytest.mark.slow  # trains a model end to end
def test_gpt_lm_trains_from_a_make_tokens_file(tmp_path):
    path = load_make_tokens().write_tokens(tmp_path / "tokens.bin", 60000, 64, "llmc", seed=0)
    config = apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={path}",
                                                    "model.vocab_size=64"])
    experiment = gpt_lm.build(config)
    assert len(experiment.train_data) == (int(60000 * (1 - 0.05)) - 1) // 128
    result = fit(experiment, config, stream=None)
    train = [r for r in result.records if r["split"] == "train"]
    assert len(train) == 2 and train[-1]["loss"] < train[0]["loss"], train
    assert train[0]["loss"] < 1.5 * np.log(64)  # starts near a uniform guess over 64 tokens
    assert "bits_per_token" in train[0] and "bits_per_byte" not in train[0]
