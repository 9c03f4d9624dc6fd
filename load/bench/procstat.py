"""What the benchmarks read about processes: peak and current RSS from /proc (VmHWM, VmRSS),
CPU seconds, process trees, and one benchmark step run in a fresh child process.

VmHWM is the high-water mark of one address space: a child's starts afresh at exec, unlike
`ru_maxrss`, which a child started by fork/vfork inherits from its parent across exec. So every
peak reported here is VmHWM, and orchestrators may import numpy without skewing their children.
Nothing here imports numpy."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, get_type_hints

__all__ = [
    "ProcessSampler",
    "cpu_seconds",
    "descendants",
    "emit",
    "log",
    "measured",
    "run_step",
    "step_main",
    "status_mib",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def status_mib(field: str, pid: int | str = "self") -> float | None:
    """A line of /proc/<pid>/status (VmHWM, VmRSS) in MiB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds of one process (not its children); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def descendants(pid: int) -> list[int]:
    """Every process below pid (gunicorn workers below a functions-framework master)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return sorted(out)


class ProcessSampler:
    """Keeps, for every process it has seen under the given roots, the largest VmHWM and the CPU
    seconds used since it was first seen. `sample()` as often as instances may come and go."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}

    def sample(self, roots: Iterable[tuple[str, int]]) -> None:
        for role, root in roots:
            for kind, pid in [("master", root)] + [("worker", p) for p in descendants(root)]:
                hwm, cpu = status_mib("VmHWM", pid), cpu_seconds(pid)
                if hwm is None or cpu is None:
                    continue
                entry = self.seen.setdefault(
                    pid,
                    {"role": role, "kind": kind, "pid": pid, "root": root, "cpu_start": cpu},
                )
                entry["vm_hwm_mib"] = max(entry.get("vm_hwm_mib", 0.0), hwm)
                entry["cpu_s"] = cpu - entry["cpu_start"]

    def mark(self) -> None:
        """Start counting CPU from now for every process seen so far."""
        for entry in self.seen.values():
            now = cpu_seconds(entry["pid"])
            if now is not None:
                entry["cpu_start"] = now
                entry["cpu_s"] = 0.0

    def processes(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in e.items() if k != "cpu_start"}
            for e in sorted(self.seen.values(), key=lambda e: (e["role"], e["pid"]))
        ]


def measured(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run work (after the caller's imports) in this process: its wall time, the RSS before it
    (baseline) and this process's VmHWM after it (peak)."""
    baseline = status_mib("VmRSS") or 0.0
    start = time.perf_counter()
    info = work()
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM") or 0.0
    return {
        **info,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "work_mib": peak - baseline,
        "seconds": seconds,
    }


def run_step(script: Path, *args: str, timeout: float | None = None) -> dict[str, Any]:
    """Run `python script args...` in a fresh process; the JSON object on its last stdout line.
    Its stderr goes to ours, so progress lines and errors show."""
    done = subprocess.run(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{script.name} {' '.join(args[:1])} exited with {done.returncode} (its error is above)"
        )
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{script.name} {' '.join(args[:1])} printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def step_main(*steps: Callable[..., dict[str, Any]], argv: list[str] | None = None) -> None:
    """The child's side of run_step: `script STEP ARG... [--OPTION VALUE]` calls the step
    function of that name and emits its answer. Parameters without a default are positional,
    with one options; each is converted by its annotation (int, float, Path, str; JSON for the
    rest, e.g. a plan list)."""
    module = sys.modules[steps[0].__module__]
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="step", required=True)
    for step in steps:
        command = commands.add_parser(step.__name__)
        command.set_defaults(run=step)
        hints = get_type_hints(step)
        for name, param in inspect.signature(step).parameters.items():
            kind = hints.get(name, str)
            convert = kind if kind in (int, float, str, Path) else json.loads
            if param.default is inspect.Parameter.empty:
                command.add_argument(name, type=convert)
            else:
                flag = "--" + name.replace("_", "-")
                command.add_argument(flag, dest=name, type=convert, default=param.default)
    args = vars(parser.parse_args(argv))
    run, _ = args.pop("run"), args.pop("step")
    emit(run(**args))


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one JSON line on stdout (progress goes to stderr)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def log(name: str, message: str) -> None:
    print(f"[{name}] {message}", file=sys.stderr, flush=True)
