"""Joining a multi-process run on JAX's own runtime (`jax.distributed`).

Every process runs the same command; process 0 is the coordinator. On TPU pod slices,
SLURM, Open MPI and GKE, JAX finds the coordinator, the process count and the process id
by itself (`--distributed`); elsewhere they are given with `--coordinator HOST:PORT
--num-processes N --process-id I` or the environment variables `JAXDIST_COORDINATOR`,
`JAXDIST_NUM_PROCESSES`, `JAXDIST_PROCESS_ID`.

A dead peer never hangs the others: each process sends heartbeats to the coordinator, and
when one stops for `heartbeat_timeout` seconds JAX ends every other process with the
message "Terminating process because the JAX distributed service detected fatal errors.
This most likely indicates that another task died".

Nothing waits without end. Joining waits at most `initialization_timeout` seconds (then one
line, before JAX's own abort); what listens at the coordinator's address must answer as
a gRPC server does; jaxdist's barriers (and the agreement of the processes) wait at most
`barrier_timeout` seconds, then stop every process that waits with one line.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from jaxdist.base.errors import UserError

ENV_COORDINATOR = "JAXDIST_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIST_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIST_PROCESS_ID"
DEFAULT_HEARTBEAT_TIMEOUT = 20  # seconds: survivors of a dead peer exit well within 60 s
DEFAULT_BARRIER_TIMEOUT = 600  # seconds a process waits for the others at a barrier
# JAX's own wait to join is set this much longer than ours, so that ours ends first (one
# line) instead of JAX's (an abort with a native stack trace).
JAX_JOIN_GRACE = 60
_barrier_timeout = DEFAULT_BARRIER_TIMEOUT
_barriers = itertools.count()


@dataclass
class DistributedSettings:
    """How this process joins a multi-process run (all None: it runs alone)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let JAX detect the cluster (TPU pod, SLURM, Open MPI, GKE)
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    initialization_timeout: int = 120  # seconds to wait for the other processes
    barrier_timeout: int = DEFAULT_BARRIER_TIMEOUT  # seconds to wait at a barrier

    def with_environment(self) -> DistributedSettings:
        """Fill unset fields from the `JAXDIST_*` environment variables."""
        def env_int(name: str) -> int | None:
            value = os.environ.get(name)
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise UserError(f"{name}={value} is not an integer") from None

        return DistributedSettings(
            coordinator=self.coordinator or os.environ.get(ENV_COORDINATOR),
            num_processes=(self.num_processes if self.num_processes is not None
                           else env_int(ENV_NUM_PROCESSES)),
            process_id=self.process_id if self.process_id is not None else env_int(
                ENV_PROCESS_ID),
            auto=self.auto, heartbeat_timeout=self.heartbeat_timeout,
            initialization_timeout=self.initialization_timeout,
            barrier_timeout=self.barrier_timeout)

    def check_timeouts(self) -> None:
        """Refuse a timeout that is not a positive number of seconds (one line)."""
        for flag, value in (("--join-timeout", self.initialization_timeout),
                            ("--heartbeat-timeout", self.heartbeat_timeout),
                            ("--barrier-timeout", self.barrier_timeout)):
            if value < 1:
                raise UserError(f"{flag} {value} must be a positive number of seconds")

    @property
    def explicit(self) -> bool:
        """Whether any of coordinator, process count and id were given."""
        return any(v is not None for v in (self.coordinator, self.num_processes,
                                           self.process_id))


def initialize(settings: DistributedSettings) -> bool:
    """Join the run that `settings` (and the environment) describe; False if alone.

    Call before anything else touches a device.
    """
    settings = settings.with_environment()
    settings.check_timeouts()
    if not settings.explicit and not settings.auto:
        return False
    global _barrier_timeout
    _barrier_timeout = settings.barrier_timeout
    if settings.explicit:
        missing = [flag for flag, value in (("--coordinator", settings.coordinator),
                                            ("--num-processes", settings.num_processes),
                                            ("--process-id", settings.process_id))
                   if value is None]
        if missing:
            raise UserError(f"a multi-process run needs --coordinator, --num-processes and "
                            f"--process-id; {', '.join(missing)} missing")
        if settings.num_processes < 1 or not 0 <= settings.process_id < settings.num_processes:
            raise UserError(f"--process-id {settings.process_id} must be in [0, "
                            f"{settings.num_processes}) and --num-processes >= 1")
        host, _, port = settings.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--coordinator {settings.coordinator} is not HOST:PORT")
        if not 1 <= int(port) <= 65535:
            raise UserError(f"--coordinator {settings.coordinator}: port {int(port)} is not a "
                            f"TCP port (1 to 65535); e.g. --coordinator {host}:1234")
        if settings.process_id == 0:
            require_free_port(int(port), settings.coordinator)
    import jax

    from jaxdist.parallel.devices import devices_ready

    if devices_ready():
        raise UserError("JAX has set up its devices already, so this process can no longer "
                        "join a multi-process run: join first (in a notebook, restart the "
                        "kernel and call jaxdist's initialize before anything else uses JAX)")
    # CPU devices talk over gloo (TCP); accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.explicit and settings.process_id != 0:
        # JAX aborts the process (no exception) when the coordinator never answers.
        wait_for_coordinator(settings.coordinator, settings.initialization_timeout)
    with JoinDeadline(settings):
        jax.distributed.initialize(
            coordinator_address=settings.coordinator, num_processes=settings.num_processes,
            process_id=settings.process_id,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
            initialization_timeout=settings.initialization_timeout + JAX_JOIN_GRACE)
    return True


