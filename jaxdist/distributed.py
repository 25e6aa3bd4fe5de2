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
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

from jaxdist.errors import UserError

ENV_COORDINATOR = "JAXDIST_COORDINATOR"
ENV_NUM_PROCESSES = "JAXDIST_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXDIST_PROCESS_ID"
DEFAULT_HEARTBEAT_TIMEOUT = 20  # seconds: survivors of a dead peer exit well within 60 s


@dataclass
class DistributedSettings:
    """How this process joins a multi-process run (all None: it runs alone)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let JAX detect the cluster (TPU pod, SLURM, Open MPI, GKE)
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT
    initialization_timeout: int = 120  # seconds to wait for the other processes

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
            initialization_timeout=self.initialization_timeout)

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
    if not settings.explicit and not settings.auto:
        return False
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
        if settings.process_id == 0:
            require_free_port(int(port), settings.coordinator)
    import jax

    from jaxdist.devices import devices_ready

    if devices_ready():
        raise UserError("JAX has set up its devices already, so this process can no longer "
                        "join a multi-process run: join first (in a notebook, restart the "
                        "kernel and call jaxdist's initialize before anything else uses JAX)")
    # CPU devices talk over gloo (TCP); accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.explicit and settings.process_id != 0:
        # JAX aborts the process (no exception) when the coordinator never answers.
        wait_for_coordinator(settings.coordinator, settings.initialization_timeout)
    jax.distributed.initialize(
        coordinator_address=settings.coordinator, num_processes=settings.num_processes,
        process_id=settings.process_id,
        heartbeat_timeout_seconds=settings.heartbeat_timeout,
        initialization_timeout=settings.initialization_timeout)
    return True


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Wait until something listens at `address`; refuse (one line) after `timeout` s."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"nothing answered at --coordinator {address} within "
                                f"{timeout:g} s; start process 0 with the same --coordinator "
                                f"and --num-processes, and check that this host can reach "
                                f"it") from None
            time.sleep(0.5)


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


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op when alone)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        from jaxdist.dispatch import host_reads

        with host_reads():
            multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True if `flag` is True on any process; every process gets the same answer."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxdist.dispatch import host_reads

    with host_reads():
        return bool(np.any(multihost_utils.process_allgather(np.array(flag))))
