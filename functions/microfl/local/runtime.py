"""The platform's functions running locally as the manifests in knative/ describe them: each
Service a ServiceRunner (instances between min- and max-scale, scale to zero), each KafkaSource a
Dispatcher posting CloudEvents to its sink Service, and the PingSource a timer posting to its
sink (finalize's deadline and recovery sweep). With bus="pubsub" the functions publish to the
Pub/Sub emulator instead and each push subscription (microfl.local.pubsub) is a PushDispatcher;
the KafkaSources are not used, as in the infra/knative-pubsub overlay."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microfl.events import PING
from microfl.local.dispatcher import Dispatcher, KafkaSource
from microfl.local.kafka import ensure_topics
from microfl.local.manifests import Platform, load_platform
from microfl.local.procs import repo_root
from microfl.local.pubsub import PROJECT, SUBSCRIPTIONS, PushSubscription, ensure_pubsub
from microfl.local.push import PushDispatcher
from microfl.local.serving import Scale, ServiceRunner
from microfl.serde import Event, event_to_http

__all__ = ["LocalRuntime"]

LOG = logging.getLogger("microfl.runtime")
LOGGERS = ("microfl.dispatcher", "microfl.runtime", "microfl.bus")


@dataclass
class LocalRuntime:
    """Start with start(), stop with stop(). `bootstrap` is the event transport's address: Kafka
    bootstrap servers, or the Pub/Sub emulator's host:port with bus="pubsub". `ping_interval`
    replaces the PingSource's cron schedule (one minute at best) where tests need faster
    deadlines; `idle_window` is how long an idle instance lives; env_extra reaches every
    function (failpoints)."""

    store_url: str
    bootstrap: str
    secret: str
    workdir: Path
    manifests: Path | None = None
    ping_interval: float | None = None
    idle_window: float = 30.0
    env_extra: dict[str, str] = field(default_factory=dict)
    replication: int = 1
    bus: str = "kafka"
    subscriptions: tuple[PushSubscription, ...] = SUBSCRIPTIONS
    wrap_sink: Callable[[str], str] | None = None  # fault tests put a proxy before each sink
    services: dict[str, ServiceRunner] = field(default_factory=dict)
    dispatchers: list[Dispatcher | PushDispatcher] = field(default_factory=list)
    platform: Platform | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _handler: logging.Handler | None = None

    def env(self) -> dict[str, str]:
        env = {
            "MICROFL_STORE": self.store_url,
            "MICROFL_SECRET": self.secret,
            "PYTHONUNBUFFERED": "1",
        }
        if self.bus == "pubsub":
            env |= {
                "MICROFL_BUS": "pubsub",
                "MICROFL_PUBSUB_PROJECT": PROJECT,
                "PUBSUB_EMULATOR_HOST": self.bootstrap,
                "MICROFL_PUSH_AUTH": "off",  # the emulator's pushes carry no OIDC token
            }
        else:
            env["MICROFL_KAFKA_BOOTSTRAP"] = self.bootstrap
        env |= self.env_extra
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        return env

    def start(self) -> LocalRuntime:
        if self.bus not in ("kafka", "pubsub"):
            raise ValueError(f"bus {self.bus!r}: use kafka or pubsub")
        self.platform = load_platform(self.manifests or repo_root() / "knative")
        logs = Path(self.workdir) / "logs"
        self._log_to(logs / "runtime.log")
        if self.bus == "kafka":
            ensure_topics(self.bootstrap, replication=self.replication)
        for svc in self.platform.services:
            scale = Scale(
                svc.min_scale,
                svc.max_scale,
                svc.target_concurrency,
                svc.container_concurrency,
                svc.timeout_seconds,
                self.idle_window,
            )
            self.services[svc.function] = ServiceRunner(
                svc.name, svc.function, scale, self.env(), logs
            ).start()
        by_name = {svc.name: svc.function for svc in self.platform.services}
        if self.bus == "pubsub":
            self._start_push()
        for src in self.platform.sources if self.bus == "kafka" else ():
            dispatcher = Dispatcher(
                KafkaSource(
                    self.bootstrap,
                    list(src.topics),
                    src.consumer_group,
                    self._sink(self.services[by_name[src.sink]].url),
                    src.delivery,
                    ordering=src.ordering,
                    initial_offset=src.initial_offset,
                )
            )
            self.dispatchers.append(dispatcher.start())
        ping = self.platform.ping
        if ping is not None:
            interval = self.ping_interval or 60.0
            sink = self.services[by_name[ping.sink]].url
            thread = threading.Thread(target=self._ping, args=(sink, interval), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _start_push(self) -> None:
        sinks = {fn: self._sink(runner.url) for fn, runner in self.services.items()}
        ensure_pubsub(self.bootstrap, PROJECT, sinks, self.subscriptions)
        for sub in self.subscriptions:
            push = PushDispatcher(self.bootstrap, PROJECT, sub, sinks[sub.function])
            self.dispatchers.append(push.start())

    def _sink(self, url: str) -> str:
        return self.wrap_sink(url) if self.wrap_sink else url

    def _log_to(self, path: Path) -> None:
        """Event delivery and Kafka client lines go to the runtime's log file, not the
        terminal of whoever runs the platform."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        for name in LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self._handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    @property
    def ingest_url(self) -> str:
        return self.services["ingest"].url

    @property
    def console_url(self) -> str | None:
        """The operator console's URL (None with manifests that have no console Service)."""
        runner = self.services.get("console")
        return None if runner is None else runner.url

    def _ping(self, sink: str, interval: float) -> None:
        n = 0
        while not self.stopping.wait(interval):
            n += 1
            headers, body = event_to_http(Event(PING, "/microfl/local/ping", f"ping-{n}"))
            request = urllib.request.Request(sink, data=body, headers=headers, method="POST")
            try:
                urllib.request.urlopen(request, timeout=120).close()
            except OSError as exc:  # the next ping tries again
                LOG.warning("ping to finalize failed: %s", exc)

    def processes(self) -> list[dict[str, Any]]:
        """Every running function instance: role, pid, port, log."""
        return [
            {"role": target, "pid": fn.proc.pid, "port": fn.port, "log": str(fn.log_path)}
            for target, runner in self.services.items()
            for fn in runner.processes()
            if fn.proc is not None
        ]

    def stop(self) -> None:
        self.stopping.set()
        for dispatcher in self.dispatchers:
            dispatcher.stop()
        for runner in self.services.values():
            runner.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._handler is not None:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()

    def __enter__(self) -> LocalRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_committed(self, store: Any, job: str, version: int, timeout: float = 120) -> None:
        from microfl.rounds import record_key

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if store.exists(record_key(job, version)):
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"round {version} of job {job} did not commit in {timeout:.0f}s; "
            f"logs in {Path(self.workdir) / 'logs'}"
        )
