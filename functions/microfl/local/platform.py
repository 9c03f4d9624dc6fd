"""The local platform as one unit: start its real parts, record them in a state file, stop them.

`microfl up` runs it in the foreground (Ctrl-C stops it) or detached (`microfl down` stops it from
the pids in the state file)."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from microfl.local.gcs import FakeGcsServer
from microfl.local.kafka import KafkaCluster
from microfl.local.procs import repo_root

__all__ = ["LocalPlatform", "state_dir", "read_state", "stop_recorded"]


def state_dir() -> Path:
    return Path(os.environ.get("MICROFL_STATE_DIR") or repo_root() / ".microfl")


def read_state() -> dict[str, Any] | None:
    path = state_dir() / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class LocalPlatform:
    kafka_nodes: int = 1
    gcs: bool = False
    kafka: KafkaCluster | None = None
    emulator: FakeGcsServer | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> dict[str, Any]:
        root = state_dir()
        if (existing := read_state()) and any(psutil.pid_exists(p["pid"])
                                               for p in existing["processes"]):
            raise RuntimeError(f"the local platform is already running (see {root}/state.json); "
                               "stop it with `microfl down`")
        logs = root / "logs"
        bootstrap = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
        if not bootstrap:
            self.kafka = KafkaCluster(root / "kafka", nodes=self.kafka_nodes).start()
            bootstrap = self.kafka.bootstrap
            for node in self.kafka.members:
                assert node.proc is not None
                self.processes.append({"role": f"kafka-{node.node_id}", "pid": node.proc.pid,
                                       "port": node.port, "log": str(node.log_path)})
        store = os.environ.get("MICROFL_STORE") or f"file://{root / 'store'}"
        emulator_host = None
        if self.gcs:
            self.emulator = FakeGcsServer(logs).start()
            assert self.emulator.proc is not None
            emulator_host = self.emulator.url
            self.processes.append({"role": "fake-gcs-server", "pid": self.emulator.proc.pid,
                                   "port": self.emulator.port,
                                   "log": str(self.emulator.log_path)})
        state = {"started": time.time(), "kafka_bootstrap": bootstrap, "store": store,
                 "storage_emulator_host": emulator_host, "processes": self.processes}
        root.mkdir(parents=True, exist_ok=True)
        (root / "state.json").write_text(json.dumps(state, indent=2))
        return state

    def stop(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()
        if self.kafka is not None:
            self.kafka.stop()
        (state_dir() / "state.json").unlink(missing_ok=True)


def stop_recorded(grace: float = 15.0) -> list[str]:
    """Stop every process named in the state file (SIGTERM, then SIGKILL); the roles stopped."""
    state = read_state()
    if state is None:
        return []
    procs = []
    for entry in state["processes"]:
        try:
            os.killpg(entry["pid"], signal.SIGTERM)
            procs.append(entry)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(psutil.pid_exists(p["pid"]) for p in procs):
        time.sleep(0.2)
    for entry in procs:
        try:
            os.killpg(entry["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    (state_dir() / "state.json").unlink(missing_ok=True)
    return [p["role"] for p in procs]
