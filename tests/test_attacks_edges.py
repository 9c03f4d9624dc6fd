"""Hostile clients at the edges (issue 13, items 5 and 13): what a client can learn from the
answers. Round records show each client's example count to admin tokens only; a storage or
Kafka outage answers a fixed message that names no path, bucket, host:port or library error,
while the function's log (JSON lines, as Cloud Logging reads them) has the details.

Real function processes over real HTTP: an ingest and a finalize instance on a file store whose
Kafka bootstrap address points at a port nobody listens on (a broker outage), and an ingest
instance whose GCS endpoint refuses every request with 403 (a bucket the functions may not
read). Storage faults on the file store are objects turned into directories: the process runs
as root in CI, where permissions do not stop it."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from fl import SECRET, auth, healthy_run, make_model, make_updates, new_job, update_bytes
from microfl import events
from microfl.errors import ERROR_TABLE, Unauthorized, http_error
from microfl.jobs import job_key
from microfl.local.instance import FunctionProcess
from microfl.local.procs import HOST, free_port
from microfl.logs import JsonFormatter
from microfl.pushauth import PushAuth
from microfl.rounds import record_key, update_key
from microfl.serde import Event, event_to_http
from microfl.store import FileStore

BUCKET = "acme-private-fl-bucket"
# What no answer may carry: where things are kept and what the libraries said about them.
INTERNALS = ("/", "gs:", "file:", "Errno", "Kafka", "rdkafka", "google", "HTTPConnection", "403")


@dataclass
class Edges:
    store: FileStore
    ingest: FunctionProcess
    finalize: FunctionProcess
    gcs_ingest: FunctionProcess
    kafka_address: str
    gcs_address: str


class Denied(BaseHTTPRequestHandler):
    """A GCS endpoint that refuses everything, as a bucket without the functions' IAM grant."""

    def do_GET(self) -> None:
        body = json.dumps({"error": {"code": 403, "message": f"denied on {BUCKET}"}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edges]:
    work = tmp_path_factory.mktemp("edges")
    store = FileStore(work / "store")
    kafka = f"{HOST}:{free_port()}"  # nothing listens: every publish times out
    env = {"MICROFL_STORE": store.url, "MICROFL_SECRET": SECRET, "MICROFL_KAFKA_BOOTSTRAP": kafka}
    gcs = ThreadingHTTPServer((HOST, 0), Denied)
    threading.Thread(target=gcs.serve_forever, daemon=True).start()
    gcs_address = f"{HOST}:{gcs.server_address[1]}"
    gcs_env = env | {
        "MICROFL_STORE": f"gs://{BUCKET}",
        "STORAGE_EMULATOR_HOST": f"http://{gcs_address}",
    }
    logs = work / "logs"
    procs = [
        FunctionProcess("ingest", env, logs),
        FunctionProcess("finalize", env, logs),
        FunctionProcess("ingest", gcs_env, logs, log_name="ingest-gcs"),
    ]
    try:
        for p in procs:
            p.start()
        yield Edges(store, procs[0], procs[1], procs[2], kafka, gcs_address)
    finally:
        for p in procs:
            p.stop()
        gcs.shutdown()


def log_entries(fn: FunctionProcess) -> list[dict[str, Any]]:
    """The instance's structured lines; every line that looks like JSON must be JSON."""
    lines = fn.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def assert_public(body: dict[str, Any], *secrets: str) -> None:
    """A fixed message from the error table, naming nothing of the platform's insides."""
    assert set(body) == {"error", "message"}, body
    for text in (*INTERNALS, *secrets):
        assert text not in body["message"], f"{text!r} leaked in {body}"
    assert body["message"] in {row[2] for row in ERROR_TABLE.values() if len(row) == 3}


# --- item 5: round records ----------------------------------------------------------------------


def test_round_record_shows_each_clients_examples_to_admin_tokens_only(edges: Edges) -> None:
    model = make_model()
    job = new_job(edges.store, model, min_clients=3)
    updates = make_updates(model, 3)
    for client, (tensors, n) in updates.items():
        edges.store.create(update_key(job, 1, client), update_bytes(tensors, n))
    healthy_run(edges.store, job)
    url = f"{edges.ingest.url}/v1/jobs/{job}/rounds/1"
    counts = {c: n for c, (_, n) in updates.items()}

    for client in updates:
        answer = requests.get(url, headers=auth(job, client), timeout=10)
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert "examples" not in doc, f"{client} sees every client's example count"
        assert doc["state"] == "committed" and doc["included"] == sorted(updates)
        assert doc["num_examples"] == sum(counts.values()) and doc["excluded"] == []

    for admin in (auth(job, admin=True), auth("*", admin=True)):
        answer = requests.get(url, headers=admin, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["examples"] == counts


# --- item 13: what error answers say --------------------------------------------------------


def test_every_5xx_row_answers_a_fixed_message() -> None:
    inside = f"file store /var/lib/microfl: gs://{BUCKET} at 10.0.0.7:9092 said Errno 13"
    rows = [cls for cls, row in ERROR_TABLE.items() if row[0] >= 500]
    assert rows
    for cls in rows:
        status, body = http_error(cls(inside))
        assert status >= 500 and body["message"] and inside not in body["message"], cls
        assert not any(part in body["message"] for part in ("/var", BUCKET, "10.0.0.7")), cls


def test_a_rejected_push_token_is_not_echoed_with_google_auth_internals() -> None:
    junk = "junk-token-not-a-jwt"
    auth_ = PushAuth("https://finalize.example.com/", "pusher@p.iam.gserviceaccount.com")
    with pytest.raises(Unauthorized) as caught:
        auth_.verify(f"Bearer {junk}")
    message = http_error(caught.value)[1]["message"]
    assert junk not in message and "segments" not in message, message
    assert "push token" in message


def test_storage_fault_answers_503_without_the_store_path(edges: Edges) -> None:
    job = new_job(edges.store, make_model(), min_clients=3)
    (edges.store.root / record_key(job, 1)).mkdir(parents=True)  # reading it fails with EISDIR
    answer = requests.get(
        f"{edges.ingest.url}/v1/jobs/{job}/rounds/1", headers=auth(job, "site-1"), timeout=10
    )
    assert answer.status_code == 503, answer.text
    assert_public(answer.json(), str(edges.store.root), "store")

    (entry,) = [
        e for e in log_entries(edges.ingest) if e.get("job") == job and e["severity"] == "ERROR"
    ]
    assert entry["round"] == 1 and entry["status"] == 503 and entry["error"] == "unavailable"
    assert str(edges.store.root) in entry["message"] and "Is a directory" in entry["message"]
    assert "StorageUnavailable" in entry["stack_trace"] and entry["logger"] == "microfl.handlers"


def test_gcs_fault_answers_503_without_bucket_host_or_library_text(edges: Edges) -> None:
    job = "job-on-gcs"
    answer = requests.get(
        f"{edges.gcs_ingest.url}/v1/jobs/{job}", headers=auth(job, "site-1"), timeout=30
    )
    assert answer.status_code == 503, answer.text
    assert_public(answer.json(), BUCKET, edges.gcs_address, "bucket", "Forbidden")

    entries = [e for e in log_entries(edges.gcs_ingest) if e["severity"] == "ERROR"]
    assert entries and all(e["job"] == job for e in entries)
    assert BUCKET in entries[-1]["message"] and "403" in entries[-1]["message"]


def test_kafka_outage_answers_503_without_the_bootstrap_address(edges: Edges) -> None:
    model = make_model()
    job = new_job(edges.store, model, min_clients=1)  # the first update announces itself
    (tensors, n) = make_updates(model, 1)["client-000"]
    answer = requests.post(
        f"{edges.ingest.url}/v1/jobs/{job}/rounds/1/updates",
        data=update_bytes(tensors, n),
        headers=auth(job, "client-000"),
        timeout=60,
    )
    assert answer.status_code == 503, answer.text
    assert_public(answer.json(), edges.kafka_address, "acknowledge")

    (entry,) = [e for e in log_entries(edges.ingest) if e.get("job") == job]
    assert entry["severity"] == "ERROR" and entry["round"] == 1 and entry["status"] == 503
    assert edges.kafka_address in entry["message"] and "BusUnavailable" in entry["message"]


# --- structured logging -------------------------------------------------------------------------


def post_event(fn: FunctionProcess, event: Event) -> requests.Response:
    headers, body = event_to_http(event)
    return requests.post(fn.url, data=body, headers=headers, timeout=30)


def test_event_functions_log_json_lines_with_job_round_and_event_id(edges: Edges) -> None:
    healthy = new_job(edges.store, make_model(), min_clients=10)
    broken = "job-broken-spec"
    (edges.store.root / job_key(broken)).mkdir(parents=True)  # its spec cannot be read
    done = events.update_accepted(healthy, 1, "site-1", 0)
    failed = events.update_accepted(broken, 1, "site-1", 0)
    poison = Event(events.UPDATE_ACCEPTED, "/test", "poison-1", {"round": 1})

    assert post_event(edges.finalize, done).status_code == 200
    answer = post_event(edges.finalize, failed)
    assert answer.status_code == 503
    assert_public(answer.json(), str(edges.store.root))
    assert post_event(edges.finalize, poison).status_code == 400

    by_event = {e.get("event"): e for e in log_entries(edges.finalize)}
    handled = by_event[done.id]
    assert (handled["severity"], handled["job"], handled["round"]) == ("INFO", healthy, 1)
    assert handled["type"] == events.UPDATE_ACCEPTED and handled["time"].startswith("20")
    error = by_event[failed.id]
    assert (error["severity"], error["job"], error["round"], error["status"]) == (
        "ERROR",
        broken,
        1,
        503,
    )
    assert str(edges.store.root) in error["message"] and "Traceback" in error["stack_trace"]
    refused = by_event[poison.id]
    assert refused["severity"] == "WARNING" and refused["error"] == "invalid_event"


def test_log_lines_mask_tokens() -> None:
    """Whatever a message quotes (a library error echoing a header), no token reaches the log."""
    client = auth("job-x", "site-1")["Authorization"]
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJl"
    record = logging.LogRecord(
        "microfl.test", logging.WARNING, __file__, 1, "refused %s and %s", (client, jwt), None
    )
    record.job = "job-x"
    line = json.loads(JsonFormatter().format(record))
    assert line["severity"] == "WARNING" and line["job"] == "job-x"
    assert "mfl1." not in line["message"] and jwt not in line["message"], line
    assert client.split()[1] not in line["message"]
