"""Client-reported metrics (`metrics` in an update's __metadata__) end to end in-process: refused
with 400 at ingest when malformed, summed exactly in the tree, and their example-weighted means
in the round (or version) record, the same bytes whatever the tree's shape and the delivery."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microfl.clientmetrics import MAX_ROUND_NAMES, MetricSums, client_metrics
from microfl.errors import InvalidUpdate
from microfl.exactsum import ExactSum
from microfl.local.metricsview import CLIENT_HEADER, client_columns, job_lines, job_metrics
from microfl.rounds import nodes_prefix, update_key
from microfl.serde import (
    PartialMeta,
    partial_from_safetensors,
    partial_to_safetensors,
    tensors_from_safetensors,
    tensors_to_safetensors,
)
from test_rounds_inprocess import (  # the in-process harness and its fixture
    JOB,
    T0,
    Platform,
    apps,  # noqa: F401
    client_updates,
    initial_model,
)

Tensors = dict[str, np.ndarray]
Plan = dict[str, tuple[Tensors, int, dict[str, float] | None]]


def mbody(update: Tensors, n: int, metrics: Any = None, **extra: str) -> bytes:
    """An update; metrics a dict (sent as JSON) or a raw string (sent as is)."""
    meta = {"num_examples": str(n), **extra}
    if metrics is not None:
        meta["metrics"] = metrics if isinstance(metrics, str) else json.dumps(metrics)
    return tensors_to_safetensors(update, meta)


def exact_means(reports: list[tuple[int, dict[str, float] | None]]) -> dict[str, float]:
    """The reference: sum n_i m_i / sum n_i per name over the reporters, in exact arithmetic."""
    sums: dict[str, tuple[Fraction, int]] = {}
    for n, metrics in reports:
        for name, value in (metrics or {}).items():
            s, w = sums.get(name, (Fraction(0), 0))
            sums[name] = (s + Fraction(value) * n, w + n)
    return {name: float(s / w) for name, (s, w) in sums.items()}


def float_means(reports: list[tuple[int, dict[str, float] | None]]) -> dict[str, float]:
    """The same with numpy float64 (a cross-check within 1e-12 on tame values)."""
    names = {name for _, m in reports for name in (m or {})}
    out = {}
    for name in names:
        pairs = [(n, m[name]) for n, m in reports if m and name in m]
        n = np.array([p[0] for p in pairs], dtype=np.float64)
        out[name] = float((n * np.array([p[1] for p in pairs])).sum() / n.sum())
    return out


def plan_for(model: Tensors, clients: list[str], seed: int) -> Plan:
    """Updates with metrics of every kind: tame (loss, accuracy), of wildly different
    magnitudes (`spread`: a float sum of it depends on the order), some clients without some
    metrics, some without any."""
    rng = random.Random(seed)
    out: Plan = {}
    for i, (c, (u, n)) in enumerate(client_updates(model, clients, seed).items()):
        metrics: dict[str, float] | None = {
            "loss": rng.uniform(0.05, 2.5),
            "accuracy": rng.random(),
        }
        if i % 4 == 1:
            metrics = None
        elif i % 4 == 2:
            metrics = {
                "loss": rng.uniform(0.05, 2.5),
                "spread": rng.choice([1e16, -1e16, 1.0, 3e-9]),
            }
        elif i % 4 == 3:
            metrics["spread"] = rng.choice([1e16, -1e16, 0.1, -7.0])
        out[c] = (u, n, metrics)
    return out


def run(p: Platform, r: int, plan: Plan, rng: random.Random | None) -> None:
    """Post round r's updates and deliver its events: in order, or (rng) posts interleaved with
    deliveries at random, some posted twice, every event delivered twice in random order."""
    posts = [(c, mbody(u, n, m)) for c, (u, n, m) in plan.items()]
    if rng is None:
        for c, data in posts:
            assert p.post(r, c, data)[0] == 202
        p.drain()
        return
    rng.shuffle(posts)
    posts += rng.sample(posts, k=min(3, len(posts)))  # replays: 200, counted once
    pending: list[Any] = []
    while posts or pending:
        if posts and (not pending or rng.random() < 0.3):
            c, data = posts.pop(rng.randrange(len(posts)))
            assert p.post(r, c, data)[0] in (200, 202)
        else:
            topic, event = pending.pop(rng.randrange(len(pending)))
            p.deliver(topic, event)
            p.deliver(topic, event)
        pending += p.take()
    p.drain()


# --- ingest: malformed metrics are 400 and store nothing -----------------------------------------

BAD_METRICS = [
    ("not JSON", "loss=0.3", "not JSON"),
    ("truncated JSON", '{"loss": 0.3', "not JSON"),
    ("a list", "[0.3, 0.9]", "not an object"),
    ("a number", "0.3", "not an object"),
    ("null", "null", "not an object"),
    ("a string", '"loss"', "not an object"),
    ("true", '{"ok": true}', "true and false are not numbers"),
    ("false", '{"ok": false}', "true and false are not numbers"),
    ("NaN", '{"loss": NaN}', "NaN"),
    ("Infinity", '{"loss": Infinity}', "Infinity"),
    ("-Infinity", '{"loss": -Infinity}', "-Infinity"),
    ("overflow", '{"loss": 1e400}', "not a finite number"),
    ("long integer", '{"loss": ' + "9" * 400 + "}", "not a finite number"),
    ("null value", '{"loss": null}', "not a finite number"),
    ("string value", '{"loss": "0.3"}', "not a finite number"),
    ("nested object", '{"loss": {"train": 0.3}}', "not a finite number"),
    ("list value", '{"loss": [0.3]}', "not a finite number"),
    ("33 names", json.dumps({f"m{i:02d}": i for i in range(33)}), "send at most 32"),
    ("empty name", '{"": 1}', "printable characters"),
    ("65-character name", json.dumps({"x" * 65: 1}), "printable characters"),
    ("newline in a name", json.dumps({"loss\n": 1}), "printable characters"),
    ("escape in a name", json.dumps({"\x1b[31mloss": 1}), "printable characters"),
    ("bidi override in a name", json.dumps({"loss\u202e": 1}), "printable characters"),
    ("a name twice", '{"loss": 0.3, "loss": 0.4}', "twice"),
    ("deep nesting", "[" * 1800 + "]" * 1800, "not JSON"),
]


@pytest.mark.parametrize(
    ("raw", "says"), [r[1:] for r in BAD_METRICS], ids=[r[0] for r in BAD_METRICS]
)
def test_malformed_metrics_are_400_saying_what_to_fix_and_store_nothing(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
    raw: str,
    says: str,
) -> None:
    model = initial_model(1)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=5)
    before = sorted(p.store.list("jobs/"))
    status, answer = p.post(1, "a", mbody(model, 10, raw))
    assert status == 400 and answer["error"] == "invalid_update", answer
    assert "__metadata__.metrics" in answer["message"] and says in answer["message"], answer
    assert sorted(p.store.list("jobs/")) == before
    assert p.take() == []


def test_malformed_metrics_are_400_on_the_async_endpoint_too(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(2)
    p = Platform(tmp_path, apps)
    p.create(model, mode="async", buffer=2, rounds=1)
    before = sorted(p.store.list("jobs/"))
    resp = p.apps["ingest"].post(
        f"/v1/jobs/{JOB}/updates",
        data=mbody(model, 10, '{"loss": NaN}', base_version="0"),
        headers={"Authorization": f"Bearer {p.token('a')}"},
    )
    assert resp.status_code == 400 and "__metadata__.metrics" in resp.get_json()["message"]
    assert sorted(p.store.list("jobs/")) == before


def test_well_formed_metrics_at_the_limits_are_accepted(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(3)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=5)
    at_limits = {f"{i:02d}" + "n" * 62: -1.5e300 + i for i in range(32)}  # 32 names of 64
    for client, metrics in [
        ("a", at_limits),
        ("b", {"loss": 1, "accuracy": 0}),  # integers are numbers
        ("c", {"Genauigkeit (%)": 91.5, "损失": 0.3, "f1 score": -0.0}),
        ("d", {}),
    ]:
        status, answer = p.post(1, client, mbody(model, 10, metrics))
        assert status == 202, answer
    assert client_metrics({"metrics": json.dumps(at_limits)}) == at_limits


# --- the record's metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_record_metrics_are_exact_weighted_means_whatever_the_tree_and_delivery(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
    seed: int,
) -> None:
    model = initial_model(seed)
    rng = random.Random(seed)
    clients = [f"client-{i:02d}" for i in rng.sample(range(60), 23)]
    plan = plan_for(model, clients, seed)
    reports = [(n, m) for _, n, m in plan.values()]
    # the guard: a float64 sum of `spread` in two orders differs, so only exact sums agree
    spread = [n * m["spread"] for n, m in reports if m and "spread" in m]
    assert sum(spread) != sum(reversed(spread)) or sum(spread) != sum(sorted(spread))

    snapshots = {}
    for fan_in in (1, 3, 50):
        for shuffled in (False, True):
            p = Platform(tmp_path / f"{fan_in}-{shuffled}", apps)
            p.create(model, rounds=1, min_clients=len(plan), fan_in=fan_in)
            run(p, 1, plan, random.Random(seed * 7 + fan_in) if shuffled else None)
            snapshots[(fan_in, shuffled)] = p.snapshot()
            record = p.record(1)
            assert record is not None and record["included"] == sorted(plan)
    for (fan_in, _), got in snapshots.items():  # every stored result, byte for byte
        reference = snapshots[(fan_in, False)]
        assert sorted(got) == sorted(reference)
        assert [k for k in reference if got[k] != reference[k]] == [], fan_in
    results = [  # across tree shapes: job.json and the seal name the fan-in; the rest agrees
        {k: v for k, v in got.items() if not k.endswith(("/job.json", "/seal.json"))}
        for got in snapshots.values()
    ]
    assert all(r == results[0] for r in results)
    assert any(k.endswith("/record.json") for k in results[0])

    metrics = record["metrics"]
    assert metrics == exact_means(reports)  # exact: correctly rounded from the exact sums
    assert set(metrics) == {"loss", "accuracy", "spread"}
    tame = float_means(reports)
    for name in ("loss", "accuracy"):
        assert abs(metrics[name] - tame[name]) <= 1e-12 * abs(tame[name])
    # each name weighs only the updates that reported it
    loss_reporters = [(n, m) for n, m in reports if m and "loss" in m]
    assert len(loss_reporters) < len(reports)
    assert metrics["loss"] == exact_means(loss_reporters)["loss"]
    # a client token sees the means too
    resp = p.apps["ingest"].get(
        f"/v1/jobs/{JOB}/rounds/1", headers={"Authorization": f"Bearer {p.token('x')}"}
    )
    assert resp.get_json()["metrics"] == metrics


def test_a_round_without_metrics_has_empty_metrics(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(4)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=2, min_clients=4, fan_in=3)
    plan = {c: (u, n, None) for c, (u, n) in client_updates(model, list("abcd"), 4).items()}
    run(p, 1, plan, None)
    record = p.record(1)
    assert record is not None and record["metrics"] == {} and len(record["included"]) == 4
    # no metrics: the partials have exactly the bytes they had before metrics existed
    for key in p.store.list(nodes_prefix(JOB, 1)):
        data = p.store.read(key)
        assert data is not None and "metrics" not in tensors_from_safetensors(data)[1]


def test_excluded_and_late_updates_do_not_count(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(5)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=2, min_clients=4, fan_in=2)
    poisoned = {k: a.copy() for k, a in model.items()}
    poisoned["fc.bias"][0] = np.nan
    # stored behind ingest's back: NaN values (the fold refuses them), and malformed metrics
    p.store.create(update_key(JOB, 1, "nan"), mbody(poisoned, 900, {"loss": 1e6}))
    p.store.create(update_key(JOB, 1, "bad"), mbody(model, 900, '{"loss": true}'))
    plan = {
        c: (u, n, {"loss": 0.25 * (i + 1)})
        for i, (c, (u, n)) in enumerate(client_updates(model, list("abcd"), 5).items())
    }
    run(p, 1, plan, None)
    p.ping(T0 + 2)
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == list("abcd")
    reasons = {e["client"]: e["reason"] for e in record["excluded"]}
    assert set(reasons) == {"nan", "bad"} and "__metadata__.metrics" in reasons["bad"]
    assert record["metrics"] == exact_means([(n, m) for _, n, m in plan.values()])


def test_a_round_whose_aggregate_is_not_finite_reports_no_metrics(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = initial_model(11)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=2)
    finish = ExactSum.finish
    monkeypatch.setattr(
        ExactSum, "finish", lambda self, w=None: {k: v * np.inf for k, v in finish(self, w).items()}
    )
    run(p, 1, plan_for(model, ["a", "b", "c"], 11), None)
    record = p.record(1)
    assert record is not None and record["included"] == [] and len(record["excluded"]) == 3
    assert record["metrics"] == {}  # the metrics of updates the model does not hold


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("median", {}), ("trimmed-mean", {"beta": 0.2}), ("krum", {"f": 1, "m": 2})],
)
def test_robust_rounds_carry_the_metrics_of_the_updates_they_counted(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
    strategy: str,
    options: dict,
) -> None:
    model = initial_model(6)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=7, strategy=strategy, strategy_options=options)
    p.store.create(update_key(JOB, 1, "bad"), mbody(model, 900, '{"loss": "high"}'))
    plan = plan_for(model, [f"c{i}" for i in range(7)], 6)
    run(p, 1, plan, None)
    record = p.record(1)
    assert record is not None and record["included"] == sorted(plan)
    assert [e["client"] for e in record["excluded"]] == ["bad"]
    # krum: over every update it considered (`included`), not only the `selected` ones
    assert record["metrics"] == exact_means([(n, m) for _, n, m in plan.values()])
    if strategy == "krum":
        assert len(record["selected"]) == 2


def test_async_versions_carry_metrics(tmp_path: Path, apps: dict[str, Any]) -> None:  # noqa: F811
    model = initial_model(7)
    p = Platform(tmp_path, apps)
    p.create(model, mode="async", buffer=5, rounds=1, fan_in=2)
    plan = plan_for(model, [f"c{i}" for i in range(5)], 7)
    for c, (u, n, m) in plan.items():
        resp = p.apps["ingest"].post(
            f"/v1/jobs/{JOB}/updates",
            data=mbody(u, n, m, base_version="0"),
            headers={"Authorization": f"Bearer {p.token(c)}"},
        )
        assert resp.status_code == 202, resp.get_json()
    p.drain()
    record = p.record(1)
    assert record is not None and len(record["included"]) == 5
    assert record["metrics"] == exact_means([(n, m) for _, n, m in plan.values()])


def test_dp_fedavg_records_and_partials_hold_no_metrics(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(8)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=6, fan_in=2, strategy="dp-fedavg")
    run(p, 1, plan_for(model, [f"c{i}" for i in range(6)], 8), None)
    record = p.record(1)
    assert record is not None and len(record["included"]) == 6 and "privacy" in record
    assert "metrics" not in record
    nodes = p.store.list(nodes_prefix(JOB, 1))
    assert nodes
    for key in nodes:
        data = p.store.read(key)
        assert data is not None and "metrics" not in tensors_from_safetensors(data)[1]


# --- the sums themselves -------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
reports = st.lists(
    st.tuples(
        st.integers(1, 10**12),
        st.dictionaries(st.sampled_from(["a", "b", "c", "loss"]), finite, max_size=4),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(reports, st.randoms(use_true_random=False))
def test_sums_are_the_same_bytes_however_grouped_and_ordered(
    reps: list[tuple[int, dict[str, float]]], rnd: random.Random
) -> None:
    parts = [MetricSums.of(m, n) for n, m in reps]
    flat = MetricSums()
    for s in parts:
        flat += s
    shuffled = parts[:]
    rnd.shuffle(shuffled)
    while len(shuffled) > 1:  # a random tree over a random order
        i = rnd.randrange(len(shuffled) - 1)
        shuffled[i : i + 2] = [shuffled[i] + shuffled[i + 1]]
    assert shuffled[0].to_text() == flat.to_text()
    assert MetricSums.from_text(flat.to_text()) == flat
    assert flat.means() == exact_means(reps)


def test_a_round_keeps_the_alphabetically_first_names_whatever_the_grouping() -> None:
    rng = random.Random(9)
    reps = [
        (i + 1, {f"m{rng.randrange(1000):03d}": rng.random() for _ in range(32)}) for i in range(10)
    ]
    parts = [MetricSums.of(m, n) for n, m in reps]
    exact = exact_means(reps)  # type: ignore[arg-type]
    assert len(exact) > MAX_ROUND_NAMES
    expected = {k: exact[k] for k in sorted(exact)[:MAX_ROUND_NAMES]}
    for order in (parts, parts[::-1], parts[1::2] + parts[::2]):
        total = MetricSums()
        for s in order:
            total += s
        assert total.means() == expected
    pairwise = [parts[i] + parts[i + 1] for i in range(0, 10, 2)]
    assert sum(pairwise, MetricSums()).means() == expected


def test_a_partial_keeps_its_metric_sums_and_older_partials_load_without() -> None:
    arrays = {"x": np.zeros(2)}
    meta = PartialMeta((("a", 3), ("b", 4)), (), 0, MetricSums.of({"loss": 0.1}, 3))
    meta += PartialMeta((), (), 0, MetricSums.of({"loss": 0.3, "acc": 1.0}, 4))
    _, back = partial_from_safetensors(partial_to_safetensors(arrays, meta))
    loss = float((Fraction(0.1) * 3 + Fraction(0.3) * 4) / 7)
    assert back == meta and back.metrics.means() == {"acc": 1.0, "loss": loss}
    old = tensors_to_safetensors(
        arrays,
        {
            "format": "microfl.exactsum.v1",
            "examples": '[["a",3]]',
            "excluded": "[]",
            "num_examples": "3",
            "unclipped": "0",
        },
    )
    assert partial_from_safetensors(old)[1].metrics == MetricSums()


def test_client_metrics_refuses_like_ingest() -> None:
    for _, raw, _ in BAD_METRICS:
        with pytest.raises(InvalidUpdate, match=r"__metadata__\.metrics"):
            client_metrics({"metrics": raw})
    assert client_metrics({}) == {}


# --- on the terminal: the demo's columns, `microfl status` -----------------------------------


def test_status_lines_show_each_jobs_latest_round_metrics(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    model = initial_model(10)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=3, min_clients=2, fan_in=2)
    plan = {"a": (model, 30, {"loss": 0.5, "accuracy": 0.75}), "b": (model, 10, {"loss": 0.1})}
    run(p, 1, plan, None)
    [job] = job_metrics(p.store)
    assert job == {
        "job": JOB,
        "mode": "sync",
        "strategy": "fedavg",
        "model_version": 1,
        "rounds": 3,
        "metrics": {"accuracy": 0.75, "loss": 0.4},
    }
    assert job_lines([job]) == [f"  {JOB:<24} round 1/3 fedavg       accuracy 0.75, loss 0.4"]
    assert client_columns(job["metrics"]) == "      0.400      0.750"
    assert client_columns({}) == client_columns(None) == "          -          -"
    assert len(client_columns(None)) == len(CLIENT_HEADER)
    dp = {**job, "strategy": "dp-fedavg", "metrics": None}
    assert job_lines([dp])[0].endswith("no client metrics (not recorded for this strategy)")
