"""The local stand-in for Knative Serving: instances between min- and max-scale, scale to zero
and cold start, bursts, and an instance dying under a request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from microfl.local.serving import Scale, ServiceRunner

SLOW = '''
import os, time
import functions_framework

@functions_framework.http
def slow(request):
    time.sleep(float(request.args.get("s", "0")))
    return {"pid": os.getpid()}
'''


@pytest.fixture
def slow_source(tmp_path: Path) -> Path:
    path = tmp_path / "slow.py"
    path.write_text(SLOW)
    return path


def runner(tmp_path: Path, source: Path, **scale: float) -> ServiceRunner:
    return ServiceRunner("slow", "slow", Scale(**scale), {}, tmp_path / "logs",  # type: ignore[arg-type]
                         source=source)


@pytest.fixture
def idle_service(tmp_path: Path, slow_source: Path) -> Iterator[ServiceRunner]:
    svc = runner(tmp_path, slow_source, min_scale=0, max_scale=2, target=1,
                 container_concurrency=1, idle_window=1.0).start()
    yield svc
    svc.stop()


def wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_scales_to_zero_when_idle_and_cold_starts_on_the_next_request(
        idle_service: ServiceRunner) -> None:
    assert idle_service.processes() == [], "min-scale 0: nothing runs before a request"
    first = requests.get(idle_service.url, timeout=60)
    assert first.status_code == 200 and idle_service.cold_starts == 1
    assert len(idle_service.processes()) == 1

    assert wait_for(lambda: idle_service.processes() == [], 10), "idle instance removed"
    second = requests.get(idle_service.url, timeout=60)
    assert second.status_code == 200
    assert idle_service.cold_starts == 2
    assert second.json()["pid"] != first.json()["pid"], "a new instance served it"


def test_a_burst_runs_more_than_one_instance_never_more_than_max_scale(
        tmp_path: Path, slow_source: Path) -> None:
    svc = runner(tmp_path, slow_source, min_scale=1, max_scale=3, target=1,
                 container_concurrency=1, idle_window=30).start()
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(
                lambda _: requests.get(svc.url, params={"s": "1.0"}, timeout=120), range(12)))
        assert [a.status_code for a in answers] == [200] * 12
        pids = {a.json()["pid"] for a in answers}
        assert 2 <= svc.peak_instances <= 3, svc.peak_instances
        assert 2 <= len(pids) <= 3  # one gunicorn worker (pid) per instance
        assert len(svc.processes()) <= 3
    finally:
        svc.stop()


def test_an_instance_killed_under_a_request_answers_502_and_the_next_works(
        idle_service: ServiceRunner) -> None:
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, idle_service.url, params={"s": "5"}, timeout=60)
        assert wait_for(lambda: any(f.alive for f in idle_service.processes()), 30)
        time.sleep(1.0)
        idle_service.kill_all()
        assert pending.result().status_code == 502
    assert requests.get(idle_service.url, timeout=60).status_code == 200


def test_an_event_to_a_service_scaled_to_zero_is_delivered_after_a_cold_start(
        idle_service: ServiceRunner, kafka: object) -> None:
    import uuid

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from microfl.local.dispatcher import Delivery, Dispatcher, KafkaSource

    bootstrap = kafka.bootstrap  # type: ignore[attr-defined]
    topic = f"cold-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(topic, value=b"{}")
    producer.flush(30)

    assert idle_service.processes() == []
    source = KafkaSource(bootstrap, [topic], f"g-{topic}", idle_service.url,
                         Delivery(retry=0, timeout=60), initial_offset="earliest")
    with Dispatcher(source) as dispatcher:
        assert wait_for(lambda: dispatcher.counters.delivered == 1, 60)
    assert idle_service.cold_starts == 1 and dispatcher.counters.retried == 0


def test_an_instance_still_starting_when_the_service_stops_is_stopped_too(
        tmp_path: Path, slow_source: Path) -> None:
    """An instance whose cold start finishes after stop() must not outlive the service (such
    instances were left running after chaos runs): here the start runs wholly after stop()."""
    import psutil

    svc = runner(tmp_path, slow_source, min_scale=0, max_scale=1, target=1,
                 container_concurrency=1).start()
    svc.stop()
    svc._starting += 1  # as _spawn does before the start it hands to a thread
    svc._add_instance()
    assert svc.instances == [] and svc._starting == 0
    mine = [p for p in psutil.Process().children(recursive=True)
            if str(slow_source.parent) in " ".join(p.cmdline())]
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in mine if p.is_running())
