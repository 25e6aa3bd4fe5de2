"""The Python API a notebook uses is the CLI's engine: same results, and a kernel that
stays usable across runs, interrupts included."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from jaxdist import fit, load

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_api_and_the_cli_write_the_same_metrics(tmp_path):
    overrides = ["train.steps=30", "train.log_every=10", "train.eval_every=15"]
    cli = subprocess.run([sys.executable, "-m", "jaxdist.run", "digits_mlp", "--workdir",
                          str(tmp_path / "cli"), *overrides], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    experiment, config = load("digits_mlp", overrides)
    result = fit(experiment, config, tmp_path / "api", stream=None)
    for name in ("metrics.jsonl", "config.json"):
        assert (tmp_path / "api" / name).read_text() == (tmp_path / "cli" / name).read_text()
    assert result.step == 30 and len(result.history("train")["loss"]) == 3


def test_a_result_is_plain_to_use():
    experiment, config = load("linear_regression", ["train.steps=20", "train.log_every=5"])
    result = fit(experiment, config, stream=None)
    train = result.history("train")
    np.testing.assert_array_equal(train["step"], [5, 10, 15, 20])
    assert train["loss"].shape == (4,) and train["loss"][-1] < train["loss"][0]
    assert result.params["w"].shape == (10,)  # one copy, no device axis
    text = repr(result)
    assert len(text) < 300 and "step=20" in text and "completed" in text


KERNEL = textwrap.dedent("""
    import os, signal, threading, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r})
    from jaxdist import fit, load
    from jaxdist.checkpoints.store import CheckpointStore
    from jaxdist.loop.preemption import PreemptionWatch

    experiment, config = load("linear_regression", ["train.steps=1000000",
                                                    "train.checkpoint_every=0"])
    handler = signal.getsignal(signal.SIGINT)
    threading.Timer(4.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    first = fit(experiment, config, {workdir!r}, stream=None)  # "interrupt kernel"
    print("first", first.stop_reason, first.signal_name, first.step > 0)
    assert signal.getsignal(signal.SIGINT) is handler  # no leftover handler
    try:
        with PreemptionWatch():  # what a second "interrupt kernel" meets inside fit
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        print("second ignored")
    except KeyboardInterrupt:
        print("second interrupted")
    assert signal.getsignal(signal.SIGINT) is handler
    newest = CheckpointStore(os.path.join({workdir!r}, "checkpoints")).latest()
    config.train.steps = newest + 10
    third = fit(experiment, config, {workdir!r}, stream=None)
    print("third", third.stop_reason, third.step == newest + 10)
""")


def test_a_kernel_stays_usable_after_an_interrupt_and_a_second_one(tmp_path):
    script = KERNEL.format(root=str(ROOT), workdir=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["first preempted SIGINT True", "second interrupted",
                                          "third completed True"]


def test_devices_can_no_longer_be_split_or_joined_once_jax_has_set_them_up():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import jax
        from jaxdist.base.errors import UserError
        from jaxdist.parallel.devices import use_cpu_devices
        use_cpu_devices(4)
        print(len(jax.devices()))
        use_cpu_devices(4)  # the same: nothing to do
        try:
            use_cpu_devices(8)
        except UserError as error:
            print(str(error).split(";")[0])
        from jaxdist.parallel.processes import DistributedSettings, initialize
        try:
            initialize(DistributedSettings(coordinator="127.0.0.1:1", num_processes=2,
                                           process_id=0))
        except UserError as error:
            print(str(error).split(",")[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                         "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "4", "JAX has set up its devices already (4 cpu)",
        "JAX has set up its devices already"]
