"""End to end through the operator's commands: `microfl up --detach` starts everything, a job is
created and 20 clients train two rounds over HTTP with no other process started by the test,
and `microfl down` leaves nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

from fl import assert_fedavg
from microfl.client import Client
from microfl.serde import tensors_to_safetensors

MICROFL = str(Path(sys.executable).parent / "microfl")


def run(*args: str, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run([MICROFL, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"microfl {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_up_job_twenty_clients_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_SECRET", "MICROFL_STORE",
                        "STORAGE_EMULATOR_HOST")}
    env["MICROFL_STATE_DIR"] = str(tmp_path / "state")
    out = run("up", "--detach", env=env)
    assert "ingest URL" in out and "microfl down" in out
    pids: list[int] = []
    try:
        status = json.loads(run("status", "--json", env=env))
        roles = {p["role"] for p in status["processes"]}
        assert {"supervisor", "kafka-1"} <= roles
        assert all(p["alive"] for p in status["processes"])
        pids = [p["pid"] for p in status["processes"]]
        assert requests.get(status["console"] + "/", timeout=60).status_code == 401  # sign in

        rng = np.random.default_rng(7)
        model = {"w": rng.standard_normal((64, 10)).astype(np.float32),
                 "b": np.zeros(10, np.float32)}
        (tmp_path / "init.safetensors").write_bytes(tensors_to_safetensors(model))
        run("job", "create", "e2e", "--model", str(tmp_path / "init.safetensors"),
            "--rounds", "2", "--min-clients", "20", "--fan-in", "6", env=env)
        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(
                lambda i: run("token", "issue", "--job", "e2e", "--client", f"c{i:02d}",
                              env=env).strip(), range(20)))
        clients = [Client(status["ingest_url"], "e2e", t) for t in tokens]

        for r in (1, 2):
            current, version = clients[0].model()
            assert version == r - 1
            updates = {f"c{i:02d}": ({k: v + rng.standard_normal(v.shape).astype(np.float32)
                                      for k, v in current.items()}, int(rng.integers(1, 99)))
                       for i in range(20)}
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(
                    lambda i, r=r, u=updates: clients[i].post_update(r, *u[f"c{i:02d}"]),
                    range(20)))
            assert {a["status"] for a in answers} == {"accepted"}
            clients[0].wait_for_version(r, timeout=120)
            committed, _ = clients[0].model()
            assert_fedavg(committed, updates)
            assert clients[0].round(r)["included"] == sorted(updates)
        assert clients[0].job_info()["state"] == "done"
        pids += [p["pid"] for p in json.loads(run("status", "--json", env=env))["processes"]]
    finally:
        out = run("down", env=env)
    assert "stopped" in out
    assert not [p for p in pids if psutil.pid_exists(p)], "down leaves nothing running"
    assert "not running" in run("status", env=env)

