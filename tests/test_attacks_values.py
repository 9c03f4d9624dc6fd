"""Attacks with values (issue 13, items 2, 3 and 12): finite but huge floats that would overflow
a round's float64 sum, num_examples claims that would let one client dictate a FedAvg model, and
rounds with no usable update under FedAdam.

What must hold: ingest refuses what could break the aggregate (422 with a message saying what to
fix, nothing stored); whatever still reaches a commit, no committed model contains NaN or Inf,
the round record says which updates were left out and why, the job goes on, and FedAdam's
optimiser state survives a round that changed nothing.

Real HTTP against the real functions (one LocalRuntime for the module: ingest, aggregate and
finalize as processes, events through the real Kafka broker) where the test is about what a
client sees; the in-process harness of test_rounds_inprocess.py where it is about finalize."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from fl import SECRET, assert_fedavg, auth, new_job, update_bytes
from microfl.errors import ConfigError, SchemaMismatch
from microfl.exactsum import ExactSum
from microfl.jobs import (
    DEFAULT_MAX_EXAMPLES,
    MAX_EXAMPLES,
    MAX_F64_MAGNITUDE,
    JobSpec,
    job_key,
    load_job,
    model_key,
    optimizer_key,
    validate_update,
)
from microfl.local import cli
from microfl.local.reference import fedavg
from microfl.local.runtime import LocalRuntime
from microfl.rounds import record_key, update_key
from microfl.serde import json_to_bytes, tensors_from_safetensors, tensors_to_safetensors
from microfl.store import FileStore
from microfl.strategy import FedAdam, fold, mean_of, merge
from test_rounds_inprocess import (  # the in-process harness and its fixtures
    JOB,
    T0,
    Platform,
    apps,  # noqa: F401
    body,
    client_updates,
    initial_model,
    reset_backends,  # noqa: F401
)

F32_MAX = float(np.finfo(np.float32).max)


def f64_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}


def honest(model: dict[str, np.ndarray], clients: list[str], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        c: (
            {k: v + rng.standard_normal(v.shape) for k, v in model.items()},
            int(rng.integers(1, 50)),
        )
        for c in clients
    }


def all_finite(tensors: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in tensors.values() if a.dtype.kind == "f")


# --- real processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FileStore:
    return FileStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def runtime(
    kafka: Any, store: FileStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRuntime]:
    with LocalRuntime(
        store.url, kafka.bootstrap, SECRET, tmp_path_factory.mktemp("runtime"), ping_interval=1.0
    ) as rt:
        assert requests.get(f"{rt.ingest_url}/healthz", timeout=60).status_code == 200
        yield rt


def post(rt: LocalRuntime, job: str, r: int, client: str, data: bytes) -> requests.Response:
    return requests.post(
        f"{rt.ingest_url}/v1/jobs/{job}/rounds/{r}/updates",
        data=data,
        headers=auth(job, client),
        timeout=30,
    )


def assert_schema_mismatch(answer: requests.Response, *words: str) -> None:
    assert answer.status_code == 422, answer.text
    doc = answer.json()
    assert doc["error"] == "schema_mismatch", doc
    for word in words:
        assert word in doc["message"], doc


def test_float64_sum_overflow_is_refused_and_the_job_goes_on(
    runtime: LocalRuntime, store: FileStore
) -> None:
    """The attack of item 2: in a float64 job one client sends 1e308. Before, the float64 sum
    overflowed, model 1 was Inf and every later honest upload was refused: the job stalled.
    Now the upload is refused (422) and stored nowhere, and both rounds commit the honest mean."""
    model = f64_model()
    job = new_job(store, model, rounds=2, min_clients=3, fan_in=2)
    attacks = {
        "1e308": {"w": np.full((4, 3), 1e308), "b": np.zeros(3)},
        "-1e308": {"w": np.zeros((4, 3)), "b": np.array([0.0, -1e308, 0.0])},
        "just above the bound": {"w": np.zeros((4, 3)), "b": np.full(3, 2 * MAX_F64_MAGNITUDE)},
    }
    current = model
    for r in (1, 2):
        for what, tensors in attacks.items():
            answer = post(runtime, job, r, "mallory", update_bytes(tensors, 1))
            assert_schema_mismatch(answer, "1e+150")
            assert store.read(update_key(job, r, "mallory")) is None, what
        updates = honest(current, ["alice", "bob", "carol"], seed=r)
        for client, (tensors, n) in updates.items():
            answer = post(runtime, job, r, client, update_bytes(tensors, n))
            assert answer.status_code == 202, answer.text  # round 2: the job is not stalled
        runtime.wait_committed(store, job, r)
        record = json.loads(store.read(record_key(job, r)) or b"{}")
        assert record["included"] == ["alice", "bob", "carol"] and record["excluded"] == []
        current = tensors_from_safetensors(store.read(model_key(job, r)) or b"")[0]
        assert all_finite(current)
        assert_fedavg(current, updates)


def test_num_examples_above_the_job_limit_is_refused_with_422(
    runtime: LocalRuntime, store: FileStore
) -> None:
    """Item 3, weight capture: a client claiming 10^12 examples used to outweigh every other
    client of a FedAvg round. The job's max_examples (default 1000000) caps the claim: above it
    422, nothing stored; malformed strings keep their 400."""
    model = f64_model(1)
    small = new_job(
        store, model, rounds=1, min_clients=10**6, round_timeout=3600.0, max_examples=500
    )
    default = new_job(store, model, rounds=1, min_clients=10**6, round_timeout=3600.0)
    data = {k: v + 0.5 for k, v in model.items()}

    for job, limit in ((small, 500), (default, DEFAULT_MAX_EXAMPLES)):
        doc = requests.get(
            f"{runtime.ingest_url}/v1/jobs/{job}", headers=auth(job, "x"), timeout=10
        ).json()
        assert doc["max_examples"] == limit
        for n in (limit + 1, 10**9, MAX_EXAMPLES):
            answer = post(runtime, job, 1, "mallory", update_bytes(data, n))
            assert_schema_mismatch(answer, str(n), f"at most {limit}", "--max-examples")
            assert store.read(update_key(job, 1, "mallory")) is None
        for raw in ("12abc", str(MAX_EXAMPLES + 1), "0"):  # malformed: still 400
            answer = post(
                runtime, job, 1, "mallory", tensors_to_safetensors(data, {"num_examples": raw})
            )
            assert answer.status_code == 400 and answer.json()["error"] == "invalid_update", raw
        assert post(runtime, job, 1, "alice", update_bytes(data, limit)).status_code == 202
        assert store.read(update_key(job, 1, "alice")) is not None


# --- the job spec and the CLI ------------------------------------------------------------------


def test_max_examples_is_a_job_setting_with_a_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = f64_model()
    spec = JobSpec.for_model("old", model)
    doc = json.loads(spec.to_bytes())
    del doc["max_examples"]  # a job.json written before the setting existed
    assert JobSpec.from_bytes(json_to_bytes(doc)).max_examples == DEFAULT_MAX_EXAMPLES == 10**6
    for bad in (0, -1, MAX_EXAMPLES + 1):
        with pytest.raises(ConfigError, match="max_examples must be between 1 and"):
            JobSpec.for_model("j", model, max_examples=bad)

    path = tmp_path / "init.safetensors"
    path.write_bytes(tensors_to_safetensors(model))
    monkeypatch.setenv("MICROFL_STORE", f"file://{tmp_path / 'store'}")
    assert cli.main(["job", "create", "j1", "--model", str(path), "--max-examples", "42"]) == 0
    assert cli.main(["job", "create", "j2", "--model", str(path)]) == 0
    local = FileStore(tmp_path / "store")
    assert load_job(local, "j1").max_examples == 42
    assert load_job(local, "j2").max_examples == DEFAULT_MAX_EXAMPLES
    assert cli.main(["job", "create", "j3", "--model", str(path), "--max-examples", "0"]) == 1
    assert "max_examples must be between 1 and" in capsys.readouterr().err
    assert local.read(job_key("j3")) is None


# --- the bound that makes the guarantee hold by construction ------------------------------------


def test_f64_values_are_bounded_and_the_bound_keeps_every_sum_finite() -> None:
    spec = JobSpec.for_model(
        "j", {"w": np.zeros(3), "h": np.zeros(2, np.float32)}, max_examples=MAX_EXAMPLES
    )
    meta = {"num_examples": str(MAX_EXAMPLES)}
    edge = np.array([MAX_F64_MAGNITUDE, -MAX_F64_MAGNITUDE, 0.0])
    h = np.array([F32_MAX, -F32_MAX], np.float32)
    assert validate_update(spec, {"w": edge, "h": h}, meta) == MAX_EXAMPLES
    above = np.nextafter(MAX_F64_MAGNITUDE, np.inf)
    for bad in ([above, 0, 0], [0, -above, 0], [1e308, 0, 0]):
        with pytest.raises(SchemaMismatch, match="'w' has a value of magnitude above 1e\\+150"):
            validate_update(spec, {"w": np.array(bad), "h": h}, meta)

    # The derivation in jobs.py, checked: 10^4 clients at the largest weight and value sum to a
    # finite total (and so would 10^146), the largest float32 values too, and FedAdam's squared
    # pseudo-gradient between +-the bound stays finite.
    with np.errstate(over="raise", invalid="raise"):
        acc = None
        for _ in range(10):
            chunk = fold(None, {"w": edge, "h": h.astype(np.float64)}, float(MAX_EXAMPLES))
            for _ in range(999):
                fold(chunk, {"w": edge, "h": h.astype(np.float64)}, float(MAX_EXAMPLES))
            acc = merge(acc, chunk)
        assert acc is not None and all_finite(mean_of(acc, 10**4 * MAX_EXAMPLES))
        current = {"w": -edge}
        model, state = FedAdam().server_update(current, {"w": edge}, None)
        model, state = FedAdam().server_update(model, {"w": -edge}, state)
        assert state is not None and all_finite(model) and all_finite(state)


# --- in-process: the last-line guard in finalize.commit ----------------------------------------


def test_poisoned_stored_update_is_excluded_by_aggregate(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    """An update that reached storage without ingest's check (an older instance, a bucket
    writer) is re-validated by aggregate: excluded with the reason, the round commits the rest."""
    model = f64_model(2)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=2)
    updates = honest(model, ["a", "b"], seed=2)
    p.store.create(
        update_key(JOB, 1, "m"), update_bytes({"w": np.full((4, 3), 1e308), "b": np.zeros(3)}, 10)
    )
    for c, (u, n) in updates.items():
        assert p.post(1, c, body(u, n))[0] == 202
    p.drain()
    p.ping(T0 + 2)  # "m" has no tree slot: the sweep's listing finds the quorum
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == ["a", "b"]
    [excluded] = record["excluded"]
    assert excluded["client"] == "m" and "stored update is invalid" in excluded["reason"]
    assert "has a value of 1e+308" in excluded["reason"]
    got = p.model(1)
    assert all_finite(got)
    assert_fedavg(got, updates)


def test_non_finite_aggregate_keeps_the_previous_model_and_the_job_goes_on(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round mean that is not finite (exact sums make one unreachable from client input, so
    the sum's finish is made to return Inf) reaches finalize's last-line guard: round 1 commits
    model 0 unchanged, lists every update as excluded with the reason, and round 2 opens and
    commits."""
    model = f64_model(3)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=2, min_clients=2, fan_in=1)
    updates = honest(model, ["a", "b"], seed=3)
    for c, (u, n) in updates.items():
        assert p.post(1, c, body(u, n))[0] == 202
    finish = ExactSum.finish
    monkeypatch.setattr(
        ExactSum, "finish", lambda self, w=None: {k: v * np.inf for k, v in finish(self, w).items()}
    )
    p.drain()
    monkeypatch.undo()

    record = p.record(1)
    assert record is not None
    assert (record["included"], record["examples"], record["num_examples"]) == ([], {}, 0)
    assert [e["client"] for e in record["excluded"]] == ["a", "b"]
    for e in record["excluded"]:
        assert e["reason"].startswith("the aggregate of round 1 is not finite"), e
    assert p.store.read(model_key(JOB, 1)) == p.store.read(model_key(JOB, 0))
    assert [e.data["round"] for e in p.committed] == [1]

    updates2 = honest(model, ["a", "b"], seed=4)
    for c, (u, n) in updates2.items():
        assert p.post(2, c, body(u, n))[0] == 202
    p.drain()
    record2 = p.record(2)
    assert record2 is not None and record2["included"] == ["a", "b"]
    assert_fedavg(p.model(2), updates2)
    assert p.get("")["state"] == "done"


