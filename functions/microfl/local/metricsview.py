"""Client-reported metrics on the terminal: the demo's per-round columns and `microfl status`'s
per-job lines (each job's latest committed round or version and its metrics' means)."""

from __future__ import annotations

from typing import Any

from microfl.jobs import load_job
from microfl.rounds import Rounds
from microfl.store import ObjectStore

__all__ = ["CLIENT_HEADER", "client_columns", "job_lines", "job_metrics"]

CLIENT_HEADER = f"{'client loss':>11} {'client acc':>10}"


def client_columns(metrics: dict[str, float] | None) -> str:
    """The clients' mean training loss and accuracy from a record's `metrics` ("-" if absent:
    no client reported it, or a dp-fedavg record, which holds none)."""
    metrics = metrics or {}
    loss, acc = metrics.get("loss"), metrics.get("accuracy")
    return (
        f"{'-' if loss is None else f'{loss:.3f}':>11} {'-' if acc is None else f'{acc:.3f}':>10}"
    )


def job_metrics(store: ObjectStore) -> list[dict[str, Any]]:
    """For each job: its latest committed round (or version) and that record's metrics (None
    for a record without them, e.g. dp-fedavg's)."""
    out: list[dict[str, Any]] = []
    for job in sorted(store.children("jobs/")):
        try:
            spec = load_job(store, job)
        except Exception as exc:  # a broken job.json must not hide the other jobs
            out.append({"job": job, "error": str(exc)})
            continue
        rounds = Rounds(store, spec)
        latest = rounds.latest_version()
        record = rounds.record(latest) if latest >= 1 else None
        out.append(
            {
                "job": job,
                "mode": spec.mode,
                "strategy": spec.strategy,
                "model_version": latest,
                "rounds": spec.rounds,
                "metrics": None if record is None else record.get("metrics"),
            }
        )
    return out


def job_lines(jobs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for j in jobs:
        if "error" in j:
            lines.append(f"  {j['job']:<24} unreadable: {j['error']}")
            continue
        unit = "version" if j["mode"] == "async" else "round"
        metrics = j["metrics"]
        shown = (
            ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
            if metrics
            else "no client metrics"
            if metrics is not None or j["model_version"] == 0
            else "no client metrics (not recorded for this strategy)"
        )
        lines.append(
            f"  {j['job']:<24} {unit} {j['model_version']}/{j['rounds']} {j['strategy']:<12} "
            + shown
        )
    return lines
