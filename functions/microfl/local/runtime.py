"""The functions running locally as real processes, wired to Kafka like on Knative: each
function a functions-framework server, each KafkaSource a Dispatcher posting CloudEvents to it,
and a ping (the PingSource) that triggers finalize's sweep on a schedule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from microfl.bus import ensure_topics
from microfl.events import PARTIAL_REQUESTED, PING, TOPICS, UPDATE_ACCEPTED
from microfl.local.dispatcher import Delivery, Dispatcher, KafkaSource
from microfl.local.procs import HOST, free_port, repo_root, spawn, stop_process, wait_until
from microfl.serde import Event, event_to_http

__all__ = ["FunctionProcess", "LocalRuntime"]

TARGETS = ("ingest", "aggregate", "finalize")


@dataclass
class FunctionProcess:
    """One instance of a function: functions-framework (gunicorn) on a free port."""

    target: str
    env: dict[str, str]
    logdir: Path
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
        return self.logdir / f"{self.target}.log"

    def start(self, timeout: float = 60.0) -> FunctionProcess:
        self.port = self.port or free_port()
        runner = Path(sys.executable).parent / "functions-framework"
        source = repo_root() / "functions" / "main.py"
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


@dataclass
class LocalRuntime:
    """Start with start(), stop with stop(). A supervisor restarts instances that die, as
    Knative restarts a crashed container; env_extra reaches every function (failpoints)."""

    store_url: str
    bootstrap: str
    secret: str
    workdir: Path
    delivery: Delivery = field(
        default_factory=lambda: Delivery(
            retry=10, backoff_policy="exponential", backoff_delay=0.2, timeout=60.0
        )
    )
    ping_interval: float = 5.0
    env_extra: dict[str, str] = field(default_factory=dict)
    replication: int = 1
    functions: dict[str, FunctionProcess] = field(default_factory=dict)
    dispatchers: list[Dispatcher] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = {
            "MICROFL_STORE": self.store_url,
            "MICROFL_KAFKA_BOOTSTRAP": self.bootstrap,
            "MICROFL_SECRET": self.secret,
            "PYTHONUNBUFFERED": "1",
            **self.env_extra,
        }
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        return env

    def start(self) -> LocalRuntime:
        ensure_topics(self.bootstrap, replication=self.replication)
        logs = Path(self.workdir) / "logs"
        for target in TARGETS:
            self.functions[target] = FunctionProcess(target, self.env(), logs).start()
        for target, event_type in (("aggregate", PARTIAL_REQUESTED), ("finalize", UPDATE_ACCEPTED)):
            topic = TOPICS[event_type]
            source = KafkaSource(
                self.bootstrap,
                [topic],
                f"microfl-{target}",
                self.functions[target].url,
                Delivery(**{**self.delivery.__dict__, "dead_letter_topic": f"{topic}.dlq"}),
                ordering="unordered" if target == "aggregate" else "ordered",
            )
            dispatcher = Dispatcher(source)
            dispatcher.start()
            self.dispatchers.append(dispatcher)
        for loop in (self._supervise, self._ping):
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def ingest_url(self) -> str:
        return self.functions["ingest"].url

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            for fn in self.functions.values():
                if not fn.alive and not self._stopping.is_set():
                    print(f"microfl: {fn.target} died; restarting it", file=sys.stderr)
                    try:
                        fn.start()
                    except (RuntimeError, TimeoutError) as exc:
                        print(f"microfl: restarting {fn.target} failed: {exc}", file=sys.stderr)

    def _ping(self) -> None:
        n = 0
        while not self._stopping.wait(self.ping_interval):
            n += 1
            headers, body = event_to_http(Event(PING, "/microfl/local/ping", f"ping-{n}"))
            request = urllib.request.Request(
                self.functions["finalize"].url, data=body, headers=headers, method="POST"
            )
            try:
                urllib.request.urlopen(request, timeout=60).close()
            except OSError as exc:  # the next ping tries again
                print(f"microfl: ping to finalize failed: {exc}", file=sys.stderr)

    def stop(self) -> None:
        self._stopping.set()
        for dispatcher in self.dispatchers:
            dispatcher.stop()
        for fn in self.functions.values():
            fn.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_committed(self, store: object, job: str, version: int, timeout: float = 120) -> None:
        from microfl.jobs import record_key

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if store.exists(record_key(job, version)):  # type: ignore[attr-defined]
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"round {version} of job {job} did not commit in {timeout:.0f}s; "
            f"logs in {Path(self.workdir) / 'logs'}"
        )
