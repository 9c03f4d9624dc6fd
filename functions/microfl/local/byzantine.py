"""Byzantine clients for `microfl demo --attack` and `microfl robustness`: which clients attack,
and what they post instead of their honest update.

The attackers are ordinary clients otherwise: valid tokens, uploads over HTTP through ingest, so
the server sees nothing but their numbers. The transforms are pure (arrays in, arrays out) and the
choice of attackers is deterministic (the first ceil(fraction x clients) client indices), so a run
with the same seed repeats bit for bit."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTACKS",
    "DEFAULT_BOOST",
    "Attack",
    "add_attack_arguments",
    "boosted",
    "byzantine_clients",
    "describe",
    "flipped_labels",
]

Tensors = dict[str, np.ndarray]

# scale: base + boost x delta (a model-replacement style boosted update, Bagdasaryan et al. 2020);
# sign-flip: base - boost x delta; label-flip: honest training on labels y -> 9 - y;
# examples: an honest update that claims the job's max_examples as its num_examples (its weight).
ATTACKS = ("scale", "sign-flip", "label-flip", "examples")
# The boost of scale and sign-flip: 10, about 1/(fraction of attackers) at 10-20 % Byzantine, the
# factor a model-replacement attacker picks to outweigh the honest majority in a mean.
DEFAULT_BOOST = 10.0


def byzantine_clients(clients: int, fraction: float) -> range:
    """The attacking client indices: the first ceil(fraction x clients)."""
    if clients < 1:
        raise ValueError(f"need at least one client, got {clients}")
    if not 0 <= fraction < 1:
        raise ValueError(f"--byzantine {fraction:g}: use a fraction in [0, 1), e.g. 0.2")
    # round() first: 0.2 x 20 is 4.000000000000001 in floating point, which is 4 attackers.
    return range(math.ceil(round(fraction * clients, 9)))


def boosted(
    base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], factor: float
) -> Tensors:
    """base + factor x (trained - base) for floating tensors, in float64, cast back; other tensors
    (counters) as trained."""
    out: Tensors = {}
    for name, arr in trained.items():
        if arr.dtype.kind != "f":
            out[name] = np.array(arr)
            continue
        start = np.asarray(base[name], dtype=np.float64)
        delta = np.asarray(arr, dtype=np.float64) - start
        out[name] = (start + factor * delta).astype(arr.dtype)
    return out


def flipped_labels(y: np.ndarray, classes: int = 10) -> np.ndarray:
    """y -> classes - 1 - y: every example taught as the wrong class, consistently."""
    return (classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)


@dataclass(frozen=True)
class Attack:
    """One Byzantine client's behaviour: `labels` before local training, then called as the
    client's tamper hook on (round's base model, trained tensors, num_examples)."""

    kind: str
    boost: float = DEFAULT_BOOST
    max_examples: int = 1_000_000  # the job's: the most num_examples ingest accepts

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; use one of {', '.join(ATTACKS)}")
        if self.boost <= 0:
            raise ValueError(f"--boost {self.boost:g}: use a positive factor, e.g. 10")

    def labels(self, y: np.ndarray) -> np.ndarray:
        return flipped_labels(y) if self.kind == "label-flip" else y

    def __call__(
        self, base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray], num_examples: int
    ) -> tuple[Tensors, int]:
        if self.kind == "scale":
            return boosted(base, trained, self.boost), num_examples
        if self.kind == "sign-flip":
            return boosted(base, trained, -self.boost), num_examples
        if self.kind == "examples":
            return dict(trained), self.max_examples
        return dict(trained), num_examples  # label-flip: the damage is in the labels


def add_attack_arguments(p: argparse.ArgumentParser, several: bool) -> None:
    """--attack (once, or repeatable when `several`), --byzantine and --boost."""
    p.add_argument(
        "--attack",
        choices=ATTACKS,
        action="append" if several else "store",
        help="Byzantine clients: scale or sign-flip their delta by --boost, train on labels "
        "9 - y, or claim the job's max_examples"
        + (" (repeatable; default: all)" if several else ""),
    )
    p.add_argument(
        "--byzantine",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="the first ceil(FRACTION x clients) clients attack (default 0.2)",
    )
    p.add_argument(
        "--boost",
        type=float,
        default=DEFAULT_BOOST,
        help=f"the factor of --attack scale and sign-flip (default {DEFAULT_BOOST:g})",
    )


def describe(kind: str | None, clients: int, fraction: float, boost: float) -> str:
    """The attack in a few words for progress lines ("" without one)."""
    if kind is None:
        return ""
    factor = f" x{boost:g}" if kind in ("scale", "sign-flip") else ""
    return f"; {len(byzantine_clients(clients, fraction))} Byzantine clients: {kind}{factor}"
