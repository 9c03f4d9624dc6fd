"""The FL client side over HTTP: fetch the global model, post an update, wait for the next round.

Uploads are idempotent on the server (the same bytes again answer 200), so retrying a post after
a timeout or a 5xx is always safe. This module needs only numpy and requests; torch helpers come
with the `client` extra."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from microfl.serde import tensors_from_safetensors, tensors_to_safetensors

__all__ = ["Client", "ClientError"]

RETRIED = {408, 429, 500, 502, 503, 504}


class ClientError(RuntimeError):
    """The server refused a request for good (a 4xx other than 408/429)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('error')}: {body.get('message')}")
        self.status = status
        self.body = body


@dataclass
class Client:
    url: str
    job: str
    token: str
    retries: int = 8
    backoff: float = 0.2
    timeout: float = 60.0

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
        return {k: v.copy() for k, v in tensors.items()}, int(resp.headers["MicroFL-Model-Version"])

    def post_update(
        self, r: int, tensors: Mapping[str, np.ndarray], num_examples: int
    ) -> dict[str, Any]:
        body = tensors_to_safetensors(tensors, {"num_examples": str(num_examples)})
        resp = self._request("POST", f"/v1/jobs/{self.job}/rounds/{r}/updates", data=body)
        return dict(resp.json())

    def round(self, r: int) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{self.job}/rounds/{r}").json())

    def wait_for_version(
        self, version: int, timeout: float = 300.0, poll: float = 0.2
    ) -> dict[str, Any]:
        """Block until the job's model reaches `version` (round `version` committed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info()
            if info["model_version"] >= version:
                return info
            time.sleep(poll)
        raise TimeoutError(
            f"job {self.job} did not reach model version {version} in {timeout:.0f}s"
        )


def _json(resp: requests.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        return body if isinstance(body, dict) else {"message": str(body)}
    except ValueError:
        return {"error": "http", "message": resp.text[:200]}
