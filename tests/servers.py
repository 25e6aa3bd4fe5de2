"""Real servers the tests start and stop by pid: an MLflow tracking server on 127.0.0.1."""

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


class MlflowServer:
    """`mlflow server` over a sqlite store in `folder`, in its own process group.

    `start()` waits until its /health answers; `stop()` ends the whole group (the server and
    its workers) by the pid it recorded in `folder/mlflow-server.pid`.
    """

    def __init__(self, folder: Path, start_timeout: float = 120.0):
        self.folder, self.start_timeout = Path(folder), start_timeout
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "mlflow-server.log").open("w")
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--default-artifact-root", str(self.folder / "artifacts")]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        (self.folder / "mlflow-server.pid").write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: "
                                   f"{(self.folder / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {self.start_timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        pid = int((self.folder / "mlflow-server.pid").read_text())
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the workers of the group, should one outlive the server
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