class JoinDeadline:
    """Ends this process with one line if joining takes longer than `--join-timeout`.

    JAX aborts the process when its own wait runs out (a process that never started, two
    processes with the same id, a port held by a program that is not the coordinator);
    this deadline, shorter than JAX's, ends it first and says what to check.
    """

    def __init__(self, settings: DistributedSettings):
        self.settings = settings
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="jaxdist-join-deadline",
                                        daemon=True)

    def __enter__(self) -> JoinDeadline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        s = self.settings
        if self._done.wait(s.initialization_timeout):
            return
        where = f"at --coordinator {s.coordinator}" if s.coordinator else "(cluster detection)"
        who = f"process {s.process_id}" if s.process_id is not None else "this process"
        print(f"error: {who} could not join the run {where} within --join-timeout "
              f"{s.initialization_timeout} s: start all {s.num_processes or 'N'} processes "
              f"with the same --coordinator and --num-processes, each with its own "
              f"--process-id from 0 to N-1, and check that what listens at that address is "
              f"process 0 of this run", file=sys.stderr, flush=True)
        os._exit(2)


# What a client sends first on an HTTP/2 connection (gRPC's), and an empty SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_FRAME = 4
PROBE_SECONDS = 10


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Wait until a gRPC server listens at `address`; refuse (one line) after `timeout` s.

    Something that accepts the connection but does not answer as an HTTP/2 server does
    (a SETTINGS frame first) is another program holding the port, not the coordinator.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1) as connection:
                answers = _answers_as_grpc(connection)
            if not answers:
                raise UserError(f"what listens at --coordinator {address} is not a JAX "
                                f"coordinator (it does not answer as a gRPC server does): "
                                f"another program holds that port; start process 0 with a "
                                f"free port and give every process that --coordinator")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"nothing answered at --coordinator {address} within "
                                f"{timeout:g} s; start process 0 with the same --coordinator "
                                f"and --num-processes, and check that this host can reach "
                                f"it") from None
            time.sleep(0.5)


def _answers_as_grpc(connection: socket.socket) -> bool:
    """Whether the server on `connection` starts as HTTP/2 does, with a SETTINGS frame."""
    connection.settimeout(PROBE_SECONDS)
    try:
        connection.sendall(HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            part = connection.recv(9 - len(header))
            if not part:
                return False
            header += part
    except OSError:
        return False
    return header[3] == SETTINGS_FRAME


def require_free_port(port: int, address: str) -> None:
    """Refuse (one line) a coordinator port that something on this host already uses."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            host = address.rpartition(":")[0]
            raise UserError(f"--coordinator {address}: port {port} is already in use on this "
                            f"host ({error.strerror}); pass another port, e.g. --coordinator "
                            f"{host}:{_any_free_port()}") from None


def _any_free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def joined() -> bool:
    """Whether this process has joined a multi-process run (without touching a device)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed

    return distributed.global_state.client is not None


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and checkpoints."""
    import jax

    return jax.process_index() == 0


def barrier_timeout() -> int:
    """Seconds a process waits for the others at a barrier (`--barrier-timeout`)."""
    return _barrier_timeout


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op when alone).

    It goes through JAX's coordination service and waits at most `barrier_timeout()`
    seconds; then every process still waiting stops with one line.
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed

    key = f"jaxdist/{name}/{next(_barriers)}"
    try:
        distributed.global_state.client.wait_at_barrier(key, _barrier_timeout * 1000)
    except Exception as error:
        if not timed_out(error):
            raise
        raise UserError(waited_too_long(f"the barrier {name!r}")) from None


def timed_out(error: BaseException) -> bool:
    """Whether `error` is the coordination service's timeout."""
    # jaxlib raises a plain XlaRuntimeError for every status: only its text has the code.
    return "DEADLINE_EXCEEDED" in str(error) or "timed out" in str(error).lower()


def waited_too_long(what: str) -> str:
    """The one line of a process that waited `barrier_timeout()` seconds at `what`."""
    import jax

    return (f"process {jax.process_index()} waited --barrier-timeout {_barrier_timeout} s at "
            f"{what} and not every process came: one is stuck or much slower (see the other "
            f"processes' logs), or saves take that long here (raise --barrier-timeout)")


def first_signal(signal_name: str | None) -> str | None:
    """The signal that asked any process to stop, or None; every process gets the same answer.

    `signal_name` is this process's (None if it got none). With peers, a signal that
    reached another process is named with it ("SIGTERM to process 1").
    """
    import jax

    if jax.process_count() == 1:
        return signal_name
    import signal

    import numpy as np
    from jax.experimental import multihost_utils

    from jaxdist.parallel.dispatch import host_reads

    mine = signal.Signals[signal_name].value if signal_name else 0
    with host_reads():
        numbers = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int32)))
    for index, number in enumerate(numbers.reshape(-1).tolist()):
        if number:
            name = signal.Signals(number).name
            return name if index == jax.process_index() else f"{name} to process {index}"
    return None
