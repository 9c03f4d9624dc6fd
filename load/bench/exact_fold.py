"""Exact fold throughput: GB/s of float32 update bytes folded into a sum, side by side with a
numpy memory copy of the same bytes in the same process (standalone; not in `make bench` yet).

For each model size, U distinct updates (about --mb MB, more than the caches hold) sit in memory
as read-only views of bytes objects (what a zero-copy safetensors read gives). Each row folds
all U of them (best of --repeats passes, rows interleaved so load bursts hit all alike):

- memcpy: np.copyto of each update into one buffer (the ceiling);
- today: the NaN/Inf scan of validate_update + strategy.fold (float64, order-dependent);
- f64 blocked numpy: isfinite + float64 fold in cache-sized blocks (not exact);
- f64 numba fused: the same in one loop (not exact);
- exact numpy: ExactSum.fold with the numpy kernel (numba disabled), one update at a time;
- exact numba K=1: ExactSum.fold, one update per call (the accumulator streams from memory);
- exact numba K=8: ExactSum.fold_many, 8 updates per call, block by block (accumulator in cache).

Also the cost of merging two partial sums and of finish() (the mean). Needs numba for the numba
rows (PYTHONPATH=functions:<dir with numba>); prints a markdown table."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from microfl import exactsum
from microfl.exactsum import ExactSum
from microfl.strategy import fold

BLOCK = 1 << 14


def f64_blocked(acc: np.ndarray, x: np.ndarray, w: float, scratch: np.ndarray) -> None:
    for start in range(0, x.size, BLOCK):
        buf = scratch[: min(BLOCK, x.size - start)]
        np.copyto(buf, x[start : start + buf.size])
        if not np.isfinite(buf).all():
            raise ValueError("NaN/Inf")
        np.multiply(buf, w, out=buf)
        np.add(acc[start : start + buf.size], buf, out=acc[start : start + buf.size])


def f64_numba() -> Callable[[np.ndarray, np.ndarray, float], int] | None:
    if exactsum.njit is None:
        return None

    @exactsum.njit(nogil=True, cache=True)
    def kernel(acc, x, w):  # type: ignore[no-untyped-def]
        bad = 0
        for i in range(x.size):
            v = np.float64(x[i])
            bad += 0 if abs(v) < np.inf else 1
            acc[i] += w * v
        return bad

    return kernel  # type: ignore[no-any-return]


def measure(params: int, mb: int, repeats: int) -> dict[str, float]:
    count = max(8, mb * 10**6 // (4 * params) // 8 * 8)
    rng = np.random.default_rng(params)
    blobs = [rng.standard_normal(params).astype(np.float32).tobytes() for _ in range(count)]
    ups = [np.frombuffer(b, dtype=np.float32) for b in blobs]  # read-only, zero-copy
    weights = [int(w) for w in rng.integers(1, 10**6, count)]
    base = {"w": ups[0]}
    dst = np.empty(params, np.float32)
    scratch = np.empty(BLOCK)
    kernel = f64_numba()
    acc = np.zeros(params)

    def exact(k: int, numba: bool) -> Callable[[], None]:
        s = ExactSum(base)  # made once (a leaf makes one per K updates), reused by every pass

        def run() -> None:
            saved, exactsum.njit = exactsum.njit, exactsum.njit if numba else None
            try:
                for i in range(0, count, k):
                    group = [{"w": u} for u in ups[i : i + k]]
                    assert not s.fold_many(group, weights[i : i + k])
            finally:
                exactsum.njit = saved

        return run

    rows: dict[str, Callable[[], None]] = {
        "memcpy": lambda: [np.copyto(dst, u) for u in ups] and None,
        "today: isfinite + strategy.fold": lambda: (
            [
                np.isfinite(u).all() and fold({"w": acc}, {"w": u}, float(w))
                for u, w in zip(ups, weights, strict=True)
            ]
            and None
        ),
        "f64 blocked numpy (isfinite per block)": lambda: (
            [f64_blocked(acc, u, float(w), scratch) for u, w in zip(ups, weights, strict=True)]
            and None
        ),
        "exact numpy, K=1": exact(1, False),
    }
    if kernel is not None:
        rows["f64 numba fused"] = lambda: (
            [kernel(acc, u, float(w)) for u, w in zip(ups, weights, strict=True)] and None
        )
        rows["exact numba, K=1"] = exact(1, True)
        rows["exact numba, K=8 (fold_many)"] = exact(8, True)
        for fn in rows.values():  # compile once, outside the timing
            fn()
    best = {name: float("inf") for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    gbps = {name: count * params * 4 / t / 1e9 for name, t in best.items()}

    a, b = ExactSum(base), ExactSum(base)
    a.fold_many([{"w": u} for u in ups[:4]], weights[:4])
    b.fold_many([{"w": u} for u in ups[4:8]], weights[4:8])
    merge_s = finish_s = float("inf")
    for _ in range(repeats):
        c = ExactSum.from_arrays(base, a.to_arrays(), a.count, a.weight)
        start = time.perf_counter()
        c.merge(b)
        merge_s = min(merge_s, time.perf_counter() - start)
        start = time.perf_counter()
        c.finish()
        finish_s = min(finish_s, time.perf_counter() - start)
    gbps["merge (s)"], gbps["finish (s)"], gbps["updates"] = merge_s, finish_s, count
    return gbps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--mb", type=int, default=256, help="MB of distinct updates per size")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    load0 = os.getloadavg()
    results = {n: measure(n, args.mb, args.repeats) for n in sizes}
    load1 = os.getloadavg()
    names = [k for k in results[sizes[0]] if k not in ("merge (s)", "finish (s)", "updates")]
    print("| fold of float32 updates | " + " | ".join(f"{n / 1e6:g}M params" for n in sizes) + " |")
    print("| --- |" + " ---: |" * len(sizes))
    for name in names:
        cells = [f"{r[name]:.2f} GB/s ({r[name] / r['memcpy']:.0%})" for r in results.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for key in ("merge (s)", "finish (s)"):
        cells = [
            f"{r[key] * 1e3:.1f} ms ({n * 16 / r[key] / 1e9:.1f} GB/s of limbs)"
            for n, r in results.items()
        ]
        print(f"| exact {key[:-4]} of one partial | " + " | ".join(cells) + " |")
    print(
        "| updates x MB | "
        + " | ".join(f"{int(r['updates'])} x {n * 4 / 1e6:g}" for n, r in results.items())
        + " |"
    )
    print(
        f"\nbest of {args.repeats}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end;"
        f" numba {'on' if exactsum.njit is not None else 'OFF (not installed)'}; numpy"
        f" {np.__version__}; {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
