"""Attacks by repetition (issue 13, items 4, 10 and 11): replay floods, retried job creation,
and create-only uploads retried by google-cloud-storage after their answer was lost.

- Replays: a client that sends the same bytes again and again (answered 200) must cause no new
  work: no event, no store write, no partial requested again, whatever the client is called.
  Real HTTP against a real ingest on Kafka (events counted on the topic), and the in-process
  harness of test_rounds_inprocess.py for what finalize does with the events.
- Job creation: a crash between model 0 and job.json, then a retry with another model, must give
  a job whose model 0 is the committed one; the same creation again is a success.
- GcsStore.create: a TCP proxy in front of the real GCS emulator loses the answer to the first
  upload, so the library's own retry gets 412 for the object this very call wrote."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from functions_framework import create_app
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from fl import SECRET, auth, make_model, make_updates, new_job, update_bytes
from microfl import events, finalize, handlers
from microfl.errors import ConfigError
from microfl.jobs import JobSpec, create_job, job_key, load_job, model_key
from microfl.local.gcs import FakeGcsServer
from microfl.local.procs import HOST
from microfl.local.runtime import LocalRuntime
from microfl.rounds import Seal, claim_key, seal_key, slot_key, update_key
from microfl.serde import Event, tensors_to_safetensors
from microfl.store import FileStore, GcsStore
from test_rounds_inprocess import (
    JOB,
    MAIN,
    T0,
    Platform,
    body,
    client_updates,
    initial_model,
)

REPLAYS = 25


# --- item 4 over real HTTP: replays publish nothing ---------------------------------------------


@dataclass
class Ingest:
    runtime: LocalRuntime
    store: FileStore
    bootstrap: str

    def post(self, job: str, client: str, data: bytes) -> tuple[int, dict]:
        answer = requests.post(
            f"{self.runtime.ingest_url}/v1/jobs/{job}/rounds/1/updates",
            data=data,
            headers=auth(job, client),
            timeout=30,
        )
        return answer.status_code, answer.json()


@pytest.fixture(scope="module")
def ingest(kafka: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    store = FileStore(tmp_path_factory.mktemp("store"))
    with LocalRuntime(
        store.url, kafka.bootstrap, SECRET, tmp_path_factory.mktemp("runtime"), idle_window=3600
    ) as rt:
        assert requests.get(f"{rt.ingest_url}/healthz", timeout=60).status_code == 200
        yield Ingest(rt, store, kafka.bootstrap)


def records_for(bootstrap: str, topic: str, job: str, kind: str | None = None) -> int:
    """Records of the topic keyed by the job (and of CloudEvents type `kind`), read from the
    start up to the end offsets."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen = {p: 0 for p in partitions}
        count = 0
        while any(seen[p] < ends[p] for p in partitions):
            for msg in consumer.consume(500, 1.0):
                if msg.error() is None:
                    seen[msg.partition()] = msg.offset() + 1
                    ce_type = dict(msg.headers() or []).get("ce_type", b"").decode()
                    count += msg.key() == job.encode() and kind in (None, ce_type)
        return count
    finally:
        consumer.close()


def stored(store: FileStore, job: str) -> dict[str, tuple[int, int]]:
    """Every object of the job with its inode and modification time: a write changes them."""
    out = {}
    for key in store.list(f"jobs/{job}/"):
        st = (store.root / key).stat()
        out[key] = (st.st_ino, st.st_mtime_ns)
    return out


