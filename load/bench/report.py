"""Where benchmark results go: one JSON file per benchmark and one section per benchmark in
results/README.md, so each benchmark rewrites its own section and leaves the others alone."""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "machine", "read_json", "run_line", "write_json", "write_section"]

RESULTS = Path(__file__).resolve().parent / "results"
TITLE = (
    "# Micro-FL benchmarks\n\nWritten by `load/bench/run.py` (`make bench`); one section per "
    "benchmark; the raw numbers are in `{benchmark}.json` beside this file.\n"
)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (numpy's version without importing it: the parent
    process stays small, see worker.py)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "memory_total_mib": round(memory / 2**20),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": version("numpy"),
        "platform": platform.platform(),
    }


def run_line(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """The "Run:" footer of every benchmark section: mode and the machine() it ran on (older
    results lack some fields; those are left out)."""
    parts = ["quick (`--quick`)" if result.get("quick") else "full", machine["timestamp"]]
    parts.append(f"{machine['cpu_count']} cores")
    if machine.get("memory_total_mib"):
        parts.append(f"{machine['memory_total_mib']:,} MiB RAM")
    if machine.get("loadavg"):
        parts.append(f"load average at start {machine['loadavg'][0]}")
    if machine.get("loadavg_end"):
        parts.append(f"at the end {machine['loadavg_end'][0]}")
    for name, key in (("Python", "python"), ("numpy", "numpy")):
        if machine.get(key):
            parts.append(f"{name} {machine[key]}")
    if machine.get("platform"):
        parts.append(machine["platform"])
    return "Run: " + ", ".join(parts) + "."


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_section(path: Path, name: str, markdown: str, first: bool = False) -> None:
    """Put markdown in the file's section `name`: replaced if there; if not, appended, or put
    right after the title with first=True."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    elif first and TITLE.strip() in text:
        head = text.index(TITLE.strip()) + len(TITLE.strip())
        text = text[:head] + "\n\n" + block + "\n" + text[head:].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
