"""`microfl stragglers`: synchronous FedAvg vs asynchronous FedBuff with the same clients, a
fraction of them several times slower, side by side on one local platform: wall-clock time to
90 % test accuracy and the accuracy curve against time (issue 17's "How it is shown").

Sync is the demo's default job: every round waits for its quorum, all the clients (the classic
synchronous setting), so every round lasts as long as its slowest client. Async makes a version
every K accepted updates from whoever is done. Both see the same number of updates by default:
versions x K = rounds x clients (K = half the clients, so 2 x rounds versions); stale updates are
weighted (1 + s) ** -0.5 (FedBuff's 1/sqrt(1 + s), the job default) and at most 10 versions old
(the job default; a slow client refused as stale fetches again and retrains, counted)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from microfl.local.demo import DemoConfig, DemoResult
from microfl.local.demo_clients import add_straggler_arguments, slow_clients

__all__ = ["TARGET", "Curve", "add_arguments", "compare", "curve", "markdown", "plot", "plan"]

TARGET = 0.9  # test accuracy whose wall-clock time is compared
# Seconds a normal client's local training takes on its simulated device. Here the training
# itself takes 20-50 ms of CPU, less than the platform's own work per update, and 20 clients
# share the machine's cores with the platform: without a device time the run measures this
# machine's CPU, not the clients' speed (measured: both modes CPU-bound, async 0.96x as fast).
STEP_TIME = 1.0


@dataclass
class Curve:
    label: str
    job: str
    elapsed: list[float]  # seconds from the clients' start to each commit
    accuracy: list[float]  # test accuracy of each committed model
    updates: int  # updates in the committed models
    stale_retries: int  # trainings thrown away on a 409 stale (async)

    def time_to(self, target: float = TARGET) -> float | None:
        return next(
            (t for t, a in zip(self.elapsed, self.accuracy, strict=True) if a >= target), None
        )

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def plan(base: DemoConfig) -> tuple[DemoConfig, DemoConfig]:
    """(sync, async): the same clients and stragglers; async makes rounds x clients / K
    versions, so both commit the same number of updates."""
    k = base.k
    versions = max(1, round(base.rounds * base.clients / k))
    return replace(base, mode="sync", buffer=0), replace(
        base, mode="async", buffer=k, rounds=versions
    )


def curve(label: str, result: DemoResult) -> Curve:
    return Curve(
        label,
        result.job,
        [float(row["elapsed"]) for row in result.rows],
        [float(row["accuracy"]) for row in result.rows],
        sum(int(row["included"]) for row in result.rows),
        sum(int(c["stale_retries"]) for c in result.clients),
    )


def compare(base: DemoConfig, report: Path) -> list[Curve]:
    """A short untimed warm-up job (spawns the client processes, cold-starts the functions),
    then sync and async on the same platform and client pool; the report is rewritten after
    each run."""
    from microfl.local.demo import one_platform
    from microfl.local.progress import bar

    report.mkdir(parents=True, exist_ok=True)
    sync, asynchronous = plan(base)
    curves: list[Curve] = []
    started = time.monotonic()
    with one_platform(base) as train, bar("stragglers", 3, "runs") as progress:
        progress.status("warm-up")
        print("\n=== warm-up (not timed): 1 round, 1 epoch, no stragglers", flush=True)
        train(replace(sync, rounds=1, epochs=1, slow_fraction=0.0, baseline=False))
        progress.advance()
        for label, config in (
            (f"sync FedAvg, {sync.rounds} rounds of all {sync.clients}", sync),
            (f"async FedBuff, {asynchronous.rounds} versions of K={asynchronous.k}", asynchronous),
        ):
            print(f"\n=== {label} ({time.monotonic() - started:.0f}s so far)", flush=True)
            progress.status(label)
            result = train(replace(config, baseline=False))
            curves.append(curve(label, result))
            write_report(report, base, curves, time.monotonic() - started)
            progress.advance(status=f"{label}: accuracy {curves[-1].final:.3f}")
    print(f"\nstragglers: done in {time.monotonic() - started:.0f}s; {report}")
    return curves


def write_report(report: Path, base: DemoConfig, curves: list[Curve], seconds: float) -> None:
    (report / "stragglers.md").write_text(markdown(base, curves, seconds))
    doc = {
        "config": asdict(base) | {"report": None},
        "seconds": round(seconds, 1),
        "runs": [asdict(c) | {"time_to_target": c.time_to()} for c in curves],
    }
    (report / "results.json").write_text(json.dumps(doc, indent=2))
    plot(report / "accuracy.png", base, curves)


def _describe(base: DemoConfig) -> str:
    slow = slow_clients(base.clients, base.slow_fraction)
    sync, asyn = plan(base)
    device = f"at least {base.step_time:g} s (simulated device) " if base.step_time else ""
    return (
        f"Digits demo, {base.clients} clients (Dirichlet alpha {base.alpha}), {base.epochs} local "
        f"epochs per update, seed {base.seed}; a local training takes {device}and "
        f"{base.slowdown:g}x as long on the {len(slow)} stragglers (clients "
        f"{', '.join(map(str, slow)) or '-'}: a sleep after training). Sync: FedAvg, "
        f"{sync.rounds} rounds, each waits for all {base.clients} clients. Async: FedBuff, "
        f"{asyn.rounds} versions of K={asyn.k} updates (the same number of updates), staleness "
        f"weight (1+s)^-{base.staleness_exponent:g}, max staleness {base.max_staleness}."
    )


def markdown(base: DemoConfig, curves: list[Curve], seconds: float) -> str:
    lines = [
        _describe(base) + f" One local platform, {seconds / 60:.1f} min in all.",
        "",
        f"| run | updates | time to {TARGET:.0%} (s) | final accuracy | last commit (s) | "
        "stale retrainings |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in curves:
        t = c.time_to()
        lines.append(
            f"| {c.label} | {c.updates} | {'not reached' if t is None else f'{t:.1f}'} | "
            f"{c.final:.3f} | {c.elapsed[-1]:.1f} | {c.stale_retries} |"
        )
    if len(curves) == 2:
        (s, a) = curves
        ts, ta = s.time_to(), a.time_to()
        speed = (
            f"async reached {TARGET:.0%} {ts / ta:.2f}x sooner than sync"
            if ts is not None and ta is not None and ta > 0
            else f"one run did not reach {TARGET:.0%}"
        )
        lines += [
            "",
            f"{speed}; final accuracy async - sync: {100 * (a.final - s.final):+.1f} points.",
        ]
    return "\n".join(lines) + "\n"


def plot(path: Path, base: DemoConfig, curves: list[Curve]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for c in curves:
        (line,) = ax.plot(c.elapsed, c.accuracy, marker=".", label=c.label)
        t = c.time_to()
        if t is not None:
            ax.axvline(t, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("wall-clock seconds since the clients started")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    slow = len(slow_clients(base.clients, base.slow_fraction))
    ax.set_title(f"digits, {base.clients} clients, {slow} of them {base.slowdown:g}x slower")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--rounds", type=int, default=d.rounds, help="sync rounds")
    p.add_argument(
        "--buffer",
        type=int,
        default=0,
        metavar="K",
        help="async updates per version (default half the clients); async makes "
        "rounds x clients / K versions",
    )
    p.add_argument("--max-staleness", type=int, default=d.max_staleness)
    p.add_argument("--staleness-exponent", type=float, default=d.staleness_exponent)
    add_straggler_arguments(p, 0.25, 5.0, STEP_TIME)
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per update")
    p.add_argument("--processes", type=int, default=d.processes, help="client worker processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--report",
        type=Path,
        default=Path("load/results/stragglers"),
        help="folder of stragglers.md, accuracy.png and results.json",
    )
    p.set_defaults(func=run_stragglers)


def run_stragglers(args: argparse.Namespace) -> int:
    base = DemoConfig(
        clients=args.clients,
        rounds=args.rounds,
        buffer=args.buffer,
        max_staleness=args.max_staleness,
        staleness_exponent=args.staleness_exponent,
        slow_fraction=args.slow_fraction,
        slowdown=args.slowdown,
        step_time=args.step_time,
        epochs=args.epochs,
        processes=args.processes,
        seed=args.seed,
    )
    compare(base, args.report)
    print((args.report / "stragglers.md").read_text())
    return 0
