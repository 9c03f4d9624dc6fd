"""Delivery faults on each event transport (Kafka, Pub/Sub): every event duplicated, delayed and
reordered by a proxy before each function, and the transport itself stalled (SIGSTOP) while
clients upload. The round commits once, with every accepted update and the same bytes as a run
without faults. (Each test starts its own runtime, so this module has no shared one: two
runtimes alive at once would share consumer groups and subscriptions.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from fl import SECRET, auth, make_model, make_updates, new_job, post_all, reference, update_bytes
from microfl.jobs import model_key
from microfl.local.proxies import EventChaosProxy
from microfl.local.runtime import LocalRuntime
from microfl.rounds import record_key
from microfl.serde import json_from_bytes
from microfl.store import FileStore


def test_duplicated_and_reordered_delivery_commits_the_same_bytes(
    transport: SimpleNamespace, tmp_path: Path
) -> None:
    """Every event may arrive twice, late and out of order (a proxy before each function)."""
    store = FileStore(tmp_path / "store")
    proxies: list[EventChaosProxy] = []

    def chaos(url: str) -> str:
        proxies.append(EventChaosProxy(url, seed=len(proxies), duplicate=0.6))
        return proxies[-1].url

    model = make_model(7)
    updates = make_updates(model, 10, seed=8)
    job = new_job(store, model, rounds=1, min_clients=10, fan_in=3)
    try:
        with LocalRuntime(
            store.url,
            transport.address,
            SECRET,
            tmp_path,
            ping_interval=1.0,
            bus=transport.bus,
            wrap_sink=chaos,
        ) as runtime:
            post_all(runtime.ingest_url, job, updates)
            runtime.wait_committed(store, job, 1)
            time.sleep(2.5)  # the last duplicates (sent up to 2 s late) land after the commit
    finally:
        for proxy in proxies:
            proxy.close()
    assert sum(p.duplicates for p in proxies) >= 5, "events were duplicated"
    ref = reference(store, job, tmp_path / "ref", sorted(updates))
    assert store.read(model_key(job, 1)) == ref.read(model_key(job, 1))
    record = json_from_bytes(store.read(record_key(job, 1)) or b"")
    assert record["included"] == sorted(updates)
    assert store.list(f"jobs/{job}/models/") == [model_key(job, 0), model_key(job, 1)]


def test_a_stalled_transport_loses_nothing(transport: SimpleNamespace, tmp_path: Path) -> None:
    """Clients keep uploading (retrying 503s) while the broker or emulator is frozen for 5 s."""
    if transport.stall is None:
        pytest.skip(
            "MICROFL_KAFKA_BOOTSTRAP names an external cluster, which this run cannot pause"
        )
    store = FileStore(tmp_path / "store")
    model = make_model(9)
    updates = make_updates(model, 12, seed=10)
    job = new_job(store, model, rounds=1, min_clients=12, fan_in=4)
    answers: dict[str, list[int]] = {c: [] for c in updates}
    done_at: dict[str, float] = {}

    def upload(client: str) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                status = requests.post(
                    f"{runtime.ingest_url}/v1/jobs/{job}/rounds/1/updates",
                    data=update_bytes(*updates[client]),
                    headers=auth(job, client),
                    timeout=30,
                ).status_code
            except requests.RequestException:
                status = 0
            answers[client].append(status)
            if status in (200, 202):
                done_at[client] = time.monotonic()
                return
            time.sleep(0.5)

    with LocalRuntime(
        store.url, transport.address, SECRET, tmp_path, ping_interval=1.0, bus=transport.bus
    ) as runtime:
        clients = sorted(updates)
        post_all(runtime.ingest_url, job, {c: updates[c] for c in clients[:4]})
        transport.stall(True)
        try:
            threads = [threading.Thread(target=upload, args=(c,)) for c in clients[4:]]
            for thread in threads:
                thread.start()
            time.sleep(5)
        finally:
            transport.stall(False)
        resumed = time.monotonic()
        for thread in threads:
            thread.join()
        assert all(answers[c][-1] in (200, 202) for c in clients[4:]), answers
        assert max(done_at.values()) >= resumed, "the stall held the uploads up"
        runtime.wait_committed(store, job, 1)
    ref = reference(store, job, tmp_path / "ref", clients)
    assert store.read(model_key(job, 1)) == ref.read(model_key(job, 1))
    assert json_from_bytes(store.read(record_key(job, 1)) or b"")["included"] == clients
