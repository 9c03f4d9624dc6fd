"""What the operator console shows, read from storage: the jobs, and a job's rounds (or async
versions) with their timeline, participation, exclusions, metrics and privacy spent.

Read-only: it only reads and lists (the console's service account may do nothing else). Views
are plain dicts of what storage says, text left unescaped (microfl.consolepages escapes it).
A page costs a bounded number of storage calls: the timeline covers the latest TIMELINE rounds,
the charts at most CHART_ROUNDS records."""

from __future__ import annotations

from typing import Any

from microfl.errors import JobNotFound, MicroFLError, RoundNotFound
from microfl.jobs import JobSpec, load_job, model_key
from microfl.rounds import Rounds
from microfl.store import ObjectStore
from microfl.tokens import ANY_JOB, valid_id

__all__ = ["CHART_ROUNDS", "TIMELINE", "job_view", "jobs_view", "live_view", "model_bytes"]

TIMELINE = 10  # rounds whose timeline (seal, tree nodes, requests) a job page shows
CHART_ROUNDS = 200  # records a job page's charts read at most (the latest ones)
LISTED = 50  # client ids shown per round and list; the rest are counted


def visible_jobs(store: ObjectStore, scope: str) -> list[str]:
    """The jobs a session may see: every job for an admin token of job "*", else its own."""
    jobs = [j for j in store.children("jobs/") if valid_id(j)]
    return jobs if scope == ANY_JOB else [j for j in jobs if j == scope]


def jobs_view(store: ObjectStore, scope: str) -> list[dict[str, Any]]:
    """One row per job: state, mode, strategy, version out of rounds, last commit time."""
    rows: list[dict[str, Any]] = []
    for job in visible_jobs(store, scope):
        try:
            spec = load_job(store, job)
            rounds = Rounds(store, spec)
            version = rounds.latest_version()
        except MicroFLError as exc:  # a half-written or foreign folder: shown, not fatal
            rows.append({"job": job, "state": "unreadable", "problem": str(exc)})
            continue
        record = rounds.record(version) if version >= 1 else None
        rows.append(
            {
                "job": job,
                "state": _state(rounds, version),
                "mode": spec.mode,
                "strategy": spec.strategy,
                "version": version,
                "rounds": spec.rounds,
                "last_commit": record.get("committed_at") if record else None,
                "created_at": spec.created_at,
            }
        )
    return rows


def _state(rounds: Rounds, version: int) -> str:
    r = rounds.open_round(version)
    if r is None:
        return "finished"
    if rounds.spec.is_async:
        return "running"
    if rounds.seal(r) is not None:
        return "committing"
    return "sealing" if rounds.is_closing(r) else "open"


def _spec(store: ObjectStore, job: str, scope: str) -> JobSpec:
    if not valid_id(job) or (scope != ANY_JOB and job != scope):
        raise JobNotFound(f"no job {job!r} here; the jobs page lists the ones you may see")
    return load_job(store, job)


def live_view(store: ObjectStore, job: str, scope: str, now: float) -> dict[str, Any]:
    """The job's moving part: its latest version and the round (or buffer) being filled."""
    spec = _spec(store, job, scope)
    rounds = Rounds(store, spec)
    version = rounds.latest_version()
    r = rounds.open_round(version)
    live: dict[str, Any] = {
        "job": job,
        "version": version,
        "state": _state(rounds, version),
        "mode": spec.mode,
        "round": None,
    }
    if r is None:
        return live
    opened = rounds.opened_at(r)
    clients = [] if spec.is_async else rounds.update_clients(r)
    live["round"] = {
        "round": r,
        "opened_at": opened,
        "age": None if opened is None else max(0.0, now - opened),
        "deadline_in": None if opened is None else opened + spec.round_timeout - now,
        "updates": len(clients) if not spec.is_async else rounds.slot_count(r),
        "needed": spec.buffer if spec.is_async else spec.min_clients,
        "slots": rounds.slot_count(r),
        "closing": rounds.closing(r),
        "clients": clients[:LISTED],
        "more_clients": max(0, len(clients) - LISTED),
    }
    return live


