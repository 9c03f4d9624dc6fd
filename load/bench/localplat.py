"""The local platform as the platform benchmarks drive it: a LocalRuntime with edited manifests,
its processes sampled while it runs, and the load generator as a child process.

Imported by host processes only (it imports microfl.local, hence numpy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import procstat

from microfl.local.dispatcher import Dispatcher
from microfl.local.procs import repo_root
from microfl.local.push import PushDispatcher
from microfl.local.runtime import LocalRuntime

__all__ = ["Sampled", "edit_manifests", "kafka", "loadgen"]

HERE = Path(__file__).resolve().parent
SCALE = "autoscaling.knative.dev/"


def edit_manifests(dest: Path, annotations: dict[str, dict[str, str]], group: str = "") -> Path:
    """A copy of knative/ in dest with Service annotations replaced, e.g.
    {"ingest": {"min-scale": "1", "max-scale": "1"}}; returns dest. With group, every
    KafkaSource gets consumer group `{its group}-{group}` starting at the latest offset, so a
    runtime does not inherit events an earlier runtime on the same broker left unconsumed."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(repo_root() / "knative", dest)
    if group:
        path = dest / "sources.yaml"
        text, n = re.subn(r"(consumerGroup:\s*)(\S+)", rf"\g<1>\g<2>-{group}", path.read_text())
        text, m = re.subn(r"(initialOffset:\s*)earliest", r"\g<1>latest", text)
        if not n or n != m:
            raise ValueError(f"{path}: expected a consumerGroup and initialOffset per source")
        path.write_text(text)
    for function, values in annotations.items():
        path = dest / f"{function}.yaml"
        text = path.read_text()
        for key, value in values.items():
            text, n = re.subn(
                rf'({re.escape(SCALE + key)}:\s*)"[^"]*"', lambda m, v=value: f'{m[1]}"{v}"', text
            )
            if n != 1:
                raise ValueError(f"{path.name}: no single {SCALE}{key} annotation to edit")
        path.write_text(text)
    return dest


@contextmanager
def kafka(workdir: Path) -> Any:
    """The broker run.py started for all platform benchmarks (MICROFL_KAFKA_BOOTSTRAP and
    MICROFL_BENCH_KAFKA_PID), or a new one in workdir for the duration."""
    bootstrap = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
    if bootstrap:
        pid = int(os.environ.get("MICROFL_BENCH_KAFKA_PID") or 0)
        yield SimpleNamespace(bootstrap=bootstrap, pids=lambda: [pid] if pid else [])
        return
    from microfl.local.kafka import KafkaCluster

    cluster = KafkaCluster(workdir / "kafka", logdir=workdir / "logs").start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Sampled:
    """A started LocalRuntime whose function processes (and Kafka's, and any `others` given as
    (role, pid)) are sampled every `interval` s: VmHWM, CPU seconds, and how many events each
    KafkaSource (by consumer group) or push subscription (by name) delivered."""

    def __init__(
        self,
        runtime: LocalRuntime,
        kafka_pids: list[int],
        interval: float = 0.25,
        others: list[tuple[str, int]] | None = None,
    ):
        self.runtime = runtime
        self.kafka_pids = kafka_pids
        self.others = others or []
        self.interval = interval
        self.sampler = procstat.ProcessSampler()
        self.progress: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._host_cpu = 0.0

    def roles(self) -> list[tuple[str, int]]:
        found = [(p["role"], int(p["pid"])) for p in self.runtime.processes()]
        return found + [("kafka", pid) for pid in self.kafka_pids] + self.others

    def start(self) -> Sampled:
        self.sampler.sample(self.roles())
        self.sampler.mark()
        self._host_cpu = procstat.cpu_seconds() or 0.0
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        self.sampler.sample(self.roles())
        delivered = {_source(d): d.counters.delivered for d in self.runtime.dispatchers}
        if not self.progress or self.progress[-1][1] != delivered:
            self.progress.append((time.time(), delivered))

    def stop(self) -> dict[str, Any]:
        """Stop sampling; what was seen: processes, peak MiB and CPU s per role, instances."""
        self._stop.set()
        self._thread.join()
        self.sample()
        procs = self.sampler.processes()
        peak: dict[str, float] = {}
        cpu: dict[str, float] = {}
        roots: dict[str, set[int]] = {}
        for p in procs:
            peak[p["role"]] = max(peak.get(p["role"], 0.0), p["vm_hwm_mib"])
            cpu[p["role"]] = cpu.get(p["role"], 0.0) + p.get("cpu_s", 0.0)
            roots.setdefault(p["role"], set()).add(p["root"])
        cpu["runtime host (proxies, dispatchers)"] = (
            procstat.cpu_seconds() or 0.0
        ) - self._host_cpu
        return {
            "processes": procs,
            "peak_mib": peak,
            "cpu_s": cpu,
            "instances": {role: len(r) for role, r in roots.items()},
            "services": {
                name: {"peak_instances": s.peak_instances, "cold_starts": s.cold_starts}
                for name, s in self.runtime.services.items()
            },
            "dispatch": {
                _source(d): {
                    k: getattr(d.counters, k)
                    for k in ("delivered", "retried", "dead_lettered", "lost")
                }
                for d in self.runtime.dispatchers
            },
        }


def _source(dispatcher: Dispatcher | PushDispatcher) -> str:
    """A KafkaSource's consumer group, or a push subscription's name."""
    if isinstance(dispatcher, PushDispatcher):
        return dispatcher.sub.name
    return dispatcher.source.group


def loadgen(
    url: str,
    job: str,
    clients: int,
    params: int,
    threads: int,
    secret: str,
    warmup: int = 0,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run loadgen.py in a process of its own (extra: more of its options); its summary."""
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            url,
            job,
            "--clients",
            str(clients),
            "--params",
            str(params),
            "--threads",
            str(threads),
            "--warmup",
            str(warmup),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MICROFL_SECRET": secret},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited with {done.returncode} (its error is above)")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