def test_fedadam_step_beyond_float32_range_keeps_model_and_state(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    """Valid float32 updates, an (unsafe) learning rate of 3e38: round 2's FedAdam step leaves
    the float32 range, so the cast to the model's dtype would commit Inf. The guard keeps model
    1 and FedAdam's state after round 1, and round 3 steps from both."""
    opts = {"lr": 3e38, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    model = {"w": np.zeros(4, np.float32)}
    p = Platform(tmp_path, apps)
    p.create(model, rounds=3, min_clients=2, fan_in=1, strategy="fedadam", strategy_options=opts)
    sends = {1: 1.0, 2: 3.4e38, 3: 1.0}  # every value a finite float32
    for r, value in sends.items():
        for c in ("a", "b"):
            u = {"w": np.full(4, value, np.float32)}
            assert p.post(r, c, body(u, 5))[0] == 202
        p.drain()
        record = p.record(r)
        assert record is not None, f"round {r} did not commit"
        assert all_finite(p.model(r)), f"model {r} holds NaN or Inf"
    assert float(p.model(1)["w"][0]) == pytest.approx(3e38, rel=0.02)  # about one lr step

    record2 = p.record(2)
    assert record2 is not None and record2["included"] == [] and record2["num_examples"] == 0
    assert all("round 2 is not finite" in e["reason"] for e in record2["excluded"])
    assert p.store.read(model_key(JOB, 2)) == p.store.read(model_key(JOB, 1))
    assert p.store.read(optimizer_key(JOB, 2)) == p.store.read(optimizer_key(JOB, 1))
    record3 = p.record(3)  # back towards 1.0: a step of about -lr from model 1
    assert record3 is not None and record3["included"] == ["a", "b"]
    assert abs(float(p.model(3)["w"][0])) < 0.05 * 3e38


# --- in-process: FedAdam state across a round with no usable update (item 12) -------------------


def test_fedadam_round_without_usable_updates_carries_the_optimiser_state(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    """Round 2 has only an unusable update (NaN, stored without ingest's check) and seals by
    deadline: model 2 is model 1, and so is the optimiser state. Before, the state was dropped
    and round 3 restarted FedAdam's moments from zero."""
    opts = {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}
    model = initial_model(21)
    p = Platform(tmp_path, apps)
    p.create(
        model,
        rounds=3,
        min_clients=4,
        round_timeout=5,
        fan_in=2,
        strategy="fedadam",
        strategy_options=opts,
    )
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    current = {k: a.copy() for k, a in model.items()}

    def reference(updates: dict) -> dict[str, np.ndarray]:  # Reddi et al. 2021, float64
        mean = fedavg(updates.values())
        out = {}
        for k, x in current.items():
            if x.dtype.kind != "f":
                out[k] = np.rint(mean[k]).astype(x.dtype)
                continue
            delta = mean[k] - x.astype(np.float64)
            m[k] = opts["beta1"] * m.get(k, 0.0) + (1 - opts["beta1"]) * delta
            v[k] = opts["beta2"] * v.get(k, 0.0) + (1 - opts["beta2"]) * delta**2
            out[k] = (
                x.astype(np.float64) + opts["lr"] * m[k] / (np.sqrt(v[k]) + opts["tau"])
            ).astype(x.dtype)
        return out

    updates1 = client_updates(current, [f"c{i}" for i in range(4)], 211)
    for c, (u, n) in updates1.items():
        assert p.post(1, c, body(u, n))[0] == 202
    p.drain()
    expected = reference(updates1)
    for k in expected:
        np.testing.assert_allclose(p.model(1)[k], expected[k], rtol=1e-6, atol=1e-7)
    current = p.model(1)

    poisoned = {k: a.copy() for k, a in current.items()}
    poisoned["fc.weight"][0, 0] = np.nan
    p.store.create(update_key(JOB, 2, "c0"), body(poisoned, 10))
    record1 = p.record(1)
    assert record1 is not None
    p.ping(record1["committed_at"] + 6)  # round 2's deadline: it seals with what it has
    p.drain()
    record2 = p.record(2)
    assert record2 is not None and (record2["included"], record2["num_examples"]) == ([], 0)
    assert [e["client"] for e in record2["excluded"]] == ["c0"]
    assert p.store.read(model_key(JOB, 2)) == p.store.read(model_key(JOB, 1))
    assert p.store.read(optimizer_key(JOB, 2)) == p.store.read(optimizer_key(JOB, 1))

    updates3 = client_updates(current, [f"c{i}" for i in range(4)], 213)
    for c, (u, n) in updates3.items():
        assert p.post(3, c, body(u, n))[0] == 202
    p.drain()
    expected = reference(updates3)  # with m and v carried from round 1
    got = p.model(3)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    state = tensors_from_safetensors(p.store.read(optimizer_key(JOB, 3)) or b"")[0]
    for k in m:
        np.testing.assert_allclose(state[f"m/{k}"], m[k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state[f"v/{k}"], v[k], rtol=1e-9, atol=1e-15)
    assert p.get("")["state"] == "done"