def test_a_replay_flood_over_http_publishes_no_event_and_writes_nothing(ingest: Ingest) -> None:
    model = make_model(7)
    # fan-in 1: every new update fills a leaf, so each announces itself once
    job = new_job(ingest.store, model, rounds=2, min_clients=10**6, round_timeout=3600.0, fan_in=1)
    updates = make_updates(model, 2, seed=7)
    (a, (ta, na)), (b, (tb, nb)) = updates.items()
    assert ingest.post(job, a, update_bytes(ta, na))[0] == 202
    before = stored(ingest.store, job)
    for _ in range(REPLAYS):
        status, answer = ingest.post(job, a, update_bytes(ta, na))
        assert (status, answer["status"]) == (200, "replay"), answer
    # and replays racing with the first upload of another client: one 202, one event
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: ingest.post(job, b, update_bytes(tb, nb)), range(REPLAYS))
        )
    assert sorted(s for s, _ in answers) == [200] * (REPLAYS - 1) + [202]
    # publish returns once the broker has the record, so what the answers caused is on the topic
    # (beside it, aggregate's partial.ready for each leaf the two events asked for, once built)
    accepted = records_for(ingest.bootstrap, "microfl.finalize", job, events.UPDATE_ACCEPTED)
    assert accepted == 2, "one event per update"
    after = stored(ingest.store, job)
    new = {update_key(job, 1, b), slot_key(job, 1, 1), claim_key(job, 1, b)}
    grown = set(after) - set(before)
    # besides the new update's slot and claim, only the work its one event asked for: the leaf
    # (fan-in 1) and its request marker, written by finalize and aggregate meanwhile
    assert new <= grown, "the new update and its tree slot"
    assert all("/requests/" in k or "/nodes/" in k for k in grown - new), grown - new
    assert {k: after[k] for k in before} == before, "a replay wrote to the store"


# --- item 4 in-process: what finalize does with the events ---------------------------------------


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    return {
        name: create_app(name, MAIN).test_client() for name in ("ingest", "aggregate", "finalize")
    }


@pytest.fixture(autouse=True)
def reset_backends() -> Iterator[None]:
    yield
    handlers.set_backends(None)


def of_type(queue: list[tuple[str, Event]], kind: str) -> list[Event]:
    return [e for _, e in queue if e.type == kind]


def test_the_client_whose_event_sealed_the_round_cannot_make_it_request_partials_again(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    model = initial_model(11)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=1)
    ups = client_updates(model, ["c0", "c1", "c2"], 11)
    announced = {}
    requested = []
    for c in ups:  # each update's event delivered before the next upload: c2's seals
        assert p.post(1, c, body(*ups[c]))[0] == 202
        queue = p.take()
        requested += of_type(queue, events.PARTIAL_REQUESTED)
        ((topic, event),) = [(t, e) for t, e in queue if e.type == events.UPDATE_ACCEPTED]
        announced[c] = (topic, event)
        p.deliver(topic, event)
    requested += of_type(p.take(), events.PARTIAL_REQUESTED)
    assert sorted(e.data["node"] for e in requested) == [0, 1, 2], "each leaf requested once"

    # the partials are in flight (or lost); c2 floods: nothing is published
    for _ in range(REPLAYS):
        assert p.post(1, "c2", body(*ups["c2"])) == (
            200,
            {"round": 1, "client": "c2", "status": "replay"},
        )
    assert p.take() == []
    # and a redelivery of the very event that sealed the round requests nothing either
    for _ in range(REPLAYS):
        p.deliver(*announced["c2"])
    assert p.take() == []

    # the partials were lost: only the sweep asks again, once per missing partial
    p.ping(T0 + 1 + finalize.RESEND_AFTER + 1)
    again = p.take()
    assert sorted(e.data["node"] for e in of_type(again, events.PARTIAL_REQUESTED)) == [0, 1, 2]
    p.bus.events.extend((t, e, JOB) for t, e in again)
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == ["c0", "c1", "c2"]
    assert Seal.from_bytes(p.store.read(seal_key(JOB, 1)) or b"").trigger == "client:c2"


