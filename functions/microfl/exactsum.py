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

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from microfl.compress import BF16, Q8, Q8_BLOCK, Tensor, bf16_to_f32, widen
from microfl.errors import InvalidUpdate

__all__ = ["MAX_UPDATES", "ExactSum", "ValueOutOfRange"]

PRECISION_BITS = 40
FLOOR = 2.0**-10
LIMB = 56
MAX_UPDATES = 2**21
MAX_GROUP = 64  # updates folded per block before lo is normalised: |lo| < 2**56 + 64 * 2**55
BLOCK = 4096  # elements: the accumulator's block (64 KiB) stays in L1/L2 across the group
_R = float(2**LIMB)
_IR = 2.0**-LIMB
_MASK = (1 << LIMB) - 1


class ValueOutOfRange(InvalidUpdate):
    """An update value is NaN, Inf, or too far beyond the base model's scale to sum exactly."""


def _fold_np(hi: np.ndarray, lo: np.ndarray, v: np.ndarray, c: float, xlim: float) -> int:
    """The kernel, in numpy: lo += r, hi += h for y = rint(v * c) = h * 2**56 + r (v float64)."""
    ok = np.abs(v) < xlim
    bad = int(v.size - np.count_nonzero(ok))
    y = np.rint(np.where(ok, v, 0.0) * c)
    h = np.rint(y * _IR)
    lo += (y - h * _R).astype(np.int64)
    hi += h.astype(np.int64)
    return bad


def _carry_np(hi: np.ndarray, lo: np.ndarray) -> None:
    carry = lo >> LIMB
    lo &= _MASK
    hi += carry


