"""Duplicated, delayed and reordered event delivery on each event transport (Kafka, Pub/Sub): a
proxy before each function posts every event after a random delay and often twice, out of order
with what follows. The round commits once, with the same bytes as a run without faults. (Its own
module: two runtimes alive at once would share consumer groups and subscriptions.)"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from fl import SECRET, make_model, make_updates, new_job, post_all, reference
from microfl.jobs import model_key, record_key
from microfl.local.proxies import EventChaosProxy
from microfl.local.runtime import LocalRuntime
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
