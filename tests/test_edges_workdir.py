"""A workdir at its edges: data, not code; its own files only; empty paths; bad values on
every path into `fit`."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import jaxdist
from jaxdist import fit
from jaxdist.base.errors import UserError
from jaxdist.loop.restore import restore_run
from tests.toy import mlp_experiment, toy_config, train_into, wait_for_file

pytestmark = pytest.mark.slow  # starts processes or trains end to end

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


# Item 3 (and 17): empty paths are refused; --restart removes only a run's own files.

@pytest.mark.parametrize("flag", ["--workdir", "--compilation-cache"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_refused_before_anything_is_touched(tmp_path, flag, value):
    (tmp_path / "config.json").write_text('{"mine": true}\n')
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "figure.png").write_bytes(b"png")
    workdir = [] if flag == "--workdir" else ["--workdir", str(tmp_path / "run")]
    result = run_cli("linear_regression", flag, value, *workdir, "--restart", "train.steps=2",
                     cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "empty path" in one_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "plots"]
    assert (tmp_path / "plots" / "figure.png").exists()


def test_fit_refuses_an_empty_workdir(tmp_path):
    with pytest.raises(UserError, match="is empty; give a folder"):
        fit(mlp_experiment(), toy_config(steps=1), "", stream=None)


@pytest.mark.parametrize("make,words", [
    (lambda w: (w / "config.json").write_text('{"mine": true}\n'),
     "config.json does not hold what a jaxdist run writes"),
    (lambda w: (w / "metrics.jsonl").write_text("my notes\n"),
     "metrics.jsonl does not hold what a jaxdist run writes"),
    (lambda w: ((w / "plots").mkdir(), (w / "plots" / "notes.txt").write_text("mine")),
     "plots holds notes.txt, which no run writes there"),
    (lambda w: ((w.parent / "elsewhere").mkdir(), (w / "plots").symlink_to(w.parent /
                                                                          "elsewhere")),
     "plots is a symbolic link"),
    (lambda w: (w / "checkpoints").write_text("not a folder"), "checkpoints is not a folder"),
])
def test_restart_refuses_to_remove_what_no_run_wrote(tmp_path, make, words):
    workdir = tmp_path / "run"
    fit(mlp_experiment(), toy_config(steps=2), workdir, stream=None)
    for name in ("config.json", "metrics.jsonl", "plots", "checkpoints"):
        target = workdir / name
        if name in ("plots", "checkpoints") and target.is_dir():
            subprocess.run(["rm", "-r", str(target)], check=True, timeout=30)
        elif target.exists() and name in words:
            target.unlink()
    make(workdir)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=f"--restart removes only what a jaxdist run wrote.*"
                                        f"{words}"):
        fit(mlp_experiment(), toy_config(steps=2), workdir, stream=None, start_over=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_restart_says_what_it_removes(tmp_path, capsys):
    workdir = tmp_path / "run"
    fit(mlp_experiment(), toy_config(steps=2), workdir, stream=None)
    (workdir / "notes.txt").write_text("a file of the user's, beside the run")
    fit(mlp_experiment(), toy_config(steps=2), workdir, sys.stdout, start_over=True)
    said = capsys.readouterr().out
    assert "--restart removed metrics.jsonl, config.json, saved.json, checkpoints/ (1 entry), " \
           "tensorboard/ (1 entry) from" in said
    assert (workdir / "notes.txt").exists()


# Item 16: every path into fit meets the command line's checks.

@pytest.mark.parametrize("change,words", [
    (lambda c: setattr(c.train, "log_every", 0), "train.log_every=0 must be > 0"),
    (lambda c: setattr(c.optimizer, "name", "adamm"),
     "optimizer.name='adamm' is not allowed; choose one of: sgd"),
    (lambda c: setattr(c.train, "steps", "10"), "train.steps='10' is not an integer"),
    (lambda c: setattr(c.parallel, "backend", "gpu"), "parallel.backend='gpu' is not allowed"),
])
def test_a_config_changed_after_load_is_validated_by_fit(tmp_path, change, words):
    experiment, config = jaxdist.load("linear_regression", ["train.steps=2"])
    change(config)
    with pytest.raises(UserError, match=words):
        fit(experiment, config, tmp_path / "run", stream=None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# Item 17: silently ignored or misleading.

def test_an_allow_change_key_that_does_not_exist_is_refused_on_a_fresh_run(tmp_path):
    with pytest.raises(UserError, match="--allow-change names an unknown config key "
                                        "'optimizer.learning_rat'; did you mean "
                                        "optimizer.learning_rate"):
        fit(mlp_experiment(), toy_config(steps=2), tmp_path, stream=None,
            allow_changes=["optimizer.learning_rat"])


def test_the_nonfinite_message_names_labels_out_of_range_for_a_classifier(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    data = {"x": np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32),
            "label": np.full(32, 7, np.int32)}  # a 3-class model

    def loss_fn(params, batch, rng):
        logits = batch["x"] @ params["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]), {}

    experiment = jaxdist.Experiment(init_params=lambda rng: {"w": jnp.zeros((4, 3))},
                                    loss_fn=loss_fn, train_data=data)
    config = toy_config(steps=20)
    config.train.max_nonfinite = 3
    del jax
    with pytest.raises(UserError, match="labels outside the model's classes"):
        fit(experiment, config, tmp_path, stream=None)


# Item 4: a removed lock file admits no second run, and a live save's folder stays.

def test_a_removed_lock_file_admits_no_second_run_and_is_put_back(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "jaxdist.run", "linear_regression",
                              "--workdir", str(workdir), "train.steps=100000000",
                              "train.checkpoint_every=200", "train.log_every=100"],
                             cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert wait_for_file(workdir / "metrics.jsonl"), first.stderr.read()
        (workdir / "lock").unlink()
        second = run_cli("linear_regression", "--workdir", str(workdir), "train.steps=10",
                         timeout=120)
        assert second.returncode == 2
        # Named by the lock file the first run has put back by then, or as "another run".
        assert f"--workdir {workdir} is in use by " in one_line(second)
        assert wait_for_file(workdir / "lock")  # put back at the first run's next save
        assert f"pid {first.pid} " in (workdir / "lock").read_text()
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-2000:]
        assert "stopped at step" in out
    finally:
        first.kill()
        first.wait()


HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
       "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"


def hold_lock(path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], text=True,
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_the_start_never_removes_the_folder_of_a_save_another_process_is_writing(tmp_path):
    from jaxdist.checkpoints.store import CheckpointStore

    folder = tmp_path / "checkpoints"
    live, dead = folder / "tmp-step_00000010-1-2", folder / "tmp-step_00000005-3-4"
    for tmp in (live, dead):
        (tmp / "state").mkdir(parents=True)
    (dead.parent / (dead.name + ".lock")).write_text("")  # its writer died
    holder = hold_lock(live.parent / (live.name + ".lock"))
    try:
        CheckpointStore(folder).clean_incomplete()
        assert sorted(p.name for p in folder.iterdir()) == [live.name, live.name + ".lock"]
    finally:
        holder.kill()
        holder.wait()
    CheckpointStore(folder).clean_incomplete()
    assert list(folder.iterdir()) == []


def test_a_lock_file_taken_by_another_run_meanwhile_stops_this_one(tmp_path):
    from jaxdist.checkpoints.workdir import WorkdirLock

    with WorkdirLock(tmp_path) as lock:
        (tmp_path / "lock").unlink()
        lock.check()  # nobody else: put back, with this run's token
        assert f"(token {lock.token})" in (tmp_path / "lock").read_text()
        (tmp_path / "lock").unlink()
        holder = hold_lock(tmp_path / "lock")  # where folders cannot be locked (NFS)
        try:
            with pytest.raises(UserError, match="was removed while this run held it and "
                                                "another run has locked the workdir since"):
                lock.check()
        finally:
            holder.kill()
            holder.wait()


# Item 13: a full disk before the start is one line too.

def test_a_lock_file_that_cannot_be_written_is_one_line(tmp_path):
    command = f"ulimit -f 0; trap '' XFSZ; exec {sys.executable} -m jaxdist.run " \
              f"linear_regression --workdir {tmp_path / 'run'} train.steps=2"
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    # (scikit-learn's joblib warns first that it cannot write its own files either)
    last = result.stderr.strip().splitlines()[-1]
    assert "could not write the lock file" in last and "File too large" in last
    assert "Traceback" not in result.stderr


# Item 11: no unbounded memory.

def test_a_prefetch_deeper_than_memory_is_refused_naming_what_fits(tmp_path):
    config = toy_config(steps=2)
    config.loader.prefetch = 10**9
    with pytest.raises(UserError, match=r"loader.prefetch=1000000000 keeps .* MB placed on each "
                                        r"device .* use loader.prefetch=2 \(at most \d+ fits\)"):
        fit(mlp_experiment(), config, tmp_path, stream=None)
    config.loader.prefetch = 64  # a deep prefetch that fits is fine
    assert fit(mlp_experiment(), config, tmp_path / "ok", stream=None).step == 2


def test_too_many_cpu_devices_are_refused_before_jax_sets_them_up(tmp_path):
    result = run_cli("linear_regression", "--cpu-devices", "100000", "--workdir",
                     str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    assert "--cpu-devices 100000 must be between 1 and 1024" in one_line(result)


# Item 13: a full disk during logging, and during a background save, is one line.

def capped(kib, *args, prelude=""):
    """`python -m jaxdist.run ARGS` with files limited to `kib` KiB (a disk that fills up)."""
    code = (f"import sys{prelude}; from jaxdist.run import main; "
            f"sys.exit(main(sys.argv[1:]))")
    command = " ".join([sys.executable, "-c", repr(code), *args])
    return subprocess.run(["bash", "-c", f"ulimit -f {kib}; trap '' XFSZ; exec {command}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_full_disk_while_logging_is_one_line_naming_what_is_intact(tmp_path):
    workdir = tmp_path / "run"
    result = capped(8, "linear_regression", "--workdir", str(workdir), "train.steps=3000",
                    "train.log_every=1", "train.checkpoint_every=0", "--compilation-cache",
                    str(tmp_path / "cache"))
    assert result.returncode == 2
    line = one_line(result)
    assert "could not write TensorBoard's events" in line and "File too large" in line
    assert "metrics.jsonl and the checkpoints are intact" in line
    records = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))


def test_a_disk_that_fills_during_a_background_save_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    args = ["digits_mlp", "--workdir", str(workdir), "train.checkpoint_every=1",
            "train.eval_every=0"]
    train_into(workdir, "digits_mlp", "train.checkpoint_every=1", "train.eval_every=0",
               "train.steps=1")
    # The room is checked before a save; here the disk fills after that check.
    result = capped(1024, *args, "train.steps=3",
                    prelude="; import jaxdist.base.disk as d; d.lacking_room = lambda *a: None")
    assert result.returncode == 2
    line = one_line(result)
    assert "could not write checkpoint" in line and "step_00000001 is intact" in line


def test_a_full_disk_when_the_log_is_rewritten_at_a_resume_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    train_into(workdir, "linear_regression", "train.steps=200", "train.log_every=1")
    before = (workdir / "metrics.jsonl").read_text()
    assert len(before) > 8192  # more than the limit below
    result = capped(4, "linear_regression", "--workdir", str(workdir), "train.steps=400",
                    "train.log_every=1")
    assert result.returncode == 2
    line = one_line(result)
    assert "could not write" in line and "metrics.jsonl" in line and "it is unchanged" in line
    assert (workdir / "metrics.jsonl").read_text() == before


def test_a_config_json_that_cannot_be_written_is_one_line(tmp_path):
    result = capped(1, "linear_regression", "--workdir", str(tmp_path / "run"),
                    "train.steps=3")
    assert result.returncode == 2
    line = one_line(result)
    assert f"could not write {tmp_path / 'run' / 'config.json'} (File too large)" in line
    assert not list((tmp_path / "run").glob(".config.json.tmp-*"))
