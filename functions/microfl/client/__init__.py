"""The FL client side over HTTP: fetch the global model, post an update, wait for the next round
(sync jobs) or the next version (async jobs: post_async_update names the version trained on).

Uploads are idempotent on the server (the same bytes again answer 200), so retrying a post after
a timeout or a 5xx is always safe. This module needs only numpy and requests; torch helpers come
with the `client` extra."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from microfl.clientmetrics import metrics_to_text
from microfl.compress import encode
from microfl.serde import tensors_from_safetensors, tensors_to_safetensors

__all__ = ["Client", "ClientError", "JobDone"]

RETRIED = {408, 429, 500, 502, 503, 504}


class ClientError(RuntimeError):
    """The server refused a request for good (a 4xx other than 408/429)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('error')}: {body.get('message')}")
        self.status = status
        self.body = body


class JobDone(RuntimeError):
    """The job has made all its rounds or versions: there is nothing left to train for."""


@dataclass
class Client:
    url: str
    job: str
    token: str
    retries: int = 8
    backoff: float = 0.2
    timeout: float = 60.0
    compress: str | None = None  # "fp16", "bf16" or "int8" (microfl.compress); None: as given
    bytes_sent: int = field(default=0, init=False)  # update bodies posted (each attempt once)
    _mode: str | None = field(default=None, init=False, repr=False)  # a job's mode never changes
    _last: tuple[int, dict[str, np.ndarray]] | None = field(default=None, init=False, repr=False)

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        for attempt in range(self.retries + 1):
            try:
                resp = requests.request(
                    method, f"{self.url}{path}", headers=headers, timeout=self.timeout, **kw
                )
            except requests.RequestException:
                if attempt == self.retries:
                    raise
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code not in RETRIED or attempt == self.retries:
                    raise ClientError(resp.status_code, _json(resp))
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def job_info(self) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{self.job}").json())

    def model(self, version: int | None = None) -> tuple[dict[str, np.ndarray], int]:
        params = {} if version is None else {"version": version}
        resp = self._request("GET", f"/v1/jobs/{self.job}/model", params=params)
        tensors, _ = tensors_from_safetensors(resp.content)
        model = {k: v.copy() for k, v in tensors.items()}
        version = int(resp.headers["MicroFL-Model-Version"])
        self._last = (version, model)  # the base of an int8 update trained on it
        return {k: v.copy() for k, v in model.items()}, version

    def post_update(
        self,
        r: int,
        tensors: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
        compress: str | None = None,
        base: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Round r's update; `metrics` (finite numbers by name, e.g. the local training loss)
        go into the round record's example-weighted means. compress ("fp16", "bf16", "int8";
        default the client's) encodes its float32 tensors (microfl.compress); int8 sends the
        delta from model r-1, which is `base` or else the model last fetched if it is that
        version, or else fetched again."""
        body = self._body(tensors, _metadata(num_examples, metrics), r - 1, compress, base)
        resp = self._request("POST", f"/v1/jobs/{self.job}/rounds/{r}/updates", data=body)
        return dict(resp.json())

    def post_async_update(
        self,
        tensors: Mapping[str, np.ndarray],
        num_examples: int,
        base_version: int,
        metrics: Mapping[str, float] | None = None,
        compress: str | None = None,
        base: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """An async job's update trained on model version `base_version`: the answer names the
        version buffer it counts in. A 409 `stale` ClientError means versions moved more than
        max_staleness past the base: fetch the latest model and train again. metrics,
        compress and base as for post_update (int8: the delta from version base_version)."""
        meta = _metadata(num_examples, metrics) | {"base_version": str(base_version)}
        body = self._body(tensors, meta, base_version, compress, base)
        resp = self._request("POST", f"/v1/jobs/{self.job}/updates", data=body)
        return dict(resp.json())

    def _body(
        self,
        tensors: Mapping[str, np.ndarray],
        meta: dict[str, str],
        version: int,
        compress: str | None,
        base: Mapping[str, np.ndarray] | None,
    ) -> bytes:
        how = compress or self.compress
        if how == "int8" and base is None:
            last = self._last
            base = last[1] if last is not None and last[0] == version else self.model(version)[0]
        encoded = encode(tensors, how, base) if how else tensors
        body = tensors_to_safetensors(encoded, meta)
        self.bytes_sent += len(body)
        return body

    def mode(self) -> str:
        """The job's mode, sync or async (asked once: it never changes)."""
        if self._mode is None:
            self._mode = str(self.job_info().get("mode", "sync"))
        return self._mode

    def post_trained(
        self,
        tensors: Mapping[str, np.ndarray],
        num_examples: int,
        trained_on: int,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Post an update trained on model version `trained_on` the way the job's mode takes it:
        to round trained_on + 1 (sync) or with base_version trained_on (async)."""
        if self.mode() == "async":
            return self.post_async_update(tensors, num_examples, trained_on, metrics)
        return self.post_update(trained_on + 1, tensors, num_examples, metrics)

    def round(self, r: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{self.job}/rounds/{r}").json())

    def version(self, v: int) -> dict[str, Any]:
        """An async job's version record once committed, else its buffer's state."""
        return dict(self._request("GET", f"/v1/jobs/{self.job}/versions/{v}").json())

    def record(self, v: int) -> dict[str, Any]:
        """What made model version v: round v's record (sync) or version v's (async)."""
        return self.version(v) if self.mode() == "async" else self.round(v)

    def wait_for_version(
        self, version: int, timeout: float = 300.0, poll: float = 0.2
    ) -> dict[str, Any]:
        """Block until the job's model reaches `version` (round or version `version`
        committed); JobDone if the job finished below it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info()
            if info["model_version"] >= version:
                return info
            if info.get("state") == "done":
                raise JobDone(
                    f"job {self.job} has made all its {info['model_version']} versions; "
                    f"there is no version {version}"
                )
            time.sleep(poll)
        raise TimeoutError(
            f"job {self.job} did not reach model version {version} in {timeout:.0f}s"
        )


def _metadata(num_examples: int, metrics: Mapping[str, float] | None) -> dict[str, str]:
    meta = {"num_examples": str(num_examples)}
    if metrics:
        meta["metrics"] = metrics_to_text(metrics)
    return meta


def _json(resp: requests.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        return body if isinstance(body, dict) else {"message": str(body)}
    except ValueError:
        return {"error": "http", "message": resp.text[:200]}
