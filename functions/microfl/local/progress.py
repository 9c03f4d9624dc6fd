"""Progress of long CLI work (demo rounds, chaos scenarios, the comparison runs): a rich bar that
redraws in place on a terminal, and plain one-line messages elsewhere (CI logs, pipes, tests),
where a redrawn line would only be noise.

Bars nest: a bar opened while another is shown becomes a second row of the same display (rich
allows one live display at a time), so `microfl robustness` shows its runs and, under them, the
demo rounds of the run in progress. Lines printed while a bar is shown appear above it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["Bar", "bar", "interactive"]

# The live display while at least one bar is open, and how many are.
_live: list[Progress] = []


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether stream (default stdout) is a terminal that can redraw a line."""
    return Console(file=stream or sys.stdout).is_interactive


class Bar:
    """One piece of long work: `total` steps of `unit`, with a short status (the current
    accuracy, the scenario running). On a terminal every call redraws the bar; elsewhere only
    `advance` prints, one line per step, and `status` is shown with the next step."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        stream: IO[str],
        progress: Progress | None,
    ) -> None:
        self.what, self.total, self.unit, self.stream = what, total, unit, stream
        self.done = 0
        self.text = ""
        self._progress = progress
        self._task: TaskID | None = None
        if progress is not None:
            self._task = progress.add_task(what, total=total, status="", unit=unit)

    def status(self, text: str) -> None:
        """Show text beside the bar (a terminal only: a log gets it with the next step)."""
        self.text = text
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=text, refresh=True)

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        """steps more are done; on a plain stream, one line saying so."""
        self.done += steps
        if status is not None:
            self.text = status
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=steps, status=self.text, refresh=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The plain progress line: `what: done/total unit (status)`."""
        status = f" ({self.text})" if self.text else ""
        return f"{self.what}: {self.done}/{self.total} {self.unit}{status}"


@contextmanager
def bar(what: str, total: int, unit: str, stream: IO[str] | None = None) -> Iterator[Bar]:
    """A Bar for the duration of the block, drawn on stream (default stdout) if it is a
    terminal; opened inside another bar's block, a row under it."""
    stream = stream or sys.stdout
    if not _live and not interactive(stream):
        yield Bar(what, total, unit, stream, None)
        return
    outer = not _live
    if outer:
        _live.append(
            Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=stream),
            )
        )
        _live[0].start()
    progress = _live[0]
    b = Bar(what, total, unit, stream, progress)
    try:
        yield b
    finally:
        assert b._task is not None
        if outer:
            progress.stop()
            _live.clear()
        else:
            progress.remove_task(b._task)
