"""Hostile ids and framing against a real ingest process (DESIGN.md invariants 5 and 6): path
traversal in job and client ids, payloads that declare more data than they carry, malformed HTTP
framing. The same promises as test_hostile.py (a JSON 4xx, nothing stored, nothing written outside
the store, the instance and its worker unchanged, bounded memory), with hostile_ingest.py's
harness: one LocalRuntime for the module."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
import requests

from fl import SECRET, auth
from hostile_ingest import (
    MIB,
    TEN_GB,
    Ingest,
    assert_alive,
    assert_nothing_outside_the_store,
    assert_refused,
    declaring,
    snapshot,
    start_ingest,
    vm,
)
from hostile_payloads import model, sign, valid_update
from microfl.rounds import update_key, updates_prefix
from microfl.serde import tensors_to_safetensors
from microfl.tokens import issue_token
from raw_http import NoAnswer, raw_request

ingest = pytest.fixture(scope="module")(start_ingest)


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


@pytest.mark.parametrize("job", HOSTILE_JOB_IDS, ids=lambda j: j[:40].decode())
def test_hostile_job_ids_are_4xx_and_touch_nothing(ingest: Ingest, job: bytes) -> None:
    around = ingest.sandbox.parent
    before, top = snapshot(ingest.sandbox), set(os.listdir(around))
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
    assert snapshot(ingest.sandbox) == before, "a request wrote into the sandbox"
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
    liar = declaring([2**40], "U8", b"\0" * 64)
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
    assert_nothing_outside_the_store(ingest)
