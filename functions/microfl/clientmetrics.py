"""Client-reported metrics: the `metrics` an update's __metadata__ may carry (checked at ingest)
and their example-weighted sums, which travel with a round's exact sums to the commit.

A sum is an exact rational (fractions.Fraction): every finite float is a dyadic rational, so
sum(n_i * m_i) is the same number however the tree groups and orders the updates, and the mean
the record holds, rounded once from it, is byte-identical whatever the tree's shape (DESIGN
invariant 7). Its size is bounded: the denominator is a power of two of at most 2**1074, the
numerator below N * 10**12 * 2**2098 (about 650 digits at worst; some 20 for a value like 0.31).
A sum keeps at most MAX_ROUND_NAMES names, the alphabetically first: keeping the k smallest
names of a union is the same whichever way the union is grouped, so that bound is exact too."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from microfl.errors import InvalidUpdate

__all__ = [
    "MAX_NAMES",
    "MAX_NAME_LENGTH",
    "MAX_ROUND_NAMES",
    "MetricSums",
    "client_metrics",
    "metrics_to_text",
]

MAX_NAMES = 32  # metrics per update
MAX_NAME_LENGTH = 64  # characters of a name (names reach the record and the operator console)
MAX_ROUND_NAMES = 64  # distinct names a round's record keeps: the alphabetically first
_EXAMPLE = '{"loss": 0.31, "accuracy": 0.92}'


def metrics_to_text(metrics: Mapping[str, float]) -> str:
    """The __metadata__ value a client sends: compact JSON, names sorted."""
    return json.dumps(
        {str(k): float(v) for k, v in metrics.items()},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )


def client_metrics(metadata: Mapping[str, str]) -> dict[str, float]:
    """The update's metrics (empty without `metrics`); InvalidUpdate says what to fix."""
    raw = metadata.get("metrics")
    if raw is None:
        return {}
    try:
        doc = json.loads(
            raw, parse_int=float, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates
        )
    except InvalidUpdate:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidUpdate(
            f"__metadata__.metrics is not JSON ({exc}); send a JSON object of finite numbers, "
            f"e.g. {_EXAMPLE}"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidUpdate(
            f"__metadata__.metrics is a JSON {type(doc).__name__}, not an object; send an "
            f"object of finite numbers, e.g. {_EXAMPLE}"
        )
    if len(doc) > MAX_NAMES:
        raise InvalidUpdate(f"__metadata__.metrics has {len(doc)} names; send at most {MAX_NAMES}")
    for name, value in doc.items():
        if not (0 < len(name) <= MAX_NAME_LENGTH and name.isprintable()):
            raise InvalidUpdate(
                f"__metadata__.metrics name {name[: MAX_NAME_LENGTH + 1]!r} is not a name of 1 to "
                f"{MAX_NAME_LENGTH} printable characters; rename it"
            )
        if type(value) is not float or not math.isfinite(value):  # parse_int: ints are floats
            hint = " (true and false are not numbers)" if isinstance(value, bool) else ""
            raise InvalidUpdate(
                f"__metadata__.metrics[{name!r}] is {json.dumps(value)[:40]}, not a finite "
                f"number; send a finite number{hint}"
            )
    return doc


def _refuse_constant(token: str) -> float:
    raise InvalidUpdate(f"__metadata__.metrics holds {token}; send finite numbers only")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        twice = min(n for n, count in Counter(p[0] for p in pairs).items() if count > 1)
        raise InvalidUpdate(f"__metadata__.metrics names {twice[:80]!r} twice; send each once")
    return doc


@dataclass(frozen=True)
class MetricSums:
    """Per metric name, sorted: (name, exact sum of n_i * m_i, sum of n_i) over the updates
    that reported it; `+` merges two (associative, commutative, exact)."""

    sums: tuple[tuple[str, Fraction, int], ...] = ()

    @classmethod
    def of(cls, metrics: Mapping[str, float], n: int) -> MetricSums:
        """One update's contribution, n = its num_examples."""
        items = sorted((name, Fraction(v) * n, n) for name, v in metrics.items())
        return cls(tuple(items[:MAX_ROUND_NAMES]))

    def __add__(self, other: MetricSums) -> MetricSums:
        if not other.sums:
            return self
        merged = {name: (total, n) for name, total, n in self.sums}
        for name, total, n in other.sums:
            t0, n0 = merged.get(name, (Fraction(0), 0))
            merged[name] = (t0 + total, n0 + n)
        names = sorted(merged)[:MAX_ROUND_NAMES]
        return MetricSums(tuple((name, *merged[name]) for name in names))

    def means(self) -> dict[str, float]:
        """name -> the example-weighted mean, correctly rounded from the exact sums."""
        return {name: float(total / n) for name, total, n in self.sums if n > 0}

    def to_text(self) -> str:
        return json.dumps(
            [[name, str(total), n] for name, total, n in self.sums], separators=(",", ":")
        )

    @classmethod
    def from_text(cls, text: str) -> MetricSums:
        """The inverse of to_text; ValueError for anything else (a partial's own field)."""
        items = [(str(name), Fraction(str(total)), int(n)) for name, total, n in json.loads(text)]
        if [i[0] for i in items] != sorted({i[0] for i in items}) or len(items) > MAX_ROUND_NAMES:
            raise ValueError("a partial's metric sums are not sorted, unique and bounded")
        return cls(tuple(items))
