"""Simulated FL clients in a process of their own: post N updates to ingest over HTTP from a
thread pool (requests, one session per thread) and report every request's outcome in summary:
statuses, the time of the first request and of the last 202, latency percentiles, throughput.

    loadgen.py URL JOB --clients N --params P --threads T [--first I] [--warmup W] [--seed S]

An async job (POST /v1/jobs/{job}/updates, base_version in __metadata__), every post from a
client of its own:

    loadgen.py URL JOB --clients K --versions V ...   per version v = 1..V, K updates on base
                                                      v-1, then wait for version v (its summary)
    loadgen.py URL JOB --seconds S --until-version V  continuously: each thread fetches the
                                                      latest model and posts an update on it,
                                                      for S s or until version V (every post)

The token secret comes from MICROFL_SECRET. Times are wall-clock (time.time()) so that other
processes can compare them with theirs."""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procstat
import requests
import synth

from microfl.tokens import issue_token

__all__ = ["post_all", "post_continuously", "post_versions", "summarise"]

POLL = 0.02  # seconds between looks at an async job's latest version


def post_all(
    url: str,
    job: str,
    updates: synth.Updates,
    indices: range,
    threads: int,
    secret: bytes,
    r: int = 1,
    base: int | None = None,
) -> list[dict[str, Any]]:
    """Post updates `indices` to round r, or with base, to an async job trained on it."""
    local = threading.local()
    endpoint = f"{url}/v1/jobs/{job}/" + (f"rounds/{r}/updates" if base is None else "updates")

    def one(i: int) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        body = updates.body(i) if base is None else updates.body(i, base)
        return _post(local.session, endpoint, job, updates.client(i), body, secret) | {"i": i}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, indices))


