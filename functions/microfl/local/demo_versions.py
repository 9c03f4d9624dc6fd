"""`microfl demo --mode async`: the clients train continuously against the latest version (each
in a thread of a worker process, microfl.local.demo_clients) while this process evaluates every
committed version on the central test set, as the sync demo does every round."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from microfl.client import Client
from microfl.local.demo_clients import Member, run_clients
from microfl.local.metricsview import CLIENT_HEADER, client_columns

if TYPE_CHECKING:
    from microfl.local.demo_config import DemoConfig
    from microfl.local.progress import Bar

__all__ = ["HEADER", "row_line", "run_versions"]

HEADER = (
    f"{'version':>7} {'accuracy':>9} {'loss':>7} {'updates':>8} {'stale':>6} {'at s':>7} "
    + CLIENT_HEADER
)


def row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['version']:>7} {row['accuracy']:>9.3f} {row['loss']:>7.3f} {row['included']:>8} "
        f"{row['mean_staleness']:>6.2f} {row['elapsed']:>7.2f} "
        + client_columns(row.get("client_metrics"))
    )


def run_versions(
    config: DemoConfig,
    url: str,
    groups: list[list[Member]],
    pool: ProcessPoolExecutor,
    observer: Client,
    evaluate: Callable[[dict[str, Any]], tuple[float, float]],
    started: float,
    on_version: Callable[[int], None] | None = None,
    progress: Bar | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(a row per version: test accuracy and loss, updates, mean staleness, seconds since
    `started` (time.time()) at its commit; each client's accepted update ids and stale
    retrainings). The clients stop by themselves once the job has made its versions."""
    futures = [pool.submit(run_clients, url, observer.job, g, config, None) for g in groups]
    rows: list[dict[str, Any]] = []
    v, last = 1, started
    while v <= config.rounds:
        _raise_failed(futures)
        if observer.job_info()["model_version"] < v:
            if all(f.done() for f in futures):
                raise RuntimeError(f"the clients stopped before version {v} was committed")
            time.sleep(0.1)
            continue
        record = observer.version(v)
        if record.get("state") != "committed":  # model v is written just before its record
            time.sleep(0.05)
            continue
        tensors, _ = observer.model(v)
        loss, accuracy = evaluate(tensors)
        staleness = list(record["staleness"].values())
        at = float(record["committed_at"])
        rows.append(
            {
                "version": v,
                "accuracy": accuracy,
                "loss": loss,
                "included": len(record["included"]),
                "excluded": len(record["excluded"]),
                "mean_staleness": sum(staleness) / max(1, len(staleness)),
                "seconds": round(at - last, 3),
                "elapsed": round(at - started, 3),
                "client_metrics": record.get("metrics"),
            }
        )
        last = at
        print(row_line(rows[-1]), flush=True)
        if progress is not None:
            progress.advance(status=f"accuracy {accuracy:.3f}")
        if on_version is not None:
            on_version(v)
        v += 1
    clients = [c for f in futures for c in f.result(timeout=600)]
    return rows, sorted(clients, key=lambda c: int(c["client"]))


def _raise_failed(futures: list[Future[list[dict[str, Any]]]]) -> None:
    for f in futures:
        if f.done() and f.exception() is not None:
            f.result()
