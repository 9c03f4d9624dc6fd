"""Aggregation maths, pure: arrays and weights in, arrays out. No I/O here.

A round is a weighted mean computed in pieces: `fold` adds one update into a float64 running sum
(one update in memory at a time), `merge` adds partial sums, and a Strategy's `server_update`
turns the mean into the next global model, with optional optimiser state (FedAdam) that the
caller stores beside the model. Client-side strategies (FedProx) need nothing here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["FedAdam", "FedAvg", "Strategy", "fold", "make_strategy", "mean_of", "merge"]

Tensors = dict[str, np.ndarray]


def fold(acc: Tensors | None, update: Mapping[str, np.ndarray], weight: float) -> Tensors:
    """acc + weight * update, accumulated in float64 (acc is updated in place)."""
    if acc is None:
        acc = {name: np.zeros(arr.shape, dtype=np.float64) for name, arr in update.items()}
    for name, arr in update.items():
        target = acc[name]
        scratch = np.multiply(arr, weight, dtype=np.float64)
        np.add(target, scratch, out=target)
    return acc


def merge(acc: Tensors | None, partial: Mapping[str, np.ndarray]) -> Tensors:
    """acc + partial (float64 sums of disjoint chunks)."""
    if acc is None:
        return {name: np.array(arr, dtype=np.float64) for name, arr in partial.items()}
    for name, arr in partial.items():
        np.add(acc[name], arr, out=acc[name])
    return acc


def mean_of(total: Tensors, weight: float) -> Tensors:
    if weight <= 0:
        raise ValueError("the mean of no updates is undefined")
    return {name: arr / weight for name, arr in total.items()}


def cast_like(tensors: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> Tensors:
    """float64 results back to the model's dtypes (integers rounded, not truncated)."""
    out = {}
    for name, arr in tensors.items():
        dtype = like[name].dtype
        out[name] = (np.rint(arr) if dtype.kind in "iub" else arr).astype(dtype)
    return out


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    def server_update(
        self, current: Tensors, mean: Tensors, state: Tensors | None
    ) -> tuple[Tensors, Tensors | None]:
        """(next model in the model's dtypes, optimiser state to store or None)."""
        ...


@dataclass(frozen=True)
class FedAvg:
    """McMahan et al. 2017: the next model is the example-weighted mean of the updates."""

    name: str = "fedavg"

    def server_update(
        self, current: Tensors, mean: Tensors, state: Tensors | None
    ) -> tuple[Tensors, Tensors | None]:
        return cast_like(mean, current), None


@dataclass(frozen=True)
class FedAdam:
    """Reddi et al. 2021 (Adaptive Federated Optimization): Adam on the pseudo-gradient
    mean - current, with moments m/* and v/* kept as float64 state."""

    name: str = "fedadam"
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def server_update(
        self, current: Tensors, mean: Tensors, state: Tensors | None
    ) -> tuple[Tensors, Tensors | None]:
        new_model: Tensors = {}
        new_state: Tensors = {}
        for name, x in current.items():
            if x.dtype.kind != "f":  # counters and the like: take the mean
                new_model[name] = cast_like({name: mean[name]}, current)[name]
                continue
            delta = mean[name] - x.astype(np.float64)
            m = state[f"m/{name}"] if state else np.zeros_like(delta)
            v = state[f"v/{name}"] if state else np.zeros_like(delta)
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            step = x.astype(np.float64) + self.lr * m / (np.sqrt(v) + self.tau)
            new_model[name] = step.astype(x.dtype)
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        return new_model, new_state


def make_strategy(name: str, options: Mapping[str, float] | None = None) -> Strategy:
    if name == "fedavg":
        return FedAvg()
    if name == "fedadam":
        given = dict(options or {})
        unknown = sorted(set(given) - {"lr", "beta1", "beta2", "tau"})
        if unknown:
            raise ValueError(f"fedadam takes options lr, beta1, beta2, tau; not {unknown}")
        return FedAdam(**{k: float(v) for k, v in given.items()})  # type: ignore[arg-type]
    raise ValueError(f"unknown strategy {name!r}; use fedavg or fedadam")
