"""Hostile input against a real ingest process (DESIGN.md invariants 5 and 6, shared/API.md):
fuzzed uploads, the OpenAPI contract under schemathesis, token tampering and replay. Path
traversal in ids and payloads that declare more than they carry: test_hostile_ids.py.

What must hold for all of it: every answer is a 4xx with a JSON error body (never a 5xx, never a
dropped connection), nothing rejected is stored, nothing is written outside the store's root, the
ingest instance and its worker stay the same processes, and the worker's memory stays bounded.

One LocalRuntime for the module (the manifests' Services behind the local Knative proxy, a
FileStore in a sandbox folder). `ingest.url` is the Service URL clients use; `instance_url`
addresses the one function instance directly, where a test is about the function itself rather
than the proxy in front of it."""

from __future__ import annotations

import itertools
import struct
import time

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

from fl import SECRET, auth
from hostile_ingest import (
    FUZZ_HEALTH,
    MIB,
    OPENAPI,
    Ingest,
    assert_alive,
    assert_nothing_outside_the_store,
    assert_refused,
    declaring,
    start_ingest,
    with_examples,
)
from hostile_payloads import FAMILIES, MAX_U64, Family, sign, valid_update
from microfl.rounds import update_key, updates_prefix
from microfl.tokens import issue_token, valid_id
from raw_http import raw_request

ingest = pytest.fixture(scope="module")(start_ingest)


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


HOSTILE_UPLOADS = {
    "num_examples '²' (str.isdigit, but int() refuses it)": with_examples("²"),
    "num_examples of 5000 digits (over int()'s 4300-digit limit)": with_examples("1" * 5000),
    "a tensor with 65 dimensions (numpy's limit is 64)": declaring([1] * 65, data=b"\0" * 4),
    "an empty tensor with a 2**70 dimension": declaring([2**70, 0]),
    "an empty tensor of shape (2**40, 2**40, 0)": declaring([2**40, 2**40, 0]),
    "a 2**40-byte tensor in a 64-byte body": declaring([2**40], "U8", b"\0" * 64),
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


# --- last: the store holds only what the module's jobs legitimately wrote ----------------------


def test_nothing_was_written_outside_the_store_root(ingest: Ingest) -> None:
    assert_nothing_outside_the_store(ingest)
