"""Asynchronous (FedBuff) jobs on the local platform: version commit latency after the K-th
update, and sustained updates and versions per second, with the sync round latency at the same
N x P beside them.

One host process (a child of run.py) uses a real Kafka broker and one LocalRuntime (the
manifests of knative/, a FileStore in the work directory) for three jobs in turn; the load
generator (loadgen.py) is a process of its own:

- latency: an async job with buffer K; per version v the load generator posts K updates
  trained on v-1 from a thread pool, then waits until the job reports version v. Latency = the
  version record's committed_at - the last 2xx of those posts (the K-th update's); version 1
  warms the instances and is reported apart;
- sync reference: a job with min_clients = K, one round, posted the same way (latency = the
  round record's committed_at - the last 2xx, as in round_latency);
- sustained: an async job whose clients post continuously: each thread fetches the latest
  model (GET /model), posts a new client's update with that base_version, and again, for a
  fixed time or until a number of versions. Accepted updates/s and versions/s over the posting
  window; each version's lag = committed_at - the last 2xx of the updates it includes; the
  backlog = updates accepted but not yet in a committed version, at each commit.

Both async jobs then go through the invariant checker (microfl.local.invariants): every 2xx'd
update in exactly one version, and every model FedBuff's within 1e-6. Figures, not asserts."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report
from round_latency import default_workdir

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "async_latency"
PLAN = {"buffer": 100, "params": 1_000_000, "versions": 6, "seconds": 120.0, "until": 12}
QUICK_PLAN = {"buffer": 20, "params": 1_000_000, "versions": 4, "seconds": 45.0, "until": 6}
FAN_IN = 10
THREADS = 16
SAMPLE = 0.25
IDLE_WINDOW = 600.0
COMMIT_TIMEOUT = 300.0
TARGET_LATENCY = 0.5  # seconds, K-th update's 2xx -> version committed, at K = 100 x 1M
ROLES = ("ingest", "finalize", "aggregate")


def run(
    quick: bool = False, workdir: Path | None = None, fan_in: int = FAN_IN, threads: int = THREADS
) -> dict[str, Any]:
    plan = dict(QUICK_PLAN if quick else PLAN)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-async-", dir=workdir or default_workdir()))
    try:
        result = procstat.run_step(
            Path(__file__), "host", str(tmp), json.dumps(plan), str(fan_in), str(threads)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            **plan,
            "fan_in": fan_in,
            "threads": threads,
            "store": "FileStore on the work directory's disk",
            "kafka": "1 KRaft node (microfl.local.kafka)",
            "manifests": "knative/ (a consumer group of its own per run)",
        },
        **result,
        "within_target": all(t["met"] for t in _targets(result, plan)),
    }


# --- the host process --------------------------------------------------------------------------


def host(workdir: Path, plan: dict[str, Any], fan_in: int, threads: int) -> dict[str, Any]:
    import localplat

    from microfl.local import runtime as runtime_module
    from microfl.store import FileStore

    with localplat.kafka(workdir) as kafka:
        procstat.log(NAME, f"Kafka at {kafka.bootstrap}")
        store = FileStore(workdir / "store")
        secret = secrets.token_urlsafe(24)
        tag = secrets.token_hex(3)
        runtime = runtime_module.LocalRuntime(
            store.url,
            kafka.bootstrap,
            secret,
            workdir / f"runtime-{tag}",
            manifests=localplat.edit_manifests(workdir / f"knative-{tag}", {}, group=tag),
            idle_window=IDLE_WINDOW,
        )
        runtime.start()
        try:
            sampled = localplat.Sampled(runtime, kafka.pids(), SAMPLE).start()
            ctx = (runtime.ingest_url, store, secret, plan, fan_in, threads)
            versions = _versions(*ctx)
            sync = _sync_round(*ctx)
            sustained = _sustained(*ctx)
            seen = sampled.stop()
        finally:
            runtime.stop()
    return {
        "latency": versions,
        "sync": sync,
        "sustained": sustained,
        "peak_mib": seen["peak_mib"],
        "cpu_s": seen["cpu_s"],
        "instances": seen["instances"],
        "dispatch": seen["dispatch"],
    }


def _new_job(store: Any, job: str, plan: dict[str, Any], fan_in: int, **options: Any) -> None:
    import synth

    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_to_safetensors

    base = synth.model(plan["params"], 0)
    spec = JobSpec.for_model(
        job, base, fan_in=fan_in, round_timeout=3600.0, created_at=time.time(), **options
    )
    create_job(store, spec, tensors_to_safetensors(base))


def _versions(
    url: str, store: Any, secret: str, plan: dict[str, Any], fan_in: int, threads: int
) -> dict[str, Any]:
    """K updates per version, version after version; each version's latency."""
    import localplat

    from microfl.jobs import load_job
    from microfl.local.invariants import check_job
    from microfl.rounds import Rounds, nodes_prefix, seal_key
    from microfl.serde import json_from_bytes

    k, count = plan["buffer"], plan["versions"]
    job, root = f"async-latency-{k}", Path(store.root)
    _new_job(store, job, plan, fan_in, rounds=count, mode="async", buffer=k)
    procstat.log(NAME, f"latency: {count} versions of K = {k} x {plan['params']:,} params")
    out = localplat.loadgen(
        url, job, k, plan["params"], threads, secret, extra=("--versions", str(count))
    )
    rows, accepted = [], set()
    rounds = Rounds(store, load_job(store, job))
    for posted in out["versions"]:
        v = posted["version"]
        _wait(lambda v=v: rounds.has_record(v), f"record {v} of job {job}")  # after model v
        record = rounds.record(v) or {}
        seal = json_from_bytes(store.read(seal_key(job, v)) or b"{}")
        last = float(posted["last_202"])
        accepted |= {(v - 1, c) for c in posted["accepted_clients"]}
        keys = store.list(nodes_prefix(job, v))
        after = sorted(t for t in (os.stat(root / key).st_mtime for key in keys) if t >= last)
        rows.append(
            {
                "version": v,
                "latency_s": float(record["committed_at"]) - last,
                "to_seal_s": float(seal["sealed_at"]) - last if "sealed_at" in seal else None,
                "nodes_after_last_2xx": len(after),
                "last_node_s": after[-1] - last if after else None,
                "seen_s": float(posted["seen_at"]) - last,
                "posting_s": posted["seconds"],
                "updates_per_s": posted["updates_per_s"],
                "included": len(record.get("included", [])),
                "statuses": posted["statuses"],
            }
        )
        procstat.log(NAME, f"latency: version {v}: {rows[-1]['latency_s']:.3f} s")
    verdict = _checked(check_job(store, job, accepted), len(accepted))
    steady = [r["latency_s"] for r in rows[1:]] or [r["latency_s"] for r in rows]
    shutil.rmtree(Path(store.root) / "jobs" / job, ignore_errors=True)
    return {
        "versions": rows,
        "median_s": statistics.median(steady),
        "max_s": max(steady),
        "first_s": rows[0]["latency_s"],
        "check": verdict,
    }


