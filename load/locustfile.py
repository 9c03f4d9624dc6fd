"""Locust users that behave as Micro-FL clients, and the load profiles that drive them.

Each simulated user is one FL client with its own client id and token. Per round it reads the job
(`GET /v1/jobs/{job}`) to learn the open round, fetches the global model, builds an update with
the model's tensor names, shapes and dtypes, posts it once (a retry after a 5xx or a dropped
connection sends the same bytes, which the server answers 200 "replay"), then polls the round
until it is committed. A 409 `round_not_open` (the round sealed before this late update arrived)
is an expected outcome, counted but not a failure; any other non-2xx answer is a failure.

Against the local platform (`microfl up --detach`; URL and secret come from its state folder):

    python load/locustfile.py job --kb 64 --min-clients 30     # prints a new job id
    MICROFL_JOB=<id> locust -f load/locustfile.py --headless -u 30 -t 60s
    python load/check_lost.py --job <id>                         # zero lost updates?

Against a deployed ingest, unchanged:

    MICROFL_URL=https://ingest.example MICROFL_JOB=mnist MICROFL_TOKENS=tokens.txt \
        locust -f load/locustfile.py --headless

Environment:
  MICROFL_URL            ingest base URL (default: the running local platform's, or --host)
  MICROFL_JOB            the job the clients train (required)
  MICROFL_SECRET         signs one token per simulated client (local default: its state folder)
  MICROFL_TOKENS         or: a file of client tokens, one a line, one per simulated client
  MICROFL_UPDATE_KB      model size for `locustfile.py job` (the job's model decides update size)
  MICROFL_PROFILE        steady (default) | ramp | burst, the LoadTestShape below
  MICROFL_USERS          users of the profile (steady: else --users; ramp: 1000; burst: 50)
  MICROFL_DURATION       seconds the profile runs (steady: --run-time or 60)
  MICROFL_SPAWN_RATE     steady: clients started a second (default: all at once)
  MICROFL_POLL           seconds between polls of a round (default 1)
  MICROFL_TRAIN_SECONDS  simulated local training time between fetch and post (default 0)
  MICROFL_POST_ATTEMPTS  tries of an upload after 5xx/408/429/no answer, same bytes (default 4;
                         more under chaos, where a partition lasts a minute)
  MICROFL_LEDGER         where every update's outcome is written, one JSON object a line, for
                         load/check_lost.py (default load/results/ledger.jsonl)
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from locust import LoadTestShape, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.exception import StopUser

from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
from microfl.tokens import issue_token

HERE = Path(__file__).resolve().parent
PROFILE = os.environ.get("MICROFL_PROFILE", "steady")
PROFILES = ("steady", "ramp", "burst")
RETRIED = {0, 408, 429, 500, 502, 503, 504}  # 0: no answer (connection refused, reset, timeout)

# What happened to the updates this process posted, by outcome (printed at the end).
OUTCOMES: Counter[str] = Counter()


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _local_state() -> dict[str, Any]:
    """The running local platform's state (ingest URL), if there is one."""
    from microfl.local.platform import read_state

    return read_state() or {}


# --- who the simulated clients are --------------------------------------------------------------


class Credentials:
    """Hands each new user a client id and its token: signed here with MICROFL_SECRET, or taken
    in order from MICROFL_TOKENS (for a deployment whose secret the load test does not hold)."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.secret: bytes | None = None
        self.tokens: list[str] = []
        token_file = os.environ.get("MICROFL_TOKENS")
        if token_file:
            self.tokens = [t for t in Path(token_file).read_text().split() if t]
        else:
            from microfl.local.platform import saved_secret

            secret = saved_secret()
            if not secret:
                raise SystemExit(
                    "no credentials: set MICROFL_SECRET (the platform's token key) or "
                    "MICROFL_TOKENS (a file of client tokens, one a line)"
                )
            self.secret = secret.encode()
        self._next = itertools.count()

    def next(self, worker: int) -> tuple[str, str]:
        n = next(self._next)
        if self.secret is not None:
            client = f"lc{worker}-{n:05d}"
            return client, issue_token(self.secret, self.job, client, ttl=7 * 86400)
        if n >= len(self.tokens):
            raise StopUser(f"MICROFL_TOKENS has {len(self.tokens)} tokens; more users than that")
        token = self.tokens[n]
        return _token_client(token), token


def _token_client(token: str) -> str:
    """The client id a token names (its payload's `sub`); the server checks the signature."""
    body = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["sub"])


def update_bytes(model: dict[str, np.ndarray], client: str, r: int) -> bytes:
    """The update `client` sends for round r: the model moved by a small per-client offset.
    A pure function of (model, client, round), so a retry sends byte-identical data."""
    seed = zlib.crc32(f"{client}/{r}".encode())
    offset = np.float32((seed % 2001 - 1000) * 1e-5)
    tensors = {k: (v + offset).astype(v.dtype) for k, v in model.items()}
    return tensors_to_safetensors(tensors, {"num_examples": str(1 + seed % 100)})


