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


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("median", {}),
        ("trimmed-mean", {"beta": 0.2}),
        ("krum", {"f": 1, "m": 2}),
        ("fedavg", {"clip": 4.0}),
        ("dp-fedavg", {"noise_multiplier": 0.5, "clip": 4.0}),
    ],
)
def test_every_strategy_keeps_the_invariants_when_functions_are_killed(
    env: ChaosEnv, strategy: str, options: dict[str, float]
) -> None:
    """SIGKILL of ingest while clients post and of aggregate and finalize after the seal: nothing
    lost or counted twice, and every model is its strategy's result over its record's updates,
    recomputed offline (the robust statistics bit for bit, dp-fedavg with its keyed noise)."""
    result = run_scenario(
        env, "function-kill", clients=6, rounds=2, strategy=strategy, strategy_options=options
    )
    assert result.problems == []
    assert (result.rounds_committed, result.lost, result.double_counted) == (2, 0, 0)
    assert result.accepted == 12 and result.wrong_models == 0
    assert result.faults, "the fault was injected"


@pytest.mark.parametrize("name", ["function-kill", "event-chaos", "broker-kill"])
def test_async_job_keeps_the_invariants(env: ChaosEnv, name: str) -> None:
    """An async (FedBuff) job, K = 4, 3 versions, 6 clients posting continuously on whatever
    version they fetched while functions are SIGKILLed, events are duplicated and reordered, or
    brokers die: every 2xx'd (base_version, client) update is in exactly one version's record,
    the leaves folded exactly the records' updates, and every model is FedBuff's, recomputed
    offline."""
    result = run_scenario(env, name, clients=6, rounds=3, mode="async", buffer=4)
    assert result.problems == []
    assert (result.rounds_committed, result.lost, result.double_counted) == (3, 0, 0)
    assert result.wrong_models == 0
    # 12 slots; a slot taken by an instance killed before its claim marker is void, and the
    # retry of its update may land past the last version (then refused: not accepted); under
    # load 4 of 12 were void once, so the bar is half: the job did work through the faults
    assert result.accepted >= 12 // 2
    if SCENARIOS[name].get("fault"):
        assert result.faults, "the fault was injected"
