"""Real servers the tests and scripts start and stop by pid, on 127.0.0.1: MLflow, TensorBoard."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A server command on 127.0.0.1:`port`, in its own process group, logging to `folder`.

    `start()` waits until `health_path` answers 200; `stop()` ends the whole group (the
    server and its workers) by the pid it recorded in `folder/NAME.pid`.
    """

    def __init__(self, name: str, command: list[str], folder: Path, port: int,
                 health_path: str = "/", start_timeout: float = 120.0):
        self.name, self.command, self.folder = name, command, Path(folder)
        self.port, self.health_path, self.start_timeout = port, health_path, start_timeout
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / f"{self.name}.log"
        log = log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        (self.folder / f"{self.name}.pid").write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + self.health_path, timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {self.start_timeout} s")

    def stop(self, kill: bool = False) -> None:
        """End the server's process group: SIGTERM, then SIGKILL; `kill`: SIGKILL at once."""
        if self.process is None:
            return
        pid = int((self.folder / f"{self.name}.pid").read_text())
        for sig in (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the workers of the group, should one outlive the server
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MlflowServer(LocalServer):
    """`mlflow server` over a sqlite store in `folder`."""

    def __init__(self, folder: Path, start_timeout: float = 120.0):
        folder, port = Path(folder), free_port()
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                   "--default-artifact-root", str(folder / "artifacts")]
        super().__init__("mlflow-server", command, folder, port, "/health", start_timeout)


class TensorBoardServer(LocalServer):
    """`tensorboard --logdir LOGDIR` (with its plugins: xprof's Profile tab), logging to
    `folder`."""

    def __init__(self, logdir: Path, folder: Path, start_timeout: float = 120.0):
        port = free_port()
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                   "--host", "127.0.0.1", "--port", str(port)]
        super().__init__("tensorboard", command, folder, port, "/", start_timeout)
