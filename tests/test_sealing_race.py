"""The race between an upload and the sealer: finalize writes closing.json before it lists the
round's updates, and an upload that finds the marker waits for the seal, so a 202 always means
the seal lists the update."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from fl import SECRET, make_model, make_updates, new_job, update_bytes
from microfl import finalize, ingest
from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.errors import RoundNotOpen
from microfl.jobs import JobSpec, load_job
from microfl.rounds import Seal, closing_key, seal_key, update_key
from microfl.serde import json_to_bytes
from microfl.store import FileStore
from microfl.tokens import issue_token


class DecidingStore(FileStore):
    """Writes closing.json just before client-002's update: the sealer decides between the
    upload's open-round check and its write."""

    job = ""

    def create_from_file(self, key: str, file: IO[bytes]) -> bool:  # how ingest stores updates
        if self.job and key == update_key(self.job, 1, "client-002"):
            super().create(closing_key(self.job, 1), json_to_bytes({"reason": "quorum"}))
        return super().create_from_file(key, file)


def setup(tmp_path: Path) -> tuple[Backends, JobSpec, dict]:
    b = Backends(DecidingStore(tmp_path), MemoryBus(), SECRET.encode())
    model = make_model()
    job = new_job(b.store, model, rounds=2, min_clients=2, fan_in=2)
    return b, load_job(b.store, job), make_updates(model, 3)


def post(b: Backends, spec: JobSpec, client: str, updates: dict) -> tuple[int, dict]:
    body = update_bytes(*updates[client])
    token = issue_token(SECRET.encode(), spec.job, client)
    return ingest.post_update(b, spec.job, 1, token, io.BytesIO(body).read, len(body))


def test_an_upload_after_the_decision_but_before_the_listing_is_included(tmp_path: Path) -> None:
    b, spec, updates = setup(tmp_path)
    post(b, spec, "client-000", updates)
    post(b, spec, "client-001", updates)
    b.store.job = spec.job  # type: ignore[attr-defined]
    answers: list[tuple[int, dict]] = []
    uploader = threading.Thread(target=lambda: answers.append(post(b, spec, "client-002",
                                                                  updates)))
    uploader.start()
    assert _wait(lambda: b.store.exists(update_key(spec.job, 1, "client-002")))
    assert not answers, "the upload waits for the seal before it answers"
    sealed = finalize.seal(b, spec, 1, trigger="client-001")
    uploader.join(timeout=15)
    assert sealed is not None and "client-002" in sealed.clients
    assert answers and answers[0][0] == 202


def test_an_upload_after_the_listing_is_refused_and_not_kept(tmp_path: Path) -> None:
    """The race that once answered 202 for an update the seal then left out: the sealer lists
    before the update's write and writes the seal after the upload has checked for it."""
    b, spec, updates = setup(tmp_path)
    post(b, spec, "client-000", updates)
    post(b, spec, "client-001", updates)
    b.store.job = spec.job  # type: ignore[attr-defined]
    seal = Seal(1, ("client-000", "client-001"), 2, "quorum", time.time(), "client-001")
    late_seal = threading.Timer(0.5, b.store.create, args=(seal_key(spec.job, 1), seal.to_bytes()))
    late_seal.start()
    with pytest.raises(RoundNotOpen):
        post(b, spec, "client-002", updates)
    late_seal.join()
    assert not b.store.exists(update_key(spec.job, 1, "client-002")), "a 409 keeps nothing"
    assert post(b, spec, "client-000", updates)[0] == 200, "an included update replays as 200"


def test_a_sealer_that_died_after_deciding_is_finished_by_the_sweep(tmp_path: Path) -> None:
    b, spec, updates = setup(tmp_path)
    for client in ("client-000", "client-001", "client-002"):
        b.store.create(update_key(spec.job, 1, client), update_bytes(*updates[client]))
    b.store.create(closing_key(spec.job, 1), json_to_bytes({"reason": "quorum"}))
    finalize.sweep(b)
    sealed = b.store.read(seal_key(spec.job, 1))
    assert sealed is not None
    assert Seal.from_bytes(sealed).clients == ("client-000", "client-001", "client-002")


def _wait(check: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False