def _post(
    session: requests.Session, endpoint: str, job: str, client: str, body: bytes, secret: bytes
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {issue_token(secret, job, client)}"}
    start = time.time()
    try:
        resp = session.post(endpoint, data=body, headers=headers, timeout=300)
        status, error = resp.status_code, (resp.text[:300] if resp.status_code >= 300 else "")
    except requests.RequestException as exc:
        status, error = 0, f"{type(exc).__name__}: {exc}"[:300]
    return {"start": start, "end": time.time(), "status": status, "error": error}


def _latest(session: requests.Session, url: str, job: str, token: str) -> int:
    resp = session.get(
        f"{url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    resp.raise_for_status()
    return int(resp.json()["model_version"])


def post_versions(
    url: str, job: str, updates: synth.Updates, k: int, versions: int, threads: int,
    secret: bytes, timeout: float = 600.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Version by version: K updates trained on v-1 (clients (v-1)K .. vK-1), then wait until
    the job reports version v; per version the posts' summary and when v was seen."""
    session = requests.Session()
    token = issue_token(secret, job, updates.client(0))
    body_bytes = len(updates.body(0))
    out = []
    for v in range(1, versions + 1):
        outcomes = post_all(url, job, updates, range((v - 1) * k, v * k), threads, secret,
                            base=v - 1)  # fmt: skip
        deadline = time.monotonic() + timeout
        while _latest(session, url, job, token) < v:
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {v} not committed {timeout:.0f} s after its posts")
            time.sleep(POLL)
        accepted = [updates.client(o["i"]) for o in outcomes if o["status"] == 202]
        summary = summarise(outcomes, body_bytes)
        out.append({"version": v, "seen_at": time.time(), "accepted_clients": accepted, **summary})
    return out


def post_continuously(
    url: str, job: str, updates: synth.Updates, threads: int, secret: bytes, seconds: float,
    until: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every thread, until `seconds` pass or the job reaches version `until`: fetch the
    latest model (GET /model), post a new client's update trained on it. Every post's outcome
    with its client and base; "fetched" is when the model had arrived."""
    counter = itertools.count()
    stop = threading.Event()
    end = time.time() + seconds
    endpoint = f"{url}/v1/jobs/{job}/updates"

    def client_loop() -> list[dict[str, Any]]:
        session, out = requests.Session(), []
        while not stop.is_set() and time.time() < end:
            i = next(counter)
            if i >= updates.n:
                break
            client = updates.client(i)
            auth = {"Authorization": f"Bearer {issue_token(secret, job, client)}"}
            resp = session.get(f"{url}/v1/jobs/{job}/model", headers=auth, timeout=300)
            resp.raise_for_status()
            base = int(resp.headers["MicroFL-Model-Version"])
            if base >= until:
                stop.set()
                break
            fetched = time.time()
            outcome = _post(session, endpoint, job, client, updates.body(i, base), secret)
            out.append({"client": client, "base": base, "fetched": fetched, **outcome})
        return out

    with ThreadPoolExecutor(threads) as pool:
        done = [pool.submit(client_loop) for _ in range(threads)]
        return [o for f in done for o in f.result()]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarise(outcomes: list[dict[str, Any]], body_bytes: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[str(o["status"])] = statuses.get(str(o["status"]), 0) + 1
    ok = [o for o in outcomes if o["status"] in (200, 202)]
    latencies = [o["end"] - o["start"] for o in ok]
    first = min(o["start"] for o in outcomes)
    last = max(o["end"] for o in outcomes)
    accepted = [o["end"] for o in outcomes if o["status"] == 202]
    span = last - first
    errors = sorted({o["error"] for o in outcomes if o["error"]})[:5]
    return {
        "requests": len(outcomes),
        "statuses": statuses,
        "accepted": len(accepted),
        "first_start": first,
        "last_end": last,
        "last_202": max(accepted) if accepted else None,
        "seconds": span,
        "updates_per_s": len(ok) / span if span > 0 else float("nan"),
        "mb_per_s": len(ok) * body_bytes / span / 1e6 if span > 0 else float("nan"),
        "p50_s": _percentile(latencies, 0.50),
        "p95_s": _percentile(latencies, 0.95),
        "p99_s": _percentile(latencies, 0.99),
        "max_s": max(latencies, default=float("nan")),
        "body_bytes": body_bytes,
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("job")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--first", type=int, default=0, help="index of the first client")
    parser.add_argument("--warmup", type=int, default=0, help="untimed posts before the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--versions", type=int, default=0, help="async: K = --clients per version")
    parser.add_argument("--seconds", type=float, default=0.0, help="async: post continuously")
    parser.add_argument("--until-version", type=int, default=10**9, help="async: stop there")
    args = parser.parse_args(argv)
    secret = os.environ["MICROFL_SECRET"].encode()
    if args.versions or args.seconds:
        procstat.emit(_async_main(args, secret))
        return
    timed = args.first + args.warmup
    total = timed + args.clients
    updates = synth.Updates(synth.model(args.params, args.seed), total, args.seed + 1)
    body_bytes = len(updates.body(0))
    result: dict[str, Any] = {}
    if args.warmup:
        warm = post_all(
            args.url,
            args.job,
            updates,
            range(args.first, timed),
            min(args.threads, args.warmup),
            secret,
        )
        result["warmup"] = summarise(warm, body_bytes)
    outcomes = post_all(args.url, args.job, updates, range(timed, total), args.threads, secret)
    result.update(summarise(outcomes, body_bytes))
    result["vm_hwm_mib"] = procstat.status_mib("VmHWM")
    result["cpu_s"] = procstat.cpu_seconds()
    procstat.emit(result)


def _async_main(args: argparse.Namespace, secret: bytes) -> dict[str, Any]:
    versioned = args.versions > 0
    n = args.clients * args.versions if versioned else args.clients
    updates = synth.Updates(synth.model(args.params, args.seed), n, args.seed + 1, versioned=True)
    result: dict[str, Any] = {"body_bytes": len(updates.body(0))}
    if versioned:
        result["versions"] = post_versions(
            args.url, args.job, updates, args.clients, args.versions, args.threads, secret
        )
    else:
        result["posts"] = post_continuously(
            args.url, args.job, updates, args.threads, secret, args.seconds, args.until_version
        )
    result["vm_hwm_mib"] = procstat.status_mib("VmHWM")
    result["cpu_s"] = procstat.cpu_seconds()
    return result


if __name__ == "__main__":
    main()
