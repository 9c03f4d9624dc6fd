"""After a Locust run: were any accepted updates lost? And the run's rate and latency.

Every update the load test saw accepted (202, or 200 for a replay of the same bytes) must appear
exactly once in its round's record (`GET /v1/jobs/{job}/rounds/{r}`), among the included
updates, or among the excluded ones with the reason (DESIGN.md invariant 3). An accepted update
in neither list is lost; a round that never commits leaves its updates unresolved. Rounds still
open when the run stopped seal at their deadline, so this waits for them (--wait).

    python load/check_lost.py --job JOB [--ledger 'load/results/ledger*.jsonl']
                              [--stats load/results/locust_stats.csv] [--json out.json]
                              [--metrics-before load/results/metrics-before.json]

With --metrics-before (written before the run by `python -m microfl.local.loadmetrics snapshot`)
it scrapes GET /metrics of the local platform's functions again once the rounds are committed and
reports what they counted during the run (microfl.local.loadmetrics) beside Locust's figures.

Exit status 1 when an update is lost, counted twice or unresolved, else 0. URL and credentials
as for the locustfile: MICROFL_URL, MICROFL_SECRET or MICROFL_TOKENS, else the local platform's.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent


def read_ledger(pattern: str) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            entries += [json.loads(line) for line in f if line.strip()]
    return entries


def _token(job: str) -> str:
    token_file = os.environ.get("MICROFL_TOKENS")
    if token_file:
        return Path(token_file).read_text().split()[0]
    from microfl.local.platform import state_dir
    from microfl.tokens import issue_token

    secret = os.environ.get("MICROFL_SECRET")
    if not secret and (state_dir() / "secret").is_file():
        secret = (state_dir() / "secret").read_text().strip()
    if not secret:
        raise SystemExit("set MICROFL_SECRET or MICROFL_TOKENS to read the round records")
    return issue_token(secret.encode(), job, admin=True, ttl=3600)


def _url() -> str:
    if os.environ.get("MICROFL_URL"):
        return os.environ["MICROFL_URL"]
    from microfl.local.platform import read_state

    url = (read_state() or {}).get("ingest_url")
    if not url:
        raise SystemExit("set MICROFL_URL (no local platform is running)")
    return str(url)


def check(
    url: str, job: str, token: str, ledger: list[dict[str, Any]], wait: float
) -> dict[str, Any]:
    """Match the ledger against the round records; the counts, and the problems by name."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"

    def get(path: str) -> dict[str, Any]:
        for attempt in range(6):
            try:
                resp = session.get(f"{url}{path}", timeout=30)
                if resp.status_code < 500:
                    resp.raise_for_status()
                    return dict(resp.json())
            except requests.ConnectionError:
                pass
            time.sleep(0.5 * 2**attempt)
        raise SystemExit(f"GET {path} failed; is the ingest at {url} up?")

    outcomes = Counter(e["outcome"] for e in ledger)
    accepted: dict[int, set[str]] = {}
    for e in ledger:
        if e["outcome"] in ("accepted", "replay"):
            accepted.setdefault(int(e["round"]), set()).add(e["client"])
    posted = {(int(e["round"]), e["client"]) for e in ledger}

    records: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + wait
    for r in sorted(accepted):
        while True:
            doc = get(f"/v1/jobs/{job}/rounds/{r}")
            if doc["state"] == "committed" or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        records[r] = doc
    committed = get(f"/v1/jobs/{job}")["model_version"]

    lost, doubled, excluded, unresolved = [], [], [], []
    included = 0
    for r, clients in sorted(accepted.items()):
        doc = records[r]
        if doc["state"] != "committed":
            unresolved += [f"{r}/{c}" for c in sorted(clients)]
            continue
        counted = Counter(doc["included"])
        reasons = {x["client"]: x["reason"] for x in doc["excluded"]}
        for c in sorted(clients):
            n = counted[c] + (c in reasons)
            if n == 0:
                lost.append(f"{r}/{c}")
            elif n > 1:
                doubled.append(f"{r}/{c}")
            elif c in reasons:
                excluded.append(f"{r}/{c}: {reasons[c]}")
            else:
                included += 1
    # Included without an answer the load test saw (a user stopped mid-request): not lost.
    unacknowledged = sorted(
        f"{r}/{c}"
        for r, doc in records.items()
        if doc["state"] == "committed"
        for c in doc["included"]
        if c not in accepted[r] and (r, c) not in posted
    )
    return {
        "posted": len(ledger),
        "outcomes": dict(outcomes),
        "accepted": sum(len(c) for c in accepted.values()),
        "rounds_with_updates": len(accepted),
        "rounds_committed": committed,
        "included": included,
        "excluded": excluded,
        "lost": lost,
        "doubled": doubled,
        "unresolved": unresolved,
        "unacknowledged": unacknowledged,
    }


