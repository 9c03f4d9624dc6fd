"""Profiles of the costs that the platform benchmarks point at, each measured as is and, where
load/bench/patched.py has a change for it, with the change, in the same run:

- ingest_profile: where one update's time goes in ingest.post_update (in process, FileStore,
  the real Kafka producer), by cProfile, for 100 KB and 4 MB updates; and the wall time per
  request without the profiler;
- ingest_http: the same update posted one at a time in process, straight to a function
  instance (gunicorn + flask + functions-framework), and through the local runtime's proxy;
- quorum_check: finalize.seal on an open round below quorum (what every update.accepted event
  costs before the seal) as the round's update count grows, vs patched.seal;
- compute_partial: one chunk of 10 updates of 1M parameters by cProfile, vs
  patched.compute_partial;
- cold_start: spawn to ready of an aggregate instance (functions-framework), and the import
  time of its modules;
- dispatcher: records/s an ordered KafkaSource delivers from a backlog to a sink that answers
  at once (the idle-wait fix measured here is now in the dispatcher; as is = patched)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import procstat

__all__ = ["NAME", "markdown", "run"]

NAME = "hotspots"
HERE = Path(__file__).resolve().parent
QUORUM_SIZES = (100, 1000, 5000)
QUICK_QUORUM_SIZES = (100, 1000)
HTTP_WARMUP = 5
PARTIAL_STEPS = {  # callee -> step, so that as is and patched line up
    "store.py:read": "read the updates",
    "patched.py:read_view": "read the updates",
    "serde.py:tensors_from_safetensors": "parse",
    "jobs.py:validate_update": "validate (NaN/Inf per update, or per chunk's sum)",
    "patched.py:validate_schema": "validate (NaN/Inf per update, or per chunk's sum)",
    "~:<built-in method builtins.all>": "validate (NaN/Inf per update, or per chunk's sum)",
    "strategy.py:fold": "fold",
    "patched.py:fold_blocked": "fold",
    "serde.py:tensors_to_safetensors": "serialise the partial",
    "patched.py:tensors_to_safetensors_1copy": "serialise the partial",
    "store.py:create": "write the partial (fsync)",
}


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    base = workdir or HERE.parent.parent / ".microfl" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-hotspots-", dir=base))
    try:
        result = procstat.run_step(Path(__file__), "host", str(tmp), "quick" if quick else "full")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": NAME, "quick": quick, **result, "within_target": True}


# --- host --------------------------------------------------------------------------------------


def host(workdir: Path, quick: bool) -> dict[str, Any]:
    import localplat

    out: dict[str, Any] = {}
    with localplat.kafka(workdir) as kafka:
        steps = [
            ("ingest_profile", lambda: ingest_profile(workdir, kafka.bootstrap, quick)),
            ("ingest_http", lambda: ingest_http(workdir, kafka, quick)),
            ("quorum_check", lambda: quorum_check(workdir, quick)),
            ("compute_partial", lambda: partial_profile(workdir, quick)),
            ("cold_start", lambda: cold_start(workdir, quick)),
            ("dispatcher", lambda: dispatcher_rate(kafka.bootstrap, quick)),
        ]
        for name, step in steps:
            procstat.log(NAME, name)
            out[name] = step()
            procstat.log(NAME, f"  {json.dumps(out[name])[:400]}")
    return out


def _job(root: Path, params: int, min_clients: int) -> tuple[Any, Any, Any]:
    import synth

    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_to_safetensors
    from microfl.store import FileStore

    store = FileStore(root)
    base = synth.model(params, 0)
    spec = JobSpec.for_model(
        synth.JOB, base, rounds=1, min_clients=min_clients, round_timeout=3600.0,
        created_at=time.time(),
    )  # fmt: skip
    create_job(store, spec, tensors_to_safetensors(base))
    return store, spec, synth.Updates(base, 4000, 1)


def _stats(profile: Any) -> dict[tuple[str, str], Any]:
    import pstats

    raw = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return {(Path(f).name, name): v for (f, _line, name), v in raw.items()}


def _cum(stats: dict[tuple[str, str], Any], file: str, name: str) -> float:
    entry = stats.get((file, name))
    return 0.0 if entry is None else float(entry[3])


def _callees(
    stats: dict[tuple[str, str], Any], parents: set[tuple[str, str]], top: int = 9
) -> dict[str, float]:
    """Cumulative seconds of each function called directly by one of parents (file, name), as
    "file:function"; the `top` largest, the rest summed as "(other calls)"."""
    out: dict[str, float] = {}
    for (file, name), entry in stats.items():
        if (file, name) in parents:
            continue
        for (caller_file, _line, caller), value in entry[4].items():
            if (Path(caller_file).name, caller) in parents:
                label = f"{file}:{name}"
                out[label] = out.get(label, 0.0) + float(value[3])
    ranked = sorted(out.items(), key=lambda kv: -kv[1])
    kept = dict(ranked[:top])
    if ranked[top:]:
        kept["(other calls)"] = sum(v for _, v in ranked[top:])
    return kept


def ingest_profile(workdir: Path, bootstrap: str, quick: bool) -> dict[str, Any]:
    import cProfile
    import io

    from microfl import ingest
    from microfl.backends import Backends
    from microfl.bus import KafkaBus
    from microfl.local.kafka import ensure_topics
    from microfl.tokens import issue_token

    ensure_topics(bootstrap)
    secret = b"bench-secret-0123456789-0123456789"
    out = {}
    for label, params, count in (
        ("100 KB", 25_000, 40 if quick else 300),
        ("4 MB", 1_000_000, 10 if quick else 60),
    ):
        root = workdir / f"ingest-{params}"
        store, spec, updates = _job(root, params, 10**6)
        b = Backends(store, KafkaBus(bootstrap), secret)
        bodies = [updates.body(i) for i in range(2 * count + 1)]
        tokens = [issue_token(secret, spec.job, updates.client(i)) for i in range(len(bodies))]

        def post(
            i: int,
            bodies: list[bytes] = bodies,
            b: Any = b,
            tokens: Any = tokens,
            job: str = spec.job,
        ) -> None:
            body = bodies[i]
            status, _ = ingest.post_update(b, job, 1, tokens[i], io.BytesIO(body).read, len(body))
            assert status == 202

        post(2 * count)  # the producer connects
        start = time.perf_counter()
        for i in range(count):
            post(i)
        wall = (time.perf_counter() - start) / count
        profile = cProfile.Profile()
        profile.enable()
        for i in range(count, 2 * count):
            post(i)
        profile.disable()
        st = _stats(profile)
        total = _cum(st, "ingest.py", "post_update")
        parts = _callees(st, {("ingest.py", "post_update")})
        parts["post_update itself"] = total - sum(parts.values())
        out[label] = {
            "requests": count,
            "wall_ms_per_request": wall * 1e3,
            "profiled_ms_per_request": total / count * 1e3,
            "parts_ms": {k: v / count * 1e3 for k, v in parts.items()},
        }
        shutil.rmtree(root, ignore_errors=True)
    return out


def ingest_http(workdir: Path, kafka: Any, quick: bool) -> dict[str, Any]:
    import secrets as pysecrets

    import localplat
    import requests

    from microfl.local.runtime import LocalRuntime
    from microfl.tokens import issue_token

    count = 20 if quick else 200
    root = workdir / "ingest-http"
    store, spec, updates = _job(root, 25_000, 10**6)
    secret = pysecrets.token_urlsafe(24)
    manifests = {
        variant: localplat.edit_manifests(
            workdir / f"knative-http-{i}",
            {"ingest": {"min-scale": "1", "max-scale": "1"}},
            group=f"http-{i}-{pysecrets.token_hex(3)}",
        )
        for i, variant in enumerate(("as is", "patched"))
    }
    out: dict[str, Any] = {"update_bytes": len(updates.body(0)), "requests": count}
    session = requests.Session()
    offset = 0

    def series(url: str, first: int) -> dict[str, float]:
        times = []
        for i in range(first, first + count + HTTP_WARMUP):
            token = issue_token(secret.encode(), spec.job, updates.client(i))
            body = updates.body(i)
            start = time.perf_counter()
            resp = session.post(
                f"{url}/v1/jobs/{spec.job}/rounds/1/updates",
                data=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            times.append(time.perf_counter() - start)
            assert resp.status_code == 202, resp.text
        times = sorted(times[HTTP_WARMUP:])
        return {
            "p50_ms": times[len(times) // 2] * 1e3,
            "p95_ms": times[int(len(times) * 0.95)] * 1e3,
            "mean_ms": sum(times) / len(times) * 1e3,
        }

    try:
        for variant in ("as is", "patched"):
            with localplat.patches(variant == "patched"):
                runtime = LocalRuntime(
                    store.url,
                    kafka.bootstrap,
                    secret,
                    workdir / f"rt-http-{variant.replace(' ', '-')}",
                    manifests=manifests[variant],
                ).start()
            try:
                port = next(p["port"] for p in runtime.processes() if p["role"] == "ingest")
                if variant == "as is":
                    out["direct to the instance"] = series(f"http://127.0.0.1:{port}", offset)
                    offset += count + HTTP_WARMUP
                out[f"through the runtime proxy ({variant})"] = series(runtime.ingest_url, offset)
                offset += count + HTTP_WARMUP
            finally:
                runtime.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def quorum_check(workdir: Path, quick: bool) -> dict[str, Any]:
    import patched
    import synth

    from microfl import finalize
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import update_key, updates_prefix

    out = {}
    for n in QUICK_QUORUM_SIZES if quick else QUORUM_SIZES:
        root = workdir / f"quorum-{n}"
        store, spec, _ = _job(root, 25_000, n + 1)
        folder = root / update_key(synth.JOB, 1, "x").rsplit("/", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):  # the quorum check never reads them: small files do
            (folder / f"client-{i:06d}").write_bytes(b"x" * 64)
        b = Backends(store, MemoryBus())
        reps = max(5, min(200, 20_000 // n))
        row: dict[str, Any] = {"updates": n}
        for label, fn in (
            ("seal_ms", partial(finalize.seal, b, spec, 1, trigger="bench")),
            ("patched_seal_ms", partial(patched.seal, b, spec, 1, trigger="bench")),
            ("list_ms", partial(store.list, updates_prefix(synth.JOB, 1))),
            ("count_ms", partial(patched.count_updates, store, synth.JOB, 1)),
        ):
            assert fn() in (None, n) or label == "list_ms"
            best = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(reps):
                    fn()
                best.append((time.perf_counter() - start) / reps)
            row[label] = min(best) * 1e3
        row["round_s_if_behind"] = row["seal_ms"] * n / 1e3
        row["patched_round_s_if_behind"] = row["patched_seal_ms"] * n / 1e3
        out[str(n)] = row
        shutil.rmtree(root, ignore_errors=True)
    return out


def partial_profile(workdir: Path, quick: bool) -> dict[str, Any]:
    import cProfile

    import patched
    import synth

    from microfl.aggregate import compute_partial
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import partial_key

    root = workdir / "partial"
    store, _, _ = synth.write_round(root, 1_000_000, 10, 10)
    b = Backends(store, MemoryBus())
    reps = 2 if quick else 8
    key = partial_key(synth.JOB, synth.ROUND, 0)
    out = {}
    for label, fn in (("as is", compute_partial), ("patched", patched.compute_partial)):
        profile = cProfile.Profile()
        walls = []
        for _ in range(reps):
            store.delete(key)
            start = time.perf_counter()
            profile.enable()
            fn(b, synth.JOB, synth.ROUND, 0)
            profile.disable()
            walls.append(time.perf_counter() - start)
        st = _stats(profile)
        where = "aggregate.py" if label == "as is" else "patched.py"
        parents = {(where, "compute_partial"), (where, "_partial_bytes"), (where, "partial_bytes")}
        total = _cum(st, where, "compute_partial")
        parts = {}
        for name, value in _callees(st, parents, top=20).items():
            step = PARTIAL_STEPS.get(name, name)
            parts[step] = parts.get(step, 0.0) + value
        parts["compute_partial itself"] = total - sum(parts.values())
        out[label] = {
            "wall_ms": min(walls) * 1e3,
            "profiled_ms": total / reps * 1e3,
            "parts_ms": {k: v / reps * 1e3 for k, v in parts.items()},
        }
    shutil.rmtree(root, ignore_errors=True)
    return out


def cold_start(workdir: Path, quick: bool) -> dict[str, Any]:
    import subprocess
    import sys

    from microfl.local.instance import FunctionProcess

    env = {"MICROFL_STORE": f"file://{workdir / 'cold'}", "MICROFL_KAFKA_BOOTSTRAP": "x:1"}
    starts = []
    for i in range(1 if quick else 3):
        fn = FunctionProcess("aggregate", env, workdir / "logs", log_name=f"cold-{i}")
        begin = time.perf_counter()
        fn.start()
        starts.append(time.perf_counter() - begin)
        fn.stop()
    code = (
        "import time; t = time.perf_counter(); import functions_framework, numpy, "
        "microfl.handlers; print(time.perf_counter() - t)"
    )
    imports = [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
        for _ in range(3)
    ]
    return {"spawn_to_ready_s": sorted(starts), "import_s": min(imports)}


def dispatcher_rate(bootstrap: str, quick: bool) -> dict[str, Any]:
    import threading
    import uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import localplat
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from microfl.local.dispatcher import Delivery, Dispatcher, KafkaSource
    from microfl.serde import Event, event_to_kafka

    count = 60 if quick else 300
    topic = f"bench.dispatch.{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(count):
        record = event_to_kafka(Event("bench.v1", "/bench", f"e-{i}", {"i": i}), key="job")
        producer.produce(topic, value=record.value, key=record.key, headers=list(record.headers))
    producer.flush(30)
    stamps: list[float] = []
    lock = threading.Lock()

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                stamps.append(time.perf_counter())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    out = {"records": count}
    try:
        for label in ("as is", "patched"):
            stamps.clear()
            source = KafkaSource(
                bootstrap, [topic], f"bench-{label.replace(' ', '-')}-{uuid.uuid4().hex[:6]}",
                url, Delivery(), ordering="ordered",
            )  # fmt: skip
            with localplat.patches(label == "patched"):
                dispatcher = Dispatcher(source).start()
                deadline = time.monotonic() + 120
                while len(stamps) < count and time.monotonic() < deadline:
                    time.sleep(0.05)
                dispatcher.stop()
            span = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
            out[label] = {
                "delivered": len(stamps),
                "records_per_s": (len(stamps) - 1) / span if span else float("nan"),
                "ms_per_record": span / max(1, len(stamps) - 1) * 1e3,
            }
    finally:
        server.shutdown()
    return out


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = ["## Hotspots (profiles)", ""]
    ing = result["ingest_profile"]
    lines += [
        "**ingest.post_update in process** (FileStore, real Kafka producer; cProfile, ms per "
        "update by direct callee of post_update; wall = without the profiler):",
        "",
        "| step | " + " | ".join(ing) + " |",
        "| --- |" + " ---: |" * len(ing),
    ]
    for step in _rows(*(v["parts_ms"] for v in ing.values())):
        lines.append(
            f"| {step} | "
            + " | ".join(f"{v['parts_ms'].get(step, 0.0):.2f}" for v in ing.values())
            + " |"
        )
    lines.append(
        "| **total (profiled)** | "
        + " | ".join(f"**{v['profiled_ms_per_request']:.2f}**" for v in ing.values())
        + " |"
    )
    lines.append(
        "| wall, no profiler | "
        + " | ".join(f"{v['wall_ms_per_request']:.2f}" for v in ing.values())
        + " |"
    )
    http = result["ingest_http"]
    lines += [
        "",
        f"**One {http['update_bytes'] / 1e3:.0f} KB update at a time over HTTP** "
        f"({http['requests']} each; in process above: "
        f"{ing.get('100 KB', {}).get('wall_ms_per_request', float('nan')):.1f} ms):",
        "",
        "| path | p50 ms | p95 ms | mean ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label in (
        "direct to the instance",
        "through the runtime proxy (as is)",
        "through the runtime proxy (patched)",
    ):
        v = http[label]
        lines.append(f"| {label} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['mean_ms']:.1f} |")
    q = result["quorum_check"]
    lines += [
        "",
        "**finalize's quorum check** (finalize.seal on an open round below quorum: what each "
        "update.accepted event costs before the seal), ms per event; *if behind* = N events "
        "each seeing all N updates (finalize lagging), seconds per round:",
        "",
        "| updates stored | seal ms | FileStore.list ms | patched seal ms | os.scandir count ms "
        "| s per round if behind | patched |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in q.values():
        lines.append(
            f"| {row['updates']:,} | {row['seal_ms']:.2f} | {row['list_ms']:.2f} "
            f"| {row['patched_seal_ms']:.2f} | {row['count_ms']:.2f} "
            f"| {row['round_s_if_behind']:.1f} | {row['patched_round_s_if_behind']:.1f} |"
        )
    cp = result["compute_partial"]
    lines += [
        "",
        "**aggregate.compute_partial**, one chunk of 10 updates x 1M parameters (cProfile, "
        "ms per chunk, by direct callee of compute_partial and _partial_bytes; patched: of "
        "patched.compute_partial and patched.partial_bytes):",
        "",
        "| step | as is | patched |",
        "| --- | ---: | ---: |",
    ]
    for step in _rows(cp["as is"]["parts_ms"], cp["patched"]["parts_ms"], floor=0.5):
        lines.append(
            f"| {step} | {cp['as is']['parts_ms'].get(step, 0.0):.1f} "
            f"| {cp['patched']['parts_ms'].get(step, 0.0):.1f} |"
        )
    lines.append(
        f"| **total (profiled)** | **{cp['as is']['profiled_ms']:.1f}** "
        f"| **{cp['patched']['profiled_ms']:.1f}** |"
    )
    lines.append(f"| wall, best | {cp['as is']['wall_ms']:.1f} | {cp['patched']['wall_ms']:.1f} |")
    cold, disp = result["cold_start"], result["dispatcher"]
    lines += [
        "",
        "**Cold start** of an aggregate instance (spawn to ready): "
        + ", ".join(f"{s:.2f}" for s in cold["spawn_to_ready_s"])
        + f" s; importing functions_framework, numpy and microfl.handlers: "
        f"{cold['import_s']:.2f} s.",
        "",
        f"**Ordered KafkaSource delivery** from a backlog of {disp['records']} records to a "
        f"sink that answers at once: as is {disp['as is']['records_per_s']:.1f} records/s "
        f"({disp['as is']['ms_per_record']:.0f} ms each), patched "
        f"{disp['patched']['records_per_s']:.1f} records/s "
        f"({disp['patched']['ms_per_record']:.1f} ms each).",
    ]
    mode = "quick (`--quick`)" if result["quick"] else "full"
    lines += [
        "",
        f"Run: {mode}, {machine['timestamp']}, {machine['cpu_count']} cores, "
        f"{machine['memory_total_mib']:,} MiB RAM, load average at start "
        f"{machine.get('loadavg', ['?'])[0]}.",
    ]
    return "\n".join(lines)


def _rows(*parts: dict[str, float], floor: float = 0.1) -> list[str]:
    """Row labels of several columns, largest first, the catch-all rows last; rows under
    floor ms in every column are added into "(other calls)" (in place)."""
    labels: dict[str, float] = {}
    for column in parts:
        for label, value in column.items():
            labels[label] = max(labels.get(label, 0.0), value)
    small = [k for k, v in labels.items() if v < floor and not k.endswith(" itself")]
    for column in parts:
        moved = sum(column.pop(k, 0.0) for k in small if k != "(other calls)")
        if moved or "(other calls)" in column:
            column["(other calls)"] = column.get("(other calls)", 0.0) + moved
    if small:
        labels = {k: v for k, v in labels.items() if k not in small}
        labels["(other calls)"] = 0.0
    last = [k for k in labels if k.startswith("(") or k.endswith(" itself")]
    return sorted((k for k in labels if k not in last), key=lambda k: -labels[k]) + last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["host"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("mode", choices=["quick", "full"])
    args = parser.parse_args(argv)
    procstat.emit(host(args.workdir, args.mode == "quick"))


if __name__ == "__main__":
    main()
