"""The demo end to end, small: a healthy run, a --chaos run (every function SIGKILLed, the
Kafka broker restarted) and a run on Pub/Sub (--bus pubsub) with the same seeds commit identical
model bytes at every round."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from microfl.local.demo import DemoConfig, run


@pytest.fixture
def own_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROFL_STATE_DIR", str(tmp_path / "state"))
    for name in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_STORE", "MICROFL_SECRET"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("own_state")
def test_chaos_and_pubsub_runs_commit_the_same_models_as_the_healthy_run(tmp_path: Path) -> None:
    config = DemoConfig(clients=4, rounds=3, epochs=2, processes=2, fan_in=2,
                        report=tmp_path / "healthy")
    healthy = run(config)
    chaotic = run(replace(config, chaos=True, report=tmp_path / "chaos"))
    on_pubsub = run(replace(config, bus="pubsub", report=tmp_path / "pubsub"))

    assert [row["included"] for row in healthy.rows] == [4, 4, 4]
    assert [row["included"] for row in chaotic.rows] == [4, 4, 4]
    assert len(set(healthy.model_sha256)) == 4, "every round changed the model"
    assert chaotic.model_sha256 == healthy.model_sha256
    assert on_pubsub.model_sha256 == healthy.model_sha256
    assert [row["included"] for row in on_pubsub.rows] == [4, 4, 4]
    killed = " ".join(chaotic.chaos)
    for what in ("ingest SIGKILLed", "aggregate SIGKILLed", "finalize SIGKILLed",
                 "Kafka broker SIGKILLed", "Kafka broker restarted"):
        assert what in killed, chaotic.chaos

    metrics = json.loads((tmp_path / "healthy" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["rounds"][-1]["accuracy"] > metrics["rounds"][0]["accuracy"]
    for row in metrics["rounds"]:  # the clients' own training loss and accuracy, averaged
        assert set(row["client_metrics"]) == {"loss", "accuracy"}
        assert 0 < row["client_metrics"]["accuracy"] <= 1 and row["client_metrics"]["loss"] > 0
    assert 0 < metrics["centralised"]["accuracy"] <= 1
    assert (tmp_path / "healthy" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "healthy").glob("round-*.json"))) == 3
