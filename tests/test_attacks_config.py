"""Unsafe configurations fail closed (issue 13, items 6-8), tried against real function processes
(functions-framework, as the image starts them) and the checks behind them:

- on Pub/Sub, aggregate and finalize refuse to start without push authentication unless it is
  switched off for the local emulator; event bodies are bounded (413, without reading them);
- junk push-token key ids cost a bounded number of key fetches and never delay a valid push;
- weak and placeholder secrets are refused, knative/ ships none; rotation with a previous
  secret, key ids in tokens, a maximum token lifetime, and `microfl token revoke`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from hostile_payloads import sign
from microfl.backends import backends_from_env, check_env
from microfl.errors import ConfigError, Unauthorized
from microfl.jobs import JobSpec, create_job, revoked_key
from microfl.local import cli
from microfl.local.instance import FunctionProcess
from microfl.local.manifests import load_documents
from microfl.local.procs import HOST, free_port, spawn, stop_process
from microfl.pushauth import PushAuth
from microfl.rounds import update_key
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token, key_id, secret_from_env, verify_token
from raw_http import raw_request
from test_pushauth import AUDIENCE, INVOKER, keypair, token

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "functions" / "main.py"
CURRENT = "current-secret-of-the-config-attack-tests-0123456789"
PREVIOUS = "previous-secret-of-the-config-attack-tests-9876543210"
PLACEHOLDER = "REPLACE-ME-WITH-A-RANDOM-SECRET"  # what knative/config.yaml used to deploy


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any Micro-FL setting, plus `extra`."""
    prefixes = ("MICROFL_", "PUBSUB_", "FUNCTION_", "STORAGE_EMULATOR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return env | extra


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A deployment's settings: a file store, a (never reached) Kafka, a good secret."""
    return {
        "MICROFL_STORE": f"file://{tmp / 'store'}",
        "MICROFL_KAFKA_BOOTSTRAP": f"{HOST}:{free_port()}",
        "MICROFL_SECRET": CURRENT,
    } | extra


PUBSUB = {"MICROFL_BUS": "pubsub", "MICROFL_PUBSUB_PROJECT": "microfl-test"}


def start_fails(target: str, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Start `target` as the image does; its exit code (it must exit) and its log."""
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "functions-framework"),
        "--target",
        target,
        "--source",
        str(MAIN),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    proc = spawn(argv, log, env=clean_env(**env))
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        healthy = requests.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code
        stop_process(proc, grace=2)
        pytest.fail(f"{target} started (answered {healthy}) instead of refusing; log {log}")
    return code, log.read_text()


# --- 6. Pub/Sub without push authentication ---------------------------------------------------


@pytest.mark.parametrize("target", ["aggregate", "finalize"])
def test_event_functions_on_pubsub_without_push_auth_exit_at_start(
    target: str, tmp_path: Path
) -> None:
    code, log = start_fails(target, base_env(tmp_path, **PUBSUB), tmp_path / f"{target}.log")
    assert code != 0
    assert "refuses to start" in log and "MICROFL_PUSH_AUDIENCE" in log, log[-2000:]
    assert "MICROFL_PUSH_AUTH=off" in log, "the message names the emulator's switch"


def test_on_pubsub_ingest_and_the_emulators_functions_start(tmp_path: Path) -> None:
    """ingest takes no pushes; with MICROFL_PUSH_AUTH=off (the local runtime sets it for the
    emulator) finalize starts too, and so does one with the push settings."""
    logs = tmp_path / "logs"
    settings = [
        ("ingest", base_env(tmp_path, **PUBSUB)),
        ("finalize", base_env(tmp_path, **PUBSUB, MICROFL_PUSH_AUTH="off")),
        (
            "aggregate",
            base_env(
                tmp_path, **PUBSUB, MICROFL_PUSH_AUDIENCE=AUDIENCE, MICROFL_PUSH_INVOKER=INVOKER
            ),
        ),
    ]
    for target, env in settings:
        fn = FunctionProcess(target, clean_env(**env), logs)
        try:
            fn.start(timeout=60)
            assert fn.alive
        finally:
            fn.stop()


def test_the_local_runtime_switches_push_auth_off_for_the_emulator_only(tmp_path: Path) -> None:
    from microfl.local.runtime import LocalRuntime

    on_pubsub = LocalRuntime("file:///x", "127.0.0.1:1", CURRENT, tmp_path, bus="pubsub").env()
    on_kafka = LocalRuntime("file:///x", "127.0.0.1:1", CURRENT, tmp_path).env()
    assert on_pubsub["MICROFL_PUSH_AUTH"] == "off" and "MICROFL_PUSH_AUTH" not in on_kafka


@pytest.mark.parametrize(
    ("target", "env", "error"),
    [
        ("finalize", PUBSUB, "MICROFL_PUSH_AUDIENCE"),
        ("aggregate", PUBSUB, "MICROFL_PUSH_AUDIENCE"),
        ("finalize", PUBSUB | {"MICROFL_PUSH_AUDIENCE": AUDIENCE}, "both"),
        ("finalize", PUBSUB | {"MICROFL_PUSH_AUTH": "no"}, "on .* or off"),
        ("finalize", {"MICROFL_PUSH_AUTH": "off", "MICROFL_PUSH_INVOKER": INVOKER}, "unset"),
        ("finalize", PUBSUB | {"MICROFL_PUSH_AUTH": "off"}, None),
        ("ingest", PUBSUB, None),
        ("finalize", {}, None),  # Kafka: the KafkaSource is inside the cluster
        ("ingest", {"MICROFL_SECRET": PLACEHOLDER}, "placeholder"),
        ("finalize", {"MICROFL_SECRET": "0123456789abcdef"}, "at least 32"),
        ("ingest", {"MICROFL_SECRET_PREVIOUS": "short"}, "MICROFL_SECRET_PREVIOUS has 5 bytes"),
        ("ingest", {"MICROFL_SECRET_PREVIOUS": CURRENT}, "equals MICROFL_SECRET"),
        ("ingest", {"MICROFL_MAX_TOKEN_TTL": "0"}, "MICROFL_MAX_TOKEN_TTL"),
        ("ingest", {"MICROFL_BUS": "carrier-pigeon"}, "kafka or pubsub"),
    ],
)
def test_check_env(
    target: str,
    env: dict[str, str],
    error: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith(("MICROFL_", "PUBSUB_")):
            monkeypatch.delenv(name)
    for name, value in base_env(tmp_path, **env).items():
        monkeypatch.setenv(name, value)
    if error is None:
        check_env(target)
    else:
        with pytest.raises(ConfigError, match=error):
            check_env(target)


# --- 6. event bodies are bounded --------------------------------------------------------------


@pytest.fixture(scope="module")
def finalize_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real finalize process (Kafka settings that nothing reaches: bodies are refused
    before any event is handled)."""
    tmp = tmp_path_factory.mktemp("finalize")
    fn = FunctionProcess("finalize", clean_env(**base_env(tmp)), tmp / "logs").start()
    yield fn.url
    fn.stop()


CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-type": "dev.knative.sources.ping",
    "ce-source": "/attack",
    "ce-id": "big-1",
    "Content-Type": "application/json",
}


def test_an_event_declaring_a_huge_body_is_413_before_it_is_read(finalize_url: str) -> None:
    t0 = time.monotonic()
    answer = raw_request(
        finalize_url,
        "POST",
        b"/",
        CE_HEADERS | {"Content-Length": str(2**30)},
        b"{" + b" " * 100_000,
        timeout=10,
    )
    assert (answer.status, answer.json()["error"]) == (413, "event_too_large"), answer.body
    assert "65536" in answer.json()["message"] and time.monotonic() - t0 < 5


def test_a_chunked_event_body_is_cut_at_the_limit(finalize_url: str) -> None:
    """No length declared: the function reads one byte past the limit and answers, without
    waiting for the rest (the body here never ends)."""
    chunk = b" " * 16384
    body = b"1\r\n{\r\n" + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 6  # ~96 KiB, no end
    t0 = time.monotonic()
    answer = raw_request(
        finalize_url, "POST", b"/", CE_HEADERS | {"Transfer-Encoding": "chunked"}, body, timeout=10
    )
    assert (answer.status, answer.json()["error"]) == (413, "event_too_large"), answer.body
    assert time.monotonic() - t0 < 5


def test_a_small_event_is_still_handled(finalize_url: str) -> None:
    headers = CE_HEADERS | {"ce-id": "small-1"}
    answer = requests.post(finalize_url, data=b"{}", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text


# --- 7. push-token key ids chosen by the caller -----------------------------------------------


@dataclass
class Certs:
    url: str
    fetches: list[float]
    delay: list[float]  # seconds each fetch after the first waits
    started: threading.Event


@pytest.fixture
def certs() -> Iterator[Certs]:
    """A certs endpoint publishing key 'k1', counting fetches; later fetches can be slow."""
    signer, cert = keypair("k1")
    body = json.dumps({"k1": cert}).encode()
    state = Certs("", [], [0.0], threading.Event())
    state.signer = signer  # type: ignore[attr-defined]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            state.fetches.append(time.monotonic())
            if len(state.fetches) > 1:
                state.started.set()
                time.sleep(state.delay[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://{HOST}:{server.server_address[1]}/certs"
    yield state
    server.shutdown()
    server.server_close()


JUNK_SIGNER, _ = keypair("junk")


def junk(i: int) -> str:
    JUNK_SIGNER._key_id = f"junk-{i}"  # a fresh key id per token, as an attacker would pick
    return f"Bearer {token(JUNK_SIGNER)}"


def test_a_flood_of_junk_key_ids_costs_at_most_one_fetch(certs: Certs) -> None:
    auth = PushAuth(AUDIENCE, INVOKER, certs.url)
    auth.verify(f"Bearer {token(certs.signer)}")  # type: ignore[attr-defined]
    assert len(certs.fetches) == 1
    refused: list[float] = []

    def attack(start: int) -> None:
        for i in range(start, start + 50):
            t0 = time.monotonic()
            with pytest.raises(Unauthorized):
                auth.verify(junk(i))
            refused.append(time.monotonic() - t0)

    threads = [threading.Thread(target=attack, args=(n * 50,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 200
    assert len(certs.fetches) == 1, "junk key ids right after a fetch fetch nothing"
    assert max(refused) < 1.0, "and are refused at once"


def test_a_junk_key_id_refetches_at_most_once_per_interval(certs: Certs) -> None:
    auth = PushAuth(AUDIENCE, INVOKER, certs.url, refetch_interval=0.5)
    auth.verify(f"Bearer {token(certs.signer)}")  # type: ignore[attr-defined]
    t_end = time.monotonic() + 1.6
    i = 0
    while time.monotonic() < t_end:
        with pytest.raises(Unauthorized):
            auth.verify(junk(i))
        i += 1
    assert i > 50
    assert 2 <= len(certs.fetches) <= 5, certs.fetches  # 1 + at most one per 0.5 s


def test_a_valid_push_never_waits_for_a_slow_fetch(certs: Certs) -> None:
    auth = PushAuth(AUDIENCE, INVOKER, certs.url, refetch_interval=0.0)
    valid = f"Bearer {token(certs.signer)}"  # type: ignore[attr-defined]
    auth.verify(valid)
    certs.delay[0] = 3.0
    refused: list[Exception] = []

    def attack() -> None:
        try:
            auth.verify(junk(0))
        except Unauthorized as exc:
            refused.append(exc)

    slow = threading.Thread(target=attack)
    slow.start()
    assert certs.started.wait(5), "the junk token did not start a fetch"
    t0 = time.monotonic()
    for _ in range(5):
        auth.verify(valid)
    elapsed = time.monotonic() - t0
    slow.join()
    assert elapsed < 1.0, f"5 valid pushes took {elapsed:.2f}s behind a 3 s fetch"
    assert len(refused) == 1 and len(certs.fetches) == 2


# --- 8. secrets, rotation, lifetime, revocation ------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        PLACEHOLDER,
        PLACEHOLDER + "-0123456789",
        "changeme" * 5,
        "x" * 64,
        "0123456789abcdef",
        "a" * 31 + "b",
    ],
)
def test_weak_and_placeholder_secrets_are_refused(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROFL_SECRET", secret)
    with pytest.raises(ConfigError, match="openssl rand -hex 32"):
        secret_from_env()
    with pytest.raises(ConfigError):
        issue_token(secret.encode(), "job-1", "c")


def test_ingest_with_the_placeholder_secret_exits_at_start(tmp_path: Path) -> None:
    env = base_env(tmp_path, MICROFL_SECRET=PLACEHOLDER)
    code, log = start_fails("ingest", env, tmp_path / "ingest.log")
    assert code != 0 and "placeholder" in log and "openssl rand -hex 32" in log, log[-2000:]


def test_knative_ships_no_usable_secret() -> None:
    docs = load_documents(REPO / "knative")
    assert [d for d in docs if d["kind"] == "Secret"] == []
    text = "\n".join(p.read_text() for p in (REPO / "knative").glob("*.yaml"))
    assert PLACEHOLDER not in text and "stringData" not in text


@dataclass
class Ingest:
    url: str
    store: FileStore
    job: str

    def get(self, path: str, tok: str) -> requests.Response:
        return requests.get(
            f"{self.url}/v1/jobs/{self.job}{path}",
            headers={"Authorization": f"Bearer {tok}"},
            timeout=30,
        )


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    """One real ingest process with a current and a previous secret, and a job."""
    tmp = tmp_path_factory.mktemp("ingest")
    env = base_env(tmp, MICROFL_SECRET_PREVIOUS=PREVIOUS)
    store = FileStore(tmp / "store")
    model = {"w": np.zeros((2, 2), np.float32)}
    create_job(
        store,
        JobSpec.for_model("job-1", model, created_at=time.time()),
        tensors_to_safetensors(model),
    )
    fn = FunctionProcess("ingest", clean_env(**env), tmp / "logs").start()
    yield Ingest(fn.url, store, "job-1")
    fn.stop()


def test_tokens_of_the_previous_secret_verify_during_a_rotation(ingest: Ingest) -> None:
    old = issue_token(PREVIOUS.encode(), ingest.job, "site-1")
    new = issue_token(CURRENT.encode(), ingest.job, "site-1")
    assert old.split(".")[1] == key_id(PREVIOUS.encode()) != new.split(".")[1]
    for tok in (old, new):
        assert ingest.get("", tok).status_code == 200
    # First-format tokens (mfl1, no key id) still verify, against either secret.
    legacy = sign(
        CURRENT.encode(),
        {"adm": False, "exp": int(time.time()) + 60, "job": ingest.job, "sub": "site-1"},
    )
    assert legacy.startswith("mfl1.") and ingest.get("", legacy).status_code == 200
    # A third secret, or a key id naming the previous secret over another's signature: 401.
    other = issue_token(b"another-secret-entirely-0123456789abcdef", ingest.job, "site-1")
    version, kid, payload, mac = new.split(".")
    swapped = f"{version}.{key_id(PREVIOUS.encode())}.{payload}.{mac}"
    for tok in (other, swapped):
        answer = ingest.get("", tok)
        assert (answer.status_code, answer.json()["error"]) == (401, "unauthorized"), tok


def test_rotation_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in base_env(
        tmp_path, MICROFL_SECRET_PREVIOUS=PREVIOUS, MICROFL_MAX_TOKEN_TTL="3600"
    ).items():
        monkeypatch.setenv(name, value)
    b = backends_from_env()
    assert (b.secret, b.secret_previous, b.max_token_ttl) == (
        CURRENT.encode(),
        PREVIOUS.encode(),
        3600,
    )
    tok = issue_token(PREVIOUS.encode(), "j", "c", ttl=60)
    verify_token(b.secret, tok, "j", previous=b.secret_previous, max_ttl=b.max_token_ttl)
    with pytest.raises(Unauthorized, match="rotated out"):
        verify_token(b.secret, tok, "j")


def test_a_token_living_longer_than_the_maximum_is_forbidden(ingest: Ingest) -> None:
    now = int(time.time())
    forever = sign(
        CURRENT.encode(),
        {"adm": False, "exp": now + 40 * 86400, "job": ingest.job, "sub": "site-1"},
    )
    answer = ingest.get("/model", forever)
    assert (answer.status_code, answer.json()["error"]) == (403, "forbidden")
    assert "maximum token lifetime" in answer.json()["message"]
    assert (
        ingest.get(
            "/model", issue_token(CURRENT.encode(), ingest.job, "site-1", ttl=29 * 86400)
        ).status_code
        == 200
    )


def test_token_issue_refuses_a_ttl_above_the_maximum(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MICROFL_SECRET", CURRENT)
    monkeypatch.delenv("MICROFL_MAX_TOKEN_TTL", raising=False)
    assert cli.main(["token", "issue", "--job", "j", "--client", "c", "--ttl", "2592001"]) == 1
    assert "MICROFL_MAX_TOKEN_TTL" in capsys.readouterr().err
    monkeypatch.setenv("MICROFL_MAX_TOKEN_TTL", "600")
    assert cli.main(["token", "issue", "--job", "j", "--client", "c", "--ttl", "601"]) == 1
    assert cli.main(["token", "issue", "--job", "j", "--client", "c", "--ttl", "600"]) == 0
    assert capsys.readouterr().out.startswith("mfl2.")
    monkeypatch.setenv("MICROFL_SECRET", PLACEHOLDER)
    assert cli.main(["token", "issue", "--job", "j", "--client", "c"]) == 1
    assert "placeholder" in capsys.readouterr().err


def test_a_revoked_client_is_refused_on_upload_and_reads(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = issue_token(CURRENT.encode(), ingest.job, "stolen")
    honest = issue_token(CURRENT.encode(), ingest.job, "honest")
    assert ingest.get("/model", victim).status_code == 200
    monkeypatch.setenv("MICROFL_STORE", f"file://{ingest.store.root}")
    argv = ["token", "revoke", "--job", ingest.job, "--client", "stolen"]
    assert cli.main(argv) == 0 and "revoked" in capsys.readouterr().out
    assert ingest.store.exists(revoked_key(ingest.job, "stolen"))
    assert cli.main(argv) == 0 and "already revoked" in capsys.readouterr().out
    upload = requests.post(
        f"{ingest.url}/v1/jobs/{ingest.job}/rounds/1/updates",
        data=tensors_to_safetensors({"w": np.ones((2, 2), np.float32)}, {"num_examples": "1"}),
        headers={"Authorization": f"Bearer {victim}"},
        timeout=30,
    )
    assert (upload.status_code, upload.json()["error"]) == (403, "forbidden"), upload.text
    assert "revoked" in upload.json()["message"]
    assert not ingest.store.exists(update_key(ingest.job, 1, "stolen"))
    for path in ("", "/model", "/rounds/1"):
        assert ingest.get(path, victim).status_code == 403, path
    assert ingest.get("/model", honest).status_code == 200
    assert cli.main(["token", "revoke", "--job", "no-such-job", "--client", "x"]) == 1
