"""Processes that agree: on their config, on an error found before training, on a failure.

All of it goes through the key-value store of JAX's coordination service (the one
`jax.distributed` starts), not through device collectives, so it works before anything is
compiled and whatever the backend. With one process every function here is a no-op.

- `agree(name, check)`: every process runs `check`; if it raises a `UserError` on any
  process, every process raises the same one-line error (naming the process), so no
  process is left waiting for a peer that has stopped.
- `require_same_config(flat)`: refuse, on every process, a run whose processes were
  started with different settings, naming the first key that differs.
- `announce_failure(message)` and `FailureWatch`: a process that fails during training
  posts why; the others, stuck in a collective with it, print that cause and exit at once,
  instead of waiting for the heartbeat timeout and reporting only "another task died".
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax

from jaxdist.distributed import barrier_timeout, timed_out, waited_too_long
from jaxdist.errors import UserError
from jaxdist.workdir import read_token

T = TypeVar("T")
PREFIX = "jaxdist"
FAILED = f"{PREFIX}/failed"
_rounds = itertools.count()
SHARED_FILE_RETRIES = 5  # seconds to wait for a shared file system to show process 0's file


def _client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


def _gather(name: str, value: str) -> list[str]:
    """Post `value` under `name` and return every process's value, in process order.

    A process whose peers do not all answer within `--barrier-timeout` stops (one line).
    """
    client, me = _client(), jax.process_index()
    key = f"{PREFIX}/{name}/{next(_rounds)}"
    client.key_value_set(f"{key}/{me}", value)
    try:
        return [client.blocking_key_value_get(f"{key}/{index}", barrier_timeout() * 1000)
                for index in range(jax.process_count())]
    except Exception as error:
        if not timed_out(error):
            raise
        raise UserError(waited_too_long(f"the processes' agreement on {name!r}")) from None


def agree(name: str, check: Callable[[], T],
          undo: Callable[[T], None] | None = None) -> T:
    """Run `check` here; if it fails (`UserError`) on any process, raise on every process.

    `undo(result)` releases what a successful `check` took (a lock, say) when another
    process failed.
    """
    if jax.process_count() == 1:
        return check()
    result, mine = None, ""
    try:
        result = check()
    except UserError as error:
        mine = str(error)
    answers = _gather(name, json.dumps(mine))
    for index, answer in enumerate(answers):
        message = json.loads(answer)
        if message:
            if not mine and undo is not None:
                undo(result)
            where = "" if index == jax.process_index() else f"process {index}: "
            raise UserError(f"{where}{message}")
    return result


def require_same_config(flat: dict[str, Any]) -> None:
    """Refuse (on every process) a run whose processes hold different settings."""
    if jax.process_count() == 1:
        return
    answers = [json.loads(a) for a in _gather("config", json.dumps(flat, sort_keys=True,
                                                                     default=str))]
    reference = answers[0]
    for index, other in enumerate(answers[1:], start=1):
        for key in sorted(set(reference) | set(other)):
            if reference.get(key, "(absent)") != other.get(key, "(absent)"):
                raise UserError(
                    f"the processes were started with different settings: {key} is "
                    f"{reference.get(key, '(absent)')} on process 0 and "
                    f"{other.get(key, '(absent)')} on process {index}; start every process "
                    f"with the same command")


def require_same_workdir(workdir: Path | None, token: str | None) -> None:
    """Refuse (on every process) a run whose processes do not share one workdir folder.

    Process 0 holds the workdir's lock, whose file carries its random `token`; every other
    process must read that token back from its own `--workdir`. A folder that is not shared
    (each host's own disk, a different path) would let the processes train from different
    states, so it stops them all before the first step.
    """
    if jax.process_count() == 1 or workdir is None:
        return
    posted = [json.loads(a) for a in _gather("workdir", json.dumps(
        {"token": token, "workdir": str(workdir)}))]
    expected = posted[0]["token"]
    seen = read_token(workdir)
    for _ in range(SHARED_FILE_RETRIES):  # a shared file system may show the file late
        if seen == expected:
            break
        time.sleep(1)
        seen = read_token(workdir)
    verdicts = [json.loads(a) for a in _gather("workdir-seen", json.dumps(seen == expected))]
    for index, same in enumerate(verdicts):
        if not same:
            raise UserError(
                f"process {index} does not see the workdir that process 0 writes (process 0: "
                f"--workdir {posted[0]['workdir']}, process {index}: --workdir "
                f"{posted[index]['workdir']}, whose lock file does not hold process 0's "
                f"token); give every process the same --workdir, on a file system that all "
                f"of them share (NFS, Lustre, Filestore)")


def require_same_resume(resume: str) -> None:
    """Refuse (on every process) a run whose processes would resume different checkpoints.

    `resume` names what this process resumes (a checkpoint and its manifest's sha256) or
    says "nothing".
    """
    if jax.process_count() == 1:
        return
    answers = [json.loads(a) for a in _gather("resume", json.dumps(resume))]
    for index, other in enumerate(answers[1:], start=1):
        if other != answers[0]:
            raise UserError(f"the processes would not resume from the same checkpoint: process "
                            f"0 from {answers[0]}, process {index} from {other}; give every "
                            f"process the same --workdir, on a file system that all of them "
                            f"share")


def announce_failure(message: str) -> None:
    """Tell the other processes that this one is failing, and why (first failure wins)."""
    if jax.process_count() == 1:
        return
    try:
        _client().key_value_set(FAILED, f"process {jax.process_index()}: {message}")
    except Exception:  # another process failed first, or the service is gone
        pass


def leave_after_failure(status: int, grace_ms: int = 5000) -> None:
    """End this process at once after a failure, without waiting for its peers at exit.

    Process 0 hosts the coordination service, whose end would abort its peers before
    they print why they stop; so it first waits (at most `grace_ms` per peer) for each
    peer to say it is leaving too.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    # The one-line cause is out. What the runtime may log while the peers go (a connection
    # reset by a peer that left first) must not become the last line a user reads.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    client = _client()
    try:
        client.key_value_set(f"{PREFIX}/leaving/{jax.process_index()}", "1")
    except Exception:  # set already (by this process's other thread), or the service is gone
        pass
    if jax.process_index() == 0:
        for index in range(1, jax.process_count()):
            try:
                client.blocking_key_value_get(f"{PREFIX}/leaving/{index}", grace_ms)
            except Exception:  # that peer is gone already, or the service is
                pass
    os._exit(status)


class FailureWatch:
    """A background thread that ends this process when another one announces a failure."""

    def __init__(self, poll_ms: int = 500):
        self.poll_ms = poll_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxdist-failure-watch",
                                        daemon=True)

    def start(self) -> FailureWatch:
        """Start watching (only in a multi-process run)."""
        if jax.process_count() > 1:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before this process shuts the distributed runtime down)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        client, me = _client(), f"process {jax.process_index()}:"
        while not self._stop.is_set():
            try:
                message = client.blocking_key_value_get(FAILED, self.poll_ms)
            except Exception:  # not there yet (a timeout), or the service is gone
                self._stop.wait(0.1)
                continue
            if not message.startswith(me) and not self._stop.is_set():
                print(f"error: stopping because {message}", file=sys.stderr, flush=True)
                leave_after_failure(2)
            return
