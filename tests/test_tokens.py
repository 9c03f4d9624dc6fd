"""Bearer tokens: what verifies, what is Unauthorized (401) and what is Forbidden (403)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microfl.errors import ConfigError, Forbidden, Unauthorized
from microfl.tokens import (
    Claims,
    bearer,
    issue_token,
    key_id,
    secret_from_env,
    valid_id,
    verify_token,
)

SECRET = b"s3cret-of-the-token-tests-0123456789"
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z").filter(lambda s: ".." not in s)


def signed(payload: object, secret: bytes = SECRET) -> str:
    """A token with a valid signature over any payload, as only the secret's holder could make
    (in the first format, mfl1, which still verifies)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    body = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    mac = hmac.new(secret, f"mfl1.{body}".encode(), hashlib.sha256).digest()
    return f"mfl1.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def test_client_token_round_trip() -> None:
    token = issue_token(SECRET, "job-1", "client.7", ttl=60, now=NOW)
    assert token.startswith(f"mfl2.{key_id(SECRET)}.") and len(token.split(".")) == 4
    claims = verify_token(SECRET, token, "job-1", now=NOW + 59)
    assert claims == Claims(job="job-1", client="client.7", admin=False, expires=NOW + 60)


def test_payload_is_sorted_compact_json() -> None:
    body = issue_token(SECRET, "j", "c", ttl=10, now=NOW).split(".")[2]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert raw == b'{"adm":false,"exp":%d,"job":"j","sub":"c"}' % (NOW + 10)


def test_wrong_secret_is_unauthorized() -> None:
    token = issue_token(SECRET, "job-1", "c", now=NOW)
    with pytest.raises(Unauthorized, match="signature"):
        verify_token(b"another-secret-of-some-length-0123456789", token, "job-1", now=NOW)


def test_signature_with_other_spare_bits_is_unauthorized() -> None:
    """43 base64 characters carry 258 bits for 256: a lax decoder maps 4 endings to one MAC."""
    token = issue_token(SECRET, "job-1", "c", now=NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(twin.split(".")[3] + "=") == base64.urlsafe_b64decode(
        token.split(".")[3] + "="
    )
    with pytest.raises(Unauthorized, match="signature"):
        verify_token(SECRET, twin, "job-1", now=NOW)


def test_token_for_another_job_is_forbidden() -> None:
    token = issue_token(SECRET, "job-1", "c", now=NOW)
    with pytest.raises(Forbidden, match="for job 'job-1', not 'job-2'"):
        verify_token(SECRET, token, "job-2", now=NOW)


def test_expired_token_is_forbidden_and_says_when() -> None:
    token = issue_token(SECRET, "job-1", "c", ttl=3600, now=NOW)
    with pytest.raises(Forbidden, match=r"expired at 2026-01-01T01:00:00Z; .*microfl token issue"):
        verify_token(SECRET, token, "job-1", now=NOW + 3600)


def test_admin_star_token_works_for_any_job() -> None:
    token = issue_token(SECRET, "*", admin=True, now=NOW)
    for job in ("job-1", "other", "*"):
        claims = verify_token(SECRET, token, job, now=NOW)
        assert claims == Claims(job="*", client=None, admin=True, expires=NOW + 86400)


def test_admin_token_for_one_job_is_only_for_that_job() -> None:
    token = issue_token(SECRET, "job-1", admin=True, now=NOW)
    assert verify_token(SECRET, token, "job-1", now=NOW).admin
    with pytest.raises(Forbidden):
        verify_token(SECRET, token, "job-2", now=NOW)


def test_client_token_cannot_be_for_every_job() -> None:
    with pytest.raises(ValueError, match="not a job id"):
        issue_token(SECRET, "*", "c")
    forged = signed({"adm": False, "exp": NOW + 10, "job": "*", "sub": "c"})
    with pytest.raises(Unauthorized):
        verify_token(SECRET, forged, "job-1", now=NOW)


@pytest.mark.parametrize("kwargs", [{}, {"client": "c", "admin": True}])
def test_exactly_one_of_client_or_admin(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="client=<id> or admin=True"):
        issue_token(SECRET, "job-1", **kwargs)


@pytest.mark.parametrize(
    "bad", ["", "-a", ".a", "_a", "a/b", "a..b", "a b", "a\n", "é", "a" * 65, "*", "a:b", "a\\b"]
)
def test_bad_ids_rejected(bad: str) -> None:
    assert not valid_id(bad)
    with pytest.raises(ValueError, match="job"):
        issue_token(SECRET, bad, "c")
    with pytest.raises(ValueError, match="client"):
        issue_token(SECRET, "job-1", bad)


@pytest.mark.parametrize("good", ["a", "A9", "job-1", "c.7_x", "a.", "a" * 64, "0"])
def test_good_ids(good: str) -> None:
    assert valid_id(good)


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        issue_token(SECRET, "j", "c", ttl=0)


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_unauthorized(token: str | None) -> None:
    with pytest.raises(Unauthorized, match="Authorization: Bearer"):
        verify_token(SECRET, token, "job-1")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "mfl1.",
        "mfl1..",
        "mfl1.a.b.c",
        "mfl2.e30.e30",
        "mfl1.e30=.e30",
        "mfl1.é.é",
        "mfl1." + "A" * 2048 + ".x",
    ],
)
def test_malformed_token_is_unauthorized(token: str) -> None:
    with pytest.raises(Unauthorized):
        verify_token(SECRET, token, "job-1")


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[" * 1500,
        [],
        "str",
        {},
        {"adm": False, "exp": "1", "job": "j", "sub": "c"},
        {"adm": False, "exp": True, "job": "j", "sub": "c"},
        {"adm": 0, "exp": NOW + 10, "job": "j", "sub": "c"},
        {"adm": False, "exp": NOW + 10, "job": "j", "sub": "../c"},
        {"adm": True, "exp": NOW + 10, "job": "j", "sub": "c"},
        {"adm": False, "exp": NOW + 10, "job": "j"},
    ],
)
def test_well_signed_but_malformed_payload_is_unauthorized(payload: object) -> None:
    with pytest.raises(Unauthorized, match="malformed"):
        verify_token(SECRET, signed(payload), "j", now=NOW)


