"""Micro-FL benchmarks (`make bench`). Writes results/{benchmark}.json and one section per
benchmark in results/README.md, and exits 1 when a benchmark misses its target.

    python load/bench/run.py            clients 10, 100, 1000 (a few minutes, ~4 GB of temp files)
    python load/bench/run.py --quick    clients 10, 100"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import aggregate_memory
import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Micro-FL benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer clients, for a smoke run")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the temporary stores go (default: the system temp dir)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=report.RESULTS,
        help=f"results directory (default: {report.RESULTS})",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    machine = report.machine()
    result = aggregate_memory.run(quick=args.quick, workdir=args.workdir)
    report.write_json(args.out / f"{aggregate_memory.NAME}.json", {**result, "machine": machine})
    table = aggregate_memory.markdown(result, machine)
    report.write_section(args.out / "README.md", aggregate_memory.NAME, table)

    print()
    print(table)
    print(
        f"\nwrote {args.out / (aggregate_memory.NAME + '.json')} and {args.out / 'README.md'} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
