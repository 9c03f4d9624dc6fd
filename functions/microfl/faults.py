"""Hooks for fault tests, inert unless their environment variables are set.

`failpoint("finalize.after_model")` SIGKILLs the process there when MICROFL_FAILPOINTS lists that
name. Each fires once per MICROFL_FAILPOINT_DIR (a marker file remembers it across the restart),
so the retry that follows runs through. `clock()` is the functions' wall clock, which
MICROFL_CLOCK_SKEW_FILE can jump forward."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["FAILPOINTS", "clock", "failpoint"]

# Every failpoint in the code (tests/test_dataplane_faults.py checks the list against it): the
# fault tests crash at each of them.
FAILPOINTS = (
    "ingest.after_update",
    "ingest.after_slot",
    "aggregate.mid_fold",
    "aggregate.after_partial",
    "finalize.after_request",
    "finalize.after_closing",
    "finalize.after_seal",
    "finalize.mid_combine",
    "finalize.after_model",
    "finalize.after_record",
    "shards.mid_read",
    "shards.after_node",
    "shards.after_selection",
    "shards.after_model",
    "jobs.after_model",
)


def failpoint(name: str) -> None:
    wanted = os.environ.get("MICROFL_FAILPOINTS")
    if not wanted or name not in wanted.split(","):
        return
    marker = Path(os.environ.get("MICROFL_FAILPOINT_DIR", "/tmp")) / f"fired-{name}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def clock() -> float:
    """Wall-clock time, plus the skew in seconds written in MICROFL_CLOCK_SKEW_FILE if that is
    set: how a fault test jumps the functions' clocks past a deadline without restarting them."""
    path = os.environ.get("MICROFL_CLOCK_SKEW_FILE")
    if not path:
        return time.time()
    try:
        return time.time() + float(Path(path).read_text() or 0)
    except (OSError, ValueError):
        return time.time()
