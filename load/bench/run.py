"""Micro-FL benchmarks (`make bench`). Each benchmark writes results/{name}.json and its own
section of results/README.md; a summary section lists every target against the latest results
of each benchmark. Targets are reported, not asserted: the exit status is 0 unless a benchmark
fails to run (or, with --strict, misses a target).

    python load/bench/run.py                 everything (about 30 minutes on 2 cores)
    python load/bench/run.py --quick         a short smoke run of everything (a few minutes)
    python load/bench/run.py --only NAME     one benchmark (repeat --only, or NAME,NAME)
    python load/bench/run.py --report-only   README.md again from the JSON files

Benchmarks: fold_throughput, flower_compare, aggregate_memory, round_latency,
ingest_throughput, transport_compare, header_parse, ingest_memory (with
MICROFL_BENCH_BASELINE=DIR also against the checkout in DIR), round_cost, robust_compare,
async_latency.
flower_compare and robust_compare need flwr (pip install -e '.[bench]', or a folder of it named
by MICROFL_BENCH_DEPS); without it they are skipped with a note.
transport_compare runs the Pub/Sub emulator, which Go builds on first use. The platform
benchmarks put their stores under .microfl/bench/ (the updates of 5,000 clients are 20 GB;
each round's are deleted after it)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import report

BENCHMARKS = (
    "fold_throughput",
    "flower_compare",
    "aggregate_memory",
    "round_latency",
    "ingest_throughput",
    "transport_compare",
    "header_parse",
    "ingest_memory",
    "round_cost",
    "robust_compare",
    "async_latency",
)
# They need a Kafka broker.
PLATFORM = {
    "round_latency",
    "ingest_throughput",
    "transport_compare",
    "ingest_memory",
    "async_latency",
}
# They need flwr (the bench extra, or MICROFL_BENCH_DEPS).
FLOWER = {"flower_compare", "robust_compare"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Micro-FL benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary stores go (default: the system temp dir, and .microfl/bench "
        "for the platform benchmarks)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=report.RESULTS,
        help=f"results directory (default: {report.RESULTS})",
    )
    parser.add_argument(
        "--fan-in", type=int, default=10, help="round_latency: the job's fan-in (default 10)"
    )
    parser.add_argument(
        "--clients",
        default=None,
        help="round_latency: comma-separated N (at 1M params) or NxP[+f] (P may end in k or M; "
        "+f: also time Flower), e.g. 1000x1M+f,100x100k,10000x100k (the default)",
    )
    parser.add_argument(
        "--threads", type=int, default=16, help="round_latency: client threads (default 16)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite results/README.md from the JSON files there, running nothing",
    )
    args = parser.parse_args(argv)
    names = [n for item in args.only for n in item.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; pick from {BENCHMARKS}")

    start = time.perf_counter()
    missed: list[str] = []
    failed: list[str] = []
    if args.report_only:
        for name in names:
            result = report.read_json(args.out / f"{name}.json")
            if result is not None:
                table = importlib.import_module(name).markdown(result, result["machine"])
                report.write_section(args.out / "README.md", name, table)
    else:
        with _shared_kafka(args.workdir, set(names) & PLATFORM):
            _run_all(names, args, missed, failed)
    summary = _summary(args.out)
    report.write_section(args.out / "README.md", "summary", summary, first=True)
    print(summary)
    print(
        f"\nwrote {args.out}/*.json and {args.out / 'README.md'} in "
        f"{time.perf_counter() - start:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    if failed:
        return 2
    return 1 if args.strict and missed else 0


@contextmanager
def _shared_kafka(workdir: Path | None, needed: set[str]) -> Iterator[None]:
    """One Kafka broker for every platform benchmark (unless MICROFL_KAFKA_BOOTSTRAP names
    one): their host processes find it through the environment (localplat.kafka)."""
    if not needed or os.environ.get("MICROFL_KAFKA_BOOTSTRAP"):
        yield
        return
    from microfl.local.kafka import KafkaCluster  # no numpy: this process stays small

    base = Path(tempfile.mkdtemp(prefix="microfl-bench-kafka-", dir=workdir))
    cluster = KafkaCluster(base / "kafka", logdir=base / "logs").start()
    os.environ["MICROFL_KAFKA_BOOTSTRAP"] = cluster.bootstrap
    os.environ["MICROFL_BENCH_KAFKA_PID"] = str(cluster.pids()[0])
    try:
        yield
    finally:
        del os.environ["MICROFL_KAFKA_BOOTSTRAP"], os.environ["MICROFL_BENCH_KAFKA_PID"]
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _run_all(
    names: list[str], args: argparse.Namespace, missed: list[str], failed: list[str]
) -> None:
    for name in names:
        module = importlib.import_module(name)
        extra = os.environ.get("MICROFL_BENCH_DEPS")  # flwr there: see round_latency
        if extra and extra not in sys.path:
            sys.path.append(extra)
        if name in FLOWER and importlib.util.find_spec("flwr") is None:
            print(f"[{name}] skipped: flwr is not installed (pip install -e '.[bench]')")
            continue
        machine = report.machine()
        print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
        began = time.perf_counter()
        try:
            result = module.run(quick=args.quick, workdir=args.workdir, **_options(name, args))
        except Exception as exc:  # one broken benchmark must not hide the others' results
            print(f"[{name}] FAILED: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        result["wall_seconds"] = time.perf_counter() - began
        machine["loadavg_end"] = report.machine()["loadavg"]
        report.write_json(args.out / f"{name}.json", {**result, "machine": machine})
        table = module.markdown(result, machine)
        report.write_section(args.out / "README.md", name, table)
        print(f"\n{table}\n", flush=True)
        if not result.get("within_target", True):
            missed.append(name)


def _options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name != "round_latency":
        return {}
    options: dict[str, Any] = {"fan_in": args.fan_in, "threads": args.threads}
    if args.clients:
        options["clients"] = tuple(args.clients.split(","))
    return options


def _summary(out: Path) -> str:
    """Every target against the latest result of its benchmark in out/."""
    lines = [
        "## Targets",
        "",
        "From the latest result of each benchmark (its section below says when and where it "
        "ran). Targets are benchmark output, not test assertions.",
        "",
        "| target | measured | verdict | benchmark, run |",
        "| --- | --- | --- | --- |",
    ]
    for name in BENCHMARKS:
        result = report.read_json(out / f"{name}.json")
        module = importlib.import_module(name)
        if result is None or not hasattr(module, "targets"):
            continue
        m = result.get("machine", {})
        when = (
            f"{name}, {'quick' if result.get('quick') else 'full'}, "
            f"{m.get('timestamp', '?')[:16]}, {m.get('cpu_count', '?')} cores, "
            f"{m.get('memory_total_mib', 0) / 1024:.0f} GiB, load {m.get('loadavg', ['?'])[0]}"
        )
        try:
            rows = module.targets(result)
        except (KeyError, IndexError, TypeError) as exc:  # a JSON from an older layout
            lines.append(f"| {name}: cannot read its result ({exc!r}) | | | {when} |")
            continue
        for row in rows:
            verdict = "met" if row["met"] else "**missed**"
            lines.append(f"| {row['target']} | {row['measured']} | {verdict} | {when} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
