"""The local platform as one unit: the event transport (Kafka, or the Pub/Sub emulator), the
object store, the three functions and their event delivery, the operator console, recorded in a
state file.

`microfl up` runs it in the foreground (Ctrl-C or SIGTERM stops it); `--detach` runs that same
foreground process in the background and returns once it is ready; `microfl down` stops it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from microfl.local.gcs import FakeGcsServer
from microfl.local.kafka import KafkaCluster
from microfl.local.procs import repo_root, spawn, stop_process
from microfl.local.pubsub import PubSubEmulator
from microfl.local.runtime import LocalRuntime

__all__ = [
    "LocalPlatform",
    "detach",
    "local_secret",
    "read_state",
    "saved_secret",
    "session",
    "state_dir",
    "stop_recorded",
]


def state_dir() -> Path:
    return Path(os.environ.get("MICROFL_STATE_DIR") or repo_root() / ".microfl").resolve()


def read_state() -> dict[str, Any] | None:
    path = state_dir() / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def saved_secret() -> str | None:
    """MICROFL_SECRET, else the local platform's own secret if it has made one (the load test
    signs with it but never makes one: a new secret would not match the running platform's)."""
    if os.environ.get("MICROFL_SECRET"):
        return os.environ["MICROFL_SECRET"]
    path = state_dir() / "secret"
    return path.read_text().strip() if path.is_file() else None


def local_secret() -> str:
    """saved_secret(), or a new random one (made once, kept 0600 in the state folder)."""
    secret = saved_secret()
    if secret is None:
        path = state_dir() / "secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
        secret = path.read_text().strip()
    return secret


@contextlib.contextmanager
def session(bus: str = "kafka") -> Iterator[tuple[dict[str, Any], str, LocalPlatform | None]]:
    """(state, secret, platform) for the demo and the robustness runs: the running local platform
    (platform None), else one started here and stopped on the way out."""
    secret = local_secret()
    platform = None
    state = read_state()
    if state is not None and state.get("bus", "kafka") != bus:
        raise RuntimeError(
            f"the running local platform uses {state.get('bus', 'kafka')}, not {bus}; "
            "stop it with `microfl down` or leave out --bus"
        )
    t0 = time.monotonic()
    if state is None:
        transport = "Pub/Sub emulator" if bus == "pubsub" else "Kafka broker"
        print(
            f"starting the local platform ({transport}, file store, the three functions) ...",
            flush=True,
        )
        platform = LocalPlatform(secret, ping_interval=2.0, bus=bus)
        state = platform.start()
        print(
            f"  up in {time.monotonic() - t0:.1f}s; ingest at {state['ingest_url']}; "
            f"logs in {state['logs']}",
            flush=True,
        )
    else:
        print(f"using the running local platform at {state['ingest_url']}", flush=True)
    if state.get("console"):
        print(
            f"  operator console at {state['console']} (sign in with the token "
            "`microfl token issue --admin --job '*'` prints)",
            flush=True,
        )
    try:
        yield state, secret, platform
    finally:
        if platform is not None:
            print("stopping the local platform ...", flush=True)
            platform.stop()


def _running(state: dict[str, Any] | None) -> bool:
    return state is not None and any(psutil.pid_exists(p["pid"]) for p in state["processes"])


