"""The harness of the hostile-input tests (test_hostile.py, test_hostile_ids.py): one real ingest
behind the local Knative proxy per test module, the checks every answer must pass (a JSON 4xx, the
instance and its worker unchanged), and the payload builders both modules use."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from hypothesis import HealthCheck

from fl import SECRET, new_job
from hostile_payloads import (
    entry,
    model,
    safetensors_file,
)
from microfl.local.runtime import LocalRuntime
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore

OPENAPI = Path(__file__).resolve().parents[1] / "functions" / "openapi.yaml"
ERRORS_OF = {
    400: {"invalid_update", "bad_request"},
    413: {"update_too_large"},
    422: {"schema_mismatch"},
}
TEN_GB = 10 * 2**30
MIB = 2**20
FUZZ_HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]


@dataclass
class Ingest:
    runtime: LocalRuntime
    store: FileStore
    sandbox: Path
    url: str
    instance_url: str
    pids: dict[int, list[int]]
    jobs: list[str] = field(default_factory=list)

    def new_job(self) -> str:
        job = new_job(self.store, model(), rounds=3, min_clients=10**6, round_timeout=3600.0)
        self.jobs.append(job)
        return job

    def updates(self, job: str) -> str:
        return f"{self.url}/v1/jobs/{job}/rounds/1/updates"


def processes(runtime: LocalRuntime) -> dict[int, list[int]]:
    """Each ingest instance's pid (the gunicorn master) -> its worker pids."""
    return {
        fn.proc.pid: sorted(c.pid for c in psutil.Process(fn.proc.pid).children(recursive=True))
        for fn in runtime.services["ingest"].processes()
        if fn.proc is not None
    }


def start_ingest(kafka: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    """The module's `ingest` fixture: a LocalRuntime whose one ingest instance must survive
    every test of the module."""
    sandbox = tmp_path_factory.mktemp("sandbox")
    store = FileStore(sandbox / "store")
    with LocalRuntime(
        store.url,
        kafka.bootstrap,  # type: ignore[attr-defined]
        SECRET,
        tmp_path_factory.mktemp("runtime"),
        idle_window=3600,  # no scale to zero mid-module: the pids must stay the same
    ) as rt:
        assert requests.get(f"{rt.ingest_url}/healthz", timeout=60).status_code == 200
        (instance,) = rt.services["ingest"].processes()
        yield Ingest(rt, store, sandbox, rt.ingest_url, instance.url, processes(rt))


def assert_alive(ingest: Ingest) -> None:
    assert processes(ingest.runtime) == ingest.pids, "an ingest instance or worker was replaced"
    assert requests.get(f"{ingest.url}/healthz", timeout=10).status_code == 200


def assert_refused(status: int, body: bytes, codes: frozenset[str] | set[str]) -> None:
    """A 4xx from {400, 413, 422} with a JSON {"error", "message"} whose code fits the status."""
    assert status in ERRORS_OF, f"answered {status}: {body[:300]!r}"
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("message"), str) and doc["message"], doc
    assert doc.get("error") in ERRORS_OF[status] & set(codes), doc


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


# Uploads that crashed ingest with an unmapped ValueError (500 "internal", which also tells the
# client to retry the same poison forever), and headers that declare far more than the body holds.
def with_examples(n: str) -> bytes:
    return tensors_to_safetensors(model(), {"num_examples": n})


def declaring(shape: list[int], code: str = "F32", data: bytes = b"") -> bytes:
    size = 1
    for d in shape:
        size *= d
    size *= {"F32": 4, "U8": 1}[code]
    header = {"__metadata__": {"num_examples": "3"}, "dense.bias": entry(code, shape, [0, size])}
    return safetensors_file(header, data)


def snapshot(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files} | {
        str(Path(d).relative_to(root)) + "/" for d, _, _ in os.walk(root)
    }


def assert_nothing_outside_the_store(ingest: Ingest) -> None:
    """The store holds only what the module's jobs legitimately wrote, in their folders."""
    assert sorted(os.listdir(ingest.sandbox)) == ["store"]
    for path in snapshot(ingest.store.root):
        if path.endswith("/") and path.count("/") <= 2:
            continue  # ".", "jobs/", "jobs/<job>/"
        parts = path.split("/")
        assert parts[0] == "jobs" and parts[1] in ingest.jobs, path
        assert not parts[-1].startswith(".tmp-"), f"a temporary file was left behind: {path}"
