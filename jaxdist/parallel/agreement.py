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
from typing import Any, TypeVar

import jax

from jaxdist.base.errors import UserError
from jaxdist.parallel.processes import barrier_timeout, timed_out, waited_too_long

T = TypeVar("T")
PREFIX = "jaxdist"
FAILED = f"{PREFIX}/failed"
LEAVING_MARGIN_S = 0.5  # process 0 outlives its leaving peers by this much
_rounds = itertools.count()


def _client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


def gather(name: str, value: str) -> list[str]:
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
    answers = gather(name, json.dumps(mine))
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
    answers = [json.loads(a) for a in gather("config", json.dumps(flat, sort_keys=True,
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
    client, me, count = _client(), jax.process_index(), jax.process_count()
    try:
        client.key_value_set(f"{PREFIX}/leaving/{me}", "1")
    except Exception:  # set already (by this process's other thread), or the service is gone
        pass
    if me != 0:
        os._exit(status)
    for index in range(1, count):
        try:
            client.blocking_key_value_get(f"{PREFIX}/leaving/{index}", grace_ms)
        except Exception:  # that peer is gone already, or the service is
            pass
    # A peer that said it leaves still has to reach its own exit; a service gone before
    # that makes the peer's runtime abort (SIGABRT) instead of exiting with its status.
    time.sleep(LEAVING_MARGIN_S)
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
