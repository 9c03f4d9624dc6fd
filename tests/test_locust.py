"""load/locustfile.py: its load profiles end by themselves, its updates are replay-safe, and a
short headless steady run against a platform started by `microfl up --detach` has no failed
request, commits rounds and loses no accepted update (load/check_lost.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "load" / "locustfile.py"
CHECK_LOST = ROOT / "load" / "check_lost.py"
BIN = Path(sys.executable).parent

# Run in a child process: importing locust monkey-patches the interpreter with gevent.
PROBE = """
import importlib.util, json, os, sys
from locust.util.load_locustfile import is_shape_class
results = {}
for profile, env in json.loads(sys.argv[2]).items():
    os.environ.update(env, MICROFL_PROFILE=profile)
    spec = importlib.util.spec_from_file_location("locustfile", sys.argv[1])
    lf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lf)  # the profile is chosen on import
    shapes = [v for v in vars(lf).values() if is_shape_class(v)]
    shape = shapes[0]()
    ticks = []
    for t in range(4 * 3600):
        shape.get_run_time = lambda t=t: float(t)
        ticks.append(shape.tick())
        if ticks[-1] is None:
            break
    for k in env:
        del os.environ[k]
    results[profile] = {"shapes": [s.__name__ for s in shapes], "ticks": ticks}
model = lf.model_of_size(16)
update = lf.update_bytes(model, "c1", 3)
tensors, meta = lf.tensors_from_safetensors(update)
results["update"] = {
    "replay_safe": update == lf.update_bytes(model, "c1", 3),
    "per_client": update != lf.update_bytes(model, "c2", 3),
    "schema": {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()}
              == {k: [list(v.shape), str(v.dtype)] for k, v in model.items()},
    "num_examples": meta["num_examples"],
    "model_bytes": sum(v.nbytes for v in model.values()),
}
print(json.dumps(results))
"""


def probe(profiles: dict[str, dict[str, str]]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROFL_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(LOCUSTFILE), json.dumps(profiles)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_profiles_end_by_themselves_and_updates_are_replay_safe() -> None:
    found = probe(
        {
            "steady": {"MICROFL_USERS": "12", "MICROFL_DURATION": "30"},
            "ramp": {},
            "burst": {"MICROFL_USERS": "40", "MICROFL_BURST_BASE": "4"},
        }
    )
    steady = found["steady"]
    assert steady["shapes"] == ["SteadyShape"]
    assert steady["ticks"][:30] == [[12, 12.0]] * 30 and steady["ticks"][30:] == [None]

    ramp = found["ramp"]
    assert ramp["shapes"] == ["RampShape"]
    users = [t[0] for t in ramp["ticks"][:-1]]
    assert users == sorted(users) and users[-1] == 1000 and ramp["ticks"][-1] is None
    assert len(ramp["ticks"]) <= 400

    burst = found["burst"]
    assert burst["shapes"] == ["BurstShape"]
    users = [t[0] for t in burst["ticks"][:-1]]
    assert set(users) == {40, 4} and users[0] == 40 and burst["ticks"][-1] is None
    rises = sum(1 for a, b in zip(users, users[1:], strict=False) if b > a)
    assert rises == 2, "three bursts: the first at the start, two rises after"

    update = found["update"]
    assert update["replay_safe"] and update["per_client"] and update["schema"]
    assert 1 <= int(update["num_examples"]) <= 100
    assert abs(update["model_bytes"] - 16 * 1024) <= 1024


def run(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(300)
def test_headless_steady_run_fails_nothing_and_loses_nothing(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_SECRET", "MICROFL_STORE",
                     "STORAGE_EMULATOR_HOST", "MICROFL_URL", "MICROFL_JOB", "MICROFL_TOKENS")
    }  # fmt: skip
    env["MICROFL_STATE_DIR"] = str(tmp_path / "state")
    microfl = str(BIN / "microfl")
    t0 = time.monotonic()
    # The job goes straight into the platform's file store, so it is made while the platform
    # starts (the helper runs `microfl job create`).
    maker = subprocess.Popen(
        [sys.executable, str(LOCUSTFILE), "job", "--kb", "64", "--min-clients", "10",
         "--round-timeout", "5"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    run(microfl, "up", "--detach", env=env)
    try:
        job = maker.communicate(timeout=120)[0].strip()
        assert maker.returncode == 0 and job
        load_env = {
            **env,
            "MICROFL_JOB": job,
            "MICROFL_PROFILE": "steady",
            "MICROFL_USERS": "10",
            "MICROFL_DURATION": "20",
            "MICROFL_LEDGER": str(tmp_path / "ledger.jsonl"),
        }
        before = tmp_path / "metrics-before.json"  # the functions' counters, for the report
        run(sys.executable, "-m", "microfl.local.loadmetrics", "snapshot", str(before), env=env)
        started = time.monotonic()
        run(str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--stop-timeout", "5", "--csv", str(tmp_path / "locust"), env=load_env,
            timeout=120)  # fmt: skip
        load_seconds = time.monotonic() - started
        out = run(sys.executable, str(CHECK_LOST), "--job", job, "--wait", "60",
                  "--stats", str(tmp_path / "locust_stats.csv"),
                  "--json", str(tmp_path / "check.json"), "--metrics-before", str(before),
                  env=load_env)  # fmt: skip
    finally:
        run(microfl, "down", env=env)
    result = json.loads((tmp_path / "check.json").read_text())
    print(out, f"platform up to down {time.monotonic() - t0:.0f}s", sep="\n")

    stats = result["locust"]
    assert load_seconds < 60, "the profile ends by itself after 20 s"
    assert stats["all"]["requests"] > 100 and stats["all"]["failures"] == 0
    assert stats["POST /v1/jobs/[job]/rounds/[r]/updates"]["requests"] >= 20
    assert result["rounds_committed"] >= 2
    assert result["outcomes"].get("failed", 0) == 0
    assert result["accepted"] >= 20
    assert result["lost"] == [] and result["doubled"] == [] and result["unresolved"] == []
    assert result["included"] + len(result["excluded"]) == result["accepted"]

    # What the functions counted over the same run, beside Locust's figures.
    functions = result["functions"]
    assert "functions (GET /metrics of" in out and "uploads answered:" in out
    gone = {g.split("/")[0] for g in functions["instances_gone"]}
    if "ingest" not in gone:  # an instance stopped mid-run took its counts with it
        assert functions["uploads"].get("202", 0) == result["outcomes"]["accepted"]
        assert functions["upload_bytes"] > 64 * 1024 * result["outcomes"]["accepted"]
    if not gone & {"aggregate", "finalize"}:
        assert functions["folded_updates"] >= result["included"]
        assert functions["commit"]["count"] >= result["rounds_committed"]
        assert functions["commit"]["p95"] is not None and functions["seal"]["mean"] > 0
