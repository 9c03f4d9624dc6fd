"""PyTorch on the client side (the `client` extra; the server functions never import this).

A module's state_dict crosses the wire as plain numpy arrays in safetensors (microfl.serde), so
nothing here unpickles: no pickle, no torch.load. Local training is plain SGD on cross-entropy,
optionally with FedProx's proximal term (Li et al., 2020, "Federated Optimization in
Heterogeneous Networks"), which keeps a client's weights near the global model it started from
when the data are non-IID."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microfl.client import Client, ClientError, JobDone

__all__ = [
    "StaleModel",
    "Tamper",
    "TorchClient",
    "evaluate",
    "fit_local",
    "load_into_module",
    "mlp",
    "tensors_from_module",
    "train_local",
]


class StaleModel(RuntimeError):
    """The fetched global model is not the one the open round trains on (a round committed in
    between, or the job has finished); fetch again and retrain."""


def tensors_from_module(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A snapshot of the state_dict (parameters and buffers) as contiguous CPU numpy copies."""
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.dtype in (torch.bfloat16, torch.complex64, torch.complex128):
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype}, which has no safetensors dtype on the "
                "wire here; convert the module (e.g. module.float()) before sending it"
            )
        out[name] = tensor.detach().cpu().contiguous().numpy().copy()
    return out


def load_into_module(module: torch.nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy into the module's state_dict in place; values are cast to the module's dtypes."""
    state = module.state_dict()
    missing = sorted(state.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - state.keys())
    if missing or unexpected:
        raise ValueError(
            f"tensors do not match the module's state_dict: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, tensor in state.items():
        shape = tuple(np.shape(tensors[name]))
        if shape != tuple(tensor.shape):
            raise ValueError(
                f"tensor {name!r} has shape {shape}; the module expects {tuple(tensor.shape)}"
            )
    # torch.from_numpy wants native byte order and warns on read-only views (serde's arrays).
    arrays = {
        name: np.require(arr, arr.dtype.newbyteorder("="), ["C", "W"])
        for name, arr in ((n, np.asarray(a)) for n, a in tensors.items())
    }
    module.load_state_dict({name: torch.from_numpy(a) for name, a in arrays.items()}, strict=True)


def train_local(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    prox_mu: float = 0.0,
    seed: int = 0,
) -> float:
    """SGD on cross-entropy for `epochs` passes; the last epoch's mean cross-entropy (without the
    proximal term). The same seed, data and start weights give the same weights, bit for bit;
    the global RNG is seeded inside torch.random.fork_rng, so callers' RNG state is untouched."""
    return fit_local(
        module, x, y, epochs=epochs, lr=lr, batch_size=batch_size, prox_mu=prox_mu, seed=seed
    )["loss"]


