"""The demo's data and report: scikit-learn's bundled digits split non-IID over clients, and the
plot of accuracy per round or version. Bundled data only: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["Shards", "digits_shards", "plot_accuracy"]

Shards = tuple[
    list[tuple[np.ndarray, np.ndarray]],
    tuple[np.ndarray, np.ndarray],
    tuple[np.ndarray, np.ndarray],
]


def digits_shards(clients: int, alpha: float, seed: int) -> Shards:
    """(per-client (x, y), held-out test (x, y), pooled training (x, y)): 80/20 split, the
    training part dealt to clients per label with Dirichlet(alpha) shares (smaller alpha, more
    skew); a client left empty gets one example so that it can still report."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the demo needs scikit-learn: pip install -e '.[client]'") from exc
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    owned: list[list[int]] = [[] for _ in range(clients)]
    for label in range(10):
        idx = train[y[train] == label]
        bounds = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
        for c, part in enumerate(np.split(idx, bounds)):
            owned[c] += part.tolist()
    shards = []
    for c, rows in enumerate(owned):
        picked = np.array(sorted(rows) or [int(train[c % len(train)])], dtype=np.int64)
        shards.append((x[picked], y[picked]))
    return shards, (x[test], y[test]), (x[train], y[train])


def plot_accuracy(
    path: Path, accuracy: list[float], baseline: float | None, title: str, unit: str = "round"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    rounds = list(range(1, len(accuracy) + 1))
    ax.plot(rounds, accuracy, marker="o", label="Micro-FL global model")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="centralised baseline")
    ax.set_xlabel(unit)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
