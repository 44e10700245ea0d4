"""Start ``gist-lightning serve`` as a process on a free loopback port, wait until it is healthy,
and stop it (with everything it started) afterwards: for the tests, the load test and scripts."""

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


class ServerProcess:
    """``with ServerProcess(model, "--mode", "full") as server: server.url`` (``.../v1``)."""

    def __init__(self, model: str | os.PathLike, *args: str, startup_timeout: float = 180.0,
                 log: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        self.command = [sys.executable, "-m", "gist_lightning.cli", "serve", "--model", str(model),
                        "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.log_path = Path(log) if log else None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # its own session: stop() can reach the HTTP process and inference worker it starts
        self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} before it was "
                                   "healthy" + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server was not healthy within {self.startup_timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its session (the inference worker, the manager)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
