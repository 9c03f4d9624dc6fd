"""Store operations and events per update of a whole round, in process, from 100 to 10,000
clients: what a round costs in object-store calls, keys listed and events, whatever the model.

Each N runs in a fresh child process through the service entry points only, so that it measures
whatever protocol the services implement: ingest.post_update for every client (a tiny model: the
cost is in the operations, not the bytes), and every event the services publish delivered to
the function its topic feeds (ROUTES: aggregate.handle, finalize.handle), first published first
delivered, after each upload, until the bus is quiet, as the in-process tests' Platform does.
If the round is not committed once the last events are delivered, the scheduled sweep is pinged
(the clock moved past finalize.RESEND_AFTER), up to MAX_PINGS times; the pings are reported.

The store is a FileStore whose class is wrapped so that every public method call is counted
(outermost calls only: ObjectStore.exists calling read counts once), with the keys returned by
list-like calls (list, children, or any method returning a list), per function. The bus is a
MemoryBus that counts what is published, per event type. The job's quorum is N, so the round
seals on the last update; the committed model is checked against a float64 FedAvg."""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import procstat

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "round_cost"
CLIENTS = (100, 1000, 10_000)
QUICK_CLIENTS = (50, 500)
FAN_IN = 10
TARGET_FLAT = 1.2  # per-update figure at the largest N over the smallest
TIME_LIMIT = 900.0  # seconds of uploads per N; past it the round is left unfinished, and said so
QUICK_TIME_LIMIT = 120.0
MAX_PINGS = 3
T0 = 1_767_225_600.0
JOB = "cost"
# topic -> the service function it feeds. The protocol's new topics go here (and nowhere else).
ROUTES = {"microfl.aggregate": "aggregate", "microfl.finalize": "finalize"}
OBSERVED = {"microfl.rounds"}  # published for observers: counted, delivered to no function
PAGE = 1000  # keys per list response of GCS: a listing of k keys is ceil(k / PAGE) requests
FLAT = ("store_ops", "store_requests", "keys_listed", "events")  # the target's figures


def run(
    quick: bool = False, workdir: Path | None = None, clients: tuple[int, ...] | None = None
) -> dict[str, Any]:
    sizes = clients or (QUICK_CLIENTS if quick else CLIENTS)
    limit = QUICK_TIME_LIMIT if quick else TIME_LIMIT
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"microfl-cost-{n}-", dir=workdir))
        try:
            procstat.log(NAME, f"N={n:,}: one round in process")
            row = procstat.run_step(
                Path(__file__), "child", str(tmp), str(n), str(limit), timeout=limit * 3 + 600
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        per = row["per_update"]
        procstat.log(
            NAME,
            f"N={n:,}: {'committed' if row['committed'] else 'NOT FINISHED'} in "
            f"{row['seconds']:.1f} s; per update {per['store_ops']:.1f} store ops, "
            f"{per['list_calls']:.2f} lists, {per['keys_listed']:.1f} keys listed, "
            f"{per['events']:.2f} events",
        )
        rows.append(row)
    done = [r for r in rows if r["committed"]]
    ratio = {}
    if len(done) >= 2:
        first, last = done[0]["per_update"], done[-1]["per_update"]
        ratio = {k: last[k] / first[k] if first[k] else None for k in first}
    complete = len(done) == len(rows)
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "clients": list(sizes),
            "fan_in": FAN_IN,
            "model": "2 float32 tensors, 20 parameters",
            "store": "FileStore (counted)",
            "bus": "MemoryBus (counted), delivered in order after each upload",
            "time_limit_s": limit,
        },
        "runs": rows,
        "ratio": ratio,
        "target_flat": TARGET_FLAT,
        "within_target": complete
        and bool(ratio)
        and all((ratio.get(k) or 0) <= TARGET_FLAT for k in FLAT),
    }


# --- the child process -------------------------------------------------------------------------