class Ledger:
    """One JSON line per update outcome, flushed at once so a killed run keeps what it saw."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, **entry: Any) -> None:
        self._file.write(json.dumps({"t": round(time.time(), 3), **entry}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


SETUP: dict[str, Any] = {}


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    from locust.runners import MasterRunner

    if isinstance(environment.runner, MasterRunner):
        return  # the workers run the users
    job = os.environ.get("MICROFL_JOB")
    if not job:
        raise SystemExit("set MICROFL_JOB (create one with `python load/locustfile.py job`)")
    ledger = Path(os.environ.get("MICROFL_LEDGER") or HERE / "results" / "ledger.jsonl")
    worker = getattr(environment.runner, "worker_index", 0)
    if worker:
        ledger = ledger.with_name(f"{ledger.stem}.{worker}{ledger.suffix}")
    SETUP.update(job=job, credentials=Credentials(job), ledger=Ledger(ledger), worker=worker)
    OUTCOMES.clear()


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    ledger = SETUP.pop("ledger", None)
    if ledger is None:
        return
    ledger.close()
    summary = ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items())) or "none"
    print(f"microfl: updates posted by outcome: {summary}; ledger {ledger.path}", flush=True)


def _base_url() -> str:
    return os.environ.get("MICROFL_URL") or _local_state().get("ingest_url") or ""


# --- the FL client ------------------------------------------------------------------------------


class FLClient(FastHttpUser):
    """One FL client. Each task call is one step of its round, so a stopping run waits for at
    most one request (`--stop-timeout`), never for a whole round."""

    host = _base_url()
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.job: str = SETUP["job"]
        self.client_id, token = SETUP["credentials"].next(SETUP["worker"])
        self.headers = {"Authorization": f"Bearer {token}"}
        self.poll = _env_float("MICROFL_POLL", 1.0)
        self.train_seconds = _env_float("MICROFL_TRAIN_SECONDS", 0.0)
        self.post_attempts = int(os.environ.get("MICROFL_POST_ATTEMPTS") or 4)
        self.step = self.join
        self.pause = 0.0
        self.round = 0  # the round this client is in
        self.done_round = 0  # the last round it posted to (or found sealed)
        self.body = b""
        self.attempt = 0

    def wait_time(self) -> float:
        return self.pause

    @task
    def next_step(self) -> None:
        self.pause = 0.0
        self.step()

    def _get(self, path: str, name: str) -> Any:
        return self.client.get(path, name=name, headers=self.headers, catch_response=True)

    # Steps: join -> model -> post -> poll -> join ...

    def join(self) -> None:
        with self._get(f"/v1/jobs/{self.job}", "GET /v1/jobs/[job]") as resp:
            if resp.status_code != 200:
                return self._fail(resp, retry_after=1.0)
            r = resp.json()["open_round"]
        if r is None:
            raise StopUser(f"job {self.job} has run all its rounds")
        self.round = r
        if r <= self.done_round:  # still sealing the round it took part in: wait for the commit
            self.step, self.pause = self.poll_round, self.poll
        else:
            self.step = self.fetch_model

    def fetch_model(self) -> None:
        path = f"/v1/jobs/{self.job}/model"
        with self._get(path, "GET /v1/jobs/[job]/model") as resp:
            if resp.status_code != 200:
                return self._fail(resp, retry_after=1.0)
            version = int(resp.headers["MicroFL-Model-Version"])
            model, _ = tensors_from_safetensors(resp.content)
        if version != self.round - 1:  # a round committed in between: start again
            self.step = self.join
            return
        self.body = update_bytes(model, self.client_id, self.round)
        self.attempt = 0
        self.step, self.pause = self.post_update, self.train_seconds

    def post_update(self) -> None:
        r = self.round
        self.attempt += 1
        with self.client.post(
            f"/v1/jobs/{self.job}/rounds/{r}/updates",
            data=self.body,
            headers={**self.headers, "Content-Type": "application/octet-stream"},
            name="POST /v1/jobs/[job]/rounds/[r]/updates",
            catch_response=True,
        ) as resp:
            status, error = resp.status_code, _error_code(resp)
            if status in (200, 202):
                outcome = "accepted" if status == 202 else "replay"
            elif status == 409 and error == "round_not_open":
                outcome = "late"  # sealed before it arrived: expected, not a failure
                resp.success()
            elif status in RETRIED and self.attempt < self.post_attempts:
                resp.failure(f"{status} {error or resp.error}; retrying with the same bytes")
                self.pause = min(0.2 * 2**self.attempt, 10.0)
                return
            else:
                outcome = "failed"
                resp.failure(f"{status} {error or resp.error}")
        OUTCOMES[outcome] += 1
        SETUP["ledger"].write(
            job=self.job,
            client=self.client_id,
            round=r,
            status=status,
            outcome=outcome,
            attempts=self.attempt,
        )
        self.done_round = r
        self.step = self.poll_round if outcome in ("accepted", "replay") else self.join

    def poll_round(self) -> None:
        path = f"/v1/jobs/{self.job}/rounds/{self.round}"
        with self._get(path, "GET /v1/jobs/[job]/rounds/[r]") as resp:
            if resp.status_code != 200:
                return self._fail(resp, retry_after=self.poll)
            committed = resp.json()["state"] == "committed"
        if committed:
            self.step = self.join
        else:  # jitter, so a thousand clients do not poll in lockstep
            self.pause = self.poll * random.uniform(0.75, 1.25)

    def _fail(self, resp: Any, retry_after: float) -> None:
        resp.failure(f"{resp.status_code} {_error_code(resp) or resp.error}")
        self.pause = retry_after


def _error_code(resp: Any) -> str | None:
    try:
        body = resp.json()
    except Exception:  # not JSON (or no answer at all)
        return None
    return body.get("error") if isinstance(body, dict) else None


# --- load profiles --------------------------------------------------------------------------
# Locust uses the first shape class that is not abstract; MICROFL_PROFILE decides which one.


class SteadyShape(LoadTestShape):
    """A fixed number of clients (MICROFL_USERS, else --users), all started at once
    (or MICROFL_SPAWN_RATE a second), for --run-time or MICROFL_DURATION seconds (default 60)."""

    abstract = PROFILE != "steady"
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(os.environ.get("MICROFL_USERS") or getattr(options, "num_users", 0) or 10)
        spawn = _env_float("MICROFL_SPAWN_RATE", users)  # default: every client at once
        duration = _env_float("MICROFL_DURATION", getattr(options, "run_time", 0) or 60)
        return (users, spawn) if self.get_run_time() < duration else None


class RampShape(LoadTestShape):
    """From 0 to MICROFL_USERS clients (default 1000) over MICROFL_RAMP seconds (default 300),
    held for MICROFL_HOLD seconds (default 60), then stop."""

    abstract = PROFILE != "ramp"

    def tick(self) -> tuple[int, float] | None:
        peak = int(os.environ.get("MICROFL_USERS") or 1000)
        ramp = _env_float("MICROFL_RAMP", 300)
        hold = _env_float("MICROFL_HOLD", 60)
        t = self.get_run_time()
        if t >= ramp + hold:
            return None
        users = max(1, min(peak, round(peak * t / ramp)))
        return users, max(1.0, peak / ramp)


class BurstShape(LoadTestShape):
    """Bursts at round start: every MICROFL_BURST_PERIOD seconds (default 20) the clients jump
    from a base of MICROFL_BURST_BASE (default 5) to MICROFL_USERS (default 50) within a second,
    so a whole cohort fetches the model and posts together, then fall back after
    MICROFL_BURST_HOLD seconds (default 8); MICROFL_BURSTS cycles (default 3)."""

    abstract = PROFILE != "burst"

    def tick(self) -> tuple[int, float] | None:
        peak = int(os.environ.get("MICROFL_USERS") or 50)
        base = int(os.environ.get("MICROFL_BURST_BASE") or 5)
        period = _env_float("MICROFL_BURST_PERIOD", 20)
        hold = _env_float("MICROFL_BURST_HOLD", 8)
        t = self.get_run_time()
        if t >= period * int(os.environ.get("MICROFL_BURSTS") or 3):
            return None
        return (peak, float(peak)) if t % period < hold else (base, float(peak))


if PROFILE not in PROFILES:
    raise SystemExit(f"MICROFL_PROFILE={PROFILE!r}: use one of {', '.join(PROFILES)}")


# --- `python load/locustfile.py job`: a job whose model is MICROFL_UPDATE_KB big ----------------


def model_of_size(kb: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A float32 dense layer of about `kb` KiB: (kb - 1) x 256 weights and 256 biases."""
    rng = np.random.default_rng(seed)
    rows = max(1, kb - 1)
    return {
        "dense.weight": rng.standard_normal((rows, 256)).astype(np.float32),
        "dense.bias": np.zeros(256, np.float32),
    }