def locust_stats(path: Path) -> dict[str, Any]:
    """Rate and latency from Locust's `{prefix}_stats.csv`: all requests and the uploads."""
    rows = {row["Name"]: row for row in csv.DictReader(path.open(encoding="utf-8"))}

    def pick(row: dict[str, str]) -> dict[str, float]:
        return {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "rps": float(row["Requests/s"]),
            "p50_ms": float(row["50%"]),
            "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"]),
        }

    out = {"all": pick(rows["Aggregated"])}
    for name, row in rows.items():
        if name != "Aggregated":
            out[name] = pick(row)
    return out


def functions_figures(before: Path) -> dict[str, Any] | None:
    """What the local platform's functions counted since the `before` scrape (None, said on
    stderr, without a local platform: a deployment is scraped by its Prometheus)."""
    from microfl.local.loadmetrics import delta, snapshot, summary
    from microfl.local.platform import read_state

    state = read_state()
    if state is None or not before.is_file():
        print(f"no functions' metrics: no local platform or no {before}", file=sys.stderr)
        return None
    return summary(delta(json.loads(before.read_text()), snapshot(state["processes"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default=os.environ.get("MICROFL_JOB"))
    parser.add_argument(
        "--ledger",
        default=os.environ.get("MICROFL_LEDGER") or str(HERE / "results" / "ledger.jsonl"),
        help="the locustfile's ledger (a glob: one file per Locust worker)",
    )
    parser.add_argument("--stats", type=Path, help="Locust's {prefix}_stats.csv, to print rates")
    parser.add_argument("--wait", type=float, default=90.0, help="seconds to wait for commits")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--metrics-before",
        type=Path,
        help="the functions' /metrics scraped before the run (microfl.local.loadmetrics)",
    )
    args = parser.parse_args(argv)
    if not args.job:
        parser.error("give --job or set MICROFL_JOB")
    pattern = args.ledger
    if not any(ch in pattern for ch in "*?["):
        pattern = str(Path(pattern).with_suffix("")) + "*" + Path(pattern).suffix
    ledger = [e for e in read_ledger(pattern) if e.get("job") == args.job]
    result = check(_url(), args.job, _token(args.job), ledger, args.wait)
    if args.stats:
        result["locust"] = locust_stats(args.stats)
    if args.metrics_before:
        result["functions"] = functions_figures(args.metrics_before)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))

    if "locust" in result:
        total = result["locust"]["all"]
        post = result["locust"].get("POST /v1/jobs/[job]/rounds/[r]/updates")
        print(
            f"rate {total['rps']:.1f} req/s, p50 {total['p50_ms']:.0f} ms, "
            f"p95 {total['p95_ms']:.0f} ms; {total['failures']} failed of "
            f"{total['requests']} requests"
        )
        if post:
            print(
                f"uploads {post['rps']:.1f}/s, p50 {post['p50_ms']:.0f} ms, "
                f"p95 {post['p95_ms']:.0f} ms; {post['failures']} failed of {post['requests']}"
            )
    if result.get("functions"):
        from microfl.local.loadmetrics import report_lines

        print("\n".join(report_lines(result["functions"])))
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(result["outcomes"].items()))
    print(
        f"updates: {outcomes or 'none posted'}; {result['rounds_committed']} rounds committed; "
        f"{result['included']} accepted updates included, {len(result['excluded'])} excluded "
        f"with a reason, {len(result['lost'])} lost, {len(result['doubled'])} counted twice, "
        f"{len(result['unresolved'])} in rounds not committed"
    )
    for kind in ("lost", "doubled", "unresolved", "excluded"):
        for item in result[kind][:20]:
            print(f"  {kind}: {item}")
    bad = result["lost"] or result["doubled"] or result["unresolved"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
