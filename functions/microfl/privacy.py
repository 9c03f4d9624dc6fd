"""Clipping and central differential privacy for the summing strategies: the L2 clip of an
update, the keyed Gaussian noise and adaptive clip of `dp-fedavg`, and its privacy accounting.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
every update x is clipped to base + s * (x - base), s = min(1, C / ||x - base||_2), folded with
weight 1 (not num_examples: one client's influence on the sum is then at most C), and the round's
model is (sum + N(0, (z C)^2)) / n on the floating tensors, z the noise_multiplier. Integer
tensors (counters) carry over from the base model: no client can move them.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): with target_quantile g, C_{r+1} = C_r * exp(-clip_lr * (b - g)), where
b = (unclipped + N(0, sigma_b^2)) / n is the noised fraction of round r's updates within C_r
and sigma_b = min_clients / 20 (the paper's m/20, m the expected clients per round). C_r is in
the state stored beside model r-1, written before it, so aggregate knows it when it folds round
r.

Noise is reproducible (a retry writes the same bytes) yet unknown to clients: each draw comes
from a Philox generator keyed by HMAC-SHA256(noise key, [job, round, shard]), the noise key
derived from MICROFL_SECRET, which only the functions hold. Shards are "sum/<tensor>" and
"count", so the noise does not depend on the tree's shape.

Accounting: dp-accounting's RDP accountant, add-or-remove-one neighbouring (sensitivity C for
the sum, 1 for the count), sampling probability 1: Micro-FL does not sample clients, so no
amplification by sampling is claimed. A round composes Gaussian(z) and, adaptive, Gaussian(
sigma_b). Participation is not hidden: round records list who was included.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from microfl.compress import Tensor, delta, is_floating
from microfl.errors import ConfigError

__all__ = [
    "DP",
    "DpState",
    "add_noise",
    "clip_update",
    "count_noise",
    "epsilon",
    "fold_weight",
    "generator",
    "next_clip",
    "noise_key",
    "noise_multiplier_for",
    "privacy_record",
    "release",
    "round_clip",
]

Tensors = dict[str, np.ndarray]
DP = "dp-fedavg"
_NOISE_LABEL = b"microfl/dp-noise/v1"
_BLOCK = 1 << 16  # elements per partial sum of squares (fixed order: deterministic)


# --- clipping ----------------------------------------------------------------------------------


def clip_update(
    update: Mapping[str, Tensor],
    base: Mapping[str, np.ndarray],
    bound: float,
    keep_base_integers: bool = False,
) -> tuple[Tensors, bool]:
    """(base + s * (update - base) with s = min(1, bound / norm), whether norm <= bound).
    The norm is the float64 L2 norm of the delta over every floating tensor at once; the
    clipped floating tensors are float64 (rounding them back to float32 could push the delta
    past the bound), whatever their encoding (F16, BF16, int8 deltas: microfl.compress).
    Integer tensors are left as sent, or with keep_base_integers taken from the base. A delta
    with NaN or Inf is left unscaled: the exact fold refuses it."""
    deltas = {n: delta(x, base[n]) for n, x in update.items() if is_floating(x)}
    norm = _l2(deltas.values())
    scale = bound / norm if math.isfinite(norm) and norm > bound else 1.0
    out = {n: x for n, x in update.items() if isinstance(x, np.ndarray)}
    for name, d in deltas.items():
        if scale != 1.0:
            np.multiply(d, scale, out=d)
        out[name] = np.add(d, base[name], out=d)
    if keep_base_integers:
        out.update({n: base[n] for n, x in update.items() if not is_floating(x)})
    return out, norm <= bound


def _l2(arrays: Iterable[np.ndarray]) -> float:
    """sqrt(sum of squares), summed block by block in a fixed order (the same float for the
    same values, whatever their memory layout); rescaled when the squares overflow."""
    parts = [a.reshape(-1) for a in arrays]
    with np.errstate(over="ignore"):  # an overflow is handled below
        total = sum(float(np.add.reduce(b * b)) for p in parts for b in _blocks(p))
    if math.isfinite(total) or not all(np.isfinite(p).all() for p in parts):
        return math.sqrt(total)
    top = max(float(np.max(np.abs(p))) for p in parts if p.size)
    scaled = sum(float(np.add.reduce((b / top) ** 2)) for p in parts for b in _blocks(p))
    return top * math.sqrt(scaled)


def _blocks(flat: np.ndarray) -> Iterable[np.ndarray]:
    return (flat[i : i + _BLOCK] for i in range(0, flat.size, _BLOCK))


def fold_weight(strategy: str, num_examples: int) -> int:
    """An update's weight in the exact sum: 1 under dp-fedavg (so one client moves the sum by
    at most C), else the examples it claims."""
    return 1 if strategy == DP else num_examples


# --- state carried between rounds ----------------------------------------------------------------


@dataclass(frozen=True)
class DpState:
    """What dp-fedavg keeps beside model r (optimizer/{r}): the clip bound of round r+1 and how
    many rounds released noised models, which is all the cumulative accounting needs (every
    round is the same mechanism)."""

    clip: float
    rounds: int = 0

    def to_tensors(self) -> Tensors:
        return {"dp/clip": np.array(self.clip, np.float64), "dp/rounds": np.array(self.rounds)}

    @classmethod
    def from_tensors(
        cls, options: Mapping[str, float], state: Mapping[str, np.ndarray] | None
    ) -> DpState:
        """The stored state, or the first round's (the `clip` option, no round spent)."""
        if state is None or "dp/clip" not in state:
            return cls(float(options["clip"]))
        return cls(float(state["dp/clip"]), int(state["dp/rounds"]))


