"""The GPU benchmark reads what jaxdist's CLI prints: checked here, before a GPU day."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_gpu")


def test_the_command_it_runs_trains_and_its_figures_are_read(bench, tmp_path):
    tokens = load_script("make_tokens").write_tokens(tmp_path / "t.bin", 200_000, 512, "llmc",
                                                     seed=0)
    shape = bench.model_shape(smoke=True, batch=8)
    command = bench.jaxdist_command(shape, True, tokens, tmp_path / "run", 12,
                                    ["train.skip_with=where", "train.batch_size=16"],
                                    tmp_path / "cache")
    assert sum(arg.startswith("train.batch_size=") for arg in command) == 1
    assert "--cpu-devices" not in command
    done = subprocess.run([*command, "--cpu-devices", "8"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    own = bench.variant_shape(shape, ["train.batch_size=16"])
    figures = bench.summarize_run(done.stdout, own)
    assert len(figures["steps_per_s_windows"]) == 6  # 12 steps logged every 2
    assert figures["tokens_per_s"] == pytest.approx(figures["steps_per_s"] * 16 * 128)
    assert figures["first_step_s"] > 0 and figures["programs_compiled"] >= 1
    assert figures["checkpoint_background"] is True and figures["checkpoint_write_s"] >= 0
    assert 0 <= figures["checkpoint_share"] < 1


def test_without_out_it_writes_outside_the_checkout(bench):
    assert bench.default_out({"OUT": "/x"}) == Path("/x/bench_gpu.json")
    elsewhere = bench.default_out({})
    assert elsewhere.name == "bench_gpu.json" and not elsewhere.is_relative_to(ROOT)
    assert elsewhere.parent.is_dir()
    elsewhere.parent.rmdir()
