"""The demo's clients: worker processes that each run their share of the clients, one thread per
client, so that a slow client sleeping (a straggler) holds up no other client, as separate
devices would not; the deterministic choice of the slow clients; their command-line options."""

from __future__ import annotations

import argparse
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microfl.client import Client, JobDone

if TYPE_CHECKING:
    from microfl.local.byzantine import Attack
    from microfl.local.demo_config import DemoConfig

__all__ = [
    "Member",
    "add_straggler_arguments",
    "client_pool",
    "client_seed",
    "members",
    "run_clients",
    "slow_clients",
]


@dataclass(frozen=True)
class Member:
    """One client as a worker process runs it."""

    index: int
    token: str
    slowdown: float = 1.0
    attack: Attack | None = None
    step_time: float = 0.0


def slow_clients(clients: int, fraction: float) -> tuple[int, ...]:
    """ceil(fraction x clients) clients spread evenly over the indices (0, 4, 8, 12, 16 of 20
    at 0.25): deterministic, and not the Byzantine ones' block at the front."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"--slow-fraction must be between 0 and 1, got {fraction}")
    n = math.ceil(round(fraction * clients, 9))
    return tuple(j * clients // n for j in range(n)) if n else ()


def members(
    config: DemoConfig, tokens: list[str], attackers: range, attack: Attack | None
) -> list[list[Member]]:
    """The clients dealt round-robin to the config's worker processes, the slow ones first
    (spread over the processes too)."""
    slow = set(slow_clients(config.clients, config.slow_fraction))
    every = [
        Member(
            i,
            tokens[i],
            config.slowdown if i in slow else 1.0,
            attack if i in attackers else None,
            config.step_time,
        )
        for i in sorted(range(config.clients), key=lambda i: (i not in slow, i))
    ]
    return [g for g in (every[p :: config.processes] for p in range(config.processes)) if g]


def client_seed(config: DemoConfig, step: int, i: int) -> int:
    """Client i's training seed in round `step` (sync) or at its step-th update (async)."""
    return config.seed * 1_000_003 + step * 1_009 + i


def add_straggler_arguments(
    p: argparse.ArgumentParser, fraction: float, slowdown: float, step_time: float
) -> None:
    p.add_argument(
        "--slow-fraction",
        type=float,
        default=fraction,
        help="the fraction of the clients that are stragglers (spread evenly over the clients)",
    )
    p.add_argument(
        "--slowdown",
        type=float,
        default=slowdown,
        help="a straggler takes slowdown x as long: it sleeps (slowdown - 1) x its training "
        "time (or x --step-time, if longer) after each training",
    )
    p.add_argument(
        "--step-time",
        type=float,
        default=step_time,
        metavar="SECONDS",
        help="simulated devices: a local training takes at least this long (0: as long as it "
        "takes here)",
    )


def client_pool(config: DemoConfig) -> ProcessPoolExecutor:
    """The clients' worker processes, spawned (each imports torch and deals the data once): jobs
    with the same clients, alpha and seed can share them."""
    return ProcessPoolExecutor(
        config.processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(config.clients, config.alpha, config.seed),
    )


# --- in the worker processes ---------------------------------------------------------------------

_SHARDS: list[Any] = []


def _init_worker(clients: int, alpha: float, seed: int) -> None:
    import torch

    from microfl.local.demo_data import digits_shards

    torch.set_num_threads(1)
    _SHARDS[:] = digits_shards(clients, alpha, seed)[0]


def run_clients(
    url: str, job: str, group: list[Member], config: DemoConfig, r: int | None
) -> list[dict[str, Any]]:
    """Each member in a thread of its own: train round r and post (sync; at most
    config.threads at once when set, so a thousand clients on two cores do not all time out),
    or, with r None, train on the latest version and post until the job has made its versions
    (async: every member runs until the end, so none may wait for a thread)."""
    step = _round if r is not None else _versions
    bound = config.threads if r is not None and config.threads > 0 else len(group)
    with ThreadPoolExecutor(min(len(group), bound)) as threads:
        return list(threads.map(lambda m: step(url, job, m, config, r or 0), group))


def _torch_client(url: str, job: str, m: Member, compress: str | None) -> Any:
    from microfl.client.torch import TorchClient, mlp

    return TorchClient(
        Client(url, job, m.token, retries=10),
        mlp(),
        slowdown=m.slowdown,
        step_time=m.step_time,
        compress=compress,
    )


def _options(config: DemoConfig, m: Member, step: int) -> dict[str, Any]:
    x, y = _SHARDS[m.index]
    return {
        "x": x,
        "y": y if m.attack is None else m.attack.labels(y),
        "epochs": config.epochs,
        "lr": config.lr,
        "prox_mu": config.prox_mu,
        "seed": client_seed(config, step, m.index),
        "batch_size": config.batch_size,
        "tamper": m.attack,
    }


def _round(url: str, job: str, m: Member, config: DemoConfig, r: int) -> dict[str, Any]:
    """The server's answer, the loss, and "bytes": the update bodies it posted."""
    client = _torch_client(url, job, m, config.compress)
    answer = client.run_round(**_options(config, m, r))
    return {**answer, "bytes": client.client.bytes_sent}


def _versions(url: str, job: str, m: Member, config: DemoConfig, _: int) -> dict[str, Any]:
    """One client of an async job, training continuously: (its accepted update ids, how many
    trainings a 409 stale threw away)."""
    client = _torch_client(url, job, m, config.compress)
    accepted: list[str] = []
    stale = 0
    while True:
        try:
            answer = client.run_async(**_options(config, m, len(accepted) + 1))
        except JobDone:
            return {"client": m.index, "accepted": accepted, "stale_retries": stale}
        stale += answer["stale_retries"]
        if answer["status"] == "accepted":
            accepted.append(answer["update"])
