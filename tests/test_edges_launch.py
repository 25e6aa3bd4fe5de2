"""`python -m jaxdist.launch` at the edges: its processes die with it, even when it is
SIGKILLed (no clean-up of its own can run then)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.toy import wait_for_file

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ["linear_regression", "train.batch_size=64", "train.log_every=5", "train.eval_every=10"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="reads processes from /proc (Linux)")]


def stat_fields(pid):
    """/proc/PID/stat after the command name: (state, parent pid), or None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, parent = text.rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def alive(pid):
    """Whether `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children_of(pid):
    """The pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(entry.name)
            if fields is not None and fields[1] == pid:
                found.append(int(entry.name))
    return sorted(found)


def test_a_sigkilled_launcher_takes_its_processes_with_it(tmp_path):
    workdir = tmp_path / "run"
    out, err = (tmp_path / "stdout").open("w"), (tmp_path / "stderr").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jaxdist.launch", "--num-processes", "2", "--local-devices",
         "4", *LINEAR, "train.steps=10000000", "train.checkpoint_every=0",
         "--workdir", str(workdir)], cwd=ROOT, stdout=out, stderr=err)
    children = []
    try:
        assert wait_for_file(workdir / "metrics.jsonl", timeout=240), \
            (tmp_path / "stderr").read_text()[-2000:]
        children = children_of(launcher.pid)
        assert len(children) == 2 and all(alive(pid) for pid in children), children
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.time() + 10
        while any(alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)], "still training 10 s later"
        shown = re.findall(r"process (\d): pid (\d+)", (tmp_path / "stdout").read_text())
        assert sorted(int(pid) for _, pid in shown) == children
        assert [index for index, _ in shown] == ["0", "1"]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_launcher_refuses_more_processes_than_a_machine_should_start():
    result = subprocess.run([sys.executable, "-m", "jaxdist.launch", "--num-processes",
                             "100000", "linear_regression"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "--num-processes must be between 1 and 64" in result.stderr
