"""`train.profile_steps=START:COUNT`: a `jax.profiler` trace of those steps, each one marked.

The trace starts before step START (steps count from 1, as in metrics.jsonl) and stops
after step START+COUNT-1, once that step's device work is done; it is written to
`WORKDIR/profile/` (TensorBoard's profile plugin and xprof read that folder). Each step in
it is a `jax.profiler.StepTraceAnnotation("train", step_num=STEP)`, which the profile
tools show as steps; a step's span reaches from the end of the previous step's hooks to
the end of its own, so the spans tile the profiled time. Process 0 alone profiles, unless
`train.profile_all_processes=true`.

Stopping a trace has hung multi-host runs, so `stop_trace` runs in a thread of its own: if
it has not returned after `STOP_SECONDS`, one line says so and training goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import jax

from jaxdist.base.config.checks import profile_window
from jaxdist.base.config.sections import Config
from jaxdist.loop.hooks import Hook, Run

STOP_SECONDS = 60.0
FOLDER = "profile"


class ProfileSteps(Hook):
    """Traces steps `first` to `last` into `folder` (see the module's docstring)."""

    def __init__(self, first: int, last: int, folder: Path, stop_seconds: float = STOP_SECONDS):
        self.first, self.last, self.folder = first, last, Path(folder)
        self.stop_seconds = stop_seconds
        self._step_span = None  # the open StepTraceAnnotation
        self._tracing = False

    def on_start(self, run: Run) -> None:
        """Start tracing here if the next step is the first profiled one."""
        if run.step == self.first - 1:
            self._begin(run)

    def after_step(self, run: Run, sums: dict[str, jax.Array]) -> None:
        """Close this step's span; start, go on with, or stop the trace."""
        if self._tracing:
            self._step_span.__exit__(None, None, None)
            self._step_span = None
            if run.step >= self.last:
                self._stop(run)
            else:
                self._open_span(run.step + 1)
        elif run.step == self.first - 1:
            self._begin(run)

    def on_stop(self, run: Run) -> None:
        """The run ended inside the window: stop the trace there."""
        if self._tracing:
            self._close_span()
            self._stop(run)

    def settle(self, run: Run) -> None:
        """The run is failing: stop the trace (what it holds is still written)."""
        if self._tracing:
            self._close_span()
            self._stop(run, quiet=True)

    def _begin(self, run: Run) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.folder))
        self._tracing = True
        self._open_span(run.step + 1)

    def _open_span(self, step: int) -> None:
        self._step_span = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self._step_span.__enter__()

    def _close_span(self) -> None:
        if self._step_span is not None:
            self._step_span.__exit__(None, None, None)
            self._step_span = None

    def _stop(self, run: Run, quiet: bool = False) -> None:
        self._tracing = False
        jax.block_until_ready(run.state)  # the last step's device work belongs in the trace
        stopper = threading.Thread(target=jax.profiler.stop_trace, name="jaxdist-profile-stop",
                                   daemon=True)
        stopper.start()
        stopper.join(self.stop_seconds)
        if quiet:
            return
        if stopper.is_alive():
            run.logger.say(f"profile: jax.profiler.stop_trace had not returned after "
                           f"{self.stop_seconds:g} s; training goes on, and the trace in "
                           f"{self.folder} may be incomplete")
        else:
            run.logger.say(f"profiled steps {self.first}-{min(self.last, run.step)} into "
                           f"{self.folder} (open it with: tensorboard --logdir {self.folder}, "
                           f"Profile tab)")


def profile_hooks(config: Config, workdir: Path | None, process: int) -> list[Hook]:
    """The hook `train.profile_steps` asks for on this process (none: it is not profiled)."""
    window = profile_window(config.train.profile_steps)
    if window is None or workdir is None or (process and not config.train.profile_all_processes):
        return []
    folder = Path(workdir) / FOLDER
    return [ProfileSteps(*window, folder if process == 0 else folder / f"process_{process}")]
