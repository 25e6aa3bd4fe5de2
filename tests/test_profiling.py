"""train.profile_steps: a jax.profiler trace of the named steps, read back with xprof's own
converter, and the run's metrics unchanged by it."""

import json
import threading
import time
from pathlib import Path

import pytest

from jaxdist import fit
from jaxdist.base.config import apply_overrides
from jaxdist.base.errors import UserError
from jaxdist.loop.profiling import ProfileSteps
from tests.toy import mlp_experiment, toy_config


def trace_events(workdir):
    """The trace viewer's events of the run's one profile, as xprof converts them."""
    from xprof.convert import raw_to_tool_data

    (xplane,) = Path(workdir, "profile").glob("plugins/profile/*/*.xplane.pb")
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(xplane)], "trace_viewer", {})
    return json.loads(data)["traceEvents"]


def step_spans(events):
    """{step: (start, end)} of the steps the trace viewer shows, named "train STEP"."""
    spans = {}
    for event in events:
        step = event.get("args", {}).get("step_num")
        if step is not None and event.get("name") == f"train {step}":
            start = float(event["ts"])
            assert int(step) not in spans, f"step {step} twice"
            spans[int(step)] = (start, start + float(event["dur"]))
    return spans


@pytest.mark.slow
def test_the_profiled_steps_are_in_the_trace_and_the_metrics_do_not_change(tmp_path):
    config = toy_config(steps=8, log_every=2)
    plain = fit(mlp_experiment(), config, tmp_path / "plain", stream=None)
    config.train.profile_steps = "3:4"
    profiled = fit(mlp_experiment(), config, tmp_path / "profiled", stream=None)
    assert profiled.records == plain.records
    spans = step_spans(trace_events(tmp_path / "profiled"))
    assert sorted(spans) == [3, 4, 5, 6]
    starts = [spans[step][0] for step in sorted(spans)]
    assert starts == sorted(starts)  # one after the other, in step order
    ends = [spans[step][1] for step in sorted(spans)]
    assert all(end <= start for end, start in zip(ends[:-1], starts[1:], strict=True))


def test_a_bad_profile_window_is_one_line():
    for value in ("3", "0:2", "3:0", "a:b"):
        with pytest.raises(UserError, match=r"train.profile_steps=.* is not START:COUNT"):
            apply_overrides(toy_config(), [f"train.profile_steps={value}"])


def test_profiling_without_a_workdir_is_refused():
    config = toy_config(steps=2)
    config.train.profile_steps = "1:1"
    with pytest.raises(UserError, match="give a --workdir"):
        fit(mlp_experiment(), config, None, stream=None)


def test_a_stop_that_hangs_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch):
    import jax

    said = []
    hang = threading.Event()
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: hang.wait(30))

    class Logger:
        def say(self, line):
            said.append(line)

    class Run:
        step, state, logger = 4, None, Logger()

    hook = ProfileSteps(3, 4, tmp_path / "profile", stop_seconds=0.5)
    began = time.monotonic()
    hook._tracing = True
    hook._stop(Run())
    hang.set()
    assert time.monotonic() - began < 5
    assert len(said) == 1 and "had not returned after 0.5 s" in said[0]
    assert "stop_trace had not returned" in said[0] and "training goes on" in said[0]
