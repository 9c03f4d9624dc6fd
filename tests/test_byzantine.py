"""Byzantine clients of the demo (`microfl demo --attack`, `microfl robustness`): the attack
transforms on small arrays, the deterministic choice of attackers, the command lines, the report,
and one short real run on the local platform where an attacker's claimed num_examples changes
what FedAvg commits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microfl.local.byzantine import (
    ATTACKS,
    Attack,
    boosted,
    byzantine_clients,
    flipped_labels,
)
from microfl.local.cli import build_parser
from microfl.local.demo import DemoConfig
from microfl.local.robustness import CLIP, Outcome, Run, markdown, plan, plot

BASE = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "n": np.array([7], np.int64)}
TRAINED = {"w": np.array([[1.5, 2.0], [2.0, 4.25]], dtype=np.float32), "n": np.array([8], np.int64)}


def test_scale_and_sign_flip_boost_the_delta_from_the_base_model() -> None:
    up = boosted(BASE, TRAINED, 10.0)
    np.testing.assert_array_equal(up["w"], [[6.0, 2.0], [-7.0, 6.5]])
    assert up["w"].dtype == np.float32
    np.testing.assert_array_equal(up["n"], [8])  # counters are not boosted

    tensors, n = Attack("scale", boost=10.0)(BASE, TRAINED, 37)
    np.testing.assert_array_equal(tensors["w"], up["w"])
    assert n == 37
    tensors, n = Attack("sign-flip", boost=10.0)(BASE, TRAINED, 37)
    np.testing.assert_array_equal(tensors["w"], [[-4.0, 2.0], [13.0, 1.5]])
    assert n == 37
    np.testing.assert_array_equal(boosted(BASE, TRAINED, 1.0)["w"], TRAINED["w"])


def test_examples_claims_the_jobs_max_and_label_flip_changes_only_the_labels() -> None:
    tensors, n = Attack("examples", max_examples=1_000_000)(BASE, TRAINED, 37)
    assert n == 1_000_000
    np.testing.assert_array_equal(tensors["w"], TRAINED["w"])

    flip = Attack("label-flip")
    y = np.array([0, 1, 5, 9], dtype=np.int64)
    np.testing.assert_array_equal(flip.labels(y), [9, 8, 4, 0])
    np.testing.assert_array_equal(flipped_labels(flip.labels(y)), y)
    assert flip.labels(y).dtype == np.int64
    tensors, n = flip(BASE, TRAINED, 37)
    np.testing.assert_array_equal(tensors["w"], TRAINED["w"])
    assert n == 37
    for kind in ("scale", "sign-flip", "examples"):
        assert Attack(kind).labels(y) is y


def test_unknown_attacks_and_bad_boosts_say_what_to_use() -> None:
    with pytest.raises(ValueError, match="use one of scale, sign-flip, label-flip, examples"):
        Attack("gaussian")
    with pytest.raises(ValueError, match="positive"):
        Attack("scale", boost=0.0)


def test_the_attackers_are_the_first_ceil_fraction_of_the_clients() -> None:
    assert byzantine_clients(20, 0.2) == range(4)  # 0.2 x 20 is 4.000000000000001 in floats
    assert byzantine_clients(6, 0.2) == range(2)
    assert byzantine_clients(10, 0.0) == range(0)
    assert byzantine_clients(3, 0.9) == range(3)
    assert byzantine_clients(20, 0.2) == byzantine_clients(20, 0.2)
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\)"):
        byzantine_clients(10, 1.0)


def test_demo_command_line_takes_the_strategy_and_the_attack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import microfl.local.demo as demo

    seen: list[DemoConfig] = []
    monkeypatch.setattr(demo, "run", seen.append)
    argv = ["demo", "--clients", "10", "--strategy", "fedadam", "--strategy-option", "lr=0.05",
            "--strategy-option", "clip=2", "--attack", "sign-flip", "--byzantine", "0.3",
            "--boost", "4"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    (config,) = seen
    assert config == DemoConfig(clients=10, strategy="fedadam",
                                strategy_options={"lr": 0.05, "clip": 2.0},
                                attack="sign-flip", byzantine=0.3, boost=4.0)
    plain = build_parser().parse_args(["demo"])
    assert (plain.attack, plain.byzantine, plain.strategy) == (None, 0.2, "fedavg")
    for bad in (["--attack", "noise"], ["--strategy", "bulyan"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *bad])
    seen.clear()
    args = build_parser().parse_args(["demo", "--strategy-option", "beta"])
    with pytest.raises(ValueError, match="KEY=NUMBER"):
        args.func(args)


def test_robustness_plan_runs_every_defence_against_each_attack() -> None:
    args = build_parser().parse_args(["robustness", "--attack", "scale", "--attack",
                                      "examples", "--strategy", "krum", "--clients", "10"])
    assert (args.attack, args.strategy, args.byzantine, args.clients) == (
        ["scale", "examples"], ["krum"], 0.2, 10)
    assert build_parser().parse_args(["robustness"]).report == Path("load/results/robustness")

    runs = plan(list(ATTACKS), clients=20, byzantine=0.2, rounds=10, strategies=None)
    assert runs[0] == Run("fedavg (no attack)", "fedavg")
    clean = [r for r in runs if r.attack is None and r.strategy != "dp-fedavg"]
    assert [r.defence for r in clean] == ["fedavg", "median", "trimmed-mean", "krum", "clip"]
    attacked = [r for r in runs if r.attack is not None]
    assert len(attacked) == 5 * len(ATTACKS)
    assert {(r.defence, r.attack) for r in attacked} == {
        (d, a) for d in ("fedavg", "median", "trimmed-mean", "krum", "clip") for a in ATTACKS
    }
    by = {r.defence: r for r in attacked if r.attack == "scale"}
    assert by["krum"].options == {"f": 4, "m": 16}
    assert by["trimmed-mean"].options == {"beta": 0.2}
    assert by["clip"].options == {"clip": CLIP} and by["clip"].strategy == "fedavg"
    dp = runs[len(clean) + len(attacked):]
    assert len(dp) == 3 and all(r.strategy == "dp-fedavg" and r.attack is None for r in dp)
    only = plan(["scale"], 20, 0.2, 10, ["fedavg", "median"])
    assert [(r.defence, r.attack) for r in only] == [
        ("fedavg", None), ("median", None), ("fedavg", "scale"), ("median", "scale")]


def test_report_table_and_plot(tmp_path: Path) -> None:
    base = DemoConfig(clients=20, rounds=3)
    outcomes = [
        Outcome(Run("fedavg (no attack)", "fedavg"), "j1", [0.5, 0.8, 0.9], 1.0),
        Outcome(Run("fedavg, scale", "fedavg", {}, "scale"), "j2", [0.2, 0.1, 0.1], 1.0),
        Outcome(Run("median, scale", "median", {}, "scale"), "j3", [0.5, 0.8, 0.885], 1.0),
    ]
    table = markdown(base, outcomes, 60.0)
    assert "| median | scale | 0.885 | -1.5 | 0.500 | 0.800 | 0.885 |" in table
    assert "| fedavg | scale | 0.100 | -80.0 |" in table
    assert "4 Byzantine clients" in table
    plot(tmp_path / "accuracy.png", base, outcomes)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- one short real run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str]]:
    """One local platform (its own state folder and Kafka broker) for the module's runs."""
    from microfl.local.platform import session

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROFL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        for name in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_STORE", "MICROFL_SECRET"):
            mp.delenv(name, raising=False)
        with session("kafka") as (state, secret, _):
            yield state, secret


