"""`microfl demo`: a real federated training run on the local platform.

Simulated clients, in a few worker processes, hold non-IID shards (Dirichlet) of scikit-learn's
bundled digits data set and train a small torch MLP locally; they talk to ingest over HTTP only,
and every global model is committed by the serverless pipeline (Kafka events, object storage).
`--chaos` SIGKILLs every function and restarts the Kafka broker during the run; `--attack` makes
the first `--byzantine` fraction of the clients Byzantine (microfl.local.byzantine) against the
job's `--strategy`; `--mode async` trains a FedBuff job (microfl.local.demo_versions) and
`--slow-fraction`/`--slowdown` make some clients stragglers (microfl.local.demo_clients)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from microfl.client import Client
from microfl.compress import ENCODINGS
from microfl.local.byzantine import (
    Attack,
    add_attack_arguments,
    byzantine_clients,
    describe,
)
from microfl.local.demo_chaos import Chaos
from microfl.local.demo_clients import (
    add_straggler_arguments,
    client_pool,
    members,
    run_clients,
    slow_clients,
)
from microfl.local.demo_config import DemoConfig, DemoResult
from microfl.local.demo_versions import HEADER, run_versions
from microfl.local.jobargs import add_async_arguments, add_strategy_arguments, strategy_options
from microfl.local.metricsview import CLIENT_HEADER, client_columns
from microfl.local.progress import bar

__all__ = [
    "DemoConfig",
    "DemoResult",
    "add_arguments",
    "client_pool",
    "one_platform",
    "run",
    "run_demo",
    "train_on",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help="Dirichlet concentration of the non-IID split (smaller: more skew)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per round")
    p.add_argument("--lr", type=float, default=d.lr, help="local SGD learning rate")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="local minibatch size")
    p.add_argument("--prox-mu", type=float, default=d.prox_mu, help="FedProx proximal weight")
    p.add_argument("--fan-in", type=int, default=d.fan_in, help="updates per partial sum")
    p.add_argument("--processes", type=int, default=d.processes, help="client worker processes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--chaos",
        action="store_true",
        help="SIGKILL every function (and restart the Kafka broker) during the run",
    )
    p.add_argument(
        "--bus",
        choices=("kafka", "pubsub"),
        default=d.bus,
        help="event transport of the demo's platform: Kafka or the Pub/Sub emulator",
    )
    p.add_argument("--report", type=Path, help="report folder (default .microfl/demo/JOB)")
    add_strategy_arguments(p)
    add_attack_arguments(p, several=False)
    add_async_arguments(p)
    add_straggler_arguments(p, d.slow_fraction, d.slowdown, d.step_time)
    p.add_argument("--compress", choices=ENCODINGS, help="clients send updates so compressed")


def run_demo(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if hasattr(args, f.name)}
    run(DemoConfig(**given | {"strategy_options": strategy_options(args.strategy_option)}))
    return 0


def run(config: DemoConfig) -> DemoResult:
    from microfl.local.platform import read_state, session

    if config.chaos and read_state() is not None:
        raise RuntimeError(
            "--chaos needs the demo's own platform; stop yours with `microfl down` first"
        )
    with session(config.bus) as (state, secret, platform):
        return train_on(config, state, secret, platform)


@contextlib.contextmanager
def one_platform(base: DemoConfig) -> Iterator[Callable[[DemoConfig], DemoResult]]:
    """Run demo jobs (train_on) on one platform, the running one else one started here, and
    one client pool spawned once: the jobs share base's clients, alpha and seed."""
    from microfl.local.platform import session

    with session(base.bus) as (state, secret, platform), client_pool(base) as pool:
        yield lambda config: train_on(config, state, secret, platform, pool)