def _sync_round(
    url: str, store: Any, secret: str, plan: dict[str, Any], fan_in: int, threads: int
) -> dict[str, Any]:
    """The reference: one sync round of min_clients = K at the same size, same runtime."""
    import localplat

    from microfl.rounds import record_key
    from microfl.serde import json_from_bytes

    k = plan["buffer"]
    job = f"sync-{k}"
    _new_job(store, job, plan, fan_in, rounds=1, min_clients=k)
    procstat.log(NAME, f"sync reference: one round of {k} x {plan['params']:,} params")
    posted = localplat.loadgen(url, job, k, plan["params"], threads, secret)
    if posted["accepted"] != k:
        raise RuntimeError(f"sync: {posted['accepted']} of {k} accepted: {posted['errors']}")
    _wait(lambda: store.exists(record_key(job, 1)), f"sync round of job {job}")
    record = json_from_bytes(store.read(record_key(job, 1)) or b"{}")
    latency = float(record["committed_at"]) - float(posted["last_202"])
    shutil.rmtree(Path(store.root) / "jobs" / job, ignore_errors=True)
    procstat.log(NAME, f"sync reference: {latency:.3f} s")
    return {
        "latency_s": latency,
        "posting_s": posted["seconds"],
        "updates_per_s": posted["updates_per_s"],
        "included": len(record.get("included", [])),
    }