def test_a_client_claiming_huge_num_examples_dictates_fedavg(
    platform: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    from microfl.local.demo import client_pool, train_on

    state, secret = platform
    config = DemoConfig(clients=4, rounds=2, epochs=1, processes=1, fan_in=2, byzantine=0.25,
                        baseline=False,
                        report=tmp_path / "clean")
    with client_pool(config) as pool:  # one worker, spawned once (it imports torch)
        clean = train_on(config, state, secret, None, pool)
        attacked = train_on(replace(config, attack="examples", report=tmp_path / "examples"),
                            state, secret, None, pool)

    assert clean.model_sha256[0] == attacked.model_sha256[0], "the same initial model"
    assert clean.model_sha256[1] != attacked.model_sha256[1]
    assert clean.model_sha256[2] != attacked.model_sha256[2]
    for r in (1, 2):
        honest = json.loads((tmp_path / "clean" / f"round-{r:03d}.json").read_text())
        record = json.loads((tmp_path / "examples" / f"round-{r:03d}.json").read_text())
        assert record["included"] == honest["included"] == [f"client-{i:03d}" for i in range(4)]
        assert record["examples"]["client-000"] == 1_000_000  # the job's max_examples
        assert honest["examples"]["client-000"] < 1_000
        assert {c: n for c, n in record["examples"].items() if c != "client-000"} == {
            c: n for c, n in honest["examples"].items() if c != "client-000"
        }
