"""The exact sum's fold loops (microfl.exactsum explains the two-limb integers they add to):
a group of updates of one tensor folded one accumulator block at a time, so the block stays in
cache across the group. numba compiles each loop on the first fold (only aggregate folds); the
numpy path gives the same bytes, more slowly. Plain float updates, async deltas (x - base) *
scale made on the fly, F16/BF16 widened and int8 deltas dequantised a block at a time: no
full-size copy of an update is ever made."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from microfl.compress import BF16, HALF, Q8, Q8_BLOCK, bf16_to_f32

__all__ = ["BLOCK", "LIMB", "MASK", "carry", "flat", "group", "kernel", "scaled_delta"]

LIMB = 56
BLOCK = 4096  # elements: the accumulator's block (64 KiB) stays in L1/L2 across the group
_R = float(2**LIMB)
_IR = 2.0**-LIMB
MASK = (1 << LIMB) - 1
_MASK = MASK


def _fold_np(hi: np.ndarray, lo: np.ndarray, v: np.ndarray, c: float, xlim: float) -> int:
    """The kernel, in numpy: lo += r, hi += h for y = rint(v * c) = h * 2**56 + r (v float64)."""
    ok = np.abs(v) < xlim
    bad = int(v.size - np.count_nonzero(ok))
    y = np.rint(np.where(ok, v, 0.0) * c)
    h = np.rint(y * _IR)
    lo += (y - h * _R).astype(np.int64)
    hi += h.astype(np.int64)
    return bad


def carry(hi: np.ndarray, lo: np.ndarray) -> None:
    carry = lo >> LIMB
    lo &= _MASK
    hi += carry


def _values_np(x: Any, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of a flat update as float64, exactly as the numba loops read them:
    F32/F64 widened, F16/BF16 through their 65536-entry table, int8 codes dequantised."""
    if isinstance(x, Q8):
        scales = x.scales[np.arange(start, stop) // Q8_BLOCK].astype(np.float64)
        return x.base[start:stop].astype(np.float64) + x.codes[start:stop] * scales
    if x.dtype in HALF:
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
        carry(hi[start:stop], lo[start:stop])


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


def _delta_loop(hi, lo, xs, bs, ss, cs, xlim, bad):  # type: ignore[no-untyped-def]
    """_group_loop on v = (x - b) * s in float64 (an async delta: update x, its base b, its
    staleness weight s), the same operations as numpy's, so the same bits, with no array of
    deltas ever made."""
    for start in range(0, hi.size, BLOCK):
        stop = min(start + BLOCK, hi.size)
        for k in range(len(xs)):
            if bad[k] >= 0:
                continue
            hs, ls, c, s, refused = hi[start:stop], lo[start:stop], cs[k], ss[k], 0
            x, b = xs[k][start:stop], bs[k][start:stop]
            for i in range(x.size):
                v = (np.float64(x[i]) - np.float64(b[i])) * s
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


def scaled_delta(x: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """(x - b) * s in float64, as _delta_loop computes it."""
    with np.errstate(all="ignore"):  # a non-finite delta is refused by the fold
        v = np.subtract(x, b, dtype=np.float64)
        v *= s
    return v


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
def kernel(name: str = "float") -> Callable[..., None] | None:
    """A group loop compiled by numba (or loaded from its cache) on the first fold. Only
    aggregate folds, so ingest and finalize never load numba (it adds ~180 MiB to a process);
    without numba the numpy path gives the same bytes, more slowly."""
    try:
        from numba import njit
    except ImportError:  # pragma: no cover
        return None
    loop: Any = {
        "float": _group_loop,
        "delta": _delta_loop,
        "half": _half_loop,
        "q8": _q8_loop,
    }[name]
    return njit(nogil=True, cache=True)(loop)


def _kind(x: Any, base: np.ndarray | None = None) -> tuple:
    """Updates a kernel takes together (numba needs one type per tuple)."""
    if base is not None:
        return ("delta", (x.dtype, base.dtype))
    if isinstance(x, Q8):
        return ("q8", x.base.dtype)
    return ("half" if x.dtype in HALF else "float", x.dtype)


def group(
    hi: np.ndarray,
    lo: np.ndarray,
    xs: tuple,
    cs: np.ndarray,
    xlim: float,
    deltas: tuple[tuple, np.ndarray] | None = None,
    numba: bool = True,
) -> np.ndarray:
    """Fold a group of flat updates of one tensor (with deltas = (bases, scales): the deltas
    (x - base) * scale of plain float updates); bad[k] >= 0: update k refused, folded into
    elements [0, bad[k]) (the caller rolls that back). Updates of different encodings go
    through their own loop; integer addition makes the order irrelevant."""
    bad = np.full(len(xs), -1, dtype=np.int64)
    kinds: dict[tuple, list[int]] = {}
    for k, x in enumerate(xs):
        kinds.setdefault(_kind(x, None if deltas is None else deltas[0][k]), []).append(k)
    floats = (np.float32, np.float64)
    for (kind, dtype), ks in kinds.items():
        part = tuple(xs[k] for k in ks)
        sub = np.full(len(ks), -1, dtype=np.int64)
        if kind == "delta":
            compiled = dtype[0] in floats and dtype[1] in floats
        else:
            compiled = kind != "float" or dtype in floats
        loop = kernel(kind) if numba and compiled else None
        if kind == "delta" and deltas is not None:
            bs, ss = tuple(deltas[0][k] for k in ks), deltas[1][ks]
            if loop is not None:
                loop(hi, lo, part, bs, ss, cs[ks], xlim, sub)
            else:
                part = tuple(scaled_delta(x, b, s) for x, b, s in zip(part, bs, ss, strict=True))
                _group_np(hi, lo, part, cs[ks], xlim, sub)
        elif loop is None:
            _group_np(hi, lo, part, cs[ks], xlim, sub)
        elif kind == "q8":
            codes = tuple(q.codes for q in part)
            scales = tuple(q.scales for q in part)
            loop(hi, lo, codes, scales, tuple(q.base for q in part), cs[ks], xlim, sub)
        elif kind == "half":
            bits = tuple(x.view(np.uint16) for x in part)
            loop(hi, lo, bits, dtype == BF16, cs[ks], xlim, sub)
        else:
            loop(hi, lo, part, cs[ks], xlim, sub)
        bad[ks] = sub
    return bad


def flat(arr: Any) -> Any:
    """A read-only flat view (one numba type for every update, however it was read); an int8
    delta's codes, scales and base each so."""
    if isinstance(arr, Q8):
        return Q8(flat(arr.codes), flat(arr.scales), flat(arr.base))
    view = np.ascontiguousarray(arr).reshape(-1).view()
    view.flags.writeable = False
    return view