def _values_np(x: Any, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a flat update as float64, exactly as the numba loops read them:
    F32/F64 widened, F16/BF16 through their 65536-entry table, int8 codes dequantised."""
    if isinstance(x, Q8):
        scales = x.scales[np.arange(start, stop) // Q8_BLOCK].astype(np.float64)
        return x.base[start:stop].astype(np.float64) + x.codes[start:stop] * scales
    if x.dtype in _TABLES:
        return _table(x.dtype)[x[start:stop].view(np.uint16)]
    return x[start:stop].astype(np.float64)


def _group_np(
    hi: np.ndarray, lo: np.ndarray, xs: tuple, cs: np.ndarray, xlim: float, bad: np.ndarray
) -> None:
    for start in range(0, hi.size, BLOCK):
        stop = min(start + BLOCK, hi.size)
        for k in range(len(xs)):
            if bad[k] < 0 and _fold_np(
                hi[start:stop], lo[start:stop], _values_np(xs[k], start, stop), cs[k], xlim
            ):
                bad[k] = stop
        _carry_np(hi[start:stop], lo[start:stop])


def _group_loop(hi, lo, xs, cs, xlim, bad):  # type: ignore[no-untyped-def]
    """_group_np's loop, element by element, for numba to compile (see _kernel): one pass over
    each update and the accumulator block, no temporaries."""
    for start in range(0, hi.size, BLOCK):
        stop = min(start + BLOCK, hi.size)
        for k in range(len(xs)):
            if bad[k] >= 0:
                continue
            hs, ls, x, c, refused = hi[start:stop], lo[start:stop], xs[k][start:stop], cs[k], 0
            for i in range(x.size):
                v = np.float64(x[i])
                ok = abs(v) < xlim
                refused += 0 if ok else 1
                y = np.rint((v if ok else 0.0) * c)
                h = np.rint(y * _IR)
                ls[i] += np.int64(y - h * _R)
                hs[i] += np.int64(h)
            if refused:
                bad[k] = stop
        for i in range(start, stop):
            carry = lo[i] >> LIMB
            lo[i] &= _MASK
            hi[i] += carry


def _half_loop(hi, lo, xs, bf16, cs, xlim, bad):  # type: ignore[no-untyped-def]
    """_group_loop for F16/BF16 updates (uint16 bits), widened a block at a time into a
    BLOCK-sized float32 scratch, exactly: BF16 bits << 16; F16 magnitude bits << 13 times
    2**112 (the exponent rebiased; subnormals too), Inf/NaN kept non-finite, the sign put back."""
    bits = np.empty(BLOCK, np.uint32)
    vals = bits.view(np.float32)
    rebias = np.float32(2.0**112)
    for start in range(0, hi.size, BLOCK):
        stop = min(start + BLOCK, hi.size)
        for k in range(len(xs)):
            if bad[k] >= 0:
                continue
            hs, ls, x, c, refused = hi[start:stop], lo[start:stop], xs[k][start:stop], cs[k], 0
            if bf16:
                for i in range(x.size):
                    bits[i] = np.uint32(x[i]) << 16
            else:
                for i in range(x.size):
                    bits[i] = (np.uint32(x[i]) & 0x7FFF) << 13
                for i in range(x.size):
                    w = vals[i] * rebias
                    if (x[i] & 0x7C00) == 0x7C00:
                        w = np.float32(np.inf)
                    vals[i] = -w if x[i] & 0x8000 else w
            for i in range(x.size):
                v = np.float64(vals[i])
                ok = abs(v) < xlim
                refused += 0 if ok else 1
                y = np.rint((v if ok else 0.0) * c)
                h = np.rint(y * _IR)
                ls[i] += np.int64(y - h * _R)
                hs[i] += np.int64(h)
            if refused:
                bad[k] = stop
        for i in range(start, stop):
            carry = lo[i] >> LIMB
            lo[i] &= _MASK
            hi[i] += carry


def _q8_loop(hi, lo, codes, scales, bases, cs, xlim, bad):  # type: ignore[no-untyped-def]
    """_group_loop for int8 deltas: value = base + code * scale in float64, one element at a
    time (no dequantised copy), a scale block (which BLOCK is a multiple of) at a time."""
    for start in range(0, hi.size, BLOCK):
        stop = min(start + BLOCK, hi.size)
        for k in range(len(codes)):
            if bad[k] >= 0:
                continue
            q, b, c, refused = codes[k], bases[k], cs[k], 0
            for j in range(start, stop, _Q8):
                end = min(j + _Q8, stop)
                hs, ls, qs, bs = hi[j:end], lo[j:end], q[j:end], b[j:end]
                s = np.float64(scales[k][j // _Q8])
                for i in range(qs.size):
                    v = np.float64(bs[i]) + np.float64(qs[i]) * s
                    ok = abs(v) < xlim
                    refused += 0 if ok else 1
                    y = np.rint((v if ok else 0.0) * c)
                    h = np.rint(y * _IR)
                    ls[i] += np.int64(y - h * _R)
                    hs[i] += np.int64(h)
            if refused:
                bad[k] = stop
        for i in range(start, stop):
            carry = lo[i] >> LIMB
            lo[i] &= _MASK
            hi[i] += carry


_Q8 = Q8_BLOCK
assert BLOCK % _Q8 == 0, "an accumulator block holds whole scale blocks"
_TABLES = (np.dtype(np.float16), BF16)


@functools.cache
def _table(dtype: np.dtype) -> np.ndarray:
    """Every F16 or BF16 value by its bits, as float64 (exact): 512 KiB, built once."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = bf16_to_f32(bits) if dtype == BF16 else bits.view(np.float16)
    with np.errstate(invalid="ignore"):  # signalling NaNs stay NaN
        table = wide.astype(np.float64)
    table.flags.writeable = False
    return table


@functools.cache
def _kernel(name: str = "float") -> Callable[..., None] | None:
    """A group loop compiled by numba (or loaded from its cache) on the first fold. Only
    aggregate folds, so ingest and finalize never load numba (it adds ~180 MiB to a process);
    without numba the numpy path gives the same bytes, more slowly."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover
        return None
    loop: Any = {"float": _group_loop, "half": _half_loop, "q8": _q8_loop}[name]
    return njit(nogil=True, cache=True)(loop)


def _kind(x: Any) -> tuple:
    """Updates a kernel takes together (numba needs one type per tuple)."""
    if isinstance(x, Q8):
        return ("q8", x.base.dtype)
    return ("half" if x.dtype in _TABLES else "float", x.dtype)


def _group(
    hi: np.ndarray, lo: np.ndarray, xs: tuple, cs: np.ndarray, xlim: float, numba: bool = True
) -> np.ndarray:
    """Fold a group of flat updates of one tensor; bad[k] >= 0: update k refused, folded into
    elements [0, bad[k]) (the caller rolls that back). Updates of different encodings go
    through their own loop; integer addition makes the order irrelevant."""
    bad = np.full(len(xs), -1, dtype=np.int64)
    kinds: dict[tuple, list[int]] = {}
    for k, x in enumerate(xs):
        kinds.setdefault(_kind(x), []).append(k)
    for (kind, dtype), ks in kinds.items():
        part = tuple(xs[k] for k in ks)
        sub = np.full(len(ks), -1, dtype=np.int64)
        compiled = kind != "float" or dtype in (np.float32, np.float64)
        kernel = _kernel(kind) if numba and compiled else None
        if kernel is None:
            _group_np(hi, lo, part, cs[ks], xlim, sub)
        elif kind == "q8":
            codes = tuple(q.codes for q in part)
            scales = tuple(q.scales for q in part)
            kernel(hi, lo, codes, scales, tuple(q.base for q in part), cs[ks], xlim, sub)
        elif kind == "half":
            bits = tuple(x.view(np.uint16) for x in part)
            kernel(hi, lo, bits, dtype == BF16, cs[ks], xlim, sub)
        else:
            kernel(hi, lo, part, cs[ks], xlim, sub)
        bad[ks] = sub
    return bad


def _flat(arr: Any) -> Any:
    """A read-only flat view (one numba type for every update, however it was read); an int8
    delta's codes, scales and base each so."""
    if isinstance(arr, Q8):
        return Q8(_flat(arr.codes), _flat(arr.scales), _flat(arr.base))
    view = np.ascontiguousarray(arr).reshape(-1).view()
    view.flags.writeable = False
    return view


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
        self, updates: Sequence[Mapping[str, Tensor]], weights: Sequence[int]
    ) -> list[tuple[int, ValueOutOfRange]]:
        """Fold several updates block by block (the accumulator block stays in cache across
        them). Returns (index, error) of those refused; the others are in, exactly once."""
        if len(updates) != len(weights):
            raise ValueError("fold_many needs one weight per update")
        for w in weights:
            if not (isinstance(w, int | np.integer) and 1 <= w <= self.max_weight):
                raise ValueError(f"weight must be an integer in 1..{self.max_weight}, got {w!r}")
        if self.count + len(updates) > MAX_UPDATES:
            raise OverflowError(f"an exact sum holds at most {MAX_UPDATES} updates")
        for u in updates:
            if set(u) != set(self.shapes) or any(
                u[n].shape != s or not self._takes(n, u[n]) for n, s in self.shapes.items()
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
                xs = tuple(_flat(updates[k][name]) for k in live)
                cs = np.array([np.ldexp(float(weights[k]), -self.grid[name]) for k in live])
                bad = _group(hi, lo, xs, cs, self.xlim[name])
                for j in np.flatnonzero(bad >= 0):
                    k, stop = live[j], int(bad[j])
                    refused[k] = self._refusal(name, updates[k][name])
                    self._undo(updates[k], weights[k], done, name, stop)
                done.append(name)
        for k in range(len(updates)):
            if k not in refused:
                self.count += 1
                self.weight += int(weights[k])
        return sorted(refused.items())

    def _takes(self, name: str, x: Any) -> bool:
        """The base's dtype, or float64 for a floating tensor (clipped updates are float64, so
        rounding them back cannot push them past the clip bound); for a float32 one also F16,
        BF16 and int8 deltas (microfl.compress)."""
        base = self.dtypes[name]
        if isinstance(x, Q8) or x.dtype in _TABLES:
            return base == np.float32
        return x.dtype == base or (base.kind == "f" and x.dtype == np.float64)

    def _undo(
        self, update: Mapping[str, Tensor], weight: int, done: list[str], name: str, stop: int
    ) -> None:
        """Subtract an update folded into tensors `done` and elements [0, stop) of `name`
        (exact: rint is symmetric, so folding with -w cancels it to the last bit)."""
        for t, end in [(d, self.hi[d].size) for d in done] + [(name, stop)]:
            hi, lo = self.hi[t].reshape(-1)[:end], self.lo[t].reshape(-1)[:end]
            x = _flat(update[t])
            x = Q8(x.codes[:end], x.scales, x.base[:end]) if isinstance(x, Q8) else x[:end]
            _group(hi, lo, (x,), np.array([-np.ldexp(float(weight), -self.grid[t])]), self.xlim[t])

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
            _carry_np(self.hi[name], self.lo[name])
        self.count += other.count
        self.weight += other.weight

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
            if np.any((lo < 0) | (lo > _MASK)):
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
