"""`microfl robustness`: the README's comparison of strategies under Byzantine clients.

One local platform, started once (or the running one), runs the demo's job again and again: clean
FedAvg; for each attack, FedAvg and every defence with the same attackers; and dp-fedavg without
attackers at a few privacy budgets. Each run is the full demo (real clients over HTTP, the
serverless pipeline); the results are a Markdown table and a plot of test accuracy per round."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from microfl.local.byzantine import ATTACKS, add_attack_arguments, byzantine_clients, describe
from microfl.local.demo import DemoConfig
from microfl.privacy import noise_multiplier_for

__all__ = ["DP_EPSILONS", "Outcome", "Run", "add_arguments", "compare", "plan", "run_robustness"]

# The L2 bound of fedavg+clip and of dp-fedavg, on a client's delta from the round's model. Honest
# deltas of the demo (20 clients, 5 local epochs, lr 0.2) measure 1.3-2.8 in round 1, shrinking
# to 0.55-1.1 by round 10: 2.0 clips only some round-1 updates and caps a boosted attacker at the
# size of a large honest update (1.0 slowed clean training by 2 points in a simulation).
CLIP = 2.0
DP_EPSILONS = (1.0, 4.0, 8.0)
DP_DELTA = 1e-5
DEFENCES = ("fedavg", "median", "trimmed-mean", "krum", "clip", "dp-fedavg")


@dataclass(frozen=True)
class Run:
    label: str
    strategy: str
    options: dict[str, float] = field(default_factory=dict)
    attack: str | None = None

    @property
    def defence(self) -> str:
        """The name --strategy selects: the strategy's, or "clip" for fedavg with a clip."""
        return "clip" if self.strategy == "fedavg" and "clip" in self.options else self.strategy


@dataclass
class Outcome:
    run: Run
    job: str
    accuracy: list[float]  # per round
    seconds: float

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def plan(
    attacks: list[str], clients: int, byzantine: float, rounds: int, strategies: list[str] | None
) -> list[Run]:
    """Every defence without attackers (what robustness costs) and against each attack:
    FedAvg, median, trimmed-mean (beta: the Byzantine fraction), krum (f: the attackers;
    m = clients - f: multi-Krum averages all but the f worst-scored, the most updates it can
    keep and still leave every attacker out; m = clients - 2f lost 3-4 points more in a
    measurement, from averaging fewer of the non-IID honest updates) and FedAvg with clipping;
    then dp-fedavg clean at DP_EPSILONS. `strategies` keeps only those named (Run.defence; the
    clean FedAvg run is kept with "fedavg")."""
    f = len(byzantine_clients(clients, byzantine))
    defences: list[tuple[str, str, dict[str, float]]] = [
        ("fedavg", "fedavg", {}),
        ("median", "median", {}),
        (f"trimmed-mean beta={f / clients:g}", "trimmed-mean", {"beta": f / clients}),
        (f"krum f={f} m={clients - f}", "krum", {"f": f, "m": clients - f}),
        (f"fedavg clip={CLIP:g}", "fedavg", {"clip": CLIP}),
    ]
    runs = [Run(f"{label} (no attack)", name, opts) for label, name, opts in defences]
    for attack in attacks:
        runs += [Run(f"{label}, {attack}", name, opts, attack) for label, name, opts in defences]
    runs += dp_runs(rounds)
    return [r for r in runs if strategies is None or r.defence in strategies]


def dp_runs(rounds: int) -> list[Run]:
    """dp-fedavg without attackers at each of DP_EPSILONS over the whole job (every client in
    every round), noise multipliers from microfl.privacy's accountant."""
    runs = []
    for epsilon in DP_EPSILONS:
        z = noise_multiplier_for(epsilon, rounds=rounds, delta=DP_DELTA)
        options = {"noise_multiplier": round(z, 4), "clip": CLIP, "delta": DP_DELTA}
        runs.append(Run(f"dp-fedavg eps={epsilon:g} (z={z:.2f})", "dp-fedavg", options))
    return runs


def compare(base: DemoConfig, runs: list[Run], report: Path) -> list[Outcome]:
    """Every run on one platform (the running one, else one started here), in order; the table,
    plot and results.json are rewritten after each run, so an interrupted comparison keeps what
    it has."""
    from microfl.local.demo import one_platform
    from microfl.local.progress import bar

    report.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with one_platform(base) as train, bar("robustness", len(runs), "runs") as progress:
        for n, run in enumerate(runs, 1):
            progress.status(run.label)
            print(
                f"\n=== [{n}/{len(runs)}] {run.label}"
                + describe(run.attack, base.clients, base.byzantine, base.boost)
                + f" ({time.monotonic() - started:.0f}s so far)",
                flush=True,
            )
            config = replace(
                base,
                strategy=run.strategy,
                strategy_options=run.options,
                attack=run.attack,
                baseline=False,  # the same for every run: the demo's own report has it
            )
            t0 = time.monotonic()
            result = train(config)
            accuracy = [row["accuracy"] for row in result.rows]
            outcomes.append(Outcome(run, result.job, accuracy, time.monotonic() - t0))
            write_report(report, base, outcomes, time.monotonic() - started)
            progress.advance(status=f"{run.label}: accuracy {outcomes[-1].final:.3f}")
    print(f"\nrobustness: {len(runs)} runs in {time.monotonic() - started:.0f}s; {report}")
    return outcomes


