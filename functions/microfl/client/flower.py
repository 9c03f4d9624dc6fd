"""Run an existing Flower NumPyClient, unchanged, as a participant of a Micro-FL job.

Flower is optional: nothing here imports flwr. Any object with Flower's NumPyClient methods will
do (duck typing; numpy arrays in and out): `fit(parameters, config) -> (parameters, num_examples,
metrics)`, optionally `evaluate(parameters, config) -> (loss, num_examples, metrics)` and
`get_parameters(config) -> parameters`. A `flwr.client.Client` made by `NumPyClient.to_client()`
is unwrapped to its NumPyClient.

Tensor order. A Micro-FL model is a set of named tensors (the job's schema lists them by name);
a NumPyClient takes and returns a plain list. The list order is, in this priority:
1. `names`: the model's tensor names in the client's list order (e.g. `list(net.state_dict())`);
2. else the order of the client's own `get_parameters({})`, matched by shape: each position gets
   the job's tensor of that shape, tensors of equal shape in natural name order ("layer2" before
   "layer10"), as PyTorch's state_dict lists numbered layers (a warning names such ties);
3. else (no get_parameters, or it returns []) the job's order: names sorted.
Every list the client returns is checked against that order (length, shapes) and cast to the
model's dtypes; a mismatch raises ValueError saying which position and what to pass instead.

The config `fit` and `evaluate` receive: `server_round` (the round the update is for: r in a
sync job, the version it helps make, base + 1, in an async one), `model_version` (the version
of `parameters`), `job`, `mode` (sync or async), `rounds` (the job's rounds or versions), plus
the runner's own `config` (e.g. `local_epochs`).

Evaluation: Micro-FL jobs have no evaluation rounds, so a runner made with `evaluate=True` asks
for it: before each fit it calls `evaluate` on the same global model, and sends its loss and
metrics with the update as `eval_loss` and `eval_<name>`. Metrics sent: `__metadata__.metrics`
(API.md), a JSON object of the finite numbers of fit's (and evaluate's) dicts; other values
(strings, bytes, booleans, NaN) are left out and listed in the step's `dropped_metrics`."""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from microfl.client import Client, ClientError, JobDone

__all__ = ["FlowerRunner", "finite_metrics", "numpy_client", "tensor_order"]


