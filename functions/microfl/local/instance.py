"""One instance of a function: a functions-framework server (gunicorn) as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from microfl.local.procs import HOST, free_port, repo_root, spawn, stop_process, wait_until

__all__ = ["FunctionProcess"]


@dataclass
class FunctionProcess:
    """One instance of a function: functions-framework (gunicorn) on a free port."""

    target: str
    env: dict[str, str]
    logdir: Path
    log_name: str = ""
    source: Path | None = None  # functions/main.py of the checkout unless given
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.log_name or self.target}.log"

    def start(self, timeout: float = 60.0) -> FunctionProcess:
        self.port = free_port()
        runner = Path(sys.executable).parent / "functions-framework"
        source = self.source or repo_root() / "functions" / "main.py"
        self.proc = spawn(
            [
                str(runner),
                "--target",
                self.target,
                "--source",
                str(source),
                "--host",
                HOST,
                "--port",
                str(self.port),
            ],
            self.log_path,
            env={**os.environ, **self.env},
        )
        wait_until(self._answers, timeout, f"function {self.target}", self.proc, self.log_path)
        return self

    def _answers(self) -> bool:
        path = "/healthz" if self.target == "ingest" else "/"
        try:
            with urllib.request.urlopen(self.url + path, timeout=2):
                return True
        except urllib.error.HTTPError as exc:  # CloudEvent functions answer GET with 405
            return exc.code == 405

    def kill(self) -> None:
        """SIGKILL the whole instance (gunicorn master and workers)."""
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5.0)
