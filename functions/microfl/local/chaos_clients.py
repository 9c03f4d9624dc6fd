"""The honest clients of the fault scenarios (microfl.local.chaos): numpy clients over HTTP whose
updates are seeded perturbations of the model they fetched, in sync rounds or on an async job.

A sync scenario's updates depend only on the seed and the models committed before, so a faulty
run that includes the same updates commits the same bytes as the healthy run. An async job's
updates also depend on which version each client happened to fetch, so only the invariants
(nothing lost or counted twice, every version FedBuff's) are compared there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from microfl.client import Client, ClientError
from microfl.rounds import record_key
from microfl.store import ObjectStore

__all__ = ["Progress", "async_versions", "post_round", "sync_rounds", "wait"]

COMMIT_WAIT = 240.0  # seconds a round, or an async job's versions, may take


class Progress:
    """What the fault functions wait for: round r started (r - 1 committed; async: a client
    fetched version r - 1) and, in sync rounds, every client posted in round r; and the
    clients' outcome: accepted (round or base, client) pairs, commit times, problems."""

    def __init__(self, rounds: int) -> None:
        self.started = [threading.Event() for _ in range(rounds)]
        self.posted = [threading.Event() for _ in range(rounds)]
        self.accepted: set[tuple[int, str]] = set()
        self.commits: list[float] = []
        self.problems: list[str] = []
        self.lock = threading.Lock()


def post_round(client: Client, i: int, r: int, seed: int, replays: int = 0) -> bool:
    """Train (here: a seeded perturbation of the global model) and post; True when accepted.
    With replays, send the same bytes again that many times (each must be answered 200)."""
    while True:
        try:
            model, version = client.model()
            if version != r - 1:
                time.sleep(0.2)
                continue
            noise = np.random.default_rng([seed, r, i])
            update = {
                k: (v + noise.standard_normal(v.shape)).astype(v.dtype) for k, v in model.items()
            }
            n = int(10 + noise.integers(1, 90))
            answer = client.post_update(r, update, n)
            for _ in range(replays):
                again = client.post_update(r, update, n)
                if again["status"] != "replay":
                    raise ClientError(200, {"message": f"a replay was answered {again}"})
            return answer["status"] in ("accepted", "replay")
        except ClientError as exc:
            if exc.status == 409:
                return False
            raise


def sync_rounds(
    users: list[Client],
    store: ObjectStore,
    job: str,
    progress: Progress,
    seed: int,
    replays: int,
    say: Callable[[str], None],
) -> None:
    """Round after round: every client posts (4 at a time), then the round must commit."""
    t0 = time.monotonic()
    for r in range(1, len(progress.started) + 1):
        progress.started[r - 1].set()
        post = partial(post_round, r=r, seed=seed, replays=replays)
        try:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(post, users, range(len(users))))
        except ClientError as exc:
            progress.problems.append(f"round {r}: an honest client was refused: {exc}")
            return
        progress.accepted |= {(r, f"c{i}") for i, ok in enumerate(answers) if ok}
        progress.posted[r - 1].set()
        if not wait(partial(store.exists, record_key(job, r)), COMMIT_WAIT):
            progress.problems.append(f"round {r} did not commit within {COMMIT_WAIT:.0f} s")
            return
        progress.commits.append(time.monotonic())
        say(f"round {r} committed after {time.monotonic() - t0:.1f}s")


def async_versions(
    users: list[Client], store: ObjectStore, job: str, progress: Progress, seed: int,
    say: Callable[[str], None],
) -> None:  # fmt: skip
    """Every client, continuously: fetch the latest version b, post a seeded perturbation of it
    with base_version b (once per version), until the job has made its versions."""
    versions = len(progress.started)
    done = partial(store.exists, record_key(job, versions))
    deadline = time.monotonic() + COMMIT_WAIT * versions

    def client_loop(i: int) -> None:
        try:
            posting(i)
        except Exception as exc:  # noqa: BLE001  # a client that gives up is a finding
            with progress.lock:
                progress.problems.append(f"client c{i} failed: {type(exc).__name__}: {exc}")

    def posting(i: int) -> None:
        client, last = users[i], -1
        while not done() and time.monotonic() < deadline:
            model, base = client.model()
            if base >= versions:
                return
            progress.started[base].set()
            if base == last:  # posted on this version already: wait for the next
                time.sleep(0.1)
                continue
            noise = np.random.default_rng([seed, base, i])
            update = {
                k: (v + noise.standard_normal(v.shape)).astype(v.dtype) for k, v in model.items()
            }
            n = int(10 + noise.integers(1, 90))
            try:
                client.post_async_update(update, n, base)
            except ClientError as exc:
                if exc.status != 409:  # 409: stale, or the job made its versions meanwhile
                    with progress.lock:
                        progress.problems.append(f"c{i} on version {base} refused: {exc}")
                    return
            else:
                with progress.lock:
                    progress.accepted.add((base, f"c{i}"))
            last = base

    t0 = time.monotonic()
    watcher = threading.Thread(target=_watch, args=(store, job, progress, say, t0), daemon=True)
    watcher.start()
    with ThreadPoolExecutor(len(users)) as pool:
        list(pool.map(client_loop, range(len(users))))
    watcher.join(timeout=COMMIT_WAIT)
    if not done():
        progress.problems.append(f"the job did not make its {versions} versions in time")


def _watch(
    store: ObjectStore, job: str, progress: Progress, say: Callable[[str], None], t0: float
) -> None:
    """Note each version's commit as it appears (the recovery times are measured from these)."""
    for v in range(1, len(progress.started) + 1):
        if not wait(partial(store.exists, record_key(job, v)), COMMIT_WAIT):
            return
        progress.commits.append(time.monotonic())
        say(f"version {v} committed after {time.monotonic() - t0:.1f}s")


def wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