def test_a_client_named_like_an_internal_trigger_is_a_client(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    model = initial_model(12)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, round_timeout=60, fan_in=1)
    ups = client_updates(model, ["sweep", "internal"], 12)
    for c in ("sweep", "internal"):
        assert p.post(1, c, body(*ups[c]))[0] == 202
    announced = {e.data["client"]: (t, e) for t, e in p.take()}
    p.ping(T0 + 61)  # past the deadline: the sweep seals with what there is
    requested = of_type(p.take(), events.PARTIAL_REQUESTED)
    assert len(requested) == 2

    # the events of clients "sweep" and "internal" arrive late, and again: no work
    for _ in range(3):
        p.deliver(*announced["sweep"])
        p.deliver(*announced["internal"])
    assert p.take() == []
    sealed = Seal.from_bytes(p.store.read(seal_key(JOB, 1)) or b"")
    assert (sealed.reason, sealed.trigger) == ("deadline", finalize.SWEEP_TRIGGER)
    assert sealed.trigger != finalize.client_trigger("sweep")

    # a seal written before the labels had prefixes still parses and is left alone
    old = json.loads(p.store.read(seal_key(JOB, 1)) or b"")
    assert Seal.from_bytes(json.dumps({**old, "trigger": "sweep"}).encode()).trigger == "sweep"
    del old["trigger"]
    assert Seal.from_bytes(json.dumps(old).encode()).trigger == ""
    (tmp_path / seal_key(JOB, 1)).write_text(json.dumps({**old, "trigger": "sweep"}))
    p.deliver(*announced["sweep"])
    assert p.take() == []

    p.bus.events.extend(("microfl.aggregate", e, JOB) for e in requested)
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == ["internal", "sweep"]


def test_the_sweep_seals_a_round_whose_quorum_completing_announcement_was_lost(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    """The instance that stored c2's update died before announcing it; the client's retry is a
    replay (200) that announces nothing. The sweep finds the quorum in storage."""
    model = initial_model(13)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=2)
    ups = client_updates(model, ["c0", "c1", "c2"], 13)
    for c in ("c0", "c1"):
        assert p.post(1, c, body(*ups[c]))[0] == 202
        p.drain()
    assert p.post(1, "c2", body(*ups["c2"]))[0] == 202
    assert [e.data["client"] for _, e in p.take()] == ["c2"]  # lost with its instance
    assert p.store.read(seal_key(JOB, 1)) is None
    assert p.post(1, "c2", body(*ups["c2"]))[0] == 200
    assert p.take() == []

    p.ping(T0 + 2)
    sealed = Seal.from_bytes(p.store.read(seal_key(JOB, 1)) or b"")
    assert (sealed.clients, sealed.reason) == (("c0", "c1", "c2"), "quorum")
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == ["c0", "c1", "c2"]
    assert [e.data["round"] for e in p.committed] == [1]


# --- item 10: job creation is retry-safe ---------------------------------------------------------