@dataclass
class LocalPlatform:
    secret: str
    kafka_nodes: int = 1
    gcs: bool = False
    ping_interval: float | None = 5.0
    bus: str = "kafka"
    kafka: KafkaCluster | None = None
    pubsub: PubSubEmulator | None = None
    emulator: FakeGcsServer | None = None
    runtime: LocalRuntime | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def start(self) -> dict[str, Any]:
        root = state_dir()
        if _running(read_state()):
            raise RuntimeError(
                f"the local platform is already running (see {root}/state.json);"
                " stop it with `microfl down`"
            )
        logs = root / "logs"
        bootstrap = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
        self.processes = [
            {"role": "supervisor", "pid": os.getpid(), "port": None, "log": str(logs / "up.log")}
        ]
        if self.bus == "pubsub":
            self.pubsub = PubSubEmulator(logs).start()
            assert self.pubsub.proc is not None
            bootstrap = self.pubsub.host
            self.processes.append(
                {
                    "role": "pubsub-emulator",
                    "pid": self.pubsub.proc.pid,
                    "port": self.pubsub.port,
                    "log": str(self.pubsub.log_path),
                }
            )
        elif not bootstrap:
            self.kafka = KafkaCluster(root / "kafka", nodes=self.kafka_nodes, logdir=logs).start()
            bootstrap = self.kafka.bootstrap
            for node in self.kafka.members:
                assert node.proc is not None
                self.processes.append(
                    {
                        "role": f"kafka-{node.node_id}",
                        "pid": node.proc.pid,
                        "port": node.port,
                        "log": str(node.log_path),
                    }
                )
        store = os.environ.get("MICROFL_STORE") or f"file://{root / 'store'}"
        if self.gcs:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self.emulator = FakeGcsServer(logs).start()
            assert self.emulator.proc is not None
            os.environ["STORAGE_EMULATOR_HOST"] = self.emulator.url
            bucket = f"microfl-{uuid.uuid4().hex[:8]}"
            storage.Client(
                project="microfl-local", credentials=AnonymousCredentials()
            ).create_bucket(bucket)
            store = f"gs://{bucket}"
            self.processes.append(
                {
                    "role": "fake-gcs-server",
                    "pid": self.emulator.proc.pid,
                    "port": self.emulator.port,
                    "log": str(self.emulator.log_path),
                }
            )
        self.runtime = LocalRuntime(
            store,
            bootstrap,
            self.secret,
            root,
            ping_interval=self.ping_interval,
            replication=3 if self.kafka_nodes == 3 else 1,
            bus=self.bus,
        ).start()
        self.state = {
            "started": time.time(),
            "bus": self.bus,
            "events_at": bootstrap,
            "store": store,
            "storage_emulator_host": os.environ.get("STORAGE_EMULATOR_HOST"),
            "ingest_url": self.runtime.ingest_url,
            "console": self.runtime.console_url,  # the operator console (admin sign-in)
            "logs": str(logs),
            "processes": self.processes,
        }
        root.mkdir(parents=True, exist_ok=True)
        self._write_state(self.runtime)
        threading.Thread(target=self._refresh, args=(self.runtime,), daemon=True).start()
        return self.state

    def _write_state(self, runtime: LocalRuntime) -> None:
        """state.json with the instances running now (they come and go with the load)."""
        state = dict(
            self.state,
            processes=self.processes + runtime.processes(),
            services={t: r.url for t, r in runtime.services.items()},
        )
        tmp = state_dir() / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_dir() / "state.json")

    def _refresh(self, runtime: LocalRuntime) -> None:
        while not runtime.stopping.wait(1.0):
            self._write_state(runtime)

    def stop(self) -> None:
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.stop()
        if self.emulator is not None:
            self.emulator.stop()
        if self.pubsub is not None:
            self.pubsub.stop()
        if self.kafka is not None:
            self.kafka.stop()
        path = state_dir() / "state.json"
        state = read_state()
        if state and state["processes"][0]["pid"] == os.getpid():
            path.unlink(missing_ok=True)


def detach(argv: list[str], timeout: float = 180.0) -> dict[str, Any]:
    """Run `microfl up ARGV` in the background; the state once it is ready."""
    if _running(read_state()):
        raise RuntimeError("the local platform is already running; stop it with `microfl down`")
    log = state_dir() / "logs" / "up.log"
    (state_dir() / "state.json").unlink(missing_ok=True)
    proc = spawn([sys.executable, "-m", "microfl.local.cli", "up", *argv], log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state()
        if state and state["processes"][0]["pid"] == proc.pid:
            return state
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the local platform failed to start; end of {log}:\n{tail}")
        time.sleep(0.3)
    stop_process(proc)
    raise TimeoutError(f"the local platform was not up after {timeout:.0f}s; see {log}")


def stop_recorded(grace: float = 30.0) -> list[str]:
    """Stop the platform named in the state file: SIGTERM its supervisor (which stops the rest
    in order), then SIGKILL whatever recorded process is left."""
    state = read_state()
    if state is None:
        return []
    procs = [p for p in state["processes"] if psutil.pid_exists(p["pid"])]
    if procs and procs[0]["role"] == "supervisor":
        os.kill(procs[0]["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(psutil.pid_exists(p["pid"]) for p in procs):
        time.sleep(0.2)
    for entry in procs:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(entry["pid"], signal.SIGKILL)
    (state_dir() / "state.json").unlink(missing_ok=True)
    return [p["role"] for p in procs]
