"""The fault scenarios on the 3-broker cluster and the GCS emulator, each followed by the
invariant checker: nothing lost, nothing double-counted, every model the FedAvg of its record's
updates, and the same model bytes as the healthy run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microfl.local.chaos import SCENARIOS, ChaosEnv, ScenarioResult, run_scenario


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosEnv]:
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    chaos = ChaosEnv(tmp_path_factory.mktemp("chaos")).start()
    yield chaos
    chaos.stop()
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(scope="module")
def healthy(env: ChaosEnv) -> ScenarioResult:
    return run_scenario(env, "healthy", clients=6, rounds=2)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "healthy"])
def test_scenario_keeps_the_invariants(env: ChaosEnv, healthy: ScenarioResult, name: str,
                                       tmp_path: Path) -> None:
    assert healthy.ok, healthy.problems
    result = run_scenario(env, name, clients=6, rounds=2)
    assert result.problems == []
    assert (result.rounds_committed, result.lost, result.double_counted) == (2, 0, 0)
    assert result.accepted == 12, "every client's update was accepted in every round"
    assert result.model_sha256 == healthy.model_sha256, "same updates, same model bytes"
    if SCENARIOS[name].get("fault"):
        assert result.faults, "the fault was injected"
