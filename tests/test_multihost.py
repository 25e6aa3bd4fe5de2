"""Multi-process runs on jax.distributed, all on 127.0.0.1: 2 processes x 4 CPU devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdist.launch import free_port
from tests.id_experiment import SIZE
from tests.toy import train_into, wait_for_file

pytestmark = pytest.mark.slow  # starts processes or trains end to end

ROOT = Path(__file__).resolve().parent.parent
ID_EXPERIMENT = str(ROOT / "tests" / "id_experiment.py")
LINEAR = ["linear_regression", "train.batch_size=64", "train.log_every=5", "train.eval_every=10"]


def launch(*args, processes=2, devices=4, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxdist.launch", "--num-processes",
                           str(processes), "--local-devices", str(devices), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def single_records(name, *overrides, workdir):
    """The records of a 1 x 8 run in this process (the reference a test compares with)."""
    train_into(workdir, name, *overrides)
    return records(workdir)


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text()
            .splitlines()]


def two_process_run(workdir, backend):
    """2 x 4 devices, 20 steps of linear_regression on `backend`: (its output, its workdir)."""
    result = launch(*LINEAR, "train.steps=20", f"parallel.backend={backend}",
                    "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    return result, workdir


@pytest.fixture(scope="module")
def two_process_pmap_run(tmp_path_factory):
    """The pmap run of `two_process_run`, which two tests compare with (one xdist group)."""
    return two_process_run(tmp_path_factory.mktemp("two-pmap") / "run", "pmap")


@pytest.mark.xdist_group("two_process_pmap_run")
@pytest.mark.parametrize("backend", ["pmap", "shard_map"])
def test_two_processes_of_four_devices_equal_one_process_of_eight(request, tmp_path, backend):
    two, two_workdir = (request.getfixturevalue("two_process_pmap_run") if backend == "pmap"
                        else two_process_run(tmp_path / "two", backend))
    a = records(two_workdir)
    b = single_records(*LINEAR, "train.steps=20", f"parallel.backend={backend}",
                       workdir=tmp_path / "one")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key not in ("step", "split"):
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5)
    assert "[p0] train step 20/20" in two.stdout and "[p1] train" not in two.stdout


def test_one_epoch_over_two_processes_reads_every_example_once(tmp_path):
    result = launch(ID_EXPERIMENT, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    train, evaluation = records(tmp_path / "run")
    ids = np.arange(SIZE, dtype=np.float64)
    for point in (train, evaluation):
        assert point["examples"] == SIZE
        np.testing.assert_allclose(point["id"], ids.mean(), rtol=1e-6)
        np.testing.assert_allclose(point["id_squared"], (ids**2).mean(), rtol=1e-6)


@pytest.mark.xdist_group("two_process_pmap_run")
def test_a_two_process_run_resumes_exactly(tmp_path, two_process_pmap_run):
    _, whole = two_process_pmap_run
    for steps in (10, 20):
        part = launch(*LINEAR, f"train.steps={steps}", "parallel.backend=pmap",
                      "--workdir", str(tmp_path / "split"))
        assert part.returncode == 0, part.stderr[-2000:]
    assert "resumed from" in part.stdout
    after = [r for r in records(tmp_path / "split") if r["step"] > 10]
    assert after == [r for r in records(whole) if r["step"] > 10]
    assert len(after) == 3


def test_a_dead_peer_stops_the_survivor_within_60_seconds(tmp_path):
    port = free_port()
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "jaxdist.run", *LINEAR, "train.steps=10000000",
         "--workdir", str(workdir), "--cpu-devices", "4", "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(2)]
    wait_for_file(workdir / "metrics.jsonl")
    assert (workdir / "metrics.jsonl").exists(), processes[0].stderr.read()[-2000:]
    processes[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        processes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        processes[0].kill()
        pytest.fail("the surviving process still ran 60 s after its peer died")
    elapsed = time.time() - killed
    stderr = processes[0].stderr.read()
    processes[1].wait()
    assert processes[0].returncode != 0
    assert "another task died" in stderr
    assert elapsed < 60


def test_the_launcher_fails_when_a_process_fails(tmp_path):
    result = launch("linear_regression", "train.batch_size=10", "--workdir",
                    str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert "cannot be split over 2 processes x 4 devices" in result.stderr


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step(tmp_path):
    workdir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jaxdist.launch", "--num-processes", "2", "--local-devices",
         "4", *LINEAR, "train.steps=10000000", "train.checkpoint_every=0",
         "--workdir", str(workdir)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    wait_for_file(workdir / "metrics.jsonl")
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-2000:]
    step = int(out.split("stopped at step ")[1].split()[0])
    assert step % 5 == 0  # the processes agree at a log point (train.log_every=5)
    assert (workdir / "checkpoints" / f"step_{step:08d}").is_dir()


def start_pair(*args, port=None, env=None, per_process=lambda i: []):
    """Two processes of `python -m jaxdist.run`, 4 CPU devices each, joined on 127.0.0.1."""
    port = port or free_port()
    env = {k: v for k, v in (env or os.environ).items() if k != "XLA_FLAGS"}
    return [subprocess.Popen(
        [sys.executable, "-m", "jaxdist.run", *args, *per_process(i), "--cpu-devices", "4",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
         str(i)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE) for i in range(2)]


def finish(processes, timeout=90):
    results = []
    for p in processes:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            pytest.fail("a process still ran after its peers had stopped")
        results.append((p.returncode, out, err))
    return results


def test_processes_started_with_different_settings_all_stop_naming_the_key(tmp_path):
    pair = start_pair(*LINEAR, "train.steps=10", "--workdir", str(tmp_path / "run"),
                      per_process=lambda i: [f"train.seed={i}"])
    for code, _out, err in finish(pair):
        assert code == 2, err[-2000:]
        assert "train.seed is 0 on process 0 and 1 on process 1" in err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_error_on_one_process_before_training_stops_every_process_with_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    pair = start_pair(*LINEAR, "train.steps=10",
                      per_process=lambda i: ["--workdir", str(tmp_path / ("run", "file")[i])])
    started = time.time()
    for code, _out, err in finish(pair):
        assert code == 2, err[-2000:]
        assert "is a file, not a folder" in err.strip().splitlines()[-1]
    assert time.time() - started < 60


def test_an_error_on_one_process_during_training_stops_the_other_with_its_cause(tmp_path):
    env = dict(os.environ, FAULT="train")
    pair = start_pair(str(ROOT / "tests" / "faulty_experiment.py"), "--workdir",
                      str(tmp_path / "run"), "--heartbeat-timeout", "60", env=env)
    started = time.time()
    (code0, _, err0), (code1, _, err1) = finish(pair)
    assert code1 == 2 and "process 1 read a corrupt record" in err1, err1[-2000:]
    assert code0 == 2, err0[-2000:]
    assert "stopping because process 1: process 1 read a corrupt record" in err0
    assert time.time() - started < 50  # well within the 60 s heartbeat timeout


def test_a_coordinator_port_in_use_is_one_line_naming_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "jaxdist.run", *LINEAR, "--cpu-devices", "4",
             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
             "0", "--workdir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
            text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                        if k != "XLA_FLAGS"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--coordinator 127.0.0.1:{port}: port {port} is already in use" \
        in lines[0]


def test_a_process_whose_coordinator_never_answers_stops_with_one_line(tmp_path):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "jaxdist.run", *LINEAR, "--cpu-devices", "4", "--coordinator",
         f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
         "--join-timeout", "3", "--workdir", str(tmp_path / "run")], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing answered at --coordinator 127.0.0.1:" in lines[0]
    assert time.time() - started < 30


def test_the_launcher_is_quiet_and_documents_its_flags(tmp_path):
    result = launch(*LINEAR, "train.steps=5", "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[Gloo]" not in result.stdout + result.stderr
    shown = subprocess.run([sys.executable, "-m", "jaxdist.launch", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "EXPERIMENT" in shown.stdout.splitlines()[0]
    for flag in ("--num-processes", "--local-devices", "--port", "--heartbeat-timeout",
                 "--verbose"):
        assert flag in shown.stdout


@pytest.mark.parametrize("seen", [
    # What gloo said when a peer was SIGKILLed during an all-gather (a CI run, 2026-11-27).
    "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
    "Connection closed by peer [127.0.0.1]:195",
    "recvmsg:Connection reset by peer",
])
def test_a_collective_broken_by_a_dead_peer_is_recognised(seen):
    from jaxdist.run import _lost_peer

    assert _lost_peer(RuntimeError(seen))
    assert not _lost_peer(RuntimeError("shapes do not match"))
