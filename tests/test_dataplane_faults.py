"""SIGKILL of aggregate and finalize in the middle of their work, then restart, on each event
transport (Kafka, Pub/Sub): the round commits once, with the same bytes as a run without
faults."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from fl import SECRET, make_model, make_updates, new_job, post_all, reference
from microfl import faults
from microfl.jobs import JobSpec, create_job, model_key
from microfl.local.invariants import check_job
from microfl.local.runtime import LocalRuntime
from microfl.rounds import record_key
from microfl.serde import json_from_bytes, tensors_to_safetensors
from microfl.store import FileStore

# The event functions' failpoints (ingest's: the in-process property, test_tree_property.py)
FAILPOINTS = [n for n in faults.FAILPOINTS if n.split(".")[0] in ("aggregate", "finalize")]


def test_the_failpoint_list_names_every_failpoint_in_the_code() -> None:
    code = "\n".join(p.read_text() for p in Path(faults.__file__).parent.rglob("*.py"))
    assert set(re.findall(r'failpoint\("([a-z_.]+)"\)', code)) == set(faults.FAILPOINTS)


@pytest.fixture(scope="module")
def crashing(
    transport: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalRuntime, FileStore, Path]]:
    work = tmp_path_factory.mktemp("faults")
    store = FileStore(work / "store")
    markers = work / "failpoints"
    markers.mkdir()
    env = {"MICROFL_FAILPOINTS": ",".join(FAILPOINTS), "MICROFL_FAILPOINT_DIR": str(markers)}
    with LocalRuntime(
        store.url,
        transport.address,
        SECRET,
        work,
        ping_interval=1.0,
        env_extra=env,
        bus=transport.bus,
    ) as rt:
        yield rt, store, markers


def test_crash_at_every_failpoint_commits_identical_bytes(
    crashing: tuple[LocalRuntime, FileStore, Path], tmp_path: Path
) -> None:
    """Each failpoint fires once per run of the module. An instance serves requests on several
    threads, so a crash at one failpoint can take another request down before it reaches its
    own (finalize.after_closing, once in CI); that one fires in the next job instead."""
    runtime, store, markers = crashing
    model = make_model(3)
    for attempt in range(3):
        updates = make_updates(model, 12, seed=4 + attempt)
        job = new_job(store, model, rounds=2, min_clients=12, fan_in=4)
        post_all(runtime.ingest_url, job, updates)

        runtime.wait_committed(store, job, 1, timeout=180)
        ref = reference(store, job, tmp_path / f"ref{attempt}", sorted(updates))
        assert store.read(model_key(job, 1)) == ref.read(model_key(job, 1))
        record = json_from_bytes(store.read(record_key(job, 1)) or b"")
        assert record["included"] == sorted(updates)
        verdict = check_job(store, job, {(1, c) for c in updates}, slack=600)
        assert verdict.ok, verdict  # each update in exactly one leaf, the model FedAvg
        assert store.list(f"jobs/{job}/models/") == [model_key(job, 0), model_key(job, 1)]
        fired = sorted(p.name.removeprefix("fired-") for p in markers.iterdir())
        if fired == sorted(FAILPOINTS):
            break
    assert fired == sorted(FAILPOINTS), "every failpoint killed its process once, within 3 jobs"


def test_external_sigkill_of_whole_instances_mid_round(
    crashing: tuple[LocalRuntime, FileStore, Path], tmp_path: Path
) -> None:
    """The platform's own view: instances die at arbitrary moments, not at chosen lines."""
    runtime, store, _ = crashing
    model = {"w": make_model(5)["fc1.weight"].repeat(64, axis=0)}  # ~130k parameters
    updates = make_updates(model, 40, seed=6)
    job = f"kill-{int(time.time() * 1000)}"
    spec = JobSpec.for_model(job, model, rounds=1, min_clients=40, fan_in=5, created_at=time.time())
    create_job(store, spec, tensors_to_safetensors(model))

    stop = threading.Event()

    def killer() -> None:
        for i in range(6):
            if stop.wait(0.7):
                return
            runtime.services["aggregate" if i % 2 == 0 else "finalize"].kill_all()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        post_all(runtime.ingest_url, job, updates)
        runtime.wait_committed(store, job, 1, timeout=240)
    finally:
        stop.set()
        thread.join()
    ref = reference(store, job, tmp_path / "ref", sorted(updates))
    assert store.read(model_key(job, 1)) == ref.read(model_key(job, 1))
    assert json_from_bytes(store.read(record_key(job, 1)) or b"")["included"] == sorted(updates)