def _sustained(
    url: str, store: Any, secret: str, plan: dict[str, Any], fan_in: int, threads: int
) -> dict[str, Any]:
    """Clients post continuously; throughput, each version's lag, the backlog."""
    import localplat

    from microfl.buffers import parse_update_id
    from microfl.jobs import load_job
    from microfl.local.invariants import check_job
    from microfl.rounds import Rounds

    k, until = plan["buffer"], plan["until"]
    job = f"async-sustained-{k}"
    # room past `until` for the posts in flight when it commits
    _new_job(store, job, plan, fan_in, rounds=until + threads // k + 3, mode="async", buffer=k)
    procstat.log(
        NAME, f"sustained: {threads} clients for {plan['seconds']:g} s or {until} versions"
    )
    most = k * (until + threads // k + 3)
    extra = ("--seconds", str(plan["seconds"]), "--until-version", str(until))
    out = localplat.loadgen(url, job, most, plan["params"], threads, secret, extra=extra)
    posts = out["posts"]
    ok = [p for p in posts if p["status"] == 202]
    rounds = Rounds(store, load_job(store, job))
    full = len(ok) // k  # no faults: every accepted update takes a slot, so these fill up
    _wait(lambda: full == 0 or rounds.has_record(full), f"{full} versions of job {job}")
    start, stop = min(p["start"] for p in posts), max(p["end"] for p in posts)
    window = stop - start
    ended = {(p["client"], p["base"]): p["end"] for p in ok}
    rows = []
    for v in range(1, rounds.latest_version() + 1):
        _wait(lambda v=v: rounds.has_record(v), f"record {v} of job {job}")  # after model v
        record = rounds.record(v) or {}
        members = [ended[parse_update_id(u)] for u in record.get("included", [])]
        committed = float(record["committed_at"])
        backlog = sum(p["end"] <= committed for p in ok) - k * v
        rows.append(
            {
                "version": v,
                "committed_at": committed,
                "lag_s": committed - max(members) if members else None,
                "backlog": backlog,
                "staleness": record.get("staleness", {}),
            }
        )
    inside = [r for r in rows if start <= r["committed_at"] <= stop]
    lags = [r["lag_s"] for r in rows if r["lag_s"] is not None]
    stale = [s for r in rows for s in r["staleness"].values()]
    verdict = _checked(check_job(store, job, {(p["base"], p["client"]) for p in ok}), len(ok))
    statuses: dict[str, int] = {}
    for p in posts:
        statuses[str(p["status"])] = statuses.get(str(p["status"]), 0) + 1
    result = {
        "seconds": window,
        "posts": len(posts),
        "statuses": statuses,
        "accepted": len(ok),
        "updates_per_s": len(ok) / window,
        "versions": len(rows),
        "versions_in_window": len(inside),
        "versions_per_s": len(inside) / window,
        "lag_median_s": statistics.median(lags) if lags else None,
        "lag_max_s": max(lags, default=None),
        "backlog_median": statistics.median(r["backlog"] for r in inside) if inside else None,
        "backlog_max": max((r["backlog"] for r in inside), default=None),
        "staleness_mean": statistics.fmean(stale) if stale else None,
        "staleness_max": max(stale, default=None),
        "fetch_to_post_s": statistics.median(p["start"] - p["fetched"] for p in posts),
        "post_p50_s": statistics.median(p["end"] - p["start"] for p in ok) if ok else None,
        "by_version": [{k2: v for k2, v in r.items() if k2 != "staleness"} for r in rows],
        "check": verdict,
    }
    shutil.rmtree(Path(store.root) / "jobs" / job, ignore_errors=True)
    procstat.log(
        NAME,
        f"sustained: {result['updates_per_s']:.1f} updates/s, {result['versions_per_s']:.3f} "
        f"versions/s, lag median {_f(result['lag_median_s'])} s",
    )
    return result


def _checked(verdict: Any, accepted: int) -> dict[str, Any]:
    """The invariant checker's verdict; a benchmark whose job broke one fails loudly."""
    found = {
        "versions": verdict.rounds_committed,
        "accepted": accepted,
        "lost": len(verdict.lost),
        "double_counted": len(verdict.double_counted),
        "wrong_models": len(verdict.wrong_models),
        "bad_trees": len(verdict.bad_trees),
    }
    if not verdict.ok:
        raise RuntimeError(f"the invariant checker found problems: {found}")
    return found


def _wait(check: Any, what: str) -> None:
    deadline = time.monotonic() + COMMIT_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not committed within {COMMIT_TIMEOUT:.0f} s")
        time.sleep(0.05)


# --- report ------------------------------------------------------------------------------------


def _targets(result: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    lat, sync, sus = result["latency"], result["sync"], result["sustained"]
    size = f"K = {plan['buffer']} x {plan['params'] / 1e6:g}M"
    at_target = (plan["buffer"], plan["params"]) == (100, 1_000_000)
    return [
        {
            "target": f"K-th update's 2xx -> version committed <= {TARGET_LATENCY:g} s, {size}"
            + ("" if at_target else " (target is set at K = 100 x 1M)"),
            "measured": f"median {lat['median_s']:.2f} s, max {lat['max_s']:.2f} s over "
            f"{len(lat['versions']) - 1} versions (sync round at the same size: "
            f"{sync['latency_s']:.2f} s)",
            "met": lat["max_s"] <= TARGET_LATENCY,
        },
        {
            "target": f"sustained async throughput (reported), {size}",
            "measured": f"{sus['updates_per_s']:.1f} updates/s accepted, "
            f"{sus['versions_per_s']:.3f} versions/s, lag median {_f(sus['lag_median_s'])} s",
            "met": True,
        },
    ]


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return _targets(result, result["config"])


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    lat, sync, sus = result["latency"], result["sync"], result["sustained"]
    size = f"{cfg['buffer']} x {cfg['params'] / 1e6:g}M"
    lines = [
        "## Asynchronous (FedBuff) jobs: version commit latency and sustained throughput",
        "",
        f"A real Kafka broker and the three functions as processes ({cfg['manifests']}), "
        f"{cfg['store']}, fan-in {cfg['fan_in']}; a load generator process with "
        f"{cfg['threads']} threads. **Latency**: per version, K = {cfg['buffer']} updates "
        "trained on the previous version are posted, then the next version is awaited; latency "
        "= the version record's committed_at minus the last 2xx (version 1 is left out of the "
        "median and max: its first events start finalize from zero, as scale to zero does); "
        "*nodes after* are the tree nodes written "
        "after that 2xx, *last node* when the last of them was written. The **sync** "
        "reference is one round of min_clients = K at the same size in the same runtime. "
        "**Sustained**: every thread "
        "fetches the latest model, posts a new client's update on it, and again, for "
        f"{cfg['seconds']:g} s or until version {cfg['until']}; a version's lag = its "
        "committed_at minus the last 2xx of the updates it includes; backlog = updates "
        "accepted and not yet in a committed version, at each commit in the window. Both async "
        "jobs pass the invariant checker (nothing lost or counted twice, FedBuff models).",
        "",
        "| K x params | version | posting s | updates/s | **latency s** | to seal s | nodes "
        "after | last node s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in lat["versions"]:
        lines.append(
            f"| {size} | {r['version']}{' (warm-up)' if r['version'] == 1 else ''} "
            f"| {r['posting_s']:.1f} | {r['updates_per_s']:.1f} | **{r['latency_s']:.3f}** "
            f"| {_f(r['to_seal_s'], 3)} | {r.get('nodes_after_last_2xx', '-')} "
            f"| {_f(r.get('last_node_s'), 3)} |"
        )
    lines += [
        "",
        "| K x params | async latency median s | max s | sync round latency s (same run) |",
        "| --- | ---: | ---: | ---: |",
        f"| {size} | **{lat['median_s']:.3f}** | {lat['max_s']:.3f} | {sync['latency_s']:.3f} |",
        "",
        "| K x params | window s | accepted | **updates/s** | versions | **versions/s** | lag "
        "median s | lag max s | backlog median / max | staleness mean / max | other answers |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    other = ", ".join(f"{s}: {n}" for s, n in sorted(sus["statuses"].items()) if s != "202")
    lines.append(
        f"| {size} | {sus['seconds']:.1f} | {sus['accepted']} | **{sus['updates_per_s']:.1f}** "
        f"| {sus['versions_in_window']} | **{sus['versions_per_s']:.3f}** "
        f"| {_f(sus['lag_median_s'])} | {_f(sus['lag_max_s'])} "
        f"| {_f(sus['backlog_median'], 0)} / {_f(sus['backlog_max'], 0)} "
        f"| {_f(sus['staleness_mean'])} / {_f(sus['staleness_max'], 0)} | {other or '-'} |"
    )
    peak, cpu = result["peak_mib"], result["cpu_s"]
    lines += [
        "",
        "Whole run: peak RSS MiB "
        + ", ".join(f"{role} {_f(peak.get(role), 0)}" for role in ROLES)
        + "; CPU s "
        + ", ".join(f"{role} {_f(cpu.get(role), 1)}" for role in (*ROLES, "kafka"))
        + "; events retried / dead-lettered / lost: "
        + ", ".join(
            f"{group.rsplit('-', 1)[0]} {d['retried']}/{d['dead_lettered']}/{d['lost']}"
            for group, d in sorted(result.get("dispatch", {}).items())
        )
        + ".",
        "",
        f"Target of issue 17 (K-th update's 2xx -> version committed <= {TARGET_LATENCY:g} s at "
        "K = 100 x 1M):",
    ]
    for t in targets(result):
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"- {t['target']}: {t['measured']} ({verdict}).")
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    procstat.step_main(host)
