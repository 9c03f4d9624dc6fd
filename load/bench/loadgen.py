"""Simulated FL clients in a process of their own: post N updates to ingest over HTTP from a
thread pool (requests, one session per thread) and report every request's outcome in summary:
statuses, the time of the first request and of the last 202, latency percentiles, throughput.

    loadgen.py URL JOB --clients N --params P --threads T [--first I] [--warmup W] [--seed S]

The token secret comes from MICROFL_SECRET. Times are wall-clock (time.time()) so that other
processes can compare them with theirs."""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import procstat
import requests
import synth

from microfl.tokens import issue_token

__all__ = ["post_all", "summarise"]


def post_all(
    url: str,
    job: str,
    updates: synth.Updates,
    indices: range,
    threads: int,
    secret: bytes,
    r: int = 1,
) -> list[dict[str, Any]]:
    local = threading.local()
    endpoint = f"{url}/v1/jobs/{job}/rounds/{r}/updates"

    def one(i: int) -> dict[str, Any]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        client = updates.client(i)
        headers = {"Authorization": f"Bearer {issue_token(secret, job, client)}"}
        body = updates.body(i)
        start = time.time()
        try:
            resp = local.session.post(endpoint, data=body, headers=headers, timeout=300)
            status, error = resp.status_code, (resp.text[:300] if resp.status_code >= 300 else "")
        except requests.RequestException as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:300]
        return {"i": i, "start": start, "end": time.time(), "status": status, "error": error}

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, indices))


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
    args = parser.parse_args(argv)
    secret = os.environ["MICROFL_SECRET"].encode()
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


if __name__ == "__main__":
    main()