def cli(
    store: FileStore, *args: str, tmp: Path, failpoints: str = ""
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MICROFL_STORE": store.url,
        "MICROFL_FAILPOINT_DIR": str(tmp),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    env.pop("MICROFL_FAILPOINTS", None)
    if failpoints:
        env["MICROFL_FAILPOINTS"] = failpoints
    return subprocess.run(
        [sys.executable, "-m", "microfl.local.cli", "job", "create", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def model_file(tmp: Path, name: str, tensors: dict[str, np.ndarray]) -> Path:
    path = tmp / f"{name}.safetensors"
    path.write_bytes(tensors_to_safetensors(tensors))
    return path


def test_a_job_creation_that_crashed_between_its_writes_can_be_retried_with_another_model(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    p = Platform(tmp_path / "p", apps)
    store = p.store
    first = model_file(tmp_path, "first", initial_model(1))
    other = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}  # another model, another schema
    second = model_file(tmp_path, "second", other)

    crashed = cli(store, JOB, "--model", str(first), failpoints="jobs.after_model", tmp=tmp_path)
    assert crashed.returncode == -9, crashed.stderr  # SIGKILLed between model 0 and job.json
    assert store.read(model_key(JOB, 0)) == first.read_bytes()
    assert store.read(job_key(JOB)) is None

    retried = cli(
        store, JOB, "--model", str(second), "--rounds", "1", "--min-clients", "1", tmp=tmp_path
    )
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith("created job")
    spec = load_job(store, JOB)
    assert spec.model_sha256 == hashlib.sha256(second.read_bytes()).hexdigest()

    # clients get the committed model and their updates of it are taken
    resp = p.apps["ingest"].get(
        f"/v1/jobs/{JOB}/model?version=0", headers={"Authorization": f"Bearer {p.token('c')}"}
    )
    assert resp.status_code == 200 and resp.data == second.read_bytes()
    assert p.post(1, "c", tensors_to_safetensors(other, {"num_examples": "3"}))[0] == 202
    p.drain()
    assert p.record(1) is not None


def test_creating_a_job_again_is_a_success_and_only_another_spec_exists_already(
    tmp_path: Path,
) -> None:
    store = FileStore(tmp_path / "store")
    model = model_file(tmp_path, "m", initial_model(2))
    other = model_file(tmp_path, "o", initial_model(3))  # same schema, other weights
    options = ["--rounds", "3", "--min-clients", "2"]

    assert cli(store, JOB, "--model", str(model), *options, tmp=tmp_path).returncode == 0
    committed = store.read(job_key(JOB))
    again = cli(store, JOB, "--model", str(model), *options, tmp=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "exists already" not in again.stdout + again.stderr
    assert again.stdout.startswith("found job")
    assert store.read(job_key(JOB)) == committed  # the first creation time stays

    for changed in (["--model", str(other), *options], ["--model", str(model), "--rounds", "4"]):
        refused = cli(store, JOB, *changed, tmp=tmp_path)
        assert refused.returncode == 1 and "exists already" in refused.stderr, refused
    assert store.read(job_key(JOB)) == committed
    assert store.read(model_key(JOB, 0)) == model.read_bytes()


def test_a_model_0_that_is_not_the_committed_one_is_refused_clearly_and_repaired_by_create(
    tmp_path: Path,
    apps: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a racer that stalled past the winner's commit could leave behind."""
    p = Platform(tmp_path, apps)
    spec = p.create(initial_model(4), rounds=1, min_clients=1)
    good = p.store.read(model_key(JOB, 0)) or b""
    p.store.delete(model_key(JOB, 0))
    p.store.create(model_key(JOB, 0), tensors_to_safetensors(initial_model(5)))

    resp = p.apps["ingest"].get(
        f"/v1/jobs/{JOB}/model?version=0", headers={"Authorization": f"Bearer {p.token('c')}"}
    )
    assert resp.status_code == 500
    assert resp.get_json()["error"] == "configuration_error"
    assert "operator" in resp.get_json()["message"]  # what to do is in the function's log
    # the function's log: to caplog, or to stderr once logs.install() made it JSON lines
    assert f"microfl job create {JOB}" in caplog.text + capsys.readouterr().err

    with pytest.raises(ConfigError, match="exists already"):
        create_job(p.store, spec, tensors_to_safetensors(initial_model(5)))
    assert create_job(p.store, load_job(p.store, JOB), good) is False
    assert p.store.read(model_key(JOB, 0)) == good
    resp = p.apps["ingest"].get(
        f"/v1/jobs/{JOB}/model?version=0", headers={"Authorization": f"Bearer {p.token('c')}"}
    )
    assert resp.status_code == 200 and resp.data == good


def test_jobs_made_before_the_model_hash_still_load(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    spec = JobSpec.for_model(JOB, initial_model(6), created_at=T0)
    doc = json.loads(spec.to_bytes())
    del doc["model_sha256"]
    store.create(job_key(JOB), json.dumps(doc).encode())
    assert load_job(store, JOB).model_sha256 == ""


# --- item 11: a create whose answer was lost, retried by google-cloud-storage ---------------------


class AnswerLosingProxy:
    """127.0.0.1:port -> upstream. The first `losses` requests that start with `marker` reach
    the upstream, which answers; the answer is dropped and the client's connection reset."""

    def __init__(self, upstream: tuple[str, int], marker: bytes, losses: int = 1) -> None:
        self.upstream, self.marker, self.losses = upstream, marker, losses
        self.requests: list[bytes] = []  # request lines, in order
        self.lost = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                return
            drop = threading.Event()
            threading.Thread(target=self._up, args=(client, server, drop), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, drop), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, drop: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                if chunk.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"):
                    self.requests.append(chunk.split(b"\r\n", 1)[0])
                    with self._lock:
                        if chunk.startswith(self.marker) and self.lost < self.losses:
                            self.lost += 1
                            drop.set()
                dst.sendall(chunk)

    def _down(self, src: socket.socket, dst: socket.socket, drop: threading.Event) -> None:
        try:
            while chunk := src.recv(65536):
                if drop.is_set():  # the upstream did the work and answered: lose the answer
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    dst.shutdown(socket.SHUT_RDWR)  # now, though _up still waits in recv
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def lossy_gcs(gcs: FakeGcsServer) -> Iterator[Callable[..., tuple[GcsStore, GcsStore]]]:
    """make(losses, bucket=new one) -> (store behind a new proxy, store talking to the emulator
    directly); proxies[-1] is the proxy."""
    proxies: list[AnswerLosingProxy] = []

    def client(url: str) -> storage.Client:
        return storage.Client(
            project="microfl-test",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": url},
        )

    def make(losses: int, bucket: str = "") -> tuple[GcsStore, GcsStore]:
        if not bucket:
            bucket = f"b-{uuid.uuid4().hex[:12]}"
            client(gcs.url).create_bucket(bucket)
        proxies.append(AnswerLosingProxy((HOST, gcs.port), b"POST /upload/", losses))
        return GcsStore(bucket, client=client(proxies[-1].url)), GcsStore(
            bucket, client=client(gcs.url)
        )

    make.proxies = proxies  # type: ignore[attr-defined]
    yield make
    for proxy in proxies:
        proxy.close()


def test_a_gcs_create_whose_answer_was_lost_reports_created(
    lossy_gcs: Callable[..., tuple[GcsStore, GcsStore]],
) -> None:
    store, direct = lossy_gcs(1)
    proxy = lossy_gcs.proxies[-1]  # type: ignore[attr-defined]
    key = "jobs/j/rounds/00000001/updates/c"
    data = os.urandom(256 * 1024)
    assert store.create(key, data) is True
    uploads = [r for r in proxy.requests if r.startswith(b"POST /upload/")]
    assert (proxy.lost, len(uploads)) == (1, 2), proxy.requests  # the library did retry
    assert direct.read(key) == data
    assert store.create(key, data) is False  # now it exists

    # another writer's object is still "exists" when the answer to our attempt is lost
    assert direct.create("k", b"theirs") is True
    store, _ = lossy_gcs(1, direct.bucket.name)
    assert store.create("k", b"ours") is False
    assert lossy_gcs.proxies[-1].lost == 1  # type: ignore[attr-defined]
    assert direct.read("k") == b"theirs"


def test_a_job_created_on_gcs_through_lost_answers_is_created(
    lossy_gcs: Callable[..., tuple[GcsStore, GcsStore]],
) -> None:
    store, direct = lossy_gcs(2)  # the answers for model 0 and for job.json are lost
    model = tensors_to_safetensors(make_model(9))
    spec = JobSpec.for_model("gcs-job", make_model(9), created_at=T0)
    assert create_job(store, spec, model) is True
    assert lossy_gcs.proxies[-1].lost == 2  # type: ignore[attr-defined]
    assert load_job(direct, "gcs-job").model_sha256 == hashlib.sha256(model).hexdigest()
    assert direct.read(model_key("gcs-job", 0)) == model
