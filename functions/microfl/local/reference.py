"""The exact FedAvg (and the clip and robust statistics) that tests, benchmarks and the invariant
checker hold committed models to.

Written independently of `microfl.strategy`, `privacy` and `robust` (a plain float64 weighted
sum, no folding, no chunks; numpy's median and scipy's trim_mean over the whole stacked updates;
Krum from the paper), so a bug there cannot hide in the yardstick. One tolerance, DESIGN
invariant 7: a committed model is within 1e-6, relative to the largest weight, of the exact
float64 result (first rounded to each tensor's dtype: a float16 or integer tensor cannot hold
more)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "TOLERANCE",
    "clipped",
    "fedavg",
    "fedavg_error",
    "fedavg_mismatch",
    "fedbuff",
    "krum",
    "sq_distances",
    "statistic",
]

TOLERANCE = 1e-6

Tensors = Mapping[str, np.ndarray]


def fedavg(updates: Iterable[tuple[Tensors, float]]) -> dict[str, np.ndarray]:
    """sum(n_i * x_i) / sum(n_i) in float64, for (tensors, num_examples) pairs; updates may be
    a generator, so a benchmark can stream them from storage."""
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for tensors, n in updates:
        total += n
        for name, arr in tensors.items():
            term = np.asarray(arr, dtype=np.float64) * n
            sums[name] = sums[name] + term if name in sums else term
    if total <= 0:
        raise ValueError("FedAvg of no examples: give at least one update with num_examples > 0")
    return {name: s / total for name, s in sums.items()}


def fedbuff(
    current: Tensors,
    updates: Iterable[tuple[Tensors, float, Tensors, int]],
    exponent: float,
    clip: float | None = None,
) -> dict[str, np.ndarray]:
    """FedBuff's next point before the server update, in float64: current + sum_i n_i
    (1 + tau_i) ** -exponent (x_i - base_i) / sum_i n_i for (x_i, n_i, base_i, tau_i); with
    clip, each delta from ITS base is clipped first (`clipped`)."""
    step: dict[str, np.ndarray] = {k: np.zeros(np.shape(v)) for k, v in current.items()}
    total = 0.0
    for x, n, base, tau in updates:
        if clip is not None:
            x = clipped(x, base, clip)[0]
        w = (1.0 + tau) ** -exponent
        total += n
        for k in step:
            step[k] = step[k] + n * w * (np.asarray(x[k], np.float64) - base[k].astype(np.float64))
    if total <= 0:
        raise ValueError("FedBuff of no examples: give at least one update with num_examples > 0")
    return {k: current[k].astype(np.float64) + step[k] / total for k in current}


def fedavg_error(model: Tensors, exact: Tensors) -> float:
    """The largest |model - exact| over every tensor, divided by the largest |exact| weight."""
    return _worst(model, exact)[0]


def fedavg_mismatch(model: Tensors, exact: Tensors) -> str | None:
    """None when model is the exact FedAvg within TOLERANCE; else what differs, to show."""
    if set(model) != set(exact):
        return f"the model has tensors {sorted(model)}; the FedAvg has {sorted(exact)}"
    for name, want in exact.items():
        if np.shape(model[name]) != want.shape:
            return f"tensor {name!r} has shape {np.shape(model[name])}; FedAvg {want.shape}"
    error, name = _worst(model, exact)
    if error > TOLERANCE:
        return (
            f"tensor {name!r} is {error:.3g} of the largest weight away from the exact FedAvg "
            f"(tolerance {TOLERANCE:g})"
        )
    return None


def _worst(model: Tensors, exact: Tensors) -> tuple[float, str]:
    """(relative error, tensor) of the tensor furthest from exact; inf for NaN or Inf."""
    largest = max((float(np.max(np.abs(a))) for a in exact.values() if a.size), default=0.0)
    worst, where = 0.0, ""
    for name, want in exact.items():
        got = np.asarray(model[name])
        if not got.size:
            continue
        diff = float(np.max(np.abs(got.astype(np.float64) - _rounded(want, got.dtype))))
        if not np.isfinite(diff):
            return float("inf"), name
        if diff > worst:
            worst, where = diff, name
    if worst == 0.0:
        return 0.0, where
    return (worst / largest if largest > 0 else float("inf")), where


def _rounded(exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """exact as the best a tensor of dtype can hold, back in float64 to compare."""
    held = np.rint(exact) if dtype.kind in "iub" else exact
    return held.astype(dtype).astype(np.float64)


def clipped(
    update: Tensors, base: Tensors, bound: float, dp: bool = False
) -> tuple[dict[str, np.ndarray], bool]:
    """(base + min(1, C/||delta||) * delta over all floating tensors, whether ||delta|| <= C);
    integer tensors as sent (dp: the base's)."""
    deltas = {
        k: u.astype(np.float64) - base[k].astype(np.float64)
        for k, u in update.items()
        if u.dtype.kind == "f"
    }
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
    s = min(1.0, bound / norm) if norm > 0 else 1.0
    out = {
        k: (base[k] + s * deltas[k] if k in deltas else (base[k] if dp else u))
        for k, u in update.items()
    }
    return out, norm <= bound


def sq_distances(x: np.ndarray) -> np.ndarray:
    """Squared L2 distances between the rows of x, pair by pair."""
    n = len(x)
    return np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)])


def krum(x: np.ndarray, f: int, m: int) -> list[int]:
    """Blanchard et al. 2017, multi-Krum, written plainly: the m rows with the lowest sums of
    squared distances to their n-f-2 nearest others (at least 1), ties to the lower index."""
    n = len(x)
    d = sq_distances(x)
    k = min(max(1, n - f - 2), n - 1)
    scores = []
    for i in range(n):
        others = sorted(d[i][j] for j in range(n) if j != i)
        scores.append(sum(others[:k]))
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(ranked[:m])


def statistic(
    strategy: str, options: Mapping[str, float], updates: Sequence[Tensors], names: Iterable[str]
) -> dict[str, np.ndarray]:
    """median, trimmed-mean or krum over the whole stacked float64 updates (in the round's
    order, sorted by client), as numpy and scipy compute them; float64, not yet cast."""
    import scipy.stats

    names = list(names)
    if strategy == "krum":
        flat = np.stack(
            [np.concatenate([u[k].astype(np.float64).ravel() for k in names]) for u in updates]
        )
        updates = [updates[i] for i in krum(flat, int(options["f"]), int(options["m"]))]
    out = {}
    for k in names:
        x = np.stack([u[k].astype(np.float64) for u in updates])
        if strategy == "median":
            out[k] = np.median(x, axis=0)
        elif strategy == "trimmed-mean":
            out[k] = scipy.stats.trim_mean(x, options["beta"], axis=0)
        else:
            out[k] = np.mean(x, axis=0)  # krum: the unweighted mean of the chosen
    return out
