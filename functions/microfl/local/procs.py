"""Helpers for the local platform's child processes: free ports, log files, waiting, killing, and
the base of its server children (emulators, function instances)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Self

__all__ = ["ServerProcess", "free_port", "repo_root", "spawn", "stop_process", "wait_until"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def repo_root() -> Path:
    """The checkout the package runs from (infra/ holds the local components' recipes)."""
    env = os.environ.get("MICROFL_HOME")
    if env:
        return Path(env).resolve()
    for parent in Path(__file__).resolve().parents:
        if (parent / "infra" / "local" / "pom.xml").is_file():
            return parent
    raise FileNotFoundError(
        "cannot find infra/local/pom.xml above the microfl package; "
        "install microfl from a checkout (pip install -e '.[local]') or set MICROFL_HOME to one"
    )


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start a child in its own process group, stdout and stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll check() until it is true; fail early if proc died, naming its log file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process exited with code {proc.returncode}; see {log_path}"
            )
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, timeouts
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s; see {log_path}")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it is still there after grace."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class ServerProcess:
    """A server child on 127.0.0.1 (an emulator, a function instance), its output in a log file:
    start() spawns argv() on a free port and waits until ready() answers, failing early with the
    log's path if the child dies; stop() ends its process group. Subclasses are dataclasses with
    `port` and `proc` fields."""

    port: int
    proc: subprocess.Popen | None
    start_timeout: ClassVar[float] = 30.0
    stop_grace: ClassVar[float] = 10.0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    @property
    def what(self) -> str:
        """The server's name in errors."""
        return type(self).__name__

    def argv(self) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str] | None:
        """The child's environment; None: this process's."""
        return None

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> Self:
        self.port = self.port or free_port()
        self.proc = spawn(self.argv(), self.log_path, self.child_env())
        wait_until(self.ready, timeout or self.start_timeout, self.what, self.proc, self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=self.stop_grace)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
