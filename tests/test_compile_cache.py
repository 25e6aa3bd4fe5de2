"""A resumed run takes its compiled steps from the persistent compilation cache."""

from __future__ import annotations

import re

import pytest
from test_cli import run_cli

pytestmark = pytest.mark.slow  # starts processes or trains end to end

RUN = ["linear_regression", "train.log_every=50", "train.eval_every=0"]


def _first_step(stdout: str) -> tuple[int, int]:
    match = re.search(r"(\d+) program\(s\) reused, (\d+) compiled", stdout)
    assert match, stdout
    return int(match[1]), int(match[2])


def test_a_resumed_run_reuses_the_compiled_step_and_continues_exactly(tmp_path):
    cache = tmp_path / "cache"
    first = run_cli(*RUN, "train.steps=100", "--workdir", str(tmp_path / "run"),
                    "--compilation-cache", str(cache))
    assert first.returncode == 0, first.stderr
    reused, compiled = _first_step(first.stdout)
    assert reused == 0 and compiled >= 1
    assert any(cache.iterdir())

    second = run_cli(*RUN, "train.steps=200", "--workdir", str(tmp_path / "run"),
                     "--compilation-cache", str(cache))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    reused, compiled = _first_step(second.stdout)
    assert reused >= 1 and compiled == 0

    straight = run_cli(*RUN, "train.steps=200", "--workdir", str(tmp_path / "straight"),
                       "--compilation-cache", "off")
    assert straight.returncode == 0, straight.stderr
    assert "compilation cache" not in straight.stdout
    assert "first step (compiling included) took" in straight.stdout
    # The same points, but for the evaluation that ended the first 100 steps.
    resumed = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [line for line in resumed if not line.startswith('{"step": 100, "split": "eval"')] \
        == (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
