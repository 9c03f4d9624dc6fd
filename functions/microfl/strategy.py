"""Aggregation maths, pure: arrays and weights in, arrays out. No I/O here.

A round is a weighted mean computed in pieces: `fold` adds one update into a float64 running sum
(one update in memory at a time), `merge` adds partial sums, and a Strategy's `server_update`
turns the mean into the next global model, with optional optimiser state (FedAdam) that the
caller stores beside the model. Client-side strategies (FedProx) need nothing here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "OPTIONS",
    "SHARDED",
    "FedAdam",
    "FedAvg",
    "Strategy",
    "check_options",
    "fold",
    "make_strategy",
    "mean_of",
    "merge",
]

Tensors = dict[str, np.ndarray]

# Every strategy a job may name, with its options and their defaults (None: off unless given).
# `clip` is an L2 bound on each client's delta from the round's base model.
OPTIONS: dict[str, dict[str, float | None]] = {
    "fedavg": {"clip": None},
    "fedadam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "clip": None},
    "median": {},
    "trimmed-mean": {"beta": 0.1},
    "krum": {"f": 0, "m": 1},
    "dp-fedavg": {
        "noise_multiplier": 1.0,
        "clip": 1.0,  # the bound, or with target_quantile the first round's bound
        "target_quantile": None,  # adaptive clipping (Andrew et al. 2021) when given
        "clip_lr": 0.2,  # adaptive clipping's learning rate (eta_C)
        "delta": 1e-5,
    },
}
# Coordinate-wise statistics: computed over coordinate shards after the seal, not folded.
SHARDED = frozenset({"median", "trimmed-mean", "krum"})
_INTEGER = frozenset({"f", "m"})
# (lowest, highest, whether the lowest itself is allowed); highest is always excluded.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "clip": (0.0, math.inf, False),
    "lr": (0.0, math.inf, False),
    "beta1": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, True),
    "tau": (0.0, math.inf, False),
    "beta": (0.0, 0.5, True),
    "f": (0.0, math.inf, True),
    "m": (1.0, math.inf, True),
    "noise_multiplier": (0.0, math.inf, False),
    "target_quantile": (0.0, 1.0, False),
    "clip_lr": (0.0, math.inf, False),
    "delta": (0.0, 1.0, False),
}


def check_options(name: str, options: Mapping[str, float]) -> dict[str, float]:
    """The strategy's options with defaults filled in (None-defaults left out unless given);
    ValueError saying what to fix for an unknown strategy, option or value."""
    if name not in OPTIONS:
        raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(OPTIONS)}")
    known = OPTIONS[name]
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(known) or "no options"
        raise ValueError(f"strategy {name} takes {takes}; not {', '.join(unknown)}")
    out = {k: float(v) for k, v in known.items() if v is not None}
    for key, raw in options.items():
        value = float(raw)
        low, high, closed = _RANGES[key]
        if not (low <= value < high if closed else low < value < high):
            bounds = f"{'[' if closed else '('}{low:g}, {high:g})"
            raise ValueError(f"strategy option {key}={raw} is out of range; use one in {bounds}")
        if key in _INTEGER and value != int(value):
            raise ValueError(f"strategy option {key}={raw} must be a whole number")
        out[key] = value
    return out


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
    """The server update of a summing strategy (dp-fedavg's is FedAvg's on the noised mean)."""
    given = check_options(name, options or {})
    given.pop("clip", None)
    if name in ("fedavg", "dp-fedavg"):
        return FedAvg()
    if name == "fedadam":
        return FedAdam(**given)  # type: ignore[arg-type]
    raise ValueError(f"strategy {name} is a coordinate-wise statistic, not a server update")
