"""`microfl demo`: a real federated training run on the local platform.

Clients hold non-IID shards (Dirichlet) of scikit-learn's bundled digits data set and train a
softmax-regression model locally with numpy; they talk to ingest over HTTP only, and the global
model of every round is committed by the serverless pipeline (Kafka events, object storage)."""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from microfl.client import Client

__all__ = ["run_demo", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID concentration")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fan-in", type=int, default=5)


def load_digits_split(clients: int, alpha: float, seed: int) -> tuple[list, tuple]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the demo needs scikit-learn (make demo installs it)") from exc
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    shards: list[list[int]] = [[] for _ in range(clients)]
    for label in range(10):
        idx = train[y[train] == label]
        rng.shuffle(idx)
        shares = rng.dirichlet([alpha] * clients)
        bounds = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, bounds)):
            shards[c] += part.tolist()
    data = [(x[np.array(s, dtype=int)], y[np.array(s, dtype=int)]) for s in shards]
    return data, (x[test], y[test], x[train], y[train])


def softmax_loss(model: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits = x @ model["w"] + model["b"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, float((p.argmax(axis=1) == y).mean())


def train_local(
    model: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    lr: float = 0.5,
    batch: int = 32,
) -> dict[str, np.ndarray]:
    w, b = model["w"].astype(np.float64), model["b"].astype(np.float64)
    rng = np.random.default_rng(seed)
    onehot = np.eye(10)[y]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            i = order[start : start + batch]
            logits = x[i] @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            grad = (p - onehot[i]) / len(i)
            w -= lr * x[i].T @ grad
            b -= lr * grad.sum(axis=0)
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def run_demo(args: argparse.Namespace) -> int:
    from microfl.cli import local_secret
    from microfl.jobs import JobSpec, create_job
    from microfl.local.platform import LocalPlatform, read_state
    from microfl.serde import tensors_to_safetensors
    from microfl.store import open_store
    from microfl.tokens import issue_token

    t0 = time.monotonic()
    secret = local_secret()
    platform = None
    state = read_state()
    if state is None:
        print(
            "starting the local platform (Kafka, file store, ingest/aggregate/finalize) ...",
            flush=True,
        )
        platform = LocalPlatform(secret, ping_interval=2.0)
        state = platform.start()
        print(
            f"  up in {time.monotonic() - t0:.1f}s; ingest at {state['ingest_url']}, "
            f"logs in {state['logs']}",
            flush=True,
        )
    else:
        print(f"using the running local platform at {state['ingest_url']}")
    try:
        return _train(
            args,
            state,
            secret,
            open_store(state["store"]),
            create_job,
            JobSpec,
            tensors_to_safetensors,
            issue_token,
        )
    finally:
        if platform is not None:
            print("stopping the local platform ...", flush=True)
            platform.stop()


def _train(
    args: argparse.Namespace,
    state: dict[str, Any],
    secret: str,
    store: Any,
    create_job: Any,
    JobSpec: Any,
    to_bytes: Any,
    issue_token: Any,
) -> int:
    shards, (x_test, y_test, x_pool, y_pool) = load_digits_split(
        args.clients, args.alpha, args.seed
    )
    init = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    job = f"demo-{int(time.time())}"
    spec = JobSpec.for_model(
        job,
        init,
        rounds=args.rounds,
        min_clients=args.clients,
        round_timeout=120.0,
        fan_in=args.fan_in,
        created_at=time.time(),
    )
    create_job(store, spec, to_bytes(init))
    sizes = sorted(len(y) for _, y in shards)
    print(
        f"job {job}: {args.clients} clients, shard sizes {sizes[0]}..{sizes[-1]} "
        f"(Dirichlet alpha {args.alpha}), {args.rounds} rounds of {args.epochs} local epochs"
    )
    clients = [
        Client(state["ingest_url"], job, issue_token(secret.encode(), job, f"client-{i:02d}"))
        for i in range(args.clients)
    ]

    def work(i: int, r: int) -> None:
        model, version = clients[i].model()
        assert version == r - 1, f"client {i} fetched version {version} for round {r}"
        x, y = shards[i]
        if len(y) == 0:
            x, y = x_pool[:1], y_pool[:1]  # an empty shard still reports (one example)
        clients[i].post_update(
            r, train_local(model, x, y, args.epochs, args.seed * 1000 + i), len(y)
        )

    rows = []
    print(f"{'round':>5} {'accuracy':>9} {'loss':>7} {'updates':>8} {'time s':>7}")
    with ThreadPoolExecutor(4) as pool:
        for r in range(1, args.rounds + 1):
            start = time.monotonic()
            list(pool.map(lambda i, r=r: work(i, r), range(args.clients)))
            clients[0].wait_for_version(r)
            model, _ = clients[0].model()
            loss, acc = softmax_loss(model, x_test, y_test)
            record = clients[0].round(r)
            rows.append(
                {
                    "round": r,
                    "accuracy": acc,
                    "loss": loss,
                    "included": len(record["included"]),
                    "seconds": time.monotonic() - start,
                }
            )
            print(
                f"{r:>5} {acc:>9.3f} {loss:>7.3f} {len(record['included']):>8} "
                f"{rows[-1]['seconds']:>7.2f}",
                flush=True,
            )
    central = train_local(init, x_pool, y_pool, args.epochs * args.rounds, args.seed)
    c_loss, c_acc = softmax_loss(central, x_test, y_test)
    print(
        f"centralised baseline (pooled data, same epochs): accuracy {c_acc:.3f}, loss {c_loss:.3f}"
    )
    report = Path(state["logs"]).parent / "demo" / job
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(
        json.dumps(
            {
                "job": job,
                "rounds": rows,
                "centralised": {"accuracy": c_acc, "loss": c_loss},
                "clients": args.clients,
                "alpha": args.alpha,
                "epochs": args.epochs,
            },
            indent=2,
        )
    )
    for r in range(1, args.rounds + 1):
        (report / f"round-{r:03d}.json").write_text(json.dumps(clients[0].round(r), indent=2))
    print(f"report: {report}")
    return 0
