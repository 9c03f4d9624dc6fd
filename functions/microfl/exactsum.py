"""Exact, order-independent example-weighted sums: the same included set gives the same bytes,
whatever the arrival order, the shape of the merge tree or the retries on the way.

Representation. Every tensor of the model gets a fixed grid g = 2**(e - PRECISION_BITS), where
2**(e-1) <= max|base| < 2**e for the round's base model (known to every function before the
round opens), or 2**e = the floor (default 2**-10) when the base tensor is all zeros or smaller.
An update x with integer weight w (1 <= w <= max_weight) adds, per element, the integer
y = rint(fl(w * x / g)) (one float64 product and one rounding: a function of that update alone)
to a two-limb integer T = hi * 2**56 + lo, kept canonical with 0 <= lo < 2**56 (int64 arrays,
two's complement hi). Integer addition is associative and commutative, so T, and everything
computed from it, depends only on the set of updates. The fold splits y = h * 2**56 + r exactly
in float64 (|r| <= 2**55) and adds r to lo and h to hi with no carry test; lo is normalised
(its carry moved into hi) after every block of at most MAX_GROUP updates, and on every merge.

Compressed updates (microfl.compress) fold through loops of their own: F16/BF16 bits widened
exactly a block at a time, int8 codes as base + code * scale in float64 element by element; y is
a function of the value, so they give the bytes of folding that value as float32/float64.

Headroom. hi must hold T / 2**56, so |T| < 2**119. Folds and merges refuse more than
MAX_UPDATES = 2**21 updates, and each update must satisfy |x| / g < 2**(98 - wbits) where
wbits = max_weight.bit_length(): |x| < 2**(58 - wbits) * 2**e, i.e. 2**18 times the base's
scale at max_weight 1e12, 2**38 at 1e6. A value beyond that, NaN or Inf refuses the whole
update (ValueOutOfRange), deterministically, and leaves the accumulator as it was.

Precision. The mean is (T * g) / W in float64: |mean - exact| <= g/2 * N/W (rounding y)
+ 2**-53 * sum(w|x|)/W (the product, only where w|x|/g >= 2**53) + 3 * 2**-53 * |mean|
(conversion and division): at most about 2**-41 * max|base| + 4e-16 * max|x|, so within 1e-6
of the largest |mean| unless the mean shrinks below ~2**-21 of the base's largest value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from microfl.compress import HALF, Q8, Tensor, widen
from microfl.errors import InvalidUpdate
from microfl.foldloops import LIMB, MASK, carry, flat, group, scaled_delta

__all__ = ["MAX_UPDATES", "ExactSum", "ValueOutOfRange"]

PRECISION_BITS = 40
FLOOR = 2.0**-10
MAX_UPDATES = 2**21
MAX_GROUP = 64  # updates folded per block before lo is normalised: |lo| < 2**56 + 64 * 2**55
_R = float(2**LIMB)


class ValueOutOfRange(InvalidUpdate):
    """An update value is NaN, Inf, or too far beyond the base model's scale to sum exactly."""