def create_job(
    job: str,
    kb: int,
    min_clients: int,
    rounds: int = 1000,
    round_timeout: float = 10.0,
    fan_in: int = 10,
    microfl: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """`microfl job create` with a model of `kb` KiB, on the store of the local platform."""
    microfl = microfl or str(Path(sys.executable).parent / "microfl")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "init.safetensors"
        model.write_bytes(tensors_to_safetensors(model_of_size(kb)))
        subprocess.run(
            [microfl, "job", "create", job, "--model", str(model), "--rounds", str(rounds),
             "--min-clients", str(min_clients), "--round-timeout", str(round_timeout),
             "--fan-in", str(fan_in)],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="locustfile.py", description="load-test helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("job", help="create a job sized for a load run; prints its id")
    p.add_argument("--job", default=f"load-{int(time.time())}")
    p.add_argument("--kb", type=int, default=int(os.environ.get("MICROFL_UPDATE_KB") or 64))
    p.add_argument("--min-clients", type=int, required=True, help="quorum that seals a round")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--round-timeout", type=float, default=10.0)
    p.add_argument("--fan-in", type=int, default=10)
    args = parser.parse_args(argv)
    print(create_job(args.job, args.kb, args.min_clients, args.rounds, args.round_timeout,
                     args.fan_in))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
