"""Attacks on the upload path (issue 13, items 1 and 9), over real HTTP against a real ingest
process (the manifests' Services behind the local Knative proxy, a FileStore in a sandbox).

1. Hostile safetensors headers: integers of thousands of digits in shapes, thousands of
   dimensions, headers of a megabyte. They once answered 500 after seconds of big-integer
   arithmetic; now 400 with a message naming the problem, for a bounded, small amount of CPU.
9. Large uploads: ingest once held every body whole (and a full-size temporary per tensor), so a
   burst of large uploads could get an instance OOM-killed. Now a request holds a few blocks."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from fl import SECRET, auth, new_job
from hostile_payloads import entry, model, safetensors_file
from microfl.errors import InvalidUpdate
from microfl.local.runtime import LocalRuntime
from microfl.rounds import update_key, updates_prefix
from microfl.serde import tensors_from_safetensors, tensors_from_safetensors_file
from microfl.store import FileStore
from test_serde import ESCAPING, MALFORMED

MIB = 2**20
CPU_BOUND = 0.25  # seconds of the ingest worker's CPU per hostile upload (once: seconds)
CLIENTS = itertools.count()


@dataclass
class Ingest:
    runtime: LocalRuntime
    store: FileStore
    url: str
    instance_url: str
    worker: psutil.Process

    def updates(self, job: str, base: str | None = None) -> str:
        return f"{base or self.url}/v1/jobs/{job}/rounds/1/updates"


@pytest.fixture(scope="module")
def ingest(kafka: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    store = FileStore(tmp_path_factory.mktemp("sandbox") / "store")
    with LocalRuntime(
        store.url,
        kafka.bootstrap,  # type: ignore[attr-defined]
        SECRET,
        tmp_path_factory.mktemp("runtime"),
        idle_window=3600,  # the instance (and its worker's pid) stays for the whole module
    ) as rt:
        assert requests.get(f"{rt.ingest_url}/healthz", timeout=60).status_code == 200
        (instance,) = rt.services["ingest"].processes()
        assert instance.proc is not None
        (worker,) = psutil.Process(instance.proc.pid).children(recursive=True)
        yield Ingest(rt, store, rt.ingest_url, instance.url, worker)


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


# --- 1. hostile safetensors headers ------------------------------------------------------------


def _header(shape: bytes, offsets: bytes = b"[0,16]") -> bytes:
    """A file whose one tensor has the given raw JSON shape, and 16 bytes of data."""
    head = (
        b'{"__metadata__":{"num_examples":"3"},"dense.bias":{"dtype":"F32","shape":'
        + shape
        + b',"data_offsets":'
        + offsets
        + b"}}"
    )
    return safetensors_file(head, b"\0" * 16)


def _ints(count: int, digits: int) -> bytes:
    return b"[" + b",".join([b"9" * digits] * count) + b"]"


def _empty_tensors(size: int) -> bytes:
    """A header of about size bytes declaring valid empty tensors (what the parser accepts
    longest before the schema check)."""
    one = len(json.dumps({"t000000": entry("U8", [0], [0, 0])}))  # its entry, and 2 bytes
    header: dict[str, object] = {"__metadata__": {"num_examples": "3"}}
    for i in range(size // one):
        header[f"t{i:06d}"] = entry("U8", [0], [0, 0])
    return safetensors_file(header)


# name -> (body, what the message must name). Within the tests' job limit (model + 1 MiB); the
# job's header limit is 4,434 bytes (twice the model's header, 169 bytes, plus 4 KiB).
HOSTILE_HEADERS = {
    # 4.4 kB: within the header limit since it counts int8 scales entries, so the digits say
    "shape [10**2200, 10**2200] (the issue's)": (
        _header(b"[1" + b"0" * 2200 + b",1" + b"0" * 2200 + b"]"), "integer of 2201 digits"),
    "shape [10**1000, 10**1000]": (_header(b"[1" + b"0" * 1000 + b",1" + b"0" * 1000 + b"]"),
                                   "integer of 1001 digits"),
    "a 1 MB header: one shape of 250 integers of 4000 digits": (_header(_ints(250, 4000)),
                                                               "safetensors header is"),
    "a shape of 150 dimensions of 20 digits": (_header(_ints(150, 20)), "150 dimensions"),
    "a shape of 2,000 dimensions": (_header(b"[" + b",".join([b"1"] * 2000) + b"]"),
                                    "2000 dimensions"),
    "data_offsets of 25 digits": (_header(b"[4]", b"[0," + b"9" * 25 + b"]"),
                                  "integer of 25 digits"),
    "a 1 MB header of empty tensors": (_empty_tensors(MIB - 4096), "safetensors header is"),
    "a float in a shape": (_header(b"[4.0]"), "the number '4.0'"),
}  # fmt: skip


@pytest.fixture(scope="module")
def header_job(ingest: Ingest) -> str:
    return new_job(ingest.store, model(), rounds=3, min_clients=10**6, round_timeout=3600.0)


@pytest.mark.parametrize(
    ("body", "names"), list(HOSTILE_HEADERS.values()), ids=list(HOSTILE_HEADERS)
)
def test_hostile_headers_are_400_naming_the_problem_for_little_cpu(
    ingest: Ingest, header_job: str, body: bytes, names: str
) -> None:
    client = f"header-{next(CLIENTS):03d}"
    before = cpu(ingest.worker)
    answer = requests.post(
        ingest.updates(header_job, ingest.instance_url),
        data=body,
        headers=auth(header_job, client),
        timeout=60,
    )
    spent = cpu(ingest.worker) - before
    assert answer.status_code == 400, (answer.status_code, answer.text[:300])
    doc = answer.json()
    assert doc["error"] == "invalid_update" and names in doc["message"], doc
    assert spent < CPU_BOUND, f"the ingest worker spent {spent:.2f} s of CPU on one upload"
    assert not ingest.store.exists(update_key(header_job, 1, client))


def test_the_default_header_bound_also_refuses_big_integers_before_any_arithmetic() -> None:
    """Callers that know no model (a model file at job creation) keep the 16 MiB bound; the
    integer and dimension caps hold there too, so a megabyte of 4000-digit dimensions costs
    milliseconds (it once cost seconds: the product of 250 such integers)."""
    body = _header(_ints(250, 4000))
    start = time.process_time()
    with pytest.raises(InvalidUpdate, match="integer of 4000 digits"):
        tensors_from_safetensors(body)
    assert time.process_time() - start < 0.1


def test_a_valid_update_header_fits_the_jobs_limit_with_room_to_spare(
    ingest: Ingest, header_job: str
) -> None:
    """The limit is relative to the model: an honest update, even written by another writer
    with indented JSON and 1.5 kB of metrics in its metadata, is still accepted."""
    tensors = model(5)
    offsets, layout = 0, {}
    for name in sorted(tensors):
        raw = tensors[name].tobytes()
        layout[name] = entry("F32", list(tensors[name].shape), [offsets, offsets + len(raw)])
        offsets += len(raw)
    # 1.5 kB of metrics, within their own limits (32 names)
    metrics = json.dumps({f"holdout_top1_accuracy_of_class_{i:02d}": 0.123456 for i in range(32)})
    assert len(metrics) > 1400
    header = {"__metadata__": {"num_examples": "7", "metrics": metrics}, **layout}
    data = b"".join(tensors[name].tobytes() for name in sorted(tensors))
    body = safetensors_file(json.dumps(header, indent=2).encode(), data)
    answer = requests.post(
        ingest.updates(header_job), data=body, headers=auth(header_job, "honest"), timeout=30
    )
    assert answer.status_code == 202, answer.text
    assert ingest.store.read(update_key(header_job, 1, "honest")) == body


CORPUS = {**MALFORMED, **ESCAPING}


@pytest.mark.parametrize("data", list(CORPUS.values()), ids=list(CORPUS))
def test_a_spooled_upload_is_parsed_with_the_same_checks_and_messages(data: bytes) -> None:
    """ingest parses uploads from their spooled file: every malformed file of test_serde is
    refused there with the very message the in-memory parser gives."""
    with pytest.raises(InvalidUpdate) as in_memory:
        tensors_from_safetensors(data)
    with pytest.raises(InvalidUpdate) as from_file:
        tensors_from_safetensors_file(io.BytesIO(data), len(data))
    assert str(from_file.value) == str(in_memory.value)


# --- 9. large uploads are streamed, not held -------------------------------------------------

PARAMS = 8 * MIB  # float32 values: a 32 MiB model


class PeakRss:
    """The largest VmRSS of a process, sampled every few milliseconds while in the block."""

    def __init__(self, process: psutil.Process) -> None:
        self.process, self.peak, self._stop = process, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.003)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_concurrent_large_uploads_hold_a_few_blocks_each_not_the_body(ingest: Ingest) -> None:
    """As many 32 MiB uploads at once as the instance has threads (gunicorn's 4 per core),
    then a replay (200) and a different update for a stored client (409): the worker's RSS
    grows by less than 48 MiB in all (it held 32 MiB and more per upload)."""
    rng = np.random.default_rng(9)
    job = new_job(
        ingest.store,
        {"w": np.zeros(PARAMS, np.float32)},
        rounds=3,
        min_clients=10**6,
        round_timeout=3600.0,
    )
    threads = (psutil.cpu_count() or 1) * 4
    clients = [f"large-{i:02d}" for i in range(threads)]
    body = safetensors_file(
        {"__metadata__": {"num_examples": "5"}, "w": entry("F32", [PARAMS], [0, 4 * PARAMS])},
        rng.standard_normal(PARAMS).astype(np.float32).tobytes(),
    )
    other = body[:-4] + np.float32(1.5).tobytes()
    url = ingest.updates(job, ingest.instance_url)

    def post(client: str, data: bytes = body) -> int:
        return requests.post(url, data=data, headers=auth(job, client), timeout=120).status_code

    baseline = ingest.worker.memory_info().rss
    with PeakRss(ingest.worker) as rss, ThreadPoolExecutor(threads) as pool:
        statuses = list(pool.map(post, clients))
        replay, conflict = post(clients[0]), post(clients[1], other)
    grown = (rss.peak - baseline) / MIB
    assert statuses == [202] * threads and (replay, conflict) == (200, 409)
    assert grown < 48, f"the ingest worker's RSS grew by {grown:.0f} MiB"
    assert ingest.store.list(updates_prefix(job, 1)) == sorted(
        update_key(job, 1, c) for c in clients
    )
    stored = Path(ingest.store.root, update_key(job, 1, clients[-1])).read_bytes()
    assert stored == body