class ExactSum:
    """sum(w_i * x_i) over a set of updates, exactly on each tensor's grid (see the module)."""

    def __init__(
        self,
        base: Mapping[str, np.ndarray],
        max_weight: int = 10**12,
        precision_bits: int = PRECISION_BITS,
        floor: float = FLOOR,
    ) -> None:
        self.shapes = {name: tuple(arr.shape) for name, arr in sorted(base.items())}
        self.dtypes = {name: np.dtype(arr.dtype) for name, arr in base.items()}
        self.max_weight = int(max_weight)
        wbits = self.max_weight.bit_length()
        self.grid: dict[str, int] = {}  # g = 2**grid[name]
        self.xlim: dict[str, float] = {}
        for name, arr in base.items():
            top = float(np.max(np.abs(arr))) if arr.size else 0.0
            e = max(np.frexp(top)[1] if np.isfinite(top) else 0, np.frexp(floor)[1])
            self.grid[name] = int(e) - precision_bits
            self.xlim[name] = float(np.ldexp(1.0, min(98 - wbits + self.grid[name], 1023)))
        self.hi = {n: np.zeros(s, dtype=np.int64) for n, s in self.shapes.items()}
        self.lo = {n: np.zeros(s, dtype=np.int64) for n, s in self.shapes.items()}
        self.count = 0
        self.weight = 0

    def fold(self, update: Mapping[str, Tensor], weight: int) -> None:
        """Add weight * update; raises ValueOutOfRange (accumulator unchanged) when refused."""
        refused = self.fold_many([update], [weight])
        if refused:
            raise refused[0][1]

    def fold_many(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        weights: Sequence[int],
        bases: Sequence[Mapping[str, np.ndarray]] | None = None,
        scales: Sequence[float] | None = None,
    ) -> list[tuple[int, ValueOutOfRange]]:
        """Fold several updates block by block (the accumulator block stays in cache across
        them). With bases and scales, fold the deltas (x_i - base_i) * scale_i of plain float
        updates computed in float64 on the fly: the bits of folding those deltas as float64
        arrays, without them. Returns (index, error) of those refused; the others are in,
        exactly once."""
        if len(updates) != len(weights):
            raise ValueError("fold_many needs one weight per update")
        if (
            (bases is None) != (scales is None)
            or len(bases or updates) != len(updates)
            or len(scales or updates) != len(updates)
        ):
            raise ValueError("fold_many's deltas need one base and one scale per update")
        for w in weights:
            if not (isinstance(w, int | np.integer) and 1 <= w <= self.max_weight):
                raise ValueError(f"weight must be an integer in 1..{self.max_weight}, got {w!r}")
        if self.count + len(updates) > MAX_UPDATES:
            raise OverflowError(f"an exact sum holds at most {MAX_UPDATES} updates")
        for i, u in enumerate(updates):
            b = None if bases is None else bases[i]
            if set(u) != set(self.shapes) or any(
                u[n].shape != s or not self._takes(n, u[n], b) for n, s in self.shapes.items()
            ):
                raise ValueError("update tensors' names, shapes or dtypes differ from the base's")
        refused: dict[int, ValueOutOfRange] = {}
        for g0 in range(0, len(updates), MAX_GROUP):
            idx = list(range(g0, min(g0 + MAX_GROUP, len(updates))))
            done: list[str] = []
            for name in self.shapes:
                live = [k for k in idx if k not in refused]
                if not live:
                    break
                hi, lo = self.hi[name].reshape(-1), self.lo[name].reshape(-1)
                xs = tuple(flat(updates[k][name]) for k in live)
                cs = np.array([np.ldexp(float(weights[k]), -self.grid[name]) for k in live])
                deltas = None
                if bases is not None and scales is not None:
                    bs = tuple(flat(bases[k][name]) for k in live)
                    deltas = (bs, np.array([float(scales[k]) for k in live]))
                bad = group(hi, lo, xs, cs, self.xlim[name], deltas)
                for j in np.flatnonzero(bad >= 0):
                    k, stop = live[j], int(bad[j])
                    arr = updates[k][name]
                    if bases is not None and scales is not None:  # plain arrays (_takes)
                        arr = scaled_delta(widen(arr), bases[k][name], float(scales[k]))
                    refused[k] = self._refusal(name, arr)
                    self._undo(updates, weights, k, done, name, stop, bases, scales)
                done.append(name)
        for k in range(len(updates)):
            if k not in refused:
                self.count += 1
                self.weight += int(weights[k])
        return sorted(refused.items())

    def _takes(self, name: str, x: Any, bases: Mapping[str, np.ndarray] | None = None) -> bool:
        """The base's dtype, or float64 for a floating tensor (clipped updates are float64, so
        rounding them back cannot push them past the clip bound); for a float32 one also F16,
        BF16 and int8 deltas (microfl.compress). For a delta folded on the fly, the dtype of its
        own base (a plain array of the same shape)."""
        if bases is not None:
            ref = bases[name]
            if isinstance(x, Q8) or x.dtype in HALF or ref.shape != self.shapes[name]:
                return False
            return x.dtype == ref.dtype or (ref.dtype.kind == "f" and x.dtype == np.float64)
        base = self.dtypes[name]
        if isinstance(x, Q8) or x.dtype in HALF:
            return base == np.float32
        return x.dtype == base or (base.kind == "f" and x.dtype == np.float64)

    def _undo(
        self,
        updates: Sequence[Mapping[str, Tensor]],
        weights: Sequence[int],
        k: int,
        done: list[str],
        name: str,
        stop: int,
        bases: Sequence[Mapping[str, np.ndarray]] | None,
        scales: Sequence[float] | None,
    ) -> None:
        """Subtract update k folded into tensors `done` and elements [0, stop) of `name`
        (exact: rint is symmetric, so folding with -w cancels it to the last bit)."""
        for t, end in [(d, self.hi[d].size) for d in done] + [(name, stop)]:
            hi, lo = self.hi[t].reshape(-1)[:end], self.lo[t].reshape(-1)[:end]
            x = flat(updates[k][t])
            x = Q8(x.codes[:end], x.scales, x.base[:end]) if isinstance(x, Q8) else x[:end]
            deltas = None
            if bases is not None and scales is not None:
                deltas = ((flat(bases[k][t])[:end],), np.array([float(scales[k])]))
            c = np.array([-np.ldexp(float(weights[k]), -self.grid[t])])
            group(hi, lo, (x,), c, self.xlim[t], deltas)

    def _refusal(self, name: str, arr: Any) -> ValueOutOfRange:
        with np.errstate(invalid="ignore"):  # a signalling NaN stays NaN
            v = widen(arr).astype(np.float64)
        if not np.isfinite(v).all():
            return ValueOutOfRange(f"update tensor {name!r} contains NaN or Inf")
        return ValueOutOfRange(
            f"update tensor {name!r} has a value of {float(np.max(np.abs(v))):.3g}; exact "
            f"aggregation takes |x| < {self.xlim[name]:.3g} there (2**"
            f"{58 - self.max_weight.bit_length()} times the base model's scale at num_examples"
            f" <= {self.max_weight})"
        )

    def merge(self, other: ExactSum) -> None:
        """Add another partial sum over a disjoint set of updates (same base, same grids)."""
        if other.grid != self.grid or other.shapes != self.shapes:
            raise ValueError("partial sums over different base models or grids cannot merge")
        if self.count + other.count > MAX_UPDATES:
            raise OverflowError(f"an exact sum holds at most {MAX_UPDATES} updates")
        for name in self.shapes:
            self.hi[name] += other.hi[name]
            self.lo[name] += other.lo[name]
            carry(self.hi[name], self.lo[name])
        self.count += other.count
        self.weight += other.weight

    def merge_arrays(self, arrays: Mapping[str, np.ndarray], count: int, weight: int) -> None:
        """merge(from_arrays(base, arrays, count, weight)) for a partial sum on this sum's
        base, with the same checks and the same integers, without building that sum (no
        grid, zeroed limbs or copies: a commit merges up to fan_in of them)."""
        if self.count + int(count) > MAX_UPDATES:
            raise OverflowError(f"an exact sum holds at most {MAX_UPDATES} updates")
        checked = []
        for name, shape in self.shapes.items():
            hi, lo = arrays[f"hi/{name}"], arrays[f"lo/{name}"]
            if (
                hi.shape != shape
                or lo.shape != shape
                or {hi.dtype, lo.dtype} != {np.dtype(np.int64)}
            ):
                raise ValueError(f"partial tensor {name!r} does not match the base model")
            if lo.size and (int(lo.min()) < 0 or int(lo.max()) > MASK):
                raise ValueError(f"partial tensor {name!r} is not canonical")
            checked.append((name, hi, lo))
        for name, hi, lo in checked:  # all checked first: a refusal leaves the sum as it was
            self.hi[name] += hi
            self.lo[name] += lo
            carry(self.hi[name], self.lo[name])
        self.count += int(count)
        self.weight += int(weight)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The canonical limbs, as int64 tensors "hi/{name}" and "lo/{name}" (for safetensors)."""
        return {
            **{f"hi/{n}": a for n, a in self.hi.items()},
            **{f"lo/{n}": a for n, a in self.lo.items()},
        }

    @classmethod
    def from_arrays(
        cls,
        base: Mapping[str, np.ndarray],
        arrays: Mapping[str, np.ndarray],
        count: int,
        weight: int,
        **options: Any,
    ) -> ExactSum:
        acc = cls(base, **options)
        for name, shape in acc.shapes.items():
            hi, lo = arrays[f"hi/{name}"], arrays[f"lo/{name}"]
            if (
                hi.shape != shape
                or lo.shape != shape
                or {hi.dtype, lo.dtype} != {np.dtype(np.int64)}
            ):
                raise ValueError(f"partial tensor {name!r} does not match the base model")
            if np.any((lo < 0) | (lo > MASK)):
                raise ValueError(f"partial tensor {name!r} is not canonical")
            acc.hi[name][...] = hi
            acc.lo[name][...] = lo
        acc.count, acc.weight = int(count), int(weight)
        return acc

    def finish(self, total_weight: int | None = None) -> dict[str, np.ndarray]:
        """The float64 mean T * g / W (deterministic: a function of T and W only)."""
        w = self.weight if total_weight is None else int(total_weight)
        if w <= 0:
            raise ValueError("the mean of no updates is undefined")
        out = {}
        for name in self.shapes:
            lo = self.lo[name]
            t = self.hi[name].astype(np.float64) * _R  # exact while |hi| < 2**53
            t += (lo >> 28).astype(np.float64) * 2.0**28
            t += (lo & (2**28 - 1)).astype(np.float64)
            out[name] = np.ldexp(t, self.grid[name]) / float(w)
        return out
