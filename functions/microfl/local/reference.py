"""The exact FedAvg that tests, benchmarks and the invariant checker hold committed models to.

Written independently of `microfl.strategy` (a plain float64 weighted sum, no folding, no
chunks), so a bug there cannot hide in the yardstick. One tolerance, DESIGN invariant 7: a
committed model is within 1e-6, relative to the largest weight, of the exact float64 result
(first rounded to each tensor's dtype: a float16 or integer tensor cannot hold more)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["TOLERANCE", "fedavg", "fedavg_error", "fedavg_mismatch"]

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
