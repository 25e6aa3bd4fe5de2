"""Token files at the edges: a file truncated while training is one line (never a bus
error), held-out files matched by an exact pattern and named, an llm.c header with a wrong
magic refused, advice that names real keys, and gpt_lm's config values checked up front."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import gpt_lm
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.data.tokens import (
    LLMC_MAGIC,
    TokenWindows,
    open_token_file,
    read_token_files,
    token_files,
)
from tests.toy import wait_for_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_tokens.py"


def write_raw(path, tokens):
    np.asarray(tokens, "<u2").tofile(path)
    return path


def write_llmc(path, tokens, magic=LLMC_MAGIC, version=1):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(tokens)
    dtype = "<u2" if version == 1 else "<u4"
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype).tobytes())
    return path


def tokens(n, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def one_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


# --- (5) a token file truncated while training ---------------------------------------

@pytest.mark.parametrize("llmc", [False, True], ids=["raw", "llmc"])
def test_a_file_that_shrank_between_batches_is_one_line_naming_it(tmp_path, llmc):
    path = tmp_path / "t.bin"
    (write_llmc if llmc else write_raw)(path, tokens(2000))
    size = path.stat().st_size
    windows = TokenWindows([open_token_file(path)], 16)
    first = windows.get_batch(np.array([0, 1]))["tokens"]
    np.testing.assert_array_equal(first[0], tokens(2000)[:17])
    os.truncate(path, size // 2)
    # Windows 0 and 1 still lie inside what is left; the shrink is seen all the same.
    with pytest.raises(UserError) as error:
        windows.get_batch(np.array([0, 1]))
    message = one_line(error)
    assert f"data.tokens file {path} was truncated while training" in message
    assert f"{size} bytes when it was opened, {size // 2} now" in message
    assert "resume from the newest checkpoint" in message


def test_a_read_past_the_new_end_is_an_error_not_a_bus_error(tmp_path):
    path = write_raw(tmp_path / "t.bin", tokens(100_000))
    shard = open_token_file(path)
    os.truncate(path, 4096)
    with pytest.raises(UserError, match="was truncated while training") as error:
        shard.windows(np.array([50_000]), 17)  # the read itself, without the size check
    assert "200000 bytes when it was opened, 4096 now" in one_line(error)


def test_reading_a_truncated_file_in_a_fresh_process_exits_cleanly(tmp_path):
    """The memory-mapped reader died of SIGBUS here (status -7, nothing on stderr)."""
    path = write_raw(tmp_path / "t.bin", tokens(1_000_000))
    code = ("import sys, os, numpy as np\n"
            "from jaxdist.data.tokens import TokenWindows, open_token_file\n"
            "from jaxdist.base.errors import UserError\n"
            f"w = TokenWindows([open_token_file({str(path)!r})], 128)\n"
            "w.get_batch(np.arange(8))\n"
            f"os.truncate({str(path)!r}, 4096)\n"
            "try:\n"
            "    w.get_batch(np.arange(7000, 7008))\n"
            "except UserError as e:\n"
            "    print(e); sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "was truncated while training" in result.stdout


@pytest.mark.slow  # trains a model end to end
def test_gpt_lm_whose_token_file_is_truncated_while_training_stops_in_one_line(tmp_path):
    path = tmp_path / "tokens.bin"
    subprocess.run([sys.executable, str(SCRIPT), str(path), "--tokens", "2000000", "--vocab",
                    "64"], check=True, capture_output=True, timeout=120)
    size = path.stat().st_size
    workdir = tmp_path / "run"
    stderr = (tmp_path / "stderr").open("w+")
    run = subprocess.Popen(
        [sys.executable, "-m", "jaxdist.run", "gpt_lm", f"data.tokens={path}",
         "model.vocab_size=64", "train.steps=10000000", "train.batch_size=16",
         "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
         "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
        text=True)
    try:
        assert wait_for_file(workdir / "metrics.jsonl", timeout=240), "training never logged"
        os.truncate(path, 4096)
        truncated = time.time()
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    stderr.seek(0)
    lines = stderr.read().strip().splitlines()
    assert code == 2, (code, lines[-20:])
    assert len(lines) == 1, lines[-20:]
    assert lines[0].startswith(f"error: data.tokens file {path} was truncated while training")
    assert f"({size} bytes when it was opened, 4096 now)" in lines[0]
    assert time.time() - truncated < 60
    assert json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])["step"] >= 1


# --- (17) held-out files by an exact pattern, wrong magic, advice with real keys ------

@pytest.mark.parametrize("name, held", [
    ("val.bin", True), ("fineweb_val_000000.bin", True), ("shakespeare_val.bin", True),
    ("val_01.bin", True), ("train_interval_000.bin", False), ("valid.bin", False),
    ("eval.bin", False), ("interval.bin", False), ("my_val_set.bin", False),
    ("VAL.bin", False),
])
def test_held_out_files_match_the_documented_pattern_exactly(tmp_path, name, held):
    write_raw(tmp_path / "train_000.bin", tokens(300))
    write_raw(tmp_path / name, tokens(300, 1))
    train, held_out = token_files(tmp_path)
    assert [p.name for p in held_out] == ([name] if held else [])
    assert sorted(p.name for p in train) == sorted(["train_000.bin"] + ([] if held else [name]))


def test_a_folder_without_training_files_names_the_pattern(tmp_path):
    write_raw(tmp_path / "val.bin", tokens(300))
    with pytest.raises(UserError, match=r"\*_val\.bin") as error:
        token_files(tmp_path)
    one_line(error)


def test_gpt_lm_says_which_files_it_holds_out(tmp_path, capsys):
    for name, seed in [("train_000.bin", 0), ("train_interval_000.bin", 1),
                       ("fineweb_val_000000.bin", 2)]:
        write_raw(tmp_path / name, tokens(5000, seed))
    gpt_lm.build(apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={tmp_path}"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if "held out" in line]
    assert len(lines) == 1, lines
    assert "2 training files" in lines[0] and "held out: fineweb_val_000000.bin" in lines[0]
    train, held_out = read_token_files(tmp_path, 0.05)
    assert len(train) == 2 and len(held_out) == 1


def test_gpt_lm_says_when_it_holds_out_the_last_fraction(tmp_path, capsys):
    write_raw(tmp_path / "train_interval_000.bin", tokens(5000))
    gpt_lm.build(apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={tmp_path}",
                                                        "data.held_out=0.1"]))
    out = capsys.readouterr().out
    assert "1 training file" in out and "the last 10% of their tokens are held out" in out


@pytest.mark.parametrize("version", [1, 2])
def test_an_llmc_header_with_a_wrong_magic_is_refused_naming_both(tmp_path, version):
    path = write_llmc(tmp_path / "t.bin", tokens(500), magic=20240519, version=version)
    with pytest.raises(UserError) as error:
        open_token_file(path)
    message = one_line(error)
    assert "magic number 20240519" in message and "20240520" in message
    assert "vocab_size" not in message


def test_a_raw_file_that_starts_with_zeros_is_still_raw(tmp_path):
    data = np.concatenate([np.zeros(600, np.uint16), tokens(400)])
    shard = open_token_file(write_raw(tmp_path / "t.bin", data))
    np.testing.assert_array_equal(np.asarray(shard), data)


def test_a_tiny_token_file_advises_real_keys(tmp_path):
    path = write_raw(tmp_path / "t.bin", tokens(200))
    config = apply_overrides(gpt_lm.tiny_config(), [f"data.tokens={path}"])
    with pytest.raises(UserError, match="no window of 129 tokens") as error:
        gpt_lm.build(config)
    message = one_line(error)
    assert "model.seq_len" not in message
    assert "data.window" in message and "model.size=tiny" in message


def test_a_tiny_text_advises_real_keys(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 100)
    config = apply_overrides(gpt_lm.tiny_config(), [f"data.path={tmp_path / 't.txt'}"])
    with pytest.raises(UserError) as error:
        gpt_lm.build(config)
    message = one_line(error)
    assert "model.seq_len" not in message and "data.window" in message


# --- (16) gpt_lm's config values ---------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("model.vocab_size=0", "model.vocab_size=0"),
    ("model.vocab_size=-5", "model.vocab_size=-5"),
    ("model.vocab_size=100", "model.vocab_size=100"),  # bytes need 256
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("model.dropout=-0.1", "model.dropout=-0.1"),
    ("model.loss_chunk=-1", "model.loss_chunk=-1"),
    ("data.held_out=0", "data.held_out=0"),
    ("data.held_out=1", "data.held_out=1"),
    ("data.max_bytes=-5", "data.max_bytes=-5"),
    ("data.window=-1", "data.window=-1"),
    ("model.size=huge", "model.size=huge"),
])
def test_gpt_lm_refuses_bad_values_in_one_line_naming_the_key(override, key):
    config = apply_overrides(gpt_lm.tiny_config(), [override])
    with pytest.raises(UserError) as error:
        gpt_lm.build(config)
    assert one_line(error).startswith(key), str(error.value)


def test_gpt_lm_with_a_zero_vocabulary_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxdist.run", "gpt_lm",
                             "model.vocab_size=0", "--workdir", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: model.vocab_size=0 "), lines