def train_on(
    config: DemoConfig,
    state: dict[str, Any],
    secret: str,
    platform: Any,
    pool: ProcessPoolExecutor | None = None,
) -> DemoResult:
    """One demo job on a running platform (`platform` is needed for --chaos only; `pool` from
    client_pool with the same clients, alpha and seed, else one made for this job)."""
    import torch

    from microfl.client.torch import (
        evaluate,
        load_into_module,
        mlp,
        tensors_from_module,
        train_local,
    )
    from microfl.jobs import JobSpec, create_job
    from microfl.local.demo_data import digits_shards, plot_accuracy
    from microfl.serde import tensors_to_safetensors
    from microfl.store import open_store
    from microfl.tokens import issue_token

    shards, (x_test, y_test), (x_pool, y_pool) = digits_shards(
        config.clients, config.alpha, config.seed
    )
    torch.manual_seed(config.seed)
    init = tensors_from_module(mlp())
    job = f"demo-{int(time.time() * 1000)}"
    versions = config.mode == "async"
    mode = {
        "mode": "async",
        "buffer": config.k,
        "max_staleness": config.max_staleness,
        "staleness_exponent": config.staleness_exponent,
    }
    spec = JobSpec.for_model(
        job,
        init,
        rounds=config.rounds,
        min_clients=config.clients,
        round_timeout=600.0,
        strategy=config.strategy,
        strategy_options=config.strategy_options,
        fan_in=config.fan_in,
        created_at=time.time(),
        **(mode if versions else {}),
    )
    create_job(open_store(state["store"]), spec, tensors_to_safetensors(init))
    sizes = sorted(len(y) for _, y in shards)
    print(
        f"job {job}: {config.clients} clients in {config.processes} processes, shards of "
        f"{sizes[0]}..{sizes[-1]} examples (Dirichlet alpha {config.alpha}), MLP 64-64-10, "
        + (
            f"async, {config.rounds} versions of K={spec.buffer} updates (max staleness "
            f"{spec.max_staleness}, weight (1+s)^-{spec.staleness_exponent:g})"
            if versions
            else f"{config.rounds} rounds"
        )
        + f" x {config.epochs} local epochs; strategy {spec.strategy} "
        f"{spec.options if spec.options else ''}"
        + describe(config.attack, config.clients, config.byzantine, config.boost)
        + (
            f"; {len(slow_clients(config.clients, config.slow_fraction))} stragglers "
            f"{config.slowdown:g}x slower"
            if config.slow_fraction
            else ""
        ),
        flush=True,
    )
    attackers = byzantine_clients(config.clients, config.byzantine) if config.attack else range(0)
    attack = Attack(config.attack, config.boost, spec.max_examples) if config.attack else None
    tokens = [issue_token(secret.encode(), job, f"client-{i:03d}") for i in range(config.clients)]
    observer = Client(state["ingest_url"], job, issue_token(secret.encode(), job, admin=True))
    chaos = Chaos(platform, config.rounds) if config.chaos else None
    groups = members(config, tokens, attackers, attack)
    clients: list[dict[str, Any]] = []

    def evaluate_model(tensors: dict[str, Any]) -> tuple[float, float]:
        load_into_module(model, tensors)
        return evaluate(model, x_test, y_test)

    rows: list[dict[str, Any]] = []
    model = mlp()
    print(
        "\n"
        + (
            HEADER
            if versions
            else f"{'round':>5} {'accuracy':>9} {'loss':>7} {'updates':>8} {'time s':>7} "
            + f"{'MB up':>7} "
            + CLIENT_HEADER
        ),
        flush=True,
    )
    unit = "version" if versions else "round"
    with (
        contextlib.nullcontext(pool) if pool else client_pool(config) as pool,
        bar("demo", config.rounds, f"{unit}s") as progress,
    ):
        started = time.time()
        if versions:
            rows, clients = run_versions(
                config,
                state["ingest_url"],
                groups,
                pool,
                observer,
                evaluate_model,
                started,
                chaos.round_started if chaos else None,
                progress,
            )
        for r in range(1, 0 if versions else config.rounds + 1):
            start = time.monotonic()
            if chaos is not None:
                chaos.round_started(r)
            futures = [
                pool.submit(run_clients, state["ingest_url"], job, g, config, r) for g in groups
            ]
            sent = 0  # bytes of the update bodies posted this round
            for done, future in enumerate(as_completed(futures), 1):
                sent += sum(answer["bytes"] for answer in future.result())
                progress.status(f"round {r}: {done}/{len(groups)} client processes done")
            observer.wait_for_version(r, timeout=600, poll=0.1)
            tensors, _ = observer.model(r)
            loss, acc = evaluate_model(tensors)
            record = observer.round(r)
            rows.append(
                {
                    "round": r,
                    "accuracy": acc,
                    "loss": loss,
                    "included": len(record["included"]),
                    "excluded": len(record["excluded"]),
                    "bytes_uploaded": sent,
                    "seconds": round(time.monotonic() - start, 3),
                    "elapsed": round(float(record["committed_at"]) - started, 3),
                    "client_metrics": record.get("metrics"),  # clients' own, example-weighted
                }
            )
            print(
                f"{r:>5} {acc:>9.3f} {loss:>7.3f} {len(record['included']):>8} "
                f"{rows[-1]['seconds']:>7.2f} {sent / 1e6:>7.3f} "
                f"{client_columns(record.get('metrics'))}",
                flush=True,
            )
            progress.advance(status=f"accuracy {acc:.3f}")
    if chaos is not None:
        chaos.stop()

    centralised: dict[str, float] = {}
    if config.baseline:
        torch.manual_seed(config.seed)
        central = mlp()
        train_local(
            central,
            x_pool,
            y_pool,
            epochs=config.epochs * config.rounds,
            lr=config.lr,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        c_loss, c_acc = evaluate(central, x_test, y_test)
        centralised = {"accuracy": c_acc, "loss": c_loss}
        print(
            f"centralised baseline (same model trained on the pooled data, "
            f"{config.epochs * config.rounds} epochs): accuracy {c_acc:.3f}, loss {c_loss:.3f}"
        )

    hashes = [
        hashlib.sha256(_model_bytes(observer, v)).hexdigest() for v in range(config.rounds + 1)
    ]
    report = config.report or Path(state["logs"]).parent / "demo" / job
    report.mkdir(parents=True, exist_ok=True)
    result = DemoResult(
        job,
        rows,
        centralised,
        hashes,
        chaos.events if chaos else [],
        report,
        clients,
    )
    config_doc = asdict(config) | {"report": str(report)}
    summary = {
        "job": job,
        "rounds": rows,
        "centralised": result.centralised,
        "model_sha256": hashes,
        "chaos": result.chaos,
        "config": config_doc,
        "clients": clients,
    }
    (report / "metrics.json").write_text(json.dumps(summary, indent=2))
    for r in range(1, config.rounds + 1):
        (report / f"{unit}-{r:03d}.json").write_text(json.dumps(observer.record(r), indent=2))
    plot_accuracy(
        report / "accuracy.png",
        [row["accuracy"] for row in rows],
        centralised.get("accuracy"),
        f"{config.clients} clients, digits, Dirichlet alpha {config.alpha}",
        unit,
    )
    if chaos is not None:
        print("chaos: " + "; ".join(chaos.events))
    print(f"report: {report} (metrics.json, accuracy.png, {unit} records)")
    return result


def _model_bytes(client: Client, version: int) -> bytes:
    resp = client._request("GET", f"/v1/jobs/{client.job}/model", params={"version": version})
    return resp.content
