"""Multi-process runs at their edges: unshared workdirs, waits that end, bad flags before
joining, and a signal to one process (2 processes x 4 CPU devices on 127.0.0.1)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxdist.launch import free_port
from tests.toy import train_into, wait_for_file

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ["linear_regression", "optimizer.name=adam", "train.batch_size=64",
          "train.log_every=5"]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def process(index, *args, port, processes=2):
    """One process of a run joined on 127.0.0.1:`port`, with 4 CPU devices."""
    return subprocess.Popen(
        [sys.executable, "-m", "jaxdist.run", *args, "--cpu-devices", "4", "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(index)],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(processes, timeout=120):
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def checkpoints(workdir):
    return sorted(p.name for p in (Path(workdir) / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 20 steps on 8 devices, checkpointed every 10 (what the pairs resume)."""
    workdir = tmp_path_factory.mktemp("trained") / "w0"
    train_into(workdir, *LINEAR, "train.steps=20", "train.checkpoint_every=10")
    return workdir


def copy_of(workdir, where):
    subprocess.run(["cp", "-r", str(workdir), str(where)], check=True, timeout=60)
    return where


# Items 1 and 9: processes that do not share their workdir never train together.

def test_processes_on_unshared_workdirs_stop_before_the_first_step(trained, tmp_path):
    w0, w1 = copy_of(trained, tmp_path / "w0"), tmp_path / "w1"
    before = (w0 / "metrics.jsonl").read_text()
    port = free_port()
    started = time.time()
    pair = [process(i, *LINEAR, "train.steps=40", "parallel.shard=params", "--workdir",
                    str((w0, w1)[i]), port=port) for i in range(2)]
    for code, _out, err in finish(pair):
        assert code == 2, err[-2000:]
        assert "process 1 does not see the workdir that process 0 writes" in last_line(err)
        assert f"--workdir {w1}" in last_line(err)
    assert time.time() - started < 90  # refused at once, not after orbax's barrier timeout
    assert checkpoints(w0) == ["step_00000010", "step_00000020"]
    assert (w0 / "metrics.jsonl").read_text() == before


def test_processes_that_would_resume_different_checkpoints_stop(trained, tmp_path):
    w0 = copy_of(trained, tmp_path / "w0")
    w1 = tmp_path / "w1"
    w1.mkdir()
    (w1 / "lock").symlink_to(w0 / "lock")  # the same lock file, but not the same checkpoints
    port = free_port()
    pair = [process(i, *LINEAR, "train.steps=40", "--workdir", str((w0, w1)[i]), port=port)
            for i in range(2)]
    for code, _out, err in finish(pair):
        assert code == 2, err[-2000:]
        line = last_line(err)
        assert "would not resume from the same checkpoint: process 0 from step_00000020 " \
               "(manifest sha256 " in line and "process 1 from nothing" in line
    assert checkpoints(w0) == ["step_00000010", "step_00000020"]


# Item 9: every wait for the other processes ends, with one line.

SLOW_PEER = '''
"""linear_regression, but process 1 takes its time to build."""
import time

import jax

from experiments.linear_regression import build as _build, config  # noqa: F401


def build(config):
    if jax.process_index() == 1:
        time.sleep(float({seconds!r}))
    return _build(config)
'''


def test_a_peer_that_does_not_come_stops_every_process_after_the_barrier_timeout(tmp_path):
    slow = tmp_path / "slow_peer.py"
    slow.write_text(textwrap.dedent(SLOW_PEER.format(seconds=60)))
    started, port = time.time(), free_port()
    pair = [process(i, str(slow), "train.steps=10", "--barrier-timeout", "3", "--workdir",
                    str(tmp_path / "run"), port=port) for i in range(2)]
    (code0, _, err0), (code1, _, err1) = finish(pair)
    waited = "process 0 waited --barrier-timeout 3 s at the processes' agreement on 'start'"
    assert code0 == 2 and waited in last_line(err0), err0[-2000:]
    assert code1 == 2 and f"stopping because process 0: {waited}" in last_line(err1), \
        err1[-2000:]
    assert time.time() - started < 50