def write_report(report: Path, base: DemoConfig, outcomes: list[Outcome], seconds: float) -> None:
    (report / "robustness.md").write_text(markdown(base, outcomes, seconds))
    doc = {
        "config": asdict(base) | {"report": None},
        "seconds": round(seconds, 1),
        "runs": [asdict(o.run) | {"job": o.job, "accuracy": o.accuracy} for o in outcomes],
    }
    (report / "results.json").write_text(json.dumps(doc, indent=2))
    plot(report / "accuracy.png", base, outcomes)


def markdown(base: DemoConfig, outcomes: list[Outcome], seconds: float) -> str:
    clean = next(
        (o.final for o in outcomes if o.run.attack is None and o.run.strategy == "fedavg"), None
    )
    attackers = len(byzantine_clients(base.clients, base.byzantine))
    rounds = max(len(o.accuracy) for o in outcomes)
    lines = [
        f"Digits demo, {base.clients} clients (Dirichlet alpha {base.alpha}), {base.rounds} rounds "
        f"x {base.epochs} local epochs, seed {base.seed}; {attackers} Byzantine clients "
        f"({base.byzantine:g}): scale and sign-flip boost x{base.boost:g}. Test accuracy; "
        f"{len(outcomes)} runs on one local platform in {seconds / 60:.1f} min.",
        "",
        "| run | attack | final accuracy | vs clean FedAvg (points) | "
        + " | ".join(f"r{r}" for r in range(1, rounds + 1))
        + " |",
        "| --- | --- | ---: | ---: |" + " ---: |" * rounds,
    ]
    for o in outcomes:
        delta = "" if clean is None else f"{100 * (o.final - clean):+.1f}"
        lines.append(
            f"| {o.run.label.split(', ')[0]} | {o.run.attack or '-'} | {o.final:.3f} | {delta} | "
            + " | ".join(f"{a:.3f}" for a in o.accuracy)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, base: DemoConfig, outcomes: list[Outcome]) -> None:
    """One panel per attack (each with clean FedAvg dashed), and one for dp-fedavg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next((o for o in outcomes if o.run.attack is None and o.run.strategy == "fedavg"), None)
    panels: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o is not clean:
            quiet = "dp-fedavg, no attack" if o.run.strategy == "dp-fedavg" else "no attack"
            panels.setdefault(o.run.attack or quiet, []).append(o)
    if not panels:
        panels["no attack"] = []
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, group) in zip(axes.flat, panels.items(), strict=False):
        if clean is not None:
            xs = range(1, len(clean.accuracy) + 1)
            ax.plot(xs, clean.accuracy, "k--", label="fedavg, no attack")
        for o in group:
            xs = range(1, len(o.accuracy) + 1)
            ax.plot(xs, o.accuracy, marker=".", label=o.run.label.split(", ")[0])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    attackers = len(byzantine_clients(base.clients, base.byzantine))
    fig.suptitle(f"digits, {base.clients} clients, {attackers} Byzantine")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="local epochs per round")
    p.add_argument("--processes", type=int, default=DemoConfig.processes)
    p.add_argument("--seed", type=int, default=0)
    add_attack_arguments(p, several=True)
    p.add_argument(
        "--strategy",
        action="append",
        choices=DEFENCES,
        help="run only these (repeatable; default: all; clip: fedavg with clip)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("load/results/robustness"),
        help="folder of robustness.md, accuracy.png and results.json",
    )
    p.set_defaults(func=run_robustness)


def run_robustness(args: argparse.Namespace) -> int:
    base = DemoConfig(
        clients=args.clients,
        rounds=args.rounds,
        epochs=args.epochs,
        processes=args.processes,
        seed=args.seed,
        byzantine=args.byzantine,
        boost=args.boost,
    )
    runs = plan(
        args.attack or list(ATTACKS), args.clients, args.byzantine, args.rounds, args.strategy
    )
    if not runs:
        raise ValueError("no run left: --strategy names none of the plan's strategies")
    compare(base, runs, args.report)
    print((args.report / "robustness.md").read_text())
    return 0