def fit_local(
    module: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    prox_mu: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """train_local, reporting the last epoch's training "loss" and "accuracy" (on the batches
    as they were trained): the metrics a client sends with its update."""
    if epochs < 1 or lr <= 0 or batch_size < 1 or prox_mu < 0:
        raise ValueError("need epochs >= 1, lr > 0, batch_size >= 1 and prox_mu >= 0")
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as examples, at least one: {len(x)} vs {len(y)}")
    inputs, labels = _as_tensors(module, x, y)
    params = [p for p in module.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]  # w_global of the FedProx term
    optimizer = torch.optim.SGD(params, lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    module.train()
    total, correct = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and other in-model randomness
        for _ in range(epochs):
            total, correct = 0.0, 0
            order = torch.randperm(len(labels), generator=shuffle).to(labels.device)
            for i in order.split(batch_size):
                optimizer.zero_grad()
                logits = module(inputs[i])
                loss = F.cross_entropy(logits, labels[i])
                objective = loss
                if prox_mu > 0:
                    drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
                    objective = loss + prox_mu / 2 * drift
                objective.backward()
                optimizer.step()
                total += loss.item() * len(i)
                correct += int((logits.detach().argmax(dim=1) == labels[i]).sum().item())
    return {"loss": total / len(labels), "accuracy": correct / len(labels)}


def evaluate(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; the module's mode is restored after."""
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as examples, at least one: {len(x)} vs {len(y)}")
    inputs, labels = _as_tensors(module, x, y)
    was_training = module.training
    module.eval()
    loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for i in torch.arange(len(labels), device=labels.device).split(1024):
                logits = module(inputs[i])
                loss += F.cross_entropy(logits, labels[i], reduction="sum").item()
                correct += int((logits.argmax(dim=1) == labels[i]).sum().item())
    finally:
        module.train(was_training)
    return loss / len(labels), correct / len(labels)


def _as_tensors(
    module: torch.nn.Module, x: np.ndarray, y: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the dtype and on the device of the module's first floating parameter."""
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    inputs = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.int64, device=device)
    return inputs, labels


def mlp(inputs: int = 64, hidden: int = 64, classes: int = 10) -> torch.nn.Sequential:
    """A one-hidden-layer perceptron; the defaults fit scikit-learn's digits (8x8, 10 classes).
    Initialised from torch's global RNG: seed it (torch.manual_seed) for a reproducible start."""
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )


# (round's global model, trained tensors, num_examples) -> (tensors, num_examples) to post.
Tamper = Callable[
    [Mapping[str, np.ndarray], Mapping[str, np.ndarray], int], tuple[dict[str, np.ndarray], int]
]


@dataclass
class TorchClient:
    """One FL participant: a microfl Client (HTTP, retries) and the module it trains.
    Experiments only (simulated devices, microfl.local.stragglers): after each training, before
    posting, it sleeps until slowdown x max(training time, step_time) seconds have passed
    since the training started: (slowdown - 1) x the training time with step_time 0."""

    client: Client
    module: torch.nn.Module
    slowdown: float = 1.0
    step_time: float = 0.0
    compress: str | None = None  # "fp16", "bf16", "int8": how updates are sent (else the client's)
    last_base: int = field(default=-1, init=False)  # the version of its last async update

    def _train(
        self, tensors: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, **options: Any
    ) -> dict[str, float]:
        load_into_module(self.module, tensors)
        start = time.perf_counter()
        metrics = fit_local(self.module, x, y, **options)
        took = time.perf_counter() - start
        time.sleep(max(0.0, self.slowdown * max(took, self.step_time) - took))
        return metrics

    def run_round(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        lr: float,
        prox_mu: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        tamper: Tamper | None = None,
    ) -> dict[str, Any]:
        """Train the open round on the global model and post the update; the server's answer
        with "round", the local "loss" and the "metrics" posted with it (training loss and
        accuracy, which the round record averages). Raises StaleModel if the model is not
        version r-1. `tamper` (experiments only: microfl.local.byzantine) maps (global model,
        trained tensors, num_examples) to what is posted instead."""
        tensors, version = self.client.model()
        r = self.client.job_info()["open_round"]
        if r is None or version != r - 1:
            raise StaleModel(
                f"job {self.client.job}: fetched model version {version} but the open round is "
                f"{r}; fetch the model again"
            )
        options = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "prox_mu": prox_mu}
        metrics = self._train(tensors, x, y, seed=seed, **options)
        update, num_examples = tensors_from_module(self.module), len(y)
        if tamper is not None:
            update, num_examples = tamper(tensors, update, num_examples)
        answer = self.client.post_update(
            r, update, num_examples, _finite(metrics), compress=self.compress, base=tensors
        )
        return {**answer, "round": r, "loss": metrics["loss"], "metrics": metrics}

    def run_async(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        lr: float,
        prox_mu: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        tamper: Tamper | None = None,
        max_retries: int = 10,
        poll: float = 0.1,
    ) -> dict[str, Any]:
        """One step of an async job: train on the latest version and post the update with that
        base_version; the answer with "loss" and "stale_retries". A client sends one update per
        version, so after its update on v it first waits for v + 1. A 409 `stale` (versions
        moved past max_staleness while it trained) fetches the latest again and retrains, at
        most max_retries times. JobDone once the job has made all its versions."""
        options = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "prox_mu": prox_mu}
        stale = 0
        while True:
            if self.last_base >= 0:
                self.client.wait_for_version(self.last_base + 1, timeout=3600.0, poll=poll)
            tensors, version = self.client.model()
            metrics = self._train(tensors, x, y, seed=seed, **options)
            update, num_examples = tensors_from_module(self.module), len(y)
            if tamper is not None:
                update, num_examples = tamper(tensors, update, num_examples)
            try:
                answer = self.client.post_async_update(
                    update,
                    num_examples,
                    version,
                    _finite(metrics),
                    compress=self.compress,
                    base=tensors,
                )
            except ClientError as exc:
                error = exc.body.get("error")
                if exc.status == 409 and error == "round_not_open":
                    raise JobDone(f"job {self.client.job} has made all its versions") from exc
                if exc.status == 409 and error == "stale" and stale < max_retries:
                    stale += 1
                    continue
                raise
            self.last_base = version
            return {**answer, "loss": metrics["loss"], "metrics": metrics, "stale_retries": stale}


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics the server takes: a diverged training's NaN loss is left out, not sent."""
    return {name: v for name, v in metrics.items() if math.isfinite(v)}
