"""`microfl demo`: a real federated training run on the local platform.

Simulated clients, in a few worker processes, hold non-IID shards (Dirichlet) of scikit-learn's
bundled digits data set and train a small torch MLP locally; they talk to ingest over HTTP only,
and every global model is committed by the serverless pipeline (Kafka events, object storage).
`--chaos` SIGKILLs every function and restarts the Kafka broker during the run; `--attack` makes
the first `--byzantine` fraction of the clients Byzantine (microfl.local.byzantine) against the
job's `--strategy`."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from microfl.client import Client
from microfl.local.byzantine import (
    DEFAULT_BOOST,
    Attack,
    add_attack_arguments,
    byzantine_clients,
    describe,
)
from microfl.local.jobargs import add_strategy_arguments, strategy_options

__all__ = [
    "DemoConfig",
    "DemoResult",
    "add_arguments",
    "client_pool",
    "run",
    "run_demo",
    "train_on",
]


@dataclass(frozen=True)
class DemoConfig:
    clients: int = 20
    rounds: int = 10
    alpha: float = 0.5
    epochs: int = 5
    lr: float = 0.2
    batch_size: int = 16
    prox_mu: float = 0.0
    fan_in: int = 5
    processes: int = 4
    seed: int = 0
    chaos: bool = False
    bus: str = "kafka"
    report: Path | None = None
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    attack: str | None = None
    byzantine: float = 0.2
    boost: float = DEFAULT_BOOST
    baseline: bool = True  # also train the model centrally on the pooled data, for comparison


@dataclass
class DemoResult:
    job: str
    rows: list[dict[str, Any]]
    centralised: dict[str, float]
    model_sha256: list[str]  # version 0..rounds
    chaos: list[str] = field(default_factory=list)
    report: Path | None = None


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


def client_pool(config: DemoConfig) -> ProcessPoolExecutor:
    """The clients' worker processes, spawned (each imports torch and deals the data once): jobs
    with the same clients, alpha and seed can share them."""
    return ProcessPoolExecutor(
        config.processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(config.clients, config.alpha, config.seed),
    )


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
    )
    create_job(open_store(state["store"]), spec, tensors_to_safetensors(init))
    sizes = sorted(len(y) for _, y in shards)
    print(
        f"job {job}: {config.clients} clients in {config.processes} processes, shards of "
        f"{sizes[0]}..{sizes[-1]} examples (Dirichlet alpha {config.alpha}), MLP 64-64-10, "
        f"{config.rounds} rounds x {config.epochs} local epochs; strategy {spec.strategy} "
        f"{spec.options if spec.options else ''}"
        + describe(config.attack, config.clients, config.byzantine, config.boost),
        flush=True,
    )
    attackers = byzantine_clients(config.clients, config.byzantine) if config.attack else range(0)
    attack = Attack(config.attack, config.boost, spec.max_examples) if config.attack else None
    tokens = [issue_token(secret.encode(), job, f"client-{i:03d}") for i in range(config.clients)]
    observer = Client(state["ingest_url"], job, issue_token(secret.encode(), job, admin=True))
    chaos = _Chaos(platform, config.rounds) if config.chaos else None

    rows: list[dict[str, Any]] = []
    model = mlp()
    print(f"\n{'round':>5} {'accuracy':>9} {'loss':>7} {'updates':>8} {'time s':>7}", flush=True)
    with contextlib.nullcontext(pool) if pool else client_pool(config) as pool:
        for r in range(1, config.rounds + 1):
            start = time.monotonic()
            if chaos is not None:
                chaos.round_started(r)
            futures = [
                pool.submit(
                    _client_round,
                    state["ingest_url"],
                    job,
                    tokens[i],
                    i,
                    config,
                    config.seed * 1_000_003 + r * 1_009 + i,
                    attack if i in attackers else None,
                )
                for i in range(config.clients)
            ]
            for done, future in enumerate(as_completed(futures), 1):
                future.result()
                _progress(r, done, config.clients)
            observer.wait_for_version(r, timeout=600)
            tensors, _ = observer.model(r)
            load_into_module(model, tensors)
            loss, acc = evaluate(model, x_test, y_test)
            record = observer.round(r)
            rows.append(
                {
                    "round": r,
                    "accuracy": acc,
                    "loss": loss,
                    "included": len(record["included"]),
                    "excluded": len(record["excluded"]),
                    "seconds": round(time.monotonic() - start, 3),
                }
            )
            _clear_progress()
            print(
                f"{r:>5} {acc:>9.3f} {loss:>7.3f} {len(record['included']):>8} "
                f"{rows[-1]['seconds']:>7.2f}",
                flush=True,
            )
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
    )
    config_doc = asdict(config) | {"report": str(report)}
    summary = {
        "job": job,
        "rounds": rows,
        "centralised": result.centralised,
        "model_sha256": hashes,
        "chaos": result.chaos,
        "config": config_doc,
    }
    (report / "metrics.json").write_text(json.dumps(summary, indent=2))
    for r in range(1, config.rounds + 1):
        (report / f"round-{r:03d}.json").write_text(json.dumps(observer.round(r), indent=2))
    plot_accuracy(
        report / "accuracy.png",
        [row["accuracy"] for row in rows],
        centralised.get("accuracy"),
        f"{config.clients} clients, digits, Dirichlet alpha {config.alpha}",
    )
    if chaos is not None:
        print("chaos: " + "; ".join(chaos.events))
    print(f"report: {report} (metrics.json, accuracy.png, round records)")
    return result


def _model_bytes(client: Client, version: int) -> bytes:
    resp = client._request("GET", f"/v1/jobs/{client.job}/model", params={"version": version})
    return resp.content


# --- client worker processes ---------------------------------------------------------------

_SHARDS: list[Any] = []


def _init_worker(clients: int, alpha: float, seed: int) -> None:
    import torch

    from microfl.local.demo_data import digits_shards

    torch.set_num_threads(1)
    _SHARDS[:] = digits_shards(clients, alpha, seed)[0]


def _client_round(
    url: str, job: str, token: str, i: int, config: DemoConfig, seed: int, attack: Attack | None
) -> dict[str, Any]:
    from microfl.client.torch import TorchClient, mlp

    x, y = _SHARDS[i]
    client = TorchClient(Client(url, job, token, retries=10), mlp())
    return client.run_round(
        x,
        y if attack is None else attack.labels(y),
        epochs=config.epochs,
        lr=config.lr,
        prox_mu=config.prox_mu,
        seed=seed,
        batch_size=config.batch_size,
        tamper=attack,
    )


# --- terminal output ---------------------------------------------------------------------------


def _progress(r: int, done: int, total: int) -> None:
    if sys.stdout.isatty():
        bar = "#" * (20 * done // total)
        print(f"\r  round {r}: [{bar:<20}] {done}/{total} clients reported", end="", flush=True)


def _clear_progress() -> None:
    if sys.stdout.isatty():
        print("\r" + " " * 60 + "\r", end="", flush=True)


# --- chaos -------------------------------------------------------------------------------------


class _Chaos:
    """SIGKILLs each function at least once (every instance it has at that moment) while rounds
    run, and restarts the Kafka broker once, in the middle of the run. (On Pub/Sub the emulator
    is not restarted: it keeps messages in memory only, unlike the service it stands for.)"""

    def __init__(self, platform: Any, rounds: int) -> None:
        self.platform = platform
        self.broker_round = max(1, rounds // 2)
        self.events: list[str] = []
        self.pending = ["ingest", "aggregate", "finalize"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._kill_functions, daemon=True)
        self._thread.start()

    def round_started(self, r: int) -> None:
        if r == self.broker_round and self.platform.kafka is not None:
            threading.Thread(target=self._restart_broker, args=(r,), daemon=True).start()

    def _restart_broker(self, r: int) -> None:
        time.sleep(0.5)
        self.platform.kafka.kill(1)
        self.events.append(f"round {r}: Kafka broker SIGKILLed")
        time.sleep(3.0)
        self.platform.kafka.restart(1)
        self.events.append(f"round {r}: Kafka broker restarted")

    def _kill_functions(self) -> None:
        while self.pending and not self._stop.wait(0.7):
            target = self.pending[0]
            runner = self.platform.runtime.services[target]
            if runner.processes():
                runner.kill_all()
                self.events.append(f"{target} SIGKILLed")
                self.pending.pop(0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.pending:
            self.events.append(f"never found running: {', '.join(self.pending)}")
