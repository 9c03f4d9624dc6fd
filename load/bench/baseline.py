"""The "before" figures: a frozen copy of a benchmark's result, shown beside the latest one.

results/{name}.json is rewritten by every run; results/before/{name}.json is written only by
`python load/bench/baseline.py NAME...` (a copy of the current result), so after a change the
target table shows the new figure next to the one measured on the code before it."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import report

__all__ = ["BEFORE", "freeze", "load"]

BEFORE = report.RESULTS / "before"


def load(
    name: str, current: dict[str, Any] | None = None, results: Path = report.RESULTS
) -> dict[str, Any] | None:
    """The frozen result of benchmark `name`; None if none was frozen, or if it is the very run
    of `current` (a result with its "machine", or just {"machine": machine})."""
    before = report.read_json(results / "before" / f"{name}.json")
    stamp = ((current or {}).get("machine") or {}).get("timestamp")
    if before is not None and stamp and before.get("machine", {}).get("timestamp") == stamp:
        return None
    return before


def freeze(name: str, results: Path = report.RESULTS) -> Path:
    """Copy results/{name}.json to results/before/{name}.json."""
    source = results / f"{name}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: run the benchmark first (run.py --only {name})")
    dest = results / "before" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="benchmarks whose latest result becomes 'before'")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: {freeze(name)}")


if __name__ == "__main__":
    main()