def job_view(store: ObjectStore, job: str, scope: str, now: float) -> dict[str, Any]:
    """The job page: settings, the live round, a timeline of the latest rounds and, per round,
    participation, exclusions, client metrics and privacy spent (from the round records)."""
    spec = _spec(store, job, scope)
    rounds = Rounds(store, spec)
    live = live_view(store, job, scope, now)
    version = live["version"]
    first = max(1, version - CHART_ROUNDS + 1)
    records = {r: rounds.record(r) for r in range(first, version + 1)}
    history = [_summary(r, rec) for r, rec in records.items() if rec is not None]
    newest = live["round"]["round"] if live["round"] else version
    timeline = [
        _timeline(rounds, r, records.get(r))
        for r in range(newest, max(0, newest - TIMELINE), -1)
        if r >= 1
    ]
    return {
        "job": job,
        "spec": {
            "mode": spec.mode,
            "strategy": spec.strategy,
            "options": spec.options,
            "rounds": spec.rounds,
            "min_clients": spec.min_clients,
            "round_timeout": spec.round_timeout,
            "fan_in": spec.fan_in,
            "buffer": spec.buffer,
            "created_at": spec.created_at,
        },
        "live": live,
        "history": history,
        "timeline": timeline,
        "models": [v for v in range(version, max(-1, version - TIMELINE), -1)],
    }


def _summary(r: int, record: dict[str, Any]) -> dict[str, Any]:
    """A record's figures for the charts: participation, metric means, privacy spent."""
    privacy = record.get("privacy") or {}
    cumulative = privacy.get("cumulative") or {}
    metrics = record.get("metrics") or {}
    return {
        "round": r,
        "included": len(record.get("included") or []),
        "excluded": len(record.get("excluded") or []),
        "examples": record.get("num_examples"),
        "metrics": {str(k): v for k, v in metrics.items() if isinstance(v, int | float)},
        "epsilon": cumulative.get("epsilon"),
        "committed_at": record.get("committed_at"),
    }


def _timeline(rounds: Rounds, r: int, record: dict[str, Any] | None) -> dict[str, Any]:
    """Round r's events: opened, closing decided, sealed, each node of its tree (built, and
    when requested after the seal), committed, with the durations between them."""
    opened = rounds.opened_at(r)
    sealed = rounds.seal(r)
    if record is None and sealed is not None:
        record = rounds.record(r)
    built = rounds.nodes(r)
    requested = rounds.requests(r)
    sizes = sealed.tree.sizes if sealed is not None else []
    nodes = []
    for level, count in enumerate(sizes):
        for j in range(count):
            attempt = requested.get((level, j))
            at = None if attempt is None else rounds.requested_at(r, level, j, attempt)
            nodes.append({"level": level, "j": j, "built": (level, j) in built, "requested_at": at})
    if not sizes:  # still filling: the leaves folded so far
        nodes = [{"level": lv, "j": j, "built": True, "requested_at": None} for lv, j in built]
        nodes.sort(key=lambda n: (n["level"], n["j"]))
    committed = record.get("committed_at") if record else None
    sealed_at = sealed.sealed_at if sealed is not None else None
    excluded = (record or {}).get("excluded") or []
    included = (record or {}).get("included") or []
    return {
        "round": r,
        "opened_at": opened,
        "closing": rounds.closing(r) if sealed is None else sealed.reason,
        "sealed_at": sealed_at,
        "trigger": sealed.trigger if sealed is not None else None,
        "sealed_clients": len(sealed.clients) if sealed is not None else None,
        "committed_at": committed,
        "fill_seconds": _span(opened, sealed_at),
        "commit_seconds": _span(sealed_at, committed),
        "nodes": nodes,
        "included": [str(c) for c in included[:LISTED]],
        "more_included": max(0, len(included) - LISTED),
        "excluded": [
            {"client": str(e.get("update") or e.get("client")), "reason": str(e.get("reason"))}
            for e in excluded[:LISTED]
        ],
        "more_excluded": max(0, len(excluded) - LISTED),
        "examples": (record or {}).get("num_examples"),
        "state": "committed" if record else "sealed" if sealed else "open",
    }


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


def model_bytes(store: ObjectStore, job: str, scope: str, version: int) -> bytes:
    """The committed model `version` of the job (safetensors), as stored."""
    _spec(store, job, scope)
    data = store.read(model_key(job, version))
    if data is None:
        raise RoundNotFound(f"job {job!r} has no model version {version}; the job page lists them")
    return data