def numpy_client(app: Any) -> Any:
    """The NumPyClient inside `app`: itself, or what `NumPyClient.to_client()` wrapped."""
    inner = getattr(app, "numpy_client", None)
    if inner is not None and callable(getattr(inner, "fit", None)):
        return inner
    if not callable(getattr(app, "fit", None)):
        raise TypeError(
            f"{type(app).__name__} has no fit(parameters, config) method: pass a Flower "
            "NumPyClient (or an object with its fit/evaluate/get_parameters methods)"
        )
    return app


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def tensor_order(
    model: Mapping[str, np.ndarray],
    client_arrays: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """The model's tensor names in the order of the client's list (see the module docstring)."""
    if names is not None:
        missing = sorted(set(model) - set(names))
        unknown = sorted(set(names) - set(model))
        if missing or unknown or len(names) != len(model):
            raise ValueError(
                f"names must list each of the model's {len(model)} tensors once: missing "
                f"{missing}, unknown {unknown}, given {len(names)}"
            )
        order = list(names)
        if client_arrays:
            _check(model, order, client_arrays, "get_parameters")
        return order
    if not client_arrays:
        return sorted(model)
    if len(client_arrays) != len(model):
        raise ValueError(
            f"the client's get_parameters returns {len(client_arrays)} arrays; the job's model "
            f"has {len(model)} tensors ({_listing(model)}): is it the same model?"
        )
    free: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(model, key=_natural):
        free.setdefault(tuple(model[name].shape), []).append(name)
    ties = sorted(", ".join(group) for group in free.values() if len(group) > 1)
    order = []
    for i, arr in enumerate(client_arrays):
        shape = tuple(np.shape(arr))
        if not free.get(shape):
            raise ValueError(
                f"the client's parameter {i} has shape {shape}; the job's model has no "
                f"{'other ' if shape in free else ''}tensor of that shape ({_listing(model)}): "
                "is it the same model?"
            )
        order.append(free[shape].pop(0))
    if ties:
        warnings.warn(
            f"tensors of equal shape were matched to the client's list in name order "
            f"({'; '.join(ties)}); pass names (--tensor-order) if its list has another order",
            stacklevel=2,
        )
    return order


def _listing(model: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{n} {tuple(model[n].shape)}" for n in sorted(model))


def _check(
    model: Mapping[str, np.ndarray], order: list[str], arrays: Sequence[Any], what: str
) -> None:
    if len(arrays) != len(order):
        raise ValueError(
            f"the client's {what} returned {len(arrays)} arrays; the job's model has "
            f"{len(order)} tensors ({', '.join(order)})"
        )
    for i, (name, arr) in enumerate(zip(order, arrays, strict=True)):
        if tuple(np.shape(arr)) != tuple(model[name].shape):
            raise ValueError(
                f"the client's {what} array {i} has shape {tuple(np.shape(arr))}; in the order "
                f"{order} it is the job's tensor {name!r}, of shape {tuple(model[name].shape)}: "
                "is it the same model? (if its list has another order, pass names, "
                "--tensor-order)"
            )


def finite_metrics(
    values: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, float], list[str]]:
    """(the finite int/float values under prefix + key, the keys left out)."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in values.items():
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        )
        if number and math.isfinite(float(value)):
            kept[f"{prefix}{key}"] = (
                int(value) if isinstance(value, (int, np.integer)) else float(value)
            )
        else:
            dropped.append(f"{prefix}{key}")
    return kept, dropped


@dataclass
class FlowerRunner:
    """A NumPyClient (`app`) taking part in the job of `client`, sync or async alike.
    `step()` trains once and posts; `run()` until the job is done or for `rounds` updates."""

    client: Client
    app: Any
    config: Mapping[str, Any] = field(default_factory=dict)
    names: Sequence[str] | None = None
    evaluate: bool = False
    max_retries: int = 10
    poll: float = 0.1
    last: int = field(default=-1, init=False)  # the model version of its last update
    _order: list[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.app = numpy_client(self.app)

    def order(self, model: Mapping[str, np.ndarray]) -> list[str]:
        if self._order is None:
            own = None
            if self.names is None and callable(getattr(self.app, "get_parameters", None)):
                own = list(self.app.get_parameters(config={}))
            self._order = tensor_order(model, own, self.names)
        return self._order

    def fit_config(self, version: int, info: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "server_round": version + 1,
            "model_version": version,
            "job": self.client.job,
            "mode": self.client.mode(),
            "rounds": int(info["rounds"]),
            **self.config,
        }

    def train(
        self, model: Mapping[str, np.ndarray], version: int, info: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Evaluate (if asked) and fit on `model` (version `version` of the job described by
        `info`): the tensors to post and what to report."""
        order = self.order(model)
        parameters = [np.array(model[name]) for name in order]  # writable copies
        config = self.fit_config(version, info)
        metrics: dict[str, float] = {}
        dropped: list[str] = []
        if self.evaluate:
            loss, _, eval_metrics = self.app.evaluate([p.copy() for p in parameters], config)
            metrics, dropped = finite_metrics({"loss": loss, **dict(eval_metrics)}, "eval_")
        result = self.app.fit(parameters, config)
        arrays, num_examples, fit_metrics = result
        _check(model, order, list(arrays), "fit")
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
            raise ValueError(f"fit returned num_examples {num_examples!r}; it must be an int")
        if num_examples < 1:
            raise ValueError(
                f"fit returned num_examples {num_examples}; Micro-FL takes updates trained on "
                "at least one example"
            )
        kept, left = finite_metrics(dict(fit_metrics or {}))
        tensors = {
            name: np.ascontiguousarray(arr, dtype=model[name].dtype)
            for name, arr in zip(order, arrays, strict=True)
        }
        return {
            "tensors": tensors,
            "num_examples": int(num_examples),
            "metrics": {**metrics, **kept},
            "dropped_metrics": dropped + left,
        }

    def _post(self, trained: dict[str, Any], version: int) -> dict[str, Any]:
        return self.client.post_trained(
            trained["tensors"], trained["num_examples"], version, trained["metrics"] or None
        )

    def step(self) -> dict[str, Any]:
        """Train on the global model and post the update: the server's answer with "version"
        (the model version trained on), "num_examples", "metrics", "dropped_metrics" and
        "retries". A sync job's round that closes while the client trains, or an async
        update that went stale, is trained again on the next model (at most max_retries times).
        JobDone once the job has made all its rounds or versions."""
        retries = 0
        while True:
            if self.last >= 0:
                self.client.wait_for_version(self.last + 1, timeout=3600.0, poll=self.poll)
            model, version = self.client.model()
            info = self.client.job_info()
            if info.get("state") == "done":
                raise JobDone(f"job {self.client.job} has made all its versions")
            if self.client.mode() == "sync" and info["open_round"] != version + 1:
                time.sleep(self.poll)  # a round committed between the two requests
                continue
            trained = self.train(model, version, info)
            try:
                answer = self._post(trained, version)
            except ClientError as exc:
                error = exc.body.get("error")
                late = exc.status == 409 and error in ("round_not_open", "stale")
                if late and retries < self.max_retries:
                    retries += 1
                    continue
                raise
            self.last = version
            del trained["tensors"]
            return {**answer, **trained, "version": version, "retries": retries}

    def run(self, rounds: int | None = None) -> list[dict[str, Any]]:
        """Steps until the job is done (or `rounds` updates were posted): their answers."""
        answers: list[dict[str, Any]] = []
        while rounds is None or len(answers) < rounds:
            try:
                answers.append(self.step())
            except JobDone:
                break
        return answers