def round_clip(
    options: Mapping[str, float], state: Mapping[str, np.ndarray] | None
) -> float | None:
    """Round r's clip bound from the options and the state stored beside model r-1 (None: the
    strategy does not clip)."""
    if "clip" not in options:
        return None
    return DpState.from_tensors(options, state).clip


# --- keyed noise ---------------------------------------------------------------------------------


def noise_key(secret: bytes) -> bytes:
    """The noise key: HMAC-SHA256 of MICROFL_SECRET, so no token signature reveals it."""
    if not secret:
        raise ConfigError(
            "dp-fedavg draws its noise with a key derived from MICROFL_SECRET, which finalize "
            "does not have; set MICROFL_SECRET for the finalize function"
        )
    return hmac.new(secret, _NOISE_LABEL, hashlib.sha256).digest()


def generator(key: bytes, job: str, r: int, shard: str) -> np.random.Generator:
    """The generator of one shard of a round's noise: a function of the key, job, round and
    shard only, so every retry draws the same numbers."""
    message = json.dumps([job, r, shard], separators=(",", ":")).encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def add_noise(
    mean: Tensors,
    like: Mapping[str, np.ndarray],
    count: int,
    std: float,
    key: bytes,
    job: str,
    r: int,
) -> None:
    """mean += N(0, std^2) / count on the tensors that are floating in `like` (in place): the
    noise of the sum, divided like the sum."""
    for name in sorted(mean):
        if like[name].dtype.kind == "f":
            rng = generator(key, job, r, f"sum/{name}")
            mean[name] += rng.standard_normal(mean[name].shape) * (std / count)


def count_noise(min_clients: int) -> float:
    """sigma_b, the count's noise under adaptive clipping: Andrew et al.'s m/20."""
    return min_clients / 20


def next_clip(
    clip: float,
    unclipped: int,
    count: int,
    target_quantile: float,
    clip_lr: float,
    sigma_b: float,
    rng: np.random.Generator,
) -> float:
    """Andrew et al.'s geometric update: C * exp(-clip_lr * (noised unclipped fraction - g))."""
    fraction = (unclipped + rng.normal(0.0, sigma_b)) / count
    return clip * math.exp(-clip_lr * (fraction - target_quantile))


def release(
    mean: Tensors,
    like: Mapping[str, np.ndarray],
    count: int,
    unclipped: int,
    before: DpState,
    options: Mapping[str, float],
    min_clients: int,
    key: bytes,
    job: str,
    r: int,
) -> DpState:
    """Noise round r's mean (in place) and return the state after it."""
    add_noise(mean, like, count, options["noise_multiplier"] * before.clip, key, job, r)
    clip = before.clip
    if "target_quantile" in options:
        rng = generator(key, job, r, "count")
        clip = next_clip(
            clip,
            unclipped,
            count,
            options["target_quantile"],
            options["clip_lr"],
            count_noise(min_clients),
            rng,
        )
    return DpState(clip, before.rounds + 1)


# --- accounting ----------------------------------------------------------------------------------


def _round_event(noise_multiplier: float, sigma_b: float | None) -> Any:
    import dp_accounting  # lazily: only finalize of a dp-fedavg job loads it (scipy, ~3 s)

    mechanisms = [dp_accounting.GaussianDpEvent(noise_multiplier)]
    if sigma_b is not None:
        mechanisms.append(dp_accounting.GaussianDpEvent(sigma_b))
    return dp_accounting.ComposedDpEvent(mechanisms)


def epsilon(
    noise_multiplier: float, delta: float, rounds: int, sigma_b: float | None = None
) -> float:
    """The epsilon at `delta` of `rounds` rounds (RDP accountant, no sampling)."""
    if rounds <= 0:
        return 0.0
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(_round_event(noise_multiplier, sigma_b), rounds)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, rounds: int, delta: float, sigma_b: float | None = None
) -> float:
    """The smallest noise_multiplier whose `rounds` rounds spend at most `target_epsilon` at `delta`
    (dp-accounting's calibration, a bracketed search over the accountant); sigma_b is the
    count's noise under adaptive clipping (count_noise(min_clients)), None for a fixed clip."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if target_epsilon <= 0 or rounds < 1 or not 0 < delta < 1:
        raise ValueError("give target_epsilon > 0, rounds >= 1 and delta in (0, 1)")
    if sigma_b is not None:
        floor = epsilon(sigma_b, delta, rounds)  # what the count alone spends
        if floor >= target_epsilon:
            raise ValueError(
                f"adaptive clipping's count alone spends epsilon {floor:.3g} in {rounds} rounds "
                f"(sigma_b = min_clients/20 = {sigma_b:g}); raise min_clients or use a "
                "fixed clip (no target_quantile)"
            )
    z = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(_round_event(z, sigma_b), rounds),
        target_epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
    )
    return float(z)


def privacy_record(
    options: Mapping[str, float], min_clients: int, before: DpState, after: DpState
) -> dict[str, Any]:
    """The round record's `privacy`: the round's cost (0 when it released no model) and the
    job's so far, both at `delta`."""
    z, delta = options["noise_multiplier"], options["delta"]
    sigma_b = count_noise(min_clients) if "target_quantile" in options else None
    return {
        "accountant": "rdp",
        "delta": delta,
        "noise_multiplier": z,
        "count_noise_multiplier": sigma_b,
        "round": {
            "epsilon": epsilon(z, delta, after.rounds - before.rounds, sigma_b),
            "clip": before.clip,
        },
        "cumulative": {"epsilon": epsilon(z, delta, after.rounds, sigma_b), "rounds": after.rounds},
        "next_clip": after.clip,
    }
