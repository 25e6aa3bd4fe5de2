"""`python -m jaxdist.launch --num-processes N --local-devices D EXPERIMENT [ARGS ...]`.

Starts N jaxdist processes on this machine, each with D fake CPU devices, joined by
`jax.distributed` with a coordinator on 127.0.0.1 (on a free port, unless `--port` names
one) and CPU collectives over gloo. Their output is forwarded line by line with a `[pI]`
prefix (gloo's connection lines only with `--verbose`), after one line giving each
process's pid. If a process fails, the others are stopped and the launcher exits with that
process's status; otherwise it exits 0. SIGTERM and SIGINT are passed on to the processes
(they save a checkpoint and exit 0). On Linux, if the launcher itself dies, even by
SIGKILL, the kernel kills its processes with it (`PR_SET_PDEATHSIG`); elsewhere nothing
arranges that.

For trying multi-process training (and testing it) on one machine; on a cluster, start
`python -m jaxdist.run` once per host instead (see the README).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
MAX_PROCESSES = 64  # local processes; beyond that, a cluster's launcher is the tool


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gloo's "[Gloo] Rank R is connected to N peer ranks. Expected ..." lines, which its
# threads write at once, so that pieces of two can share a line.
GLOO_CHATTER = re.compile(r"\[Gloo\]|connected peer ranks is")


def _forward(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock,
             verbose: bool) -> None:
    for line in stream:
        if not verbose and GLOO_CHATTER.search(line):
            continue
        with lock:
            out.write(f"{prefix}{line}")
            out.flush()


def die_with_launcher() -> Callable[[], None] | None:
    """A `preexec_fn` after which the kernel SIGKILLs the child when this process dies.

    Linux's `prctl(PR_SET_PDEATHSIG)`, which fires when the thread that started the child
    ends: `launch` starts them from the thread that waits for them. None where there is no
    such call (not Linux, or no libc to call it through).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher:  # the launcher died before the request took hold
            os._exit(1)

    return in_child


def launch(num_processes: int, local_devices: int, run_args: list[str],
           heartbeat_timeout: int | None = None, port: int | None = None,
           verbose: bool = False) -> int:
    """Run `python -m jaxdist.run RUN_ARGS` as `num_processes` processes; return the status."""
    coordinator = f"127.0.0.1:{port or free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the device count comes from --cpu-devices
    env["JAX_PLATFORMS"] = "cpu"
    # All are started before any forwarding thread: a preexec_fn is safe only while the
    # launcher has a single thread.
    preexec = die_with_launcher()
    processes = []
    for index in range(num_processes):
        command = [sys.executable, "-m", "jaxdist.run", *run_args,
                   "--cpu-devices", str(local_devices), "--coordinator", coordinator,
                   "--num-processes", str(num_processes), "--process-id", str(index)]
        if heartbeat_timeout is not None:
            command += ["--heartbeat-timeout", str(heartbeat_timeout)]
        processes.append(subprocess.Popen(command, env=env, text=True, preexec_fn=preexec,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    print("jaxdist.launch: " + ", ".join(f"process {i}: pid {p.pid}"
                                         for i, p in enumerate(processes)), flush=True)
    threads, lock = [], threading.Lock()
    for index, process in enumerate(processes):
        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            thread = threading.Thread(target=_forward, daemon=True,
                                      args=(stream, f"[p{index}] ", out, lock, verbose))
            thread.start()
            threads.append(thread)
    status = _wait(processes)
    for thread in threads:
        thread.join(timeout=5)
    return status


def _wait(processes: list[subprocess.Popen]) -> int:
    """Wait for all; when one fails, stop the others and return its status.

    SIGTERM and SIGINT sent to the launcher are passed on to every process, which then
    finish their step, save and exit 0 together.
    """

    def forward(signum: int, frame: object) -> None:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                print(f"jaxdist.launch: process {index} exited with status {code}; stopping "
                      f"the others", file=sys.stderr)
                _stop(processes)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in processes:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxdist.launch",
        usage="%(prog)s --num-processes N [--local-devices D] [--port P] [--verbose] "
              "EXPERIMENT [--workdir DIR] [KEY=VALUE ...]",
        description="Run N jaxdist processes on this machine, each with D fake CPU devices, "
                    "as one multi-process run (jax.distributed over 127.0.0.1).",
        epilog="EXPERIMENT and everything after it go to python -m jaxdist.run in every "
               "process (see python -m jaxdist.run --help). If a process fails, the others "
               "are stopped and the launcher exits with its status; SIGTERM and SIGINT are "
               "passed on (the processes save and exit 0).")
    parser.add_argument("--num-processes", type=int, required=True, metavar="N",
                        help="how many processes to start")
    parser.add_argument("--local-devices", type=int, default=1, metavar="D",
                        help="fake CPU devices per process (default: 1)")
    parser.add_argument("--port", type=int, metavar="P",
                        help="the coordinator's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--heartbeat-timeout", type=int, metavar="S",
                        help="seconds without a heartbeat after which a process counts as "
                             "dead and all stop (default: jaxdist.run's)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show gloo's connection lines")
    args, run_args = parser.parse_known_args(argv)
    if not 1 <= args.num_processes <= MAX_PROCESSES or args.local_devices < 1:
        print(f"error: --num-processes must be between 1 and {MAX_PROCESSES} (each is a whole "
              f"Python process with JAX on this machine) and --local-devices >= 1",
              file=sys.stderr)
        return 2
    if not run_args:
        print("error: name an experiment, e.g. python -m jaxdist.launch --num-processes 2 "
              "--local-devices 4 linear_regression", file=sys.stderr)
        return 2
    return launch(args.num_processes, args.local_devices, run_args, args.heartbeat_timeout,
                  args.port, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
