"""Robust aggregation maths, pure: the coordinate-wise statistics and Krum over one slice.

Inputs are (N, width) float64 matrices, one row per included update in the round's client
order, one column per coordinate of a coordinate shard (microfl.shards). Every statistic here is
computed column by column, so a column's result has the same float64 bits whatever the slice it
sits in, and the shards of any width assemble into the statistic of the whole stacked matrix.
Weights (num_examples) play no part: a robust statistic must not let one client's claimed
example count decide the model."""

from __future__ import annotations

import numpy as np

__all__ = ["krum_scores", "krum_select", "mean_rows", "median", "sq_distances", "trimmed_mean"]


def median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al. 2018), exactly numpy's np.median(x, axis=0)."""
    return np.asarray(np.median(x, axis=0), dtype=np.float64)


def trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise beta-trimmed mean: per coordinate, drop the int(beta * N) lowest and as
    many highest values and average the rest. scipy.stats.trim_mean's algorithm step for step
    (the same np.partition, then a row-by-row sum in partition order): the same bits as scipy on
    the whole stacked matrix, column by column."""
    n = x.shape[0]
    lowercut = int(beta * n)
    uppercut = n - lowercut
    if lowercut >= uppercut:
        raise ValueError(f"trimming {beta:g} of {n} values on each side leaves none")
    kept = np.partition(x, (lowercut, uppercut - 1), axis=0)[lowercut:uppercut]
    return mean_rows(kept)


def mean_rows(x: np.ndarray) -> np.ndarray:
    """The unweighted mean of the rows, summed one row after another. np.mean(axis=0) does the
    same on a wide matrix, but on a (N, 1) one it switches to pairwise summation (a contiguous
    axis), whose bits differ: a shard of width 1 must agree with a shard of width 10**6."""
    if x.shape[0] == 0:
        raise ValueError("the mean of no rows is undefined")
    total = np.array(x[0], dtype=np.float64)
    for row in x[1:]:
        np.add(total, row, out=total)
    return np.asarray(total / x.shape[0], dtype=np.float64)


def sq_distances(x: np.ndarray) -> np.ndarray:
    """(N, N) squared L2 distances between the rows over this slice's coordinates; summed over
    all shards they are the distances between whole updates. Rows are first centred on row 0
    (distances do not change) so the Gram form |a|^2 + |b|^2 - 2ab does not cancel away the
    small differences between updates that share most of the model. Symmetric, zero on the
    diagonal, never negative; deterministic on a given machine (one BLAS product)."""
    n = x.shape[0]
    if n == 0 or x.shape[1] == 0:
        return np.zeros((n, n), dtype=np.float64)
    centred = np.subtract(x, x[:1], dtype=np.float64)
    gram = centred @ centred.T
    norms = np.diagonal(gram).copy()
    d = norms[:, None] + norms[None, :] - 2.0 * gram
    upper = np.triu(np.maximum(d, 0.0), k=1)  # one value per pair, mirrored below
    return np.asarray(upper + upper.T, dtype=np.float64)


def krum_scores(d: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each row (Blanchard et al. 2017): the sum of its squared distances to its
    n - f - 2 nearest other rows, at least 1 of them (at most the n - 1 there are).

    Krum's guarantee needs n >= 2f + 3. A round can hold fewer (sealed by its deadline short of
    quorum, or updates excluded as invalid): the score then counts max(1, n - f - 2) neighbours,
    still the most central updates of those present, without the guarantee; with one update its
    score is 0 and it is chosen."""
    n = d.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    scores = np.zeros(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(d[i], i))
        scores[i] = float(np.sum(others[:k])) if k > 0 else 0.0
    return scores


def krum_select(d: np.ndarray, f: int, m: int) -> list[int]:
    """The indices of the m rows with the lowest Krum scores (multi-Krum; m = 1 is Krum), ties
    broken by the lower index; all rows when there are at most m. Sorted ascending."""
    scores = krum_scores(d, f)
    order = np.lexsort((np.arange(len(scores)), scores))
    return sorted(int(i) for i in order[: max(0, min(m, len(scores)))])
