"""What the functions say about a load run: GET /metrics of every ingest, aggregate and finalize
instance of the local platform scraped before and after it, and the difference, for the Locust
report (load/check_lost.py) to show beside Locust's own request figures.

The counters live in each instance's memory (microfl.prometheus), so every instance is scraped on
its own port (the Service URL would reach one of them) and instances are matched by pid: an
instance started during the run counts from zero, one stopped during it (scaled down) took its
counts since the first scrape with it, which the report says.

    python -m microfl.local.loadmetrics snapshot load/results/metrics-before.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["delta", "parse", "quantile", "report_lines", "snapshot", "summary"]

ROLES = ("ingest", "aggregate", "finalize")
# Sample name and sorted labels -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """The microfl_* samples of one /metrics answer (prometheus_client's own text parser)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("microfl_") and not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def snapshot(processes: list[dict[str, Any]], timeout: float = 10.0) -> dict[str, Any]:
    """Every function instance's /metrics text ({role, pid, port} as in the platform's state);
    an instance that does not answer (stopping just now) is left out."""
    instances = []
    for p in processes:
        if p.get("role") not in ROLES or not p.get("port"):
            continue
        try:
            resp = requests.get(f"http://127.0.0.1:{p['port']}/metrics", timeout=timeout)
            resp.raise_for_status()
        except requests.RequestException:
            continue
        instances.append({"role": p["role"], "pid": p["pid"], "text": resp.text})
    return {"taken_at": time.time(), "instances": instances}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before summed over the instances ({samples, instances: per role, gone: pids
    scraped before and not after})."""
    earlier = {(i["role"], i["pid"]): parse(i["text"]) for i in before["instances"]}
    total: Samples = defaultdict(float)
    instances: dict[str, int] = dict.fromkeys(ROLES, 0)
    seen = set()
    for inst in after["instances"]:
        key = (inst["role"], inst["pid"])
        seen.add(key)
        instances[inst["role"]] += 1
        base = earlier.get(key, {})
        for sample, value in parse(inst["text"]).items():
            total[sample] += value - base.get(sample, 0.0)
    gone = sorted(f"{role}/{pid}" for role, pid in earlier if (role, pid) not in seen)
    return {
        "samples": dict(total),
        "instances": instances,
        "gone": gone,
        "seconds": round(after["taken_at"] - before["taken_at"], 1),
    }


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name and v:
            out[dict(labels).get(label, "")] += v
    return dict(sorted(out.items()))


def _one(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram from its cumulative (upper bound, count) buckets, +Inf
    last, interpolated linearly inside a bucket as Prometheus's histogram_quantile does (the
    highest finite bound when it falls in +Inf); None without observations."""
    count = buckets[-1][1] if buckets else 0.0
    if count <= 0:
        return None
    rank = q * count
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower, below = upper, cumulative
    return lower


def _latency(samples: Samples, name: str, **labels: str) -> dict[str, Any]:
    """count, mean and p50/p95/p99 (seconds) of histogram `name` in these samples."""
    want = set(labels.items())
    buckets = sorted(
        (float(dict(lb)["le"]), v)
        for (n, lb), v in samples.items()
        if n == f"{name}_bucket" and want <= set(lb)
    )
    count = _one(samples, f"{name}_count", **labels)
    total = _one(samples, f"{name}_sum", **labels)
    out: dict[str, Any] = {"count": int(count), "mean": total / count if count else None}
    for q in (0.5, 0.95, 0.99):
        out[f"p{round(q * 100)}"] = quantile(q, buckets)
    return out


def summary(d: dict[str, Any]) -> dict[str, Any]:
    """The figures the load report shows, from delta()."""
    s = d["samples"]
    leaf_seconds = _one(s, "microfl_partial_seconds_sum", kind="leaf")
    values = _one(s, "microfl_folded_values_total")
    return {
        "seconds": d["seconds"],
        "instances": d["instances"],
        "instances_gone": d["gone"],
        "uploads": {k: int(v) for k, v in _by(s, "microfl_uploads_total", "status").items()},
        "upload_bytes": int(_one(s, "microfl_upload_bytes_total")),
        "folded_updates": int(_one(s, "microfl_folded_updates_total")),
        "folded_values": int(values),
        "fold_values_per_leaf_second": values / leaf_seconds if leaf_seconds else None,
        "seal": _latency(s, "microfl_seal_seconds"),
        "leaf": _latency(s, "microfl_partial_seconds", kind="leaf"),
        "inner": _latency(s, "microfl_partial_seconds", kind="inner"),
        "commit": _latency(s, "microfl_commit_seconds"),
        "events_published": {
            k: int(v) for k, v in _by(s, "microfl_events_published_total", "type").items()
        },
        "events_dead_lettered": {
            k: int(v) for k, v in _by(s, "microfl_events_dead_lettered_total", "type").items()
        },
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def report_lines(f: dict[str, Any]) -> list[str]:
    """The functions' figures as the load report prints them."""
    uploads = ", ".join(f"{n} x {status}" for status, n in f["uploads"].items()) or "none"
    inst = ", ".join(f"{n} {role}" for role, n in f["instances"].items())
    lines = [
        f"functions (GET /metrics of {inst} instances, {f['seconds']:g} s apart):",
        f"  uploads answered: {uploads}; {f['upload_bytes'] / 1e6:.1f} MB of update bodies",
        f"  folded: {f['folded_updates']} updates, {f['folded_values']:,} values"
        + (
            f" ({f['fold_values_per_leaf_second']:,.0f} values per leaf-second)"
            if f["fold_values_per_leaf_second"]
            else ""
        ),
    ]
    for step in ("seal", "leaf", "inner", "commit"):
        h = f[step]
        lines.append(
            f"  {step:<6} {h['count']:>5} x  mean {_ms(h['mean'])}, p50 {_ms(h['p50'])}, "
            f"p95 {_ms(h['p95'])}, p99 {_ms(h['p99'])}"
        )
    published = ", ".join(f"{n} {t}" for t, n in f["events_published"].items()) or "none"
    dead = ", ".join(f"{n} {t}" for t, n in f["events_dead_lettered"].items()) or "none"
    lines += [f"  events published: {published}", f"  events dead-lettered: {dead}"]
    if f["instances_gone"]:
        lines.append(
            f"  stopped during the run (their counts after the first scrape are missing): "
            f"{', '.join(f['instances_gone'])}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microfl.local.loadmetrics")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("snapshot", help="scrape the local platform's functions into a file")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from microfl.local.platform import read_state

    state = read_state()
    if state is None:
        raise SystemExit("no local platform is running (start it with `microfl up --detach`)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(snapshot(state["processes"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
