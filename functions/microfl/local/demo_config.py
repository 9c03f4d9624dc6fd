"""The demo's configuration and result (microfl.local.demo), on their own so that the demo's
helper modules can use them without importing the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microfl.local.byzantine import DEFAULT_BOOST

__all__ = ["DemoConfig", "DemoResult"]


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
    threads: int = 0  # sync rounds: most clients training at once per process (0: all of them)
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
    mode: str = "sync"  # async: FedBuff versions, `rounds` of them, `buffer` updates each
    buffer: int = 0  # K; 0: half the clients
    max_staleness: int = 10
    staleness_exponent: float = 0.5
    slow_fraction: float = 0.0  # stragglers: microfl.local.demo_clients.slow_clients
    slowdown: float = 1.0
    step_time: float = 0.0  # simulated devices: seconds a local training takes at least
    compress: str | None = None  # how clients send updates: fp16, bf16, int8 (microfl.compress)

    @property
    def k(self) -> int:
        return self.buffer or max(1, self.clients // 2)


@dataclass
class DemoResult:
    job: str
    rows: list[dict[str, Any]]
    centralised: dict[str, float]
    model_sha256: list[str]  # version 0..rounds
    chaos: list[str] = field(default_factory=list)
    report: Path | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)  # async: accepted ids, stale
