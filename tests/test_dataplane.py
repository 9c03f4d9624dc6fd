"""The data plane as real processes: ingest, aggregate and finalize under functions-framework,
events through each transport (the real Kafka broker, the Pub/Sub emulator), state in
fake-gcs-server, clients over HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from fl import SECRET, assert_fedavg, auth, make_model, make_updates, new_job, update_bytes
from microfl.jobs import model_key
from microfl.local.runtime import LocalRuntime
from microfl.rounds import record_key, updates_prefix
from microfl.serde import json_from_bytes, tensors_from_safetensors, tensors_to_safetensors
from microfl.store import GcsStore


@pytest.fixture(scope="module")
def gcs_store(gcs: object) -> GcsStore:
    name = f"microfl-{uuid.uuid4().hex[:10]}"
    storage.Client(project="t", credentials=AnonymousCredentials()).create_bucket(name)
    return GcsStore(name)


@pytest.fixture(scope="module")
def runtime(
    transport: SimpleNamespace, gcs_store: GcsStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRuntime]:
    with LocalRuntime(
        gcs_store.url,
        transport.address,
        SECRET,
        tmp_path_factory.mktemp("runtime"),
        ping_interval=1.0,
        bus=transport.bus,
    ) as rt:
        yield rt


def post(url: str, job: str, r: int, client: str, body: bytes, **kw: object) -> requests.Response:
    return requests.post(
        f"{url}/v1/jobs/{job}/rounds/{r}/updates",
        data=body,
        headers=auth(job, client),
        timeout=30,
        **kw,
    )  # type: ignore[arg-type]


def test_fifty_clients_commit_the_fedavg_model(runtime: LocalRuntime, gcs_store: GcsStore) -> None:
    model = make_model()
    job = new_job(gcs_store, model, rounds=2, min_clients=50, fan_in=8)
    updates = make_updates(model, 50)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda c: post(runtime.ingest_url, job, 1, c, update_bytes(*updates[c])), updates
            )
        )
    assert [a.status_code for a in answers] == [202] * 50, answers[0].text

    runtime.wait_committed(gcs_store, job, 1)
    committed, _ = tensors_from_safetensors(gcs_store.read(model_key(job, 1)) or b"")
    assert_fedavg(committed, updates)

    record = json_from_bytes(gcs_store.read(record_key(job, 1)) or b"")
    assert record["included"] == sorted(updates)
    assert record["excluded"] == []
    assert record["num_examples"] == sum(n for _, n in updates.values())
    over_http = requests.get(
        f"{runtime.ingest_url}/v1/jobs/{job}/rounds/1", headers=auth(job, "client-000"), timeout=10
    ).json()
    assert over_http["included"] == sorted(updates) and over_http["state"] == "committed"
    job_doc = requests.get(
        f"{runtime.ingest_url}/v1/jobs/{job}", headers=auth(job, "x"), timeout=10
    ).json()
    assert job_doc["open_round"] == 2 and job_doc["model_version"] == 1
    fetched = requests.get(
        f"{runtime.ingest_url}/v1/jobs/{job}/model", headers=auth(job, "x"), timeout=10
    )
    assert fetched.headers["MicroFL-Model-Version"] == "1"
    assert fetched.content == gcs_store.read(model_key(job, 1))


def test_every_upload_error_row_is_answered_and_stores_nothing(
    runtime: LocalRuntime, gcs_store: GcsStore
) -> None:
    model = make_model()
    job = new_job(gcs_store, model, rounds=1, min_clients=3, fan_in=2)
    other = new_job(gcs_store, model, rounds=1, min_clients=1)
    good = make_updates(model, 3)
    url = f"{runtime.ingest_url}/v1/jobs/{job}/rounds/1/updates"
    valid = update_bytes(*good["client-000"])
    bad_shape = dict(good["client-000"][0], **{"fc1.bias": np.zeros(31, np.float32)})
    nan = dict(good["client-000"][0])
    nan["fc2.weight"] = nan["fc2.weight"].copy()
    nan["fc2.weight"][0, 0] = np.nan
    wrong_dtype = {k: v.astype(np.float64) for k, v in good["client-000"][0].items()}

    cases = [
        (400, "invalid_update", b"not a safetensors file", auth(job, "bad-1")),
        (400, "invalid_update", tensors_to_safetensors(good["client-000"][0]), auth(job, "bad-2")),
        (401, "unauthorized", valid, {}),
        (401, "unauthorized", valid, {"Authorization": "Bearer mfl1.forged.token"}),
        (403, "forbidden", valid, auth(other, "bad-3")),
        (403, "forbidden", valid, auth(job, "bad-4", ttl=60, now=time.time() - 3600)),
        (413, "update_too_large", valid + bytes(1 << 21), auth(job, "bad-5")),
        (422, "schema_mismatch", update_bytes(bad_shape, 5), auth(job, "bad-6")),
        (422, "schema_mismatch", update_bytes(nan, 5), auth(job, "bad-7")),
        (422, "schema_mismatch", update_bytes(wrong_dtype, 5), auth(job, "bad-8")),
    ]
    for status, code, body, headers in cases:
        answer = requests.post(url, data=body, headers=headers, timeout=30)
        assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
        assert answer.json()["message"]
    unknown = requests.post(
        f"{runtime.ingest_url}/v1/jobs/nope/rounds/1/updates",
        data=valid,
        headers=auth("nope", "c"),
        timeout=30,
    )
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_job")
    not_open = requests.post(
        f"{runtime.ingest_url}/v1/jobs/{job}/rounds/7/updates",
        data=valid,
        headers=auth(job, "client-000"),
        timeout=30,
    )
    assert (not_open.status_code, not_open.json()["error"]) == (409, "round_not_open")

    # Good clients go on; one replays (200) and one tries to change its update (409).
    for client, (tensors, n) in good.items():
        assert post(runtime.ingest_url, job, 1, client, update_bytes(tensors, n)).status_code in (
            200,
            202,
        )
    first = good["client-000"]
    assert post(runtime.ingest_url, job, 1, "client-000", update_bytes(*first)).status_code == 200
    changed = post(runtime.ingest_url, job, 1, "client-000", update_bytes(first[0], first[1] + 1))
    assert (changed.status_code, changed.json()["error"]) == (409, "conflicting_update")

    runtime.wait_committed(gcs_store, job, 1)
    stored = [k.rsplit("/", 1)[1] for k in gcs_store.list(updates_prefix(job, 1))]
    assert stored == sorted(good), "nothing from a rejected upload is stored"
    assert gcs_store.list(updates_prefix(other, 1)) == []
    record = json_from_bytes(gcs_store.read(record_key(job, 1)) or b"")
    assert record["included"] == sorted(good)
    committed, _ = tensors_from_safetensors(gcs_store.read(model_key(job, 1)) or b"")
    assert_fedavg(committed, good)


def test_logs_of_the_run_are_in_one_folder(runtime: LocalRuntime) -> None:
    logs = sorted(p.name for p in Path(runtime.workdir, "logs").iterdir())
    for service in ("microfl-ingest", "microfl-aggregate", "microfl-finalize"):
        assert f"{service}-1.log" in logs, logs
