"""Hostile input against a real ingest process (DESIGN.md invariants 5 and 6, shared/API.md):
fuzzed uploads, the OpenAPI contract under schemathesis, token tampering and replay, path
traversal in ids, and payloads that declare more data than they carry.

What must hold for all of it: every answer is a 4xx with a JSON error body (never a 5xx, never a
dropped connection), nothing rejected is stored, nothing is written outside the store's root, the
ingest instance and its worker stay the same processes, and the worker's memory stays bounded.

One LocalRuntime for the module (the manifests' Services behind the local Knative proxy, a
FileStore in a sandbox folder). `ingest.url` is the Service URL clients use; `instance_url`
addresses the one function instance directly, where a test is about the function itself rather
than the proxy in front of it."""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fl import SECRET, auth, new_job
from hostile_payloads import (
    FAMILIES,
    MAX_U64,
    Family,
    NoAnswer,
    entry,
    model,
    raw_request,
    safetensors_file,
    sign,
    valid_update,
)
from microfl.local.runtime import LocalRuntime
from microfl.rounds import update_key, updates_prefix
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token, valid_id

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


@pytest.fixture(scope="module")
def ingest(kafka: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
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


# --- 1. fuzzed uploads over real HTTP ----------------------------------------------------------

CLIENTS = itertools.count()


@pytest.fixture(scope="module")
def fuzz_job(ingest: Ingest) -> str:
    return ingest.new_job()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_fuzzed_uploads_are_refused_with_a_json_4xx_and_stored_nowhere(
    ingest: Ingest, fuzz_job: str, family: Family
) -> None:
    session = requests.Session()

    @settings(
        max_examples=family.examples,
        deadline=None,
        database=None,
        suppress_health_check=FUZZ_HEALTH,
    )
    @given(body=family.payloads)
    def upload(body: bytes) -> None:
        client = f"fz-{family.name}-{next(CLIENTS):05d}"  # one per example: a stored one shows
        answer = session.post(
            ingest.updates(fuzz_job), data=body, headers=auth(fuzz_job, client), timeout=30
        )
        assert_refused(answer.status_code, answer.content, family.codes)
        assert not ingest.store.exists(update_key(fuzz_job, 1, client)), "stored a refused upload"

    upload()
    assert ingest.store.list(updates_prefix(fuzz_job, 1)) == []
    assert_alive(ingest)


# Uploads that crashed ingest with an unmapped ValueError (500 "internal", which also tells the
# client to retry the same poison forever), and headers that declare far more than the body holds.
def _with_examples(n: str) -> bytes:
    return tensors_to_safetensors(model(), {"num_examples": n})


def _declaring(shape: list[int], code: str = "F32", data: bytes = b"") -> bytes:
    size = 1
    for d in shape:
        size *= d
    size *= {"F32": 4, "U8": 1}[code]
    header = {"__metadata__": {"num_examples": "3"}, "dense.bias": entry(code, shape, [0, size])}
    return safetensors_file(header, data)


HOSTILE_UPLOADS = {
    "num_examples '²' (str.isdigit, but int() refuses it)": _with_examples("²"),
    "num_examples of 5000 digits (over int()'s 4300-digit limit)": _with_examples("1" * 5000),
    "a tensor with 65 dimensions (numpy's limit is 64)": _declaring([1] * 65, data=b"\0" * 4),
    "an empty tensor with a 2**70 dimension": _declaring([2**70, 0]),
    "an empty tensor of shape (2**40, 2**40, 0)": _declaring([2**40, 2**40, 0]),
    "a 2**40-byte tensor in a 64-byte body": _declaring([2**40], "U8", b"\0" * 64),
    "header length 2**64-1": struct.pack("<Q", MAX_U64) + valid_update()[8:],
    "header length 2**63": struct.pack("<Q", 2**63) + valid_update()[8:],
    "header length of 16 MiB + 1 in a short body": struct.pack("<Q", 16 * MIB + 1) + b"{}",
}


@pytest.mark.parametrize("body", list(HOSTILE_UPLOADS.values()), ids=list(HOSTILE_UPLOADS))
def test_hostile_uploads_are_refused_with_a_json_4xx(
    ingest: Ingest, fuzz_job: str, body: bytes
) -> None:
    client = f"hostile-{next(CLIENTS):05d}"
    answer = requests.post(
        ingest.updates(fuzz_job), data=body, headers=auth(fuzz_job, client), timeout=30
    )
    assert_refused(answer.status_code, answer.content, {"invalid_update", "schema_mismatch"})
    assert not ingest.store.exists(update_key(fuzz_job, 1, client))


# --- 2. the OpenAPI contract under schemathesis ------------------------------------------------

# The local proxy cannot forward PATCH, OPTIONS, TRACE or QUERY at all (501, HTML): that failure
# would end every operation's run at its first case, so those methods are left to
# test_another_method_on_a_known_path_is_405_json and schemathesis checks everything else.
SCHEMA = schemathesis.openapi.from_path(
    OPENAPI,
    config=schemathesis.Config.from_dict(
        {"phases": {"coverage": {"unexpected-methods": ["get", "post", "put", "delete"]}}}
    ),
)
SWAPS = itertools.count()


@pytest.fixture(scope="module")
def contract_job(ingest: Ingest) -> str:
    return ingest.new_job()


@SCHEMA.parametrize()
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_the_openapi_contract_holds_under_schemathesis(
    case: schemathesis.Case, ingest: Ingest, contract_job: str
) -> None:
    """Generated requests (valid and invalid, other methods, missing or bad tokens) against the
    Service URL: no 5xx, and every status, content type, header and body as the file says."""
    params = case.path_parameters
    if params and "job" in params and valid_id(str(params["job"])) and next(SWAPS) % 2:
        params["job"] = contract_job  # half the well-formed ids reach a real job
    has_token = any(k.lower() == "authorization" for k in case.headers or {})
    case.call_and_validate(
        base_url=ingest.url,
        headers=None if has_token else auth(contract_job, "contract-client"),
        timeout=10,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )


@pytest.mark.parametrize(
    "target", [b"/robots.txt", b"/favicon.ico", b"/v1/jobs/a%0Ab/model", b"/v1/jobs/j/rounds/1%0A"]
)
def test_paths_the_framework_routes_itself_answer_json(ingest: Ingest, target: bytes) -> None:
    """functions-framework routes /robots.txt, /favicon.ico and paths with a newline itself;
    openapi.yaml: 'a path no route matches answers 404 not_found' (JSON, like every error)."""
    answer = raw_request(ingest.url, "GET", target, auth("*", admin=True))
    assert answer.status in (400, 404), (answer.status, answer.body[:200])
    assert answer.headers.get("content-type") == "application/json", answer.body[:200]
    assert answer.json()["error"] in ("not_found", "bad_request")


@pytest.mark.parametrize("where", ["service", "instance"])
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_another_method_on_a_known_path_is_405_json(
    ingest: Ingest, contract_job: str, method: str, where: str
) -> None:
    """openapi.yaml: 'a known path with another method answers 405 method_not_allowed'."""
    base = ingest.url if where == "service" else ingest.instance_url
    answer = raw_request(base, method, f"/v1/jobs/{contract_job}".encode(), timeout=5)
    assert answer.status == 405, (answer.status, answer.body[:200])
    doc = answer.json()
    assert isinstance(doc, dict) and doc["error"] == "method_not_allowed" and doc["message"]


# --- 3. tokens over HTTP -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_jobs(ingest: Ingest) -> tuple[str, str]:
    return ingest.new_job(), ingest.new_job()


def test_a_token_for_one_job_is_forbidden_on_every_endpoint_of_another(
    ingest: Ingest, two_jobs: tuple[str, str]
) -> None:
    a, b = two_jobs
    for token in (auth(a, "site-1"), auth(a, admin=True)):
        for method, path in [
            ("GET", f"/v1/jobs/{b}"),
            ("GET", f"/v1/jobs/{b}/model"),  # a client of job a cannot read job b's model
            ("GET", f"/v1/jobs/{b}/model?version=0"),
            ("GET", f"/v1/jobs/{b}/rounds/1"),
            ("POST", f"/v1/jobs/{b}/rounds/1/updates"),
        ]:
            body = valid_update() if method == "POST" else None
            answer = requests.request(
                method, ingest.url + path, data=body, headers=token, timeout=10
            )
            assert (answer.status_code, answer.json()["error"]) == (403, "forbidden"), path
    assert ingest.store.list(updates_prefix(b, 1)) == []


def _tampered(job: str, other: str) -> dict[str, str]:
    token = issue_token(SECRET.encode(), job, "site-1")
    version, payload, signature = token.rsplit(".", 2)  # version: "mfl2.<key id>"
    _, other_payload, other_signature = issue_token(SECRET.encode(), other, "site-1").rsplit(".", 2)
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    forged = sign(
        b"not-the-platform-secret-0123456",
        {"adm": False, "exp": 2**40, "job": job, "sub": "site-1"},
    )
    admin_claim = sign(b"x" * 16, {"adm": True, "exp": 2**40, "job": "*", "sub": "admin"})
    return {
        "signature with one character changed": f"{version}.{payload}.{flipped}",
        "payload of job b under job a's signature": f"{version}.{other_payload}.{signature}",
        "job a's payload under job b's signature": f"{version}.{payload}.{other_signature}",
        "signature removed": f"{version}.{payload}.",
        "no signature part": f"{version}.{payload}",
        "signed with another secret": forged,
        "admin claim signed with another secret": admin_claim,
    }


def test_a_tampered_token_is_unauthorized(ingest: Ingest, two_jobs: tuple[str, str]) -> None:
    a, b = two_jobs
    for what, token in _tampered(a, b).items():
        for method, path in [("POST", f"/v1/jobs/{a}/rounds/1/updates"), ("GET", f"/v1/jobs/{a}")]:
            answer = requests.request(
                method,
                ingest.url + path,
                data=valid_update(),
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized"), what
    assert ingest.store.list(updates_prefix(a, 1)) == []


def test_an_update_replayed_after_expiry_or_on_another_job_is_forbidden(
    ingest: Ingest, two_jobs: tuple[str, str]
) -> None:
    a, b = two_jobs
    body = valid_update(7)
    issued = time.time()
    token = {"Authorization": f"Bearer {issue_token(SECRET.encode(), a, 'replayer', ttl=3)}"}
    first = requests.post(ingest.updates(a), data=body, headers=token, timeout=10)
    assert first.status_code == 202, first.text
    # The same request verbatim against another job: the token does not travel.
    other = requests.post(ingest.updates(b), data=body, headers=token, timeout=10)
    assert (other.status_code, other.json()["error"]) == (403, "forbidden")
    assert ingest.store.list(updates_prefix(b, 1)) == []
    # The same bytes after expiry: 403, not the 200 an in-time replay would get.
    time.sleep(max(0.0, int(issued) + 3 - time.time()) + 0.1)
    late = requests.post(ingest.updates(a), data=body, headers=token, timeout=10)
    assert (late.status_code, late.json()["error"]) == (403, "forbidden"), late.text
    assert "expired" in late.json()["message"]
    assert ingest.store.list(updates_prefix(a, 1)) == [update_key(a, 1, "replayer")]


def test_an_admin_token_cannot_post_updates(ingest: Ingest, two_jobs: tuple[str, str]) -> None:
    a, _ = two_jobs
    for token in (auth(a, admin=True), auth("*", admin=True)):
        assert requests.get(f"{ingest.url}/v1/jobs/{a}", headers=token, timeout=10).ok
        answer = requests.post(ingest.updates(a), data=valid_update(3), headers=token, timeout=10)
        assert (answer.status_code, answer.json()["error"]) == (403, "forbidden")
    assert all("/updates/admin" not in k for k in ingest.store.list(f"jobs/{a}/"))


# --- 4. path traversal in job and client ids ---------------------------------------------------

HOSTILE_JOB_IDS = [
    b"..",
    b".",
    b"%2e%2e",
    b"%2E%2e",
    b".%2e",
    b"a/../b",
    b"a%2F..%2Fb",
    b"..%2f..%2fetc",
    b"..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    b"%2e%2e%2f%2e%2e%2fescape",
    b"..%5c..%5cescape",
    b"%252e%252e",  # double-encoded
    b"%2F",
    b"a%2F",
    b"*",  # the admin tokens' wildcard
    b"-a",
    b".hidden",
    b"a..b",
    b"a" * 65,
    b"a" * 8000,
    b"%C3%A9t%C3%A9",
    b"%E2%80%AEtxt",  # right-to-left override
    b"%EF%BC%8E%EF%BC%8E",  # fullwidth dots
    b"%00",
    b"a%00b",
    b"%FF%FE",
    b"job%20x",
    b"a%3Fb",
    b"a;b",
    b"a%0Ab",  # a newline: functions-framework's own router does not match it
]


def _snapshot(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files} | {
        str(Path(d).relative_to(root)) + "/" for d, _, _ in os.walk(root)
    }


@pytest.mark.parametrize("job", HOSTILE_JOB_IDS, ids=lambda j: j[:40].decode())
def test_hostile_job_ids_are_4xx_and_touch_nothing(ingest: Ingest, job: bytes) -> None:
    around = ingest.sandbox.parent
    before, top = _snapshot(ingest.sandbox), set(os.listdir(around))
    decoded = unquote_to_bytes(job).decode("utf-8", "replace")
    admin = auth("*", admin=True)
    client = admin  # a token naming a kilobytes-long id would itself be refused (431)
    if len(decoded) <= 256:
        signed = sign(SECRET.encode(), {"adm": False, "exp": 2**40, "job": decoded, "sub": "c"})
        client = {"Authorization": f"Bearer {signed}"}
    for method, suffix, token, body in [
        ("GET", b"", admin, b""),
        ("GET", b"/model", admin, b""),
        ("GET", b"/rounds/1", admin, b""),
        ("POST", b"/rounds/1/updates", client, valid_update()),
    ]:
        answer = raw_request(ingest.url, method, b"/v1/jobs/" + job + suffix, token, body)
        assert answer.status in (400, 404), (method, suffix, answer.status, answer.body[:200])
        assert answer.json()["error"] in ("bad_request", "not_found"), answer.body[:200]
    assert _snapshot(ingest.sandbox) == before, "a request wrote into the sandbox"
    assert set(os.listdir(around)) == top, "a request wrote next to the sandbox"


@pytest.mark.parametrize(
    "client", ["..", ".", "../escape", "a/../../escape", "%2e%2e", "a%2Fb", "..\\x", "a\x00", "/x"]
)
def test_issue_token_refuses_client_ids_that_could_leave_the_updates_folder(client: str) -> None:
    with pytest.raises(ValueError, match="client"):
        issue_token(SECRET.encode(), "job-1", client)


def test_the_client_id_comes_from_the_token_only(ingest: Ingest) -> None:
    job = ingest.new_job()
    for sub in ("../../escape", "a/../b", "..", "x/y", "%2e%2e"):
        token = sign(SECRET.encode(), {"adm": False, "exp": 2**40, "job": job, "sub": sub})
        answer = requests.post(
            ingest.updates(job),
            data=valid_update(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized"), sub
    smuggler = {"num_examples": "3", "client": "../../escape", "client_id": "victim", "sub": "x"}
    answer = requests.post(
        ingest.updates(job),
        data=tensors_to_safetensors(model(5), smuggler),
        headers=auth(job, "honest"),
        timeout=10,
    )
    assert answer.status_code == 202 and answer.json()["client"] == "honest", answer.text
    assert ingest.store.list(updates_prefix(job, 1)) == [update_key(job, 1, "honest")]


# --- 5. payloads that declare more than they carry ---------------------------------------------


@pytest.fixture(scope="module")
def big_job(ingest: Ingest) -> str:
    return ingest.new_job()


@pytest.mark.parametrize("where", ["instance", "service"])
def test_a_declared_10_gb_upload_is_413_before_the_body_is_read(
    ingest: Ingest, big_job: str, where: str
) -> None:
    """Only 4 bytes of the declared 10 GB are sent and the connection stays open: the answer
    must come from the Content-Length alone, not after waiting for (or buffering) the body."""
    base = ingest.instance_url if where == "instance" else ingest.url
    target = f"/v1/jobs/{big_job}/rounds/1/updates".encode()
    try:
        answer = raw_request(
            base, "POST", target, auth(big_job, "big"), b"safe", declared_length=TEN_GB, timeout=3
        )
    except NoAnswer as exc:
        pytest.fail(f"no 413 while the declared body is pending: {exc}")
    assert_refused(answer.status, answer.body, {"update_too_large"})
    assert answer.status == 413


def test_ingest_worker_memory_stays_bounded_under_payloads_declaring_more_than_they_carry(
    ingest: Ingest, big_job: str
) -> None:
    """50 uploads to the function instance (the Service URL's proxy buffers bodies itself):
    10 GB declared with 4 bytes or 64 MiB carried then EOF, and safetensors headers declaring a
    2**40-byte tensor in a small body. The worker's RSS and its peak RSS grow by < 50 MiB."""
    ((worker,),) = ingest.pids.values()
    target = f"/v1/jobs/{big_job}/rounds/1/updates".encode()
    carry = bytes(64 * MIB)
    liar = _declaring([2**40], "U8", b"\0" * 64)
    before = vm(worker)
    for i in range(50):
        token = auth(big_job, f"burst-{i:02d}")
        if i % 10 == 0:
            answer = raw_request(
                ingest.instance_url, "POST", target, token, b"", declared_length=TEN_GB,
                trailing=carry, half_close=True, timeout=30,
            )  # fmt: skip
            codes = {"update_too_large"}
        elif i % 2:
            answer = raw_request(
                ingest.instance_url, "POST", target, token, b"safe", declared_length=TEN_GB,
                half_close=True, timeout=10,
            )  # fmt: skip
            codes = {"update_too_large"}
        else:
            answer = raw_request(ingest.instance_url, "POST", target, token, liar, timeout=10)
            codes = {"invalid_update"}
        assert_refused(answer.status, answer.body, codes)
    after = vm(worker)
    grown = {k: (after[k] - before[k]) / MIB for k in after}
    assert grown["VmRSS"] < 50 and grown["VmHWM"] < 50, f"worker memory grew (MiB): {grown}"
    assert ingest.store.list(updates_prefix(big_job, 1)) == []
    assert_alive(ingest)


# HTTP framing a client can get wrong or abuse: each must be answered with a 4xx (any body; a
# malformed request may be refused before the function runs), not dropped and not left hanging.
FRAMING: dict[str, dict[str, Any]] = {
    "Content-Length not a number": {"headers": {"Content-Length": "abc"}, "body": b"xx"},
    "negative Content-Length": {"headers": {"Content-Length": "-1"}, "body": b"xx"},
    "Content-Length list": {"headers": {"Content-Length": "1, 2"}, "body": b"xx"},
    "two different Content-Length headers": {
        "headers": {"Content-Length": "2"},
        "extra_head": b"Content-Length: 3\r\n",
        "body": b"xxx",
    },
    "chunked body that is not safetensors": {
        "headers": {"Transfer-Encoding": "chunked"},
        "body": b"3\r\nabc\r\n0\r\n\r\n",
    },
    "raw non-ASCII bytes in the path": {"target": b"/v1/jobs/\xc3\xa9t\xc3\xa9"},
    "control character in the path": {"target": b"/v1/jobs/a\x01b"},
}


@pytest.mark.parametrize("where", ["service", "instance"])
@pytest.mark.parametrize("case", list(FRAMING.values()), ids=list(FRAMING))
def test_malformed_http_framing_is_answered_with_a_4xx(
    ingest: Ingest, big_job: str, case: dict[str, Any], where: str
) -> None:
    base = ingest.url if where == "service" else ingest.instance_url
    target = case.get("target", f"/v1/jobs/{big_job}/rounds/1/updates".encode())
    headers = {**auth(big_job, "framing"), **case.get("headers", {})}
    body, extra = case.get("body", b""), case.get("extra_head", b"")
    try:
        answer = raw_request(base, "POST", target, headers, body, extra_head=extra, timeout=3)
    except NoAnswer as exc:
        pytest.fail(str(exc))
    assert 400 <= answer.status < 500, (answer.status, answer.body[:200])
    assert not ingest.store.exists(update_key(big_job, 1, "framing"))


@pytest.mark.parametrize("where", ["service", "instance"])
def test_a_chunked_upload_arrives_intact(ingest: Ingest, where: str) -> None:
    """Transfer-Encoding: chunked is how HTTP clients stream a body of unknown length."""
    base = ingest.url if where == "service" else ingest.instance_url
    job = ingest.new_job()
    body = valid_update(11)
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    headers = {**auth(job, "chunked"), "Transfer-Encoding": "chunked"}
    target = f"/v1/jobs/{job}/rounds/1/updates".encode()
    answer = raw_request(base, "POST", target, headers, chunked, timeout=5)
    assert answer.status == 202, (answer.status, answer.body[:200])
    assert ingest.store.read(update_key(job, 1, "chunked")) == body


# --- last: the store holds only what the module's jobs legitimately wrote ----------------------


def test_nothing_was_written_outside_the_store_root(ingest: Ingest) -> None:
    assert sorted(os.listdir(ingest.sandbox)) == ["store"]
    for path in _snapshot(ingest.store.root):
        if path.endswith("/") and path.count("/") <= 2:
            continue  # ".", "jobs/", "jobs/<job>/"
        parts = path.split("/")
        assert parts[0] == "jobs" and parts[1] in ingest.jobs, path
        assert not parts[-1].startswith(".tmp-"), f"a temporary file was left behind: {path}"