# Items 10 and 14: what can be checked before joining is; the rest ends in one line.

@pytest.mark.parametrize("flags,words", [
    (["--join-timeout", "-5"], "--join-timeout -5 must be a positive number of seconds"),
    (["--heartbeat-timeout", "0"], "--heartbeat-timeout 0 must be a positive number"),
    (["--barrier-timeout", "0"], "--barrier-timeout 0 must be a positive number"),
    (["--coordinator", "127.0.0.1:0"], "port 0 is not a TCP port (1 to 65535)"),
    (["--coordinator", "127.0.0.1:99999"], "port 99999 is not a TCP port (1 to 65535)"),
])
@pytest.mark.parametrize("index", [0, 1])
def test_bad_multi_process_flags_are_refused_before_joining(tmp_path, flags, words, index):
    coordinator = [] if "--coordinator" in flags else ["--coordinator",
                                                       f"127.0.0.1:{free_port()}"]
    result = subprocess.run(
        [sys.executable, "-m", "jaxdist.run", *LINEAR, "--workdir", str(tmp_path / "run"),
         *coordinator, "--num-processes", "2", "--process-id", str(index), *flags],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr[-2000:]


def test_a_port_held_by_another_program_is_one_line_for_the_joining_process(tmp_path):
    with socket.socket() as other:  # accepts connections, never answers
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.time()
        (code, _, err), = finish([process(1, *LINEAR, "--workdir", str(tmp_path / "run"),
                                          port=port)], timeout=60)
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1
    assert f"what listens at --coordinator 127.0.0.1:{port} is not a JAX coordinator" in err
    assert time.time() - started < 40


def test_a_process_that_never_starts_ends_the_others_in_one_line(tmp_path):
    started = time.time()
    (code, _, err), = finish([process(0, *LINEAR, "--join-timeout", "5", "--workdir",
                                      str(tmp_path / "run"), port=free_port())], timeout=60)
    assert code == 2, err[-2000:]
    assert "process 0 could not join the run at --coordinator 127.0.0.1:" in last_line(err)
    assert "within --join-timeout 5 s" in last_line(err)
    assert "Check failure stack trace" not in err
    assert time.time() - started < 40


def test_a_second_process_with_a_taken_id_ends_in_one_line(tmp_path):
    port = free_port()
    pair = [process(i, *LINEAR, "train.steps=100000000", "--workdir", str(tmp_path / "run"),
                    port=port) for i in range(2)]
    try:
        assert wait_for_file(tmp_path / "run" / "metrics.jsonl"), pair[0].stderr.read()
        (code, _, err), = finish([process(1, *LINEAR, "--join-timeout", "5", "--workdir",
                                          str(tmp_path / "other"), port=port)], timeout=60)
    finally:
        results = finish(pair, timeout=60)
    assert code == 2 and "process 1 could not join the run" in last_line(err), err[-2000:]
    # JAX ends the two that had joined from its own thread (documented in the README).
    for status, _out, stderr in results:
        assert status != 0
        assert "Terminating process because the JAX distributed service detected fatal " \
               "errors" in stderr


# Item 17: a signal to one process is named as such.

def test_sigterm_to_process_1_only_is_named_by_process_0(tmp_path):
    workdir, port = tmp_path / "run", free_port()
    pair = [process(i, *LINEAR, "train.steps=100000000", "train.checkpoint_every=0",
                    "--workdir", str(workdir), port=port) for i in range(2)]
    assert wait_for_file(workdir / "metrics.jsonl"), pair[0].stderr.read()
    pair[1].send_signal(signal.SIGTERM)
    (code0, out0, err0), (code1, _, err1) = finish(pair)
    assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    line = last_line(out0)
    assert line.startswith("SIGTERM to process 1: stopped at step "), out0[-2000:]
    step = int(line.split("stopped at step ")[1].split()[0])
    assert step % 5 == 0 and (workdir / "checkpoints" / f"step_{step:08d}").is_dir()
    saved = json.loads((workdir / "checkpoints" / f"step_{step:08d}" / "meta.json")
                       .read_text())
    assert saved["stop_reason"] == "preempted"