class Counts:
    """Calls per (function, method), keys returned by list-like calls, events per type."""

    def __init__(self) -> None:
        self.role = "setup"
        self.calls: Counter[tuple[str, str]] = Counter()
        self.keys: Counter[tuple[str, str]] = Counter()
        self.pages: Counter[tuple[str, str]] = Counter()
        self.published: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.depth = 0

    def reset(self) -> None:
        self.calls.clear()
        self.keys.clear()
        self.pages.clear()
        self.published.clear()
        self.delivered.clear()


def counting_store(cls: type, counts: Counts) -> type:
    """A subclass of store class cls whose public methods are counted in counts (outermost
    calls only), so that the services see the same class, fast paths included."""

    def wrap(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            outer = counts.depth == 0
            counts.depth += 1
            try:
                result = method(self, *args, **kwargs)
            finally:
                counts.depth -= 1
            if outer:
                counts.calls[counts.role, name] += 1
                if isinstance(result, list):
                    counts.keys[counts.role, name] += len(result)
                    counts.pages[counts.role, name] += max(1, -(-len(result) // PAGE))
            return result

        return counted

    namespace = {
        name: wrap(name, member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }
    return type(f"Counting{cls.__name__}", (cls,), namespace)


def child(root: Path, n: int, limit: float) -> dict[str, Any]:
    import numpy as np

    from microfl import aggregate, events, finalize, ingest
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import JobSpec, create_job, model_key
    from microfl.rounds import record_key
    from microfl.serde import Event, json_from_bytes, tensors_from_safetensors
    from microfl.serde import tensors_to_safetensors as to_st
    from microfl.store import FileStore
    from microfl.tokens import issue_token

    handlers = {"aggregate": aggregate.handle, "finalize": finalize.handle}
    counts = Counts()
    store = counting_store(FileStore, counts)(root / "store")
    clock_now = [T0 + 1]
    bus = MemoryBus()
    b = Backends(store, bus, b"round-cost-bench-secret-0123456789abcdef", lambda: clock_now[0])
    rng = np.random.default_rng(0)
    base = {"b": np.zeros(4, np.float32), "w": rng.standard_normal((4, 4), dtype=np.float32)}
    spec = JobSpec.for_model(
        JOB, base, rounds=1, min_clients=n, fan_in=FAN_IN, round_timeout=10**6, created_at=T0
    )
    create_job(store, spec, to_st(base))
    pool = [
        {k: v + rng.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()}
        for _ in range(16)
    ]
    weights = [int(w) for w in rng.integers(1, 500, size=n)]
    counts.reset()
    queue: list[tuple[str, Event]] = []
    cpu: Counter[str] = Counter()

    def take() -> None:
        for topic, event, _key in bus.events:
            counts.published[event.type] += 1
            if topic not in OBSERVED:
                if topic not in ROUTES:
                    raise RuntimeError(f"no route for topic {topic!r} ({event.type}): add it")
                queue.append((topic, event))
        bus.events.clear()

    def call(role: str, fn: Any, *args: Any) -> Any:
        counts.role = role
        start = time.process_time()
        try:
            return fn(*args)
        finally:
            cpu[role] += time.process_time() - start
            counts.role = "harness"

    def drain() -> None:
        take()
        while queue:
            topic, event = queue.pop(0)
            counts.delivered[event.type] += 1
            call(ROUTES[topic], handlers[ROUTES[topic]], b, event)
            take()

    started = time.perf_counter()
    posted = 0
    statuses: Counter[int] = Counter()
    for i in range(n):
        if time.perf_counter() - started > limit:
            break
        client = f"client-{i:06d}"
        body = to_st(pool[i % len(pool)], {"num_examples": str(weights[i])})
        token = issue_token(b.secret, JOB, client, now=clock_now[0])
        status, _ = call(
            "ingest", ingest.post_update, b, JOB, 1, token, io.BytesIO(body).read, len(body)
        )
        statuses[status] += 1
        posted += 1
        drain()
    pings = 0
    committed = posted == n and store.exists(record_key(JOB, 1))
    while posted == n and not committed and pings < MAX_PINGS:
        clock_now[0] += finalize.RESEND_AFTER + 1
        pings += 1
        call("finalize", finalize.handle, b, Event(events.PING, "/bench/ping", f"p{pings}"))
        drain()
        committed = store.exists(record_key(JOB, 1))
    seconds = time.perf_counter() - started
    counts.role = "harness"
    error = None
    included = 0
    if committed:
        record = json_from_bytes(store.read(record_key(JOB, 1)) or b"{}")
        included = len(record.get("included", []))
        model, _ = tensors_from_safetensors(store.read(model_key(JOB, 1)) or b"")
        w = np.zeros(len(pool))
        for i, x in enumerate(weights):
            w[i % len(pool)] += x
        exact = {
            k: sum(wi * p[k].astype(np.float64) for wi, p in zip(w, pool, strict=True)) / w.sum()
            for k in base
        }
        error = max(float(np.abs(model[k] - exact[k]).max() / np.abs(exact[k]).max()) for k in base)
        if included != n or error > 1e-6:
            raise RuntimeError(f"N={n}: the round included {included} updates, error {error}")
    for tally in (
        counts.calls,
        counts.keys,
        counts.pages,
    ):  # the harness's own checks are not the round's
        for key in [k for k in tally if k[0] == "harness"]:
            del tally[key]
    calls = {f"{role}.{op}": c for (role, op), c in sorted(counts.calls.items())}
    keys = {f"{role}.{op}": c for (role, op), c in sorted(counts.keys.items())}
    total_calls = sum(counts.calls.values())
    lists = sum(c for k, c in counts.calls.items() if k in counts.keys)  # list-like calls
    per_role: dict[str, dict[str, float]] = defaultdict(dict)
    for (role, _op), c in counts.calls.items():
        per_role[role]["store_ops"] = per_role[role].get("store_ops", 0) + c / max(posted, 1)
    for (role, _op), c in counts.keys.items():
        per_role[role]["keys_listed"] = per_role[role].get("keys_listed", 0) + c / max(posted, 1)
    events = sum(counts.published.values())
    denominator = max(posted, 1)
    return {
        "clients": n,
        "posted": posted,
        "statuses": {str(k): v for k, v in statuses.items()},
        "committed": committed,
        "included": included,
        "max_relative_error": error,
        "pings": pings,
        "seconds": seconds,
        "cpu_s": dict(cpu),
        "store_calls": calls,
        "keys_listed": keys,
        "events_published": dict(counts.published),
        "events_delivered": dict(counts.delivered),
        "per_update": {
            "store_ops": total_calls / denominator,
            "store_requests": (total_calls - lists + sum(counts.pages.values())) / denominator,
            "list_calls": lists / denominator,
            "keys_listed": sum(counts.keys.values()) / denominator,
            "events": events / denominator,
            "deliveries": sum(counts.delivered.values()) / denominator,
        },
        "per_role": dict(per_role),
        "vm_hwm_mib": procstat.status_mib("VmHWM"),
    }


# --- report ------------------------------------------------------------------------------------

LABELS = {
    "store_ops": "store operations",
    "store_requests": f"store requests (a list = one per {PAGE:,} keys, as on GCS)",
    "list_calls": "list calls",
    "keys_listed": "keys listed",
    "events": "events published",
}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    import baseline

    done = [r for r in result["runs"] if r["committed"]]
    before = baseline.load(NAME, result)
    out = []
    if len(done) < 2:
        return [
            {
                "target": f"store operations and events per update flat in N (<= "
                f"{TARGET_FLAT}x), {result['config']['clients'][0]:,} to "
                f"{result['config']['clients'][-1]:,} clients",
                "measured": "not measured: fewer than two sizes committed",
                "met": False,
            }
        ]
    lo, hi = done[0], done[-1]
    unfinished = [r["clients"] for r in result["runs"] if not r["committed"]]
    for key in FLAT:
        ratio = result["ratio"][key]
        measured = (
            f"{ratio:.2f}x ({lo['per_update'][key]:.1f} -> {hi['per_update'][key]:.1f} per update)"
            if ratio is not None
            else f"0 -> {hi['per_update'][key]:.1f} per update"
        )
        if before and before["ratio"].get(key) is not None:
            b_done = [r for r in before["runs"] if r["committed"]]
            measured += (
                f"; before: {before['ratio'][key]:.2f}x at {b_done[0]['clients']:,} to "
                f"{b_done[-1]['clients']:,}"
            )
        if unfinished:
            measured += f"; {', '.join(f'{u:,}' for u in unfinished)} clients did not finish"
        out.append(
            {
                "target": f"{LABELS[key]} per update flat in N (<= {TARGET_FLAT}x, "
                f"{lo['clients']:,} to {hi['clients']:,} clients)",
                "measured": measured,
                "met": not unfinished and ratio is not None and ratio <= TARGET_FLAT,
            }
        )
    return out


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    import baseline

    cfg = result["config"]
    lines = [
        "## Store operations and events per update",
        "",
        "One round in process per N through the service entry points (ingest.post_update, "
        "aggregate.handle, finalize.handle), a counted FileStore and a counted MemoryBus "
        f"delivered in order after each upload; {cfg['model']}, fan-in {cfg['fan_in']}, "
        "quorum N. *Store operations* are calls of the store's public methods (outermost "
        "only), *store requests* count a list as one request per "
        f"{PAGE:,} keys it returns (GCS's page), *keys listed* the keys returned by list-like "
        "calls; all per accepted update.",
        "",
        "| clients | committed | wall s | store ops | store requests | list calls | keys listed "
        "| events | deliveries | pings | ingest ops | aggregate ops | finalize ops | CPU s i/a/f |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- |",
    ]
    for r in result["runs"]:
        p, roles, cpu = r["per_update"], r["per_role"], r["cpu_s"]
        state = "yes" if r["committed"] else f"no ({r['posted']:,} posted in the time limit)"
        ops = [f"{roles.get(role, {}).get('store_ops', 0):.1f}" for role in ROLE_ORDER]
        lines.append(
            f"| {r['clients']:,} | {state} | {r['seconds']:.1f} | {p['store_ops']:.1f} "
            f"| {p.get('store_requests', 0):.1f} | {p['list_calls']:.2f} "
            f"| {p['keys_listed']:.1f} | {p['events']:.2f} "
            f"| {p['deliveries']:.2f} | {r['pings']} | {' | '.join(ops)} "
            f"| {'/'.join(f'{cpu.get(role, 0):.1f}' for role in ROLE_ORDER)} |"
        )
    lines += ["", f"Largest N over smallest N, per update (target <= {TARGET_FLAT}x):", ""]
    before = baseline.load(NAME, {"machine": machine})
    for key, label in LABELS.items():
        ratio = result["ratio"].get(key)
        text = "-" if ratio is None else f"{ratio:.2f}x"
        if before and before.get("ratio", {}).get(key) is not None:
            text += f" (before: {before['ratio'][key]:.2f}x)"
        lines.append(f"- {label}: {text}")
    last = result["runs"][-1]
    busiest = sorted(last["store_calls"].items(), key=lambda kv: -kv[1])[:6]
    lines += [
        "",
        f"At {last['clients']:,} clients, the most frequent calls (function.method: calls): "
        + ", ".join(f"{k} {v:,}" for k, v in busiest)
        + "; keys listed: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(last["keys_listed"].items()))
        + ".",
    ]
    mode = "quick (`--quick`)" if result["quick"] else "full"
    lines += [
        "",
        f"Run: {mode}, {machine['timestamp']}, {machine['cpu_count']} cores, "
        f"{machine['memory_total_mib']:,} MiB RAM, load average at start "
        f"{machine.get('loadavg', ['?'])[0]}.",
    ]
    return "\n".join(lines)


ROLE_ORDER = ("ingest", "aggregate", "finalize")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["child"])
    parser.add_argument("root", type=Path)
    parser.add_argument("clients", type=int)
    parser.add_argument("limit", type=float)
    args = parser.parse_args(argv)
    procstat.emit(child(args.root, args.clients, args.limit))


if __name__ == "__main__":
    main()
