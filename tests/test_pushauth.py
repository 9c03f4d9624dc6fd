"""Push authentication on the Pub/Sub deployment: aggregate and finalize accept an event only
with a Google-style OIDC token for the configured audience and invoker. Tokens are signed here
with a test key whose certificate a local HTTP server publishes, in Google's certs format."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from functions_framework import create_app
from google.auth import crypt, jwt

from microfl import handlers
from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.events import PING
from microfl.local.procs import HOST, free_port
from microfl.pushauth import PushAuth
from microfl.serde import Event, event_to_http
from microfl.store import FileStore

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
AUDIENCE = "https://microfl-finalize.microfl.example.com/"
INVOKER = "microfl-pusher@project.iam.gserviceaccount.com"


def keypair(kid: str) -> tuple[crypt.RSASigner, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kid)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signer = crypt.RSASigner.from_string(pem, key_id=kid)
    return signer, cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def google() -> Iterator[dict[str, Any]]:
    """A certs endpoint publishing key 'k1' (and counting fetches); `signer` signs with it."""
    signer, cert = keypair("k1")
    state: dict[str, Any] = {"signer": signer, "fetches": 0}
    body = json.dumps({"k1": cert}).encode()

    class Certs(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            state["fetches"] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((HOST, 0), Certs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://{HOST}:{server.server_address[1]}/certs"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def finalize(tmp_path: Path, google: dict[str, Any]) -> Iterator[Any]:
    auth = PushAuth(AUDIENCE, INVOKER, google["url"])
    handlers.set_backends(Backends(FileStore(tmp_path), MemoryBus(), b"s", push_auth=auth))
    yield create_app("finalize", MAIN).test_client()
    handlers.set_backends(None)


def token(signer: crypt.RSASigner, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": INVOKER,
        "email_verified": True,
        "sub": "1234",
        "iat": now,
        "exp": now + 3600,
    } | overrides
    return jwt.encode(signer, claims).decode()


def push(client: Any, authorization: str | None) -> tuple[int, dict[str, Any]]:
    headers, body = event_to_http(Event(PING, "/microfl/test", f"ping-{time.time_ns()}"))
    if authorization is not None:
        headers["Authorization"] = authorization
    answer = client.post("/", data=body, headers=headers)
    return answer.status_code, answer.get_json()


def test_a_valid_push_token_is_accepted_and_keys_are_cached(
    finalize: Any, google: dict[str, Any]
) -> None:
    before = google["fetches"]
    for _ in range(3):
        status, body = push(finalize, f"Bearer {token(google['signer'])}")
        assert (status, body["status"]) == (200, "done"), body
    assert google["fetches"] - before == 1, "the keys are fetched once, not per event"


@pytest.mark.parametrize(
    ("why", "authorization"),
    [
        ("no token", None),
        ("another scheme", "Basic dXNlcjpwYXNz"),
        ("not a JWT", "Bearer not-a-jwt"),
        ("another audience", {"aud": "https://elsewhere.example.com/"}),
        ("another service account", {"email": "intruder@project.iam.gserviceaccount.com"}),
        ("unverified email", {"email_verified": False}),
        ("not Google's issuer", {"iss": "https://issuer.example.com"}),
        ("expired", {"iat": 1_000_000, "exp": 1_003_600}),
        ("signed with another key", "other-key"),
    ],
)
def test_a_push_without_a_valid_token_is_refused_before_anything_runs(
    finalize: Any, google: dict[str, Any], why: str, authorization: Any
) -> None:
    if isinstance(authorization, dict):
        authorization = f"Bearer {token(google['signer'], **authorization)}"
    elif authorization == "other-key":
        impostor, _ = keypair("k1")  # same key id, different key
        authorization = f"Bearer {token(impostor)}"
    status, body = push(finalize, authorization)
    assert (status, body["error"]) == (401, "unauthorized"), why
    assert body["message"]


def test_unreachable_keys_are_a_retryable_503(tmp_path: Path, google: dict[str, Any]) -> None:
    auth = PushAuth(AUDIENCE, INVOKER, f"http://{HOST}:{free_port()}/certs")
    handlers.set_backends(Backends(FileStore(tmp_path), MemoryBus(), b"s", push_auth=auth))
    try:
        client = create_app("finalize", MAIN).test_client()
        status, body = push(client, f"Bearer {token(google['signer'])}")
    finally:
        handlers.set_backends(None)
    assert (status, body["error"]) == (503, "unavailable")
    assert "http" not in body["message"] and "certs" not in body["message"]  # logged only
