"""`microfl status`'s view of each running job: how far its open round (an async job: the buffer
filling towards its next version) is from sealing, by updates towards the quorum (the buffer's
K) and by time towards the deadline, read from the platform's store as the functions read it."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from microfl.jobs import JobSpec, load_job
from microfl.rounds import Rounds
from microfl.store import ObjectStore

__all__ = ["add_progress", "print_progress", "round_progress"]


def round_progress(store: ObjectStore, spec: JobSpec, now: float) -> dict[str, Any] | None:
    """The open round's figures, None once the job has made all its rounds. Sync: `updates`
    stored towards `target` = min_clients (finalize compares the same listing with the quorum).
    Async: places taken in buffer `round` (the one making version `round`) towards K. The
    deadline is round_timeout after the previous commit (job creation for round 1); `opened_at`
    is None for the moment between a model and its record, when no deadline runs yet."""
    rounds = Rounds(store, spec)
    latest = rounds.latest_version()
    if latest >= spec.rounds:
        return None
    r = latest + 1
    if spec.is_async:
        updates, target = min(rounds.slot_count(r), spec.buffer), spec.buffer
    else:
        updates, target = len(rounds.update_clients(r)), spec.min_clients
    if rounds.seal(r) is not None:
        state = "sealed"  # being aggregated and committed
    elif rounds.is_closing(r):
        state = "sealing"
    else:
        state = "open"
    opened = rounds.opened_at(r)
    deadline = None if opened is None else opened + spec.round_timeout
    return {
        "round": r,
        "updates": updates,
        "target": target,
        "target_is": "buffer" if spec.is_async else "quorum",
        "state": state,
        "opened_at": opened,
        "deadline_at": deadline,
        "seconds_left": None if deadline is None else round(max(0.0, deadline - now), 1),
    }


def add_progress(store: ObjectStore, jobs: list[dict[str, Any]], now: float | None = None) -> None:
    """Give each readable job of `microfl status` a `progress` entry (round_progress)."""
    now = time.time() if now is None else now
    for job in jobs:
        if "error" not in job:
            job["progress"] = round_progress(store, load_job(store, job["job"]), now)


def _when(p: dict[str, Any]) -> str:
    if p["deadline_at"] is None:
        return "deadline starts at the previous round's commit"
    if p["seconds_left"] > 0:
        return f"{p['seconds_left']:.0f} s to the deadline"
    if p["updates"] == 0:
        return "deadline passed; seals with its first update"
    return "deadline passed; seals at the next sweep"


def print_progress(jobs: list[dict[str, Any]], console: Console | None = None) -> None:
    """One bar per running job: updates towards the quorum (or K), and the time left."""
    running = [j for j in jobs if j.get("progress")]
    if not running:
        return
    table = Table.grid(padding=(0, 1))
    for _ in range(4):
        table.add_column()
    for j in running:
        p = j["progress"]
        unit = "version" if p["target_is"] == "buffer" else "round"
        table.add_row(
            Text(f"  {j['job']}"),
            Text(f"{unit} {p['round']}"),
            ProgressBar(total=p["target"], completed=min(p["updates"], p["target"]), width=24),
            Text(
                f"{p['updates']}/{p['target']} updates ({p['target_is']})"
                + ("" if p["state"] == "open" else f", {p['state']}")
                + f"; {_when(p)}"
            ),
        )
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log or a pipe: no width to fit, so none to wrap at
            console = Console(width=200)
    console.print(Group(Text("open rounds:"), table))
