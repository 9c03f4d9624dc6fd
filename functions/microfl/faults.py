"""Named crash points for fault tests: `failpoint("finalize.after_model")` SIGKILLs the process
there when MICROFL_FAILPOINTS lists that name. Each fires once per MICROFL_FAILPOINT_DIR (a
marker file remembers it across the restart), so the retry that follows runs through. Without
MICROFL_FAILPOINTS set this is a dictionary lookup and nothing else."""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["failpoint"]


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
