"""Hostile clients for the fault scenarios (`microfl chaos hostile-clients`): each attack is one
request that a client holding a valid token (or a forged one) can send, with the answer the
contract (shared/API.md) gives it. The scenario fires them while rounds are open, beside honest
clients, then checks that none was answered 5xx, none was stored and no round stalled."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import requests

from microfl import events
from microfl.local.kafka import read_events
from microfl.rounds import updates_prefix
from microfl.serde import tensors_to_safetensors
from microfl.store import ObjectStore
from microfl.tokens import issue_token

__all__ = ["ATTACKS", "Attack", "Target", "counts", "fire"]


GUESSED_SECRET = b"an-attacker-guessed-this-0123456789"
REVOKED = "evil-revoked"  # the scenario revokes this client before it attacks


@dataclass(frozen=True)
class Target:
    url: str  # the ingest URL
    job: str
    round: int
    model: dict[str, np.ndarray]
    secret: bytes
    limit: int  # the job's update limit in bytes


@dataclass(frozen=True)
class Attack:
    name: str
    expect: int
    build: Callable[[Target, str], tuple[str | None, bytes]]  # (token, body) for client id

    def path(self, t: Target) -> str:
        return f"{t.url}/v1/jobs/{t.job}/rounds/{t.round}/updates"


def _token(t: Target, client: str, **kw: object) -> str:
    return issue_token(t.secret, t.job, client, **kw)  # type: ignore[arg-type]


def _update(t: Target, n: str = "10", change: dict[str, np.ndarray] | None = None) -> bytes:
    tensors = {**t.model, **(change or {})}
    return tensors_to_safetensors(tensors, {"num_examples": n})


def _raw(header: dict | bytes, data: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def _poisoned(t: Target, value: float) -> bytes:
    """The model with one value of its first float64 tensor (else first tensor) replaced."""
    name = next((k for k, v in sorted(t.model.items()) if v.dtype == np.float64), min(t.model))
    arr = t.model[name].copy()
    arr.flat[0] = value
    return _update(t, change={name: arr})


def _valid(t: Target, client: str) -> tuple[str | None, bytes]:
    return _token(t, client), _update(t)


def _with(body: Callable[[Target], bytes]) -> Callable[[Target, str], tuple[str | None, bytes]]:
    return lambda t, client: (_token(t, client), body(t))


def _shape(shape: list[int]) -> Callable[[Target], bytes]:
    return lambda t: _raw(
        {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, b"\0" * 4
    )


ATTACKS: tuple[Attack, ...] = (
    Attack("shape of 10**2200 x 10**2200 in the header", 400, _with(_shape([10**2200] * 2))),
    Attack("4,000 dimensions in the header", 400, _with(_shape([1] * 4000))),
    Attack(
        "header of 900 KB (within the size limit)",
        400,
        _with(lambda t: _raw({"__metadata__": {"num_examples": "1", "pad": "x" * 900_000}})),
    ),
    Attack("not a safetensors file", 400, _with(lambda t: b"\x93NUMPY pickle? no")),
    Attack("NaN value", 422, _with(lambda t: _poisoned(t, float("nan")))),
    Attack("Inf value", 422, _with(lambda t: _poisoned(t, float("inf")))),
    Attack("1e308 in a float64 tensor", 422, _with(lambda t: _poisoned(t, 1e308))),
    Attack(
        "num_examples above the job's max_examples", 422, _with(lambda t: _update(t, "10000000"))
    ),
    Attack("num_examples of 10**13", 400, _with(lambda t: _update(t, "10000000000000"))),
    Attack("num_examples of 0", 400, _with(lambda t: _update(t, "0"))),
    Attack(
        "a tensor of the wrong shape",
        422,
        _with(
            lambda t: _update(t, change={min(t.model): np.zeros(3, t.model[min(t.model)].dtype)})
        ),
    ),
    Attack("body over the job's size limit", 413, _with(lambda t: b"\0" * (t.limit + 1))),
    Attack("no token", 401, lambda t, client: (None, _update(t))),
    Attack(
        "token with a forged signature",
        401,
        lambda t, client: (_token(t, client)[:-4] + "AAAA", _update(t)),
    ),
    Attack(
        "token signed with another secret",
        401,
        lambda t, client: (issue_token(GUESSED_SECRET, t.job, client), _update(t)),
    ),
    Attack(
        "token for another job",
        403,
        lambda t, client: (issue_token(t.secret, t.job + "-other", client), _update(t)),
    ),
    Attack(
        "expired token",
        403,
        lambda t, client: (_token(t, client, ttl=1, now=0), _update(t)),
    ),
    Attack(
        "token of a revoked client",
        403,
        lambda t, client: (_token(t, REVOKED), _update(t)),
    ),
    Attack(
        "admin token posting an update",
        403,
        lambda t, client: (issue_token(t.secret, t.job, admin=True), _update(t)),
    ),
)
STALE = Attack("valid update for a round that is not open", 409, _valid)


def fire(target: Target, prefix: str = "evil") -> list[tuple[str, int, int]]:
    """Every attack once against target's round (and a stale one): (name, expected, got), got
    0 when no HTTP answer came."""
    stale = Target(**{**target.__dict__, "round": target.round + 1})
    plan = [(a, target) for a in ATTACKS] + [(STALE, stale)]

    def send(item: tuple[int, tuple[Attack, Target]]) -> tuple[str, int, int]:
        i, (attack, t) = item
        token, body = attack.build(t, f"{prefix}-{i}")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            got = requests.post(attack.path(t), data=body, headers=headers, timeout=30).status_code
        except requests.RequestException:
            got = 0
        return attack.name, attack.expect, got

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(send, enumerate(plan)))


def counts(
    answers: list[tuple[str, int, int]],
    store: ObjectStore,
    job: str,
    bootstrap: str,
    rounds: int,
    accepted: int,
    replays: int,
) -> dict[str, int]:
    """What the hostile-clients scenario reports: the attacks' answers (name, wanted, got),
    hostile uploads stored (must be 0) and update.accepted events published for the job (at
    most one per accepted update: replays publish nothing)."""
    stored = sum(
        key.rsplit("/", 1)[1].startswith("evil")
        for r in range(1, rounds + 2)
        for key in store.list(updates_prefix(job, r))
    )
    announcements = sum(
        data.get("job") == job and kind == events.UPDATE_ACCEPTED
        for data, kind in read_events(bootstrap, ["microfl.finalize"])
    )
    return {
        "tried": len(answers),
        "as_contract": sum(want == got for _, want, got in answers),
        "5xx": sum(got >= 500 or got == 0 for _, _, got in answers),
        "stored": stored,
        "replays": replays,
        "accepted": accepted,
        "announcements": announcements,
    }
