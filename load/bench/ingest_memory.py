"""Ingest memory under the manifest's full concurrency: peak RSS of one ingest instance while
containerConcurrency (knative/ingest.yaml: 100) uploads of a large update arrive at once,
against the manifest's memory limit (512 MiB).

One host process (a child of run.py) starts Kafka (or uses run.py's), then per configuration one
ingest instance the way the local runtime starts one (microfl.local.instance.FunctionProcess:
functions-framework, gunicorn with one worker), with THREADS=100 so that all 100 requests are in
the function at once (gunicorn's default, 4 threads per core, would queue most of them on small
machines and hide the worst case). A job whose model is one float32 tensor gets 100 concurrent
uploads from 100 clients (threads of the host, 127.0.0.1 only), each the whole update; the
instance's VmHWM (gunicorn master and worker) is its peak RSS.

The largest update: LARGEST_MIB (100 MiB, 26M float32 parameters). With the body no longer held
in memory, the bound on an update's size is time, not memory: 100 uploads of 100 MiB are 10 GiB
to receive, check and store on one instance within the manifest's timeoutSeconds (60), which a
1-CPU instance cannot do much faster; and on this 2-core machine it is what runs in a couple of
minutes (20 GiB of disk writes: spool and store). A before/after row (COMPARE_MIB, 8 MiB
updates, small enough for the old code to survive) runs against another checkout when
MICROFL_BENCH_BASELINE names its root (e.g. `git archive <rev> | tar -x -C /tmp/old`). Every
instance runs under an address-space limit of AS_LIMIT_GIB, a guard for the machine."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "ingest_memory"
CONCURRENCY = 100  # knative/ingest.yaml containerConcurrency
LIMIT_MIB = 512  # knative/ingest.yaml resources.limits.memory
LARGEST_MIB = 100
COMPARE_MIB = 8
QUICK_MIB = 8
AS_LIMIT_GIB = 6
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    baseline = os.environ.get("MICROFL_BENCH_BASELINE")
    plan = [
        {"code": "this checkout", "root": str(ROOT), "mib": QUICK_MIB if quick else LARGEST_MIB}
    ]
    if not quick:
        plan.append({"code": "this checkout", "root": str(ROOT), "mib": COMPARE_MIB})
    if baseline:
        plan.append({"code": f"baseline ({baseline})", "root": baseline, "mib": COMPARE_MIB})
    base = workdir or ROOT / ".microfl" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-ingest-memory-", dir=base))
    try:
        result = procstat.run_step(Path(__file__), "host", str(tmp), json.dumps(plan))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs = result["runs"]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {"concurrency": CONCURRENCY, "limit_mib": LIMIT_MIB, "threads": CONCURRENCY},
        "runs": runs,
        "within_target": all(
            r["peak_mib"] < LIMIT_MIB for r in runs if r["code"] == "this checkout"
        ),
    }


def host(workdir: Path, plan: list[dict[str, Any]]) -> dict[str, Any]:
    import localplat
    import numpy as np
    import psutil

    from microfl.jobs import JobSpec, create_job
    from microfl.local.instance import FunctionProcess
    from microfl.serde import tensors_to_safetensors
    from microfl.store import FileStore
    from microfl.tokens import issue_token

    runs = []
    with localplat.kafka(workdir) as kafka:
        for i, step in enumerate(plan):
            params = step["mib"] * 2**20 // 4
            store = FileStore(workdir / f"store-{i}")
            (workdir / f"tmp-{i}").mkdir()
            secret = secrets.token_urlsafe(24)
            env = {
                "MICROFL_STORE": store.url,
                "MICROFL_SECRET": secret,
                "MICROFL_KAFKA_BOOTSTRAP": kafka.bootstrap,
                "PYTHONPATH": str(Path(step["root"]) / "functions"),
                "THREADS": str(CONCURRENCY),
                "TMPDIR": str(workdir / f"tmp-{i}"),
            }
            job = f"memory-{i}"
            model = {"w": np.zeros(params, np.float32)}
            spec = JobSpec.for_model(job, model, rounds=1, min_clients=10**6, round_timeout=3600.0,
                                     created_at=time.time())  # fmt: skip
            create_job(store, spec, tensors_to_safetensors(model))
            update = {"w": np.random.default_rng(i).standard_normal(params).astype(np.float32)}
            body = tensors_to_safetensors(update, {"num_examples": "10"})
            del model, update
            fn = FunctionProcess(
                "ingest", env, workdir / "logs", f"ingest-{i}",
                source=Path(step["root"]) / "functions" / "main.py",
            ).start()  # fmt: skip
            try:
                assert fn.proc is not None
                master = psutil.Process(fn.proc.pid)
                (worker,) = master.children(recursive=True)
                for p in (master, worker):
                    p.rlimit(psutil.RLIMIT_AS, (AS_LIMIT_GIB * 2**30, AS_LIMIT_GIB * 2**30))
                warmup = issue_token(secret.encode(), job, "warmup")
                _post(fn.url, job, b"not safetensors", warmup)  # a 400: the imports are done
                before = procstat.status_mib("VmRSS", worker.pid) or 0.0
                procstat.log(NAME, f"{step['code']}: {CONCURRENCY} uploads of {step['mib']} MiB")
                cpu0, began = procstat.cpu_seconds(worker.pid) or 0.0, time.perf_counter()
                peak_rss = _PeakRss(worker.pid)
                tokens = [
                    issue_token(secret.encode(), job, f"c{c:03d}") for c in range(CONCURRENCY)
                ]
                with peak_rss, ThreadPoolExecutor(CONCURRENCY) as pool:
                    answers = list(pool.map(partial(_post, fn.url, job, body), tokens))
                seconds = time.perf_counter() - began
                alive = fn.alive
                worker_hwm = procstat.status_mib("VmHWM", worker.pid) or peak_rss.peak
                master_hwm = procstat.status_mib("VmHWM", master.pid) or 0.0
                cpu = (procstat.cpu_seconds(worker.pid) or cpu0) - cpu0
            finally:
                fn.stop()
                shutil.rmtree(workdir / f"store-{i}", ignore_errors=True)
            statuses: dict[str, int] = {}
            for status, _ in answers:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            latencies = sorted(s for _, s in answers)
            row = {
                "code": step["code"],
                "update_mib": len(body) / 2**20,
                "uploads": CONCURRENCY,
                "statuses": statuses,
                "instance_survived": alive,
                "baseline_mib": before,
                "worker_peak_mib": worker_hwm,
                "sampled_peak_mib": peak_rss.peak,
                "master_peak_mib": master_hwm,
                "peak_mib": worker_hwm + master_hwm,
                "seconds": seconds,
                "p50_s": statistics.median(latencies),
                "max_s": latencies[-1],
                "worker_cpu_s": cpu,
            }
            procstat.log(
                NAME,
                f"{step['code']}, {row['update_mib']:.0f} MiB: peak {row['peak_mib']:.0f} MiB "
                f"(worker {worker_hwm:.0f}, master {master_hwm:.0f}, worker before "
                f"{before:.0f}), {seconds:.0f} s, statuses {statuses}",
            )
            runs.append(row)
    return {"runs": runs}


class _PeakRss:
    """VmRSS of a process sampled every 10 ms (VmHWM is the figure; this shows it is the
    burst's, not the start's)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, procstat.status_mib("VmRSS", self.pid) or 0.0)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _post(url: str, job: str, body: bytes, token: str) -> tuple[int, float]:
    """One upload with http.client (it sends the shared bytes as they are); (status, seconds)."""
    target = urlparse(url)
    began = time.perf_counter()
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    try:
        conn.request(
            "POST",
            f"/v1/jobs/{job}/rounds/1/updates",
            body=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        answer = conn.getresponse()
        answer.read()
        return answer.status, time.perf_counter() - began
    except OSError:
        return 0, time.perf_counter() - began  # connection reset: the instance died
    finally:
        conn.close()


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"ingest instance peak RSS < {LIMIT_MIB} MiB (its memory limit), "
            f"{r['uploads']} concurrent uploads of {r['update_mib']:.0f} MiB",
            "measured": f"{r['peak_mib']:.0f} MiB (statuses {r['statuses']})",
            "met": r["peak_mib"] < LIMIT_MIB and r["statuses"] == {"202": r["uploads"]},
        }
        for r in result["runs"]
        if r["code"] == "this checkout"
    ]


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "## Ingest memory under full concurrency",
        "",
        f"One ingest instance (functions-framework, one gunicorn worker with THREADS="
        f"{cfg['threads']}) receives {cfg['concurrency']} uploads at once "
        "(knative/ingest.yaml's containerConcurrency), each from another client, over "
        "127.0.0.1; FileStore on local disk, Kafka for the events. Peak RSS is VmHWM of the "
        f"gunicorn master plus its worker, against the manifest's {cfg['limit_mib']} MiB limit. "
        "Uploads are spooled to a temporary file and checked and stored block by block; the "
        "baseline row, if any, is an older checkout under the same load.",
        "",
        "| code | update MiB | statuses | peak RSS MiB | worker before | worker peak "
        "| wall s | p50 s | slowest s | worker CPU s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        if not r["instance_survived"]:
            statuses += " (instance died)"
        lines.append(
            f"| {r['code']} | {r['update_mib']:.0f} | {statuses} | **{r['peak_mib']:.0f}** "
            f"| {r['baseline_mib']:.0f} | {r['worker_peak_mib']:.0f} | {r['seconds']:.0f} "
            f"| {r['p50_s']:.1f} | {r['max_s']:.1f} | {r['worker_cpu_s']:.1f} |"
        )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


if __name__ == "__main__":
    procstat.step_main(host)
