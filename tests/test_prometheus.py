"""GET /metrics of the three functions as real processes on the local runtime (Kafka, file
store), scraped during a round: the counters move as the round goes, and what an operator reads
(uploads by status, bytes, folds, node/seal/commit latencies, events) matches what was done."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fl import SECRET, auth, eventually, make_model, make_updates, new_job, update_bytes
from microfl import events
from microfl.local.runtime import LocalRuntime
from microfl.store import FileStore

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def platform(
    kafka: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalRuntime, FileStore]]:
    work = tmp_path_factory.mktemp("prometheus")
    store = FileStore(work / "store")
    # No instance is removed while the test runs: the counters live as long as their instance.
    with LocalRuntime(
        store.url,
        kafka.bootstrap,  # type: ignore[attr-defined]
        SECRET,
        work,
        ping_interval=1.0,
        idle_window=600.0,
    ) as rt:
        yield rt, store


def scrape(rt: LocalRuntime, role: str) -> Samples:
    """Every instance of role scraped on its own port, samples summed over the instances (a
    service scaled to zero is woken through its URL first, as a scraper's request would)."""
    if not any(p["role"] == role for p in rt.processes()):
        assert requests.get(rt.services[role].url + "/metrics", timeout=60).status_code == 200
    ports = [p["port"] for p in rt.processes() if p["role"] == role]
    assert ports, f"no {role} instance runs"
    total: Samples = defaultdict(float)
    for port in ports:
        resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/plain")
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                total[(s.name, frozenset(s.labels.items()))] += s.value
    return total


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def published(samples: Samples) -> float:
    return sum(v for (n, _), v in samples.items() if n == "microfl_events_published_total")


def test_counters_move_as_a_round_goes(platform: tuple[LocalRuntime, FileStore]) -> None:
    rt, store = platform
    model = make_model()
    job = new_job(store, model, rounds=1, min_clients=6, fan_in=2)
    updates = make_updates(model, 6)
    bodies = {c: update_bytes(t, n) for c, (t, n) in updates.items()}
    url = f"{rt.ingest_url}/v1/jobs/{job}/rounds/1/updates"

    def post(client: str) -> int:
        headers = auth(job, client) | {"Content-Type": "application/octet-stream"}
        return requests.post(url, data=bodies[client], headers=headers, timeout=30).status_code

    before = scrape(rt, "ingest")
    clients = sorted(bodies)
    assert [post(c) for c in clients[:5]] == [202] * 5  # below the quorum of 6: the round runs

    # During the round: ingest counted them, and aggregate folds the full leaves eagerly.
    during = scrape(rt, "ingest")
    assert (
        value(during, "microfl_uploads_total", status="202")
        - value(before, "microfl_uploads_total", status="202")
        == 5
    )
    sent = sum(len(bodies[c]) for c in clients[:5])
    grown = value(during, "microfl_upload_bytes_total") - value(
        before, "microfl_upload_bytes_total"
    )
    assert grown == sent
    assert published(during) > 0  # update.accepted of the slots that fill a leaf
    eventually(
        lambda: value(scrape(rt, "aggregate"), "microfl_folded_updates_total") == 4,
        "aggregate folds the two full leaves before the seal",
    )
    assert value(scrape(rt, "finalize"), "microfl_seal_seconds_count") == 0

    assert post(clients[5]) == 202
    assert post(clients[0]) == 200  # a replay
    admin = auth(job, None, admin=True)
    assert requests.post(url, data=b"x", headers=admin, timeout=30).status_code == 403
    rt.wait_committed(store, job, 1)

    ingest = scrape(rt, "ingest")
    assert (
        value(ingest, "microfl_uploads_total", status="202")
        - value(before, "microfl_uploads_total", status="202")
        == 6
    )
    assert value(ingest, "microfl_uploads_total", status="200") >= 1
    assert value(ingest, "microfl_uploads_total", status="403") >= 1  # an admin token uploads not
    assert value(ingest, "process_resident_memory_bytes") > 0  # the process collector

    aggregate = scrape(rt, "aggregate")
    values = sum(int(a.size) for a in model.values())
    assert value(aggregate, "microfl_folded_updates_total") == 6
    assert value(aggregate, "microfl_folded_values_total") == 6 * values
    assert value(aggregate, "microfl_partial_seconds_count", kind="leaf") == 3
    assert value(aggregate, "microfl_partial_seconds_sum", kind="leaf") > 0
    assert value(aggregate, "microfl_events_published_total", type=events.PARTIAL_READY) >= 3

    eventually(
        lambda: value(scrape(rt, "finalize"), "microfl_commit_seconds_count") == 1,
        "finalize counts its commit (the record is written just before)",
    )
    finalize = scrape(rt, "finalize")
    assert value(finalize, "microfl_seal_seconds_count") == 1
    assert value(finalize, "microfl_events_published_total", type=events.PARTIAL_REQUESTED) >= 3
    assert value(finalize, "microfl_events_published_total", type=events.ROUND_COMMITTED) == 1


def test_refused_events_are_counted_and_delivery_still_works(
    platform: tuple[LocalRuntime, FileStore],
) -> None:
    """A poison event is counted as dead-lettered (label: "other", not what the sender typed);
    GET /metrics on an event function leaves its other GETs and its POSTs as they were."""
    rt, _ = platform
    aggregate = rt.services["aggregate"].url
    before = value(
        scrape(rt, "aggregate"), "microfl_events_dead_lettered_total", type="other", status="400"
    )
    poison = {
        "ce-specversion": "1.0",
        "ce-type": "io.example.anything-a-sender-likes",
        "ce-source": "test",
        "ce-id": "poison-1",
        "Content-Type": "application/json",
    }
    answer = requests.post(aggregate, data=b"{}", headers=poison, timeout=30)
    assert answer.status_code == 400, answer.text
    after = scrape(rt, "aggregate")
    assert value(after, "microfl_events_dead_lettered_total", type="other", status="400") == (
        before + 1
    )
    assert not any("anything-a-sender-likes" in str(labels) for _, labels in after)
    assert requests.get(aggregate + "/", timeout=10).status_code == 405
    assert requests.get(aggregate + "/metrics", timeout=10).status_code == 200


def test_load_report_figures_from_the_scrapes(platform: tuple[LocalRuntime, FileStore]) -> None:
    """microfl.local.loadmetrics on the functions' real /metrics text: what a round did, as the
    Locust report shows it (every instance scraped before and after, matched by pid)."""
    from microfl.local.loadmetrics import delta, quantile, report_lines, snapshot, summary

    rt, store = platform
    model = make_model()
    job = new_job(store, model, rounds=1, min_clients=4, fan_in=2)
    bodies = {c: update_bytes(t, n) for c, (t, n) in make_updates(model, 4).items()}
    url = f"{rt.ingest_url}/v1/jobs/{job}/rounds/1/updates"

    def post(client: str) -> int:
        headers = auth(job, client) | {"Content-Type": "application/octet-stream"}
        return requests.post(url, data=bodies[client], headers=headers, timeout=30).status_code

    before = snapshot(rt.processes())
    assert sorted(post(c) for c in bodies) == [202] * 4
    first = sorted(bodies)[0]
    assert post(first) == 200  # a replay: its body is read and compared
    rt.wait_committed(store, job, 1)

    def figures() -> dict:
        return summary(delta(before, snapshot(rt.processes())))

    eventually(lambda: figures()["commit"]["count"] == 1, "finalize counts its commit")
    f = figures()
    assert f["uploads"] == {"200": 1, "202": 4}
    assert f["upload_bytes"] == sum(len(b) for b in bodies.values()) + len(bodies[first])
    values = sum(int(a.size) for a in model.values())
    assert (f["folded_updates"], f["folded_values"]) == (4, 4 * values)
    assert f["fold_values_per_leaf_second"] > 0
    assert (f["leaf"]["count"], f["seal"]["count"], f["commit"]["count"]) == (2, 1, 1)
    for step in ("leaf", "seal", "commit"):
        h = f[step]
        assert h["mean"] > 0 and 0 < h["p50"] <= h["p95"] <= h["p99"] <= 300
    assert f["events_published"][events.ROUND_COMMITTED] == 1
    assert f["events_published"][events.PARTIAL_REQUESTED] >= 2
    assert f["events_dead_lettered"] == {}
    assert f["instances"]["ingest"] >= 1 and f["instances_gone"] == []
    text = "\n".join(report_lines(f))
    assert "uploads answered: 1 x 200, 4 x 202" in text
    assert any(line.split()[:3] == ["commit", "1", "x"] for line in text.splitlines())

    # An instance that started during the run counts from zero; one that stopped is named.
    after = snapshot(rt.processes())
    moved = {"taken_at": after["taken_at"], "instances": [
        {**i, "pid": -i["pid"]} if i["role"] == "finalize" else i for i in after["instances"]
    ]}  # fmt: skip
    d = delta(before, moved)
    total = value(scrape(rt, "finalize"), "microfl_commit_seconds_count")
    assert summary(d)["commit"]["count"] == total >= 1  # the instance's whole count
    assert {g.split("/")[0] for g in d["gone"]} == {"finalize"}
    assert "stopped during the run" in "\n".join(report_lines(summary(d)))

    # histogram_quantile's interpolation, and the highest finite bound past it.
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 8.0), (float("inf"), 8.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.3)
    assert quantile(0.99, buckets) == pytest.approx(0.98)
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 2.0)]) == 1.0
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
