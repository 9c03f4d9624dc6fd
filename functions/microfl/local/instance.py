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

from microfl.local.procs import HOST, ServerProcess, repo_root

__all__ = ["FunctionProcess"]


@dataclass
class FunctionProcess(ServerProcess):
    """One instance of a function: functions-framework (gunicorn) on a free port."""

    target: str
    env: dict[str, str]
    logdir: Path
    log_name: str = ""
    source: Path | None = None  # functions/main.py of the checkout unless given
    port: int = 0
    proc: subprocess.Popen | None = None
    start_timeout = 60.0
    stop_grace = 5.0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.log_name or self.target}.log"

    @property
    def what(self) -> str:
        return f"function {self.target}"

    def argv(self) -> list[str]:
        runner = Path(sys.executable).parent / "functions-framework"
        source = self.source or repo_root() / "functions" / "main.py"
        return [
            str(runner),
            "--target",
            self.target,
            "--source",
            str(source),
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]

    def child_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def ready(self) -> bool:
        # ingest has a health path, the console a page served without a session (Knative's TCP
        # probe checks less); CloudEvent functions answer GET / with 405.
        path = {"ingest": "/healthz", "console": "/signin"}.get(self.target, "/")
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
