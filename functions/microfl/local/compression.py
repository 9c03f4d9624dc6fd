"""`microfl compression`: the README's comparison of update encodings on the demo.

One local platform and one client pool (robustness's one_platform) run the demo's job once per
encoding: uncompressed float32, fp16, bf16 and int8 blockwise deltas (microfl.compress), the same
clients, data and seeds. Each run reports per round the bytes the clients posted (whole
safetensors bodies: header and tensor data) and the test accuracy; the table also gives the
tensor data alone, which is what an encoding changes."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from microfl.compress import ENCODINGS, Q8_BLOCK
from microfl.local.demo_config import DemoConfig

__all__ = ["Outcome", "add_arguments", "compare", "data_bytes", "run_compression"]

NONE = "none"


@dataclass
class Outcome:
    encoding: str
    job: str
    accuracy: list[float]  # per round
    uploaded: list[int]  # bytes posted per round, every client's body
    seconds: float

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def data_bytes(shapes: list[tuple[int, ...]], encoding: str) -> int:
    """Tensor data of one update of a float32 model with these tensors (no header)."""
    sizes = [math.prod(s) for s in shapes]
    if encoding == "int8":
        return sum(n + 4 * math.ceil(n / Q8_BLOCK) for n in sizes)
    return sum(sizes) * (4 if encoding == NONE else 2)


def compare(base: DemoConfig, encodings: list[str], report: Path) -> list[Outcome]:
    """Every encoding on one platform, in order; the report is rewritten after each run."""
    from microfl.local.demo import one_platform
    from microfl.local.progress import bar

    report.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with one_platform(base) as train, bar("compression", len(encodings), "runs") as progress:
        for n, encoding in enumerate(encodings, 1):
            progress.status(encoding)
            print(f"\n=== [{n}/{len(encodings)}] updates sent as {encoding}", flush=True)
            config = replace(base, compress=None if encoding == NONE else encoding, baseline=False)
            t0 = time.monotonic()
            result = train(config)
            outcomes.append(
                Outcome(
                    encoding,
                    result.job,
                    [row["accuracy"] for row in result.rows],
                    [row["bytes_uploaded"] for row in result.rows],
                    time.monotonic() - t0,
                )
            )
            write_report(report, base, outcomes, time.monotonic() - started)
            progress.advance(status=f"{encoding}: accuracy {outcomes[-1].final:.3f}")
    print(f"\ncompression: {len(encodings)} runs in {time.monotonic() - started:.0f}s; {report}")
    return outcomes


def _shapes() -> list[tuple[int, ...]]:
    from microfl.client.torch import mlp, tensors_from_module

    return [a.shape for a in tensors_from_module(mlp()).values()]


def write_report(report: Path, base: DemoConfig, outcomes: list[Outcome], seconds: float) -> None:
    shapes = _shapes()
    (report / "compression.md").write_text(markdown(base, outcomes, seconds, shapes))
    doc = {
        "config": asdict(base) | {"report": None},
        "seconds": round(seconds, 1),
        "data_bytes_per_update": {o.encoding: data_bytes(shapes, o.encoding) for o in outcomes},
        "runs": [asdict(o) for o in outcomes],
    }
    (report / "results.json").write_text(json.dumps(doc, indent=2))
    plot(report / "accuracy.png", base, outcomes)


def markdown(
    base: DemoConfig, outcomes: list[Outcome], seconds: float, shapes: list[tuple[int, ...]]
) -> str:
    ref = next((o for o in outcomes if o.encoding == NONE), None)
    params = sum(math.prod(s) for s in shapes)
    rounds = max(len(o.accuracy) for o in outcomes)
    lines = [
        f"Digits demo, {base.clients} clients (Dirichlet alpha {base.alpha}), {base.rounds} rounds "
        f"x {base.epochs} local epochs, seed {base.seed}, MLP 64-64-10 ({params} float32 "
        f"parameters in {len(shapes)} tensors); {len(outcomes)} runs on one local platform in "
        f"{seconds / 60:.1f} min. Bytes: what the clients posted over the whole job (bodies: "
        "safetensors header + tensor data) and the tensor data of one update; x: fewer than "
        "float32.",
        "",
        "| updates | bytes posted | x | tensor data / update | x | final accuracy | "
        "vs float32 (points) | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * rounds,
    ]
    for o in outcomes:
        posted, data = sum(o.uploaded), data_bytes(shapes, o.encoding)
        ratio = "" if ref is None else f"{sum(ref.uploaded) / posted:.2f}"
        data_ratio = "" if ref is None else f"{data_bytes(shapes, NONE) / data:.2f}"
        delta = "" if ref is None else f"{100 * (o.final - ref.final):+.1f}"
        lines.append(
            f"| {o.encoding} | {posted} | {ratio} | {data} | {data_ratio} | {o.final:.3f} | "
            f"{delta} | " + " | ".join(f"{a:.3f}" for a in o.accuracy) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, base: DemoConfig, outcomes: list[Outcome]) -> None:
    """Accuracy per round and cumulative megabytes posted, one line per encoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for o in outcomes:
        xs = range(1, len(o.accuracy) + 1)
        left.plot(xs, o.accuracy, marker=".", label=o.encoding)
        total, cumulative = 0, []
        for b in o.uploaded:
            total += b
            cumulative.append(total / 1e6)
        right.plot(cumulative, o.accuracy, marker=".", label=o.encoding)
    left.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    right.set(xlabel="MB posted by the clients", ylabel="test accuracy", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"digits, {base.clients} clients: updates as float32, fp16, bf16, int8")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="local epochs per round")
    p.add_argument("--processes", type=int, default=DemoConfig.processes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--encoding",
        action="append",
        choices=(NONE, *ENCODINGS),
        help=f"run only these (repeatable; default: {NONE} and every encoding)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("load/results/compression"),
        help="folder of compression.md, accuracy.png and results.json",
    )
    p.set_defaults(func=run_compression)


def run_compression(args: argparse.Namespace) -> int:
    base = DemoConfig(
        clients=args.clients,
        rounds=args.rounds,
        epochs=args.epochs,
        processes=args.processes,
        seed=args.seed,
    )
    compare(base, args.encoding or [NONE, *ENCODINGS], args.report)
    print((args.report / "compression.md").read_text())
    return 0