def test_huge_expiry_is_forbidden_as_too_long_lived() -> None:
    token = signed({"adm": False, "exp": 10**30, "job": "j", "sub": "c"})
    with pytest.raises(Forbidden, match="maximum token lifetime"):
        verify_token(SECRET, token, "j", now=NOW)
    with pytest.raises(Forbidden, match="expired at"):
        verify_token(
            SECRET, signed({"adm": False, "exp": -(10**30), "job": "j", "sub": "c"}), "j", now=NOW
        )


def test_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        issue_token(b"", "j", "c")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("  Bearer abc", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpw", None),
        ("Token abc", None),
        ("Bearerabc", None),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROFL_SECRET", raising=False)
    with pytest.raises(ConfigError, match="MICROFL_SECRET is not set"):
        secret_from_env()
    monkeypatch.setenv("MICROFL_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        secret_from_env()
    monkeypatch.setenv("MICROFL_SECRET", "ünïcode-secret-0123456789abcdef")
    assert secret_from_env() == "ünïcode-secret-0123456789abcdef".encode()


@given(job=ids, client=ids)
def test_any_valid_ids_round_trip(job: str, client: str) -> None:
    claims = verify_token(SECRET, issue_token(SECRET, job, client, now=NOW), job, now=NOW)
    assert (claims.job, claims.client) == (job, client)


@given(data=st.data(), job=ids, client=ids | st.none())
def test_any_single_character_change_is_rejected(
    data: st.DataObject, job: str, client: str | None
) -> None:
    token = issue_token(SECRET, job, client, admin=client is None, now=NOW)
    i = data.draw(st.integers(0, len(token) - 1), label="position")
    c = data.draw(st.characters(codec="utf-8").filter(lambda c: c != token[i]), label="char")
    with pytest.raises((Unauthorized, Forbidden)):
        verify_token(SECRET, token[:i] + c + token[i + 1 :], job, now=NOW)


@given(text=st.text(max_size=3000))
def test_arbitrary_text_is_only_ever_unauthorized(text: str) -> None:
    with pytest.raises(Unauthorized):
        verify_token(SECRET, text, "job-1", now=NOW)
