"""A workdir at its edges: data, not code; its own files only; empty paths; bad values on
every path into `fit`."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import jaxdist
from jaxdist import fit
from jaxdist.errors import UserError
from jaxdist.restore import restore_run
from tests.toy import mlp_experiment, toy_config

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_FILE = '''
"""linear_regression, from a file of the user's own."""
from experiments.linear_regression import build, config  # noqa: F401
'''
PAYLOAD = '''
"""Code a stranger put in a workdir's config.json."""
from pathlib import Path
Path({marker!r}).write_text("ran")
from experiments.linear_regression import build, config  # noqa: F401
'''


def run_cli(*args, timeout=300, module="jaxdist.run", cwd=ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
    """A run trained from an experiment file; returns (workdir, experiment file)."""
    root = tmp_path_factory.mktemp("file_run")
    source = root / "mine.py"
    source.write_text(EXPERIMENT_FILE)
    experiment, config = jaxdist.load(str(source), ["train.steps=2"])
    fit(experiment, config, root / "run", stream=None)
    return root / "run", source


def point_config_at(workdir, tmp_path, path, digest=None):
    """A copy of `workdir` whose config.json names `path` (and `digest`, or none)."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True, timeout=60)
    saved = json.loads((copy / "config.json").read_text())
    saved["experiment"] = str(path)
    saved.pop("experiment_sha256")
    if digest is not None:
        saved["experiment_sha256"] = digest
    (copy / "config.json").write_text(json.dumps(saved))
    return copy


# Item 6: reading a workdir never runs the code it names.

def test_a_workdir_naming_a_stranger_file_does_not_run_it(file_run, tmp_path):
    workdir, _ = file_run
    marker = tmp_path / "marker"
    payload = tmp_path / "payload.py"
    payload.write_text(PAYLOAD.format(marker=str(marker)))
    copy = point_config_at(workdir, tmp_path, payload)
    with pytest.raises(UserError, match="does not run code that a workdir names.*--experiment"):
        restore_run(copy)
    with pytest.raises(UserError, match="has no sha256 recorded"):
        restore_run(copy, trust_workdir=True)
    assert not marker.exists()


def test_the_recorded_sha256_lets_a_trusted_workdir_run_its_unchanged_file(file_run, tmp_path):
    workdir, source = file_run
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["experiment"] == str(source.resolve())
    assert len(saved["experiment_sha256"]) == 64
    assert restore_run(workdir, trust_workdir=True).step == 2
    assert restore_run(workdir, experiment=str(source)).step == 2  # named by the user
    changed = tmp_path / "changed.py"
    changed.write_text(EXPERIMENT_FILE + "\n# edited\n")
    copy = point_config_at(workdir, tmp_path, changed, digest=saved["experiment_sha256"])
    with pytest.raises(UserError, match="the file changed since the run was trained"):
        restore_run(copy, trust_workdir=True)


@pytest.mark.parametrize("value", [7, None, ["linear_regression"], "../../tmp/x", "os.path"])
def test_a_config_json_whose_experiment_is_not_a_bundled_name_is_one_line(file_run, tmp_path,
                                                                         value):
    workdir, _ = file_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True, timeout=60)
    saved = json.loads((copy / "config.json").read_text())
    saved["experiment"] = value
    (copy / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="experiment"):
        restore_run(copy)
