"""What clipping costs the aggregate's fold: aggregate.fold_updates on the same 16 stored updates
of a 1M-parameter float32 model, plain fedavg, fedavg with `clip` and dp-fedavg, side by side in
one process (best of 3; the numba kernel compiled before timing). Prints seconds, values folded
per second and each ratio to plain fedavg.

    PYTHONPATH=functions .venv/bin/python load/bench/clip_cost.py
"""

from __future__ import annotations

import time

import numpy as np

from microfl.aggregate import fold_updates
from microfl.exactsum import ExactSum
from microfl.jobs import JobSpec
from microfl.serde import tensors_to_safetensors

UPDATES, SHAPE, REPEATS = 16, (1000, 1000), 3
CASES = {
    "fedavg": ("fedavg", {}, None),
    "fedavg+clip": ("fedavg", {"clip": 1.0}, 1.0),
    "dp-fedavg": ("dp-fedavg", {}, 1.0),
}


def main() -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(SHAPE).astype(np.float32)}
    members = [
        (
            f"c{i}",
            tensors_to_safetensors(
                {"w": (base["w"] + rng.standard_normal(SHAPE) * 0.01).astype(np.float32)},
                {"num_examples": "10"},
            ),
        )
        for i in range(UPDATES)
    ]
    best: dict[str, float] = {}
    for rep in range(REPEATS + 1):  # pass 0 compiles and warms up: not timed
        for name, (strategy, options, clip) in CASES.items():
            spec = JobSpec.for_model("bench", base, strategy=strategy, strategy_options=options)
            acc = ExactSum(base, max_weight=spec.max_examples)
            start = time.perf_counter()
            fold_updates(acc, spec, members, base, clip)
            elapsed = time.perf_counter() - start
            if rep:
                best[name] = min(best.get(name, elapsed), elapsed)
    values = UPDATES * int(np.prod(SHAPE))
    for name, seconds in best.items():
        print(
            f"{name:12s} {seconds:.3f} s for {UPDATES} updates "
            f"({values / seconds / 1e6:.0f} M values/s), x{seconds / best['fedavg']:.2f} of fedavg"
        )


if __name__ == "__main__":
    main()
