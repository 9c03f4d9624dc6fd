"""The operator console through functions-framework's own test client (fast; the browser tests
are in test_console_browser.py): sign-in and the session cookie, refusal without a session or
with a forged one, the security headers on every answer, escaping of what clients chose, the
admin's scope, read-only paths, and the pages' content from rounds committed in-process."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from functions_framework import create_app

from fl import SECRET, healthy_run, make_model, make_updates, new_job
from microfl import console, consolepages
from microfl.clientmetrics import metrics_to_text
from microfl.jobs import model_key
from microfl.rounds import update_key
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
HOSTILE = '<img src=x onerror="document.title=1">'  # printable: a valid metric name
HOSTILE_ID = "<svg onload=alert(1)>"  # ingest refuses such ids; the console trusts no store


def post_round(store: FileStore, job: str, r: int, n: int, late: str | None = None) -> None:
    """Round r committed in-process from n updates reporting metrics (one with a hostile
    name), and, if given, a `late` update stored after the seal (excluded, with its reason)."""
    model = make_model()
    for i, (client, (tensors, examples)) in enumerate(make_updates(model, n, seed=r).items()):
        metrics = {"loss": 1.0 / (r + i), "accuracy": 0.5 + 0.1 * r, HOSTILE: 1.0}
        meta = {"num_examples": str(examples), "metrics": metrics_to_text(metrics)}
        store.create(update_key(job, r, client), tensors_to_safetensors(tensors, meta))
    if late is None:
        healthy_run(store, job, r)
        return
    from microfl import aggregate, finalize
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import load_job

    bus = MemoryBus()
    b = Backends(store, bus, SECRET.encode())
    finalize.seal(b, load_job(store, job), r, trigger="test", listing=True)
    tensors, examples = next(iter(make_updates(model, 1, seed=99).values()))
    store.create(update_key(job, r, late), tensors_to_safetensors(tensors, {"num_examples": "3"}))
    while bus.events:
        topic, event, _ = bus.events.pop(0)
        if topic == "microfl.aggregate":
            aggregate.handle(b, event)
        elif topic == "microfl.finalize":
            finalize.handle(b, event)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileStore, str, str]]:
    """Two jobs: `busy` with two committed rounds (round 2 excluded a late, hostile-named
    update) and round 3 filling; `other`, untouched."""
    store = FileStore(tmp_path_factory.mktemp("console") / "store")
    busy = new_job(store, make_model(), rounds=5, min_clients=3, fan_in=2)
    other = new_job(store, make_model(), rounds=2, min_clients=2)
    post_round(store, busy, 1, 3)
    post_round(store, busy, 2, 3, late=HOSTILE_ID)
    tensors, n = next(iter(make_updates(make_model(), 1, seed=7).values()))
    store.create(
        update_key(busy, 3, "client-in-3"),
        tensors_to_safetensors(tensors, {"num_examples": str(n)}),
    )
    new_job(store, make_model(), rounds=3, min_clients=1, mode="async", buffer=2)
    console.configure(store, SECRET.encode())
    yield store, busy, other
    console.configure(None)


@pytest.fixture()
def client(world: tuple[FileStore, str, str]):
    return create_app("console", MAIN).test_client()


def sign_in(client, job: str = "*", **kw: object):
    token = issue_token(SECRET.encode(), job, admin=True, **kw)  # type: ignore[arg-type]
    answer = client.post("/signin", data={"token": token})
    assert answer.status_code == 303, answer.data
    return answer


def assert_secure(answer) -> None:
    h = answer.headers
    csp = h["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert h["X-Frame-Options"] == "DENY"
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "no-referrer"


def test_nothing_but_sign_in_and_assets_without_a_session(client, world) -> None:
    _, busy, _ = world
    for path in (
        "/",
        f"/jobs/{busy}",
        "/fragments/jobs",
        f"/fragments/jobs/{busy}",
        f"/jobs/{busy}/models/1",
        "/no/such/page",
        "/jobs/" + "a" * 70,
    ):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert_secure(answer)
        text = answer.data.decode()
        assert busy not in text and 'name="token"' in text, path  # the sign-in form, no data
    for path in ("/signin", "/assets/console.js", "/assets/console.css"):
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert_secure(answer)
    assert client.get("/assets/console.js").headers["Content-Type"].startswith("text/javascript")
    assert client.get("/assets/nope.js").status_code == 404
    assert_secure(client.get("/favicon.ico"))  # a path the framework routes itself


def test_sign_in_sets_a_strict_http_only_session_cookie(client) -> None:
    cookie = sign_in(client).headers["Set-Cookie"]
    assert cookie.startswith(f"{console.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http (the local platform)
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))  # type: ignore[union-attr]
    assert max_age == console.SESSION_TTL
    assert client.get("/").status_code == 200
    assert client.get("/signin").status_code == 303  # signed in already
    out = client.post("/signout")
    assert out.status_code == 303 and out.headers["Location"] == "/signin"
    assert client.get("/").status_code == 401


def test_session_ends_with_a_short_lived_token_and_is_secure_over_https(client) -> None:
    token = issue_token(SECRET.encode(), "*", admin=True, ttl=60)
    answer = client.post("/signin", data={"token": token}, headers={"X-Forwarded-Proto": "https"})
    cookie = answer.headers["Set-Cookie"]
    assert "Secure" in cookie
    assert 55 <= int(re.search(r"Max-Age=(\d+)", cookie).group(1)) <= 60  # type: ignore[union-attr]
    assert answer.headers["Strict-Transport-Security"].startswith("max-age=")


@pytest.mark.parametrize(
    ("token", "status", "says"),
    [
        ("", 401, "malformed token"),
        ("mfl2.x.y.z", 401, "signature"),
        (issue_token(SECRET.encode(), "j1", "client-1"), 403, "not an admin token"),
        (issue_token(b"another-secret-0123456789abcdef-0123", "*", admin=True), 401, "signature"),
        (
            issue_token(SECRET.encode(), "*", admin=True, now=time.time() - 7200, ttl=60),
            403,
            "expired",
        ),
    ],
)
def test_sign_in_refuses_what_is_not_a_valid_admin_token(client, token, status, says) -> None:
    answer = client.post("/signin", data={"token": token})
    assert answer.status_code == status
    assert says in answer.data.decode()
    assert "Set-Cookie" not in answer.headers
    assert_secure(answer)
    assert client.get("/").status_code == 401


def test_forged_altered_or_expired_cookies_are_refused_and_forgotten(client) -> None:
    other = b"another-secret-0123456789abcdef-0123"
    good = console.session_cookie(SECRET.encode(), "j1", int(time.time()) + 600)
    payload, mac = good.split(".")
    widened = (
        base64.urlsafe_b64encode(
            json.dumps({"exp": int(time.time()) + 600, "job": "*"}, sort_keys=True).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    for value in (
        console.session_cookie(other, "*", int(time.time()) + 600),  # signed with another key
        f"{widened}.{mac}",  # scope widened, signature kept
        console.session_cookie(SECRET.encode(), "*", int(time.time()) - 1),  # expired
        "x" * 600,
        "garbage",
        issue_token(SECRET.encode(), "*", admin=True),  # a token is not a session
    ):
        client.set_cookie(console.COOKIE, value)
        answer = client.get("/")
        assert answer.status_code == 401, value
        assert f"{console.COOKIE}=;" in answer.headers.get("Set-Cookie", ""), value
    client.set_cookie(console.COOKIE, good)
    assert client.get("/").status_code == 200


def test_read_only_and_headers_on_every_signed_in_answer(client, world) -> None:
    store, busy, _ = world
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    sign_in(client)
    for path in (
        "/",
        f"/jobs/{busy}",
        f"/fragments/jobs/{busy}",
        "/fragments/jobs",
        f"/jobs/{busy}/models/2",
        "/jobs/no-such-job",
        "/nowhere",
    ):
        answer = client.get(path)
        assert answer.status_code in (200, 404), path
        assert_secure(answer)
        assert answer.headers["Cache-Control"] == "no-store"
        for method in (client.post, client.put, client.delete):
            refused = method(path)
            assert refused.status_code in (404, 405), (method, path)
            assert_secure(refused)
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before


def test_jobs_page(client, world) -> None:
    _, busy, other = world
    sign_in(client)
    page = client.get("/").data.decode()
    assert busy in page and other in page
    row = page[page.index(f">{busy}<") :].split("</tr>")[0]
    assert "open" in row and "sync" in row and "fedavg" in row and "2 / 5" in row
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", row)  # the last commit


def test_job_page_shows_rounds_exclusions_metrics_and_escapes_client_text(client, world) -> None:
    store, busy, _ = world
    sign_in(client)
    page = client.get(f"/jobs/{busy}").data.decode()
    # Nothing a client chose reaches the page as markup.
    assert "<img" not in page and "<svg onload" not in page
    assert "&lt;img src=x onerror=&#34;document.title=1&#34;&gt;" in page  # metric name
    assert "&lt;svg onload=alert(1)&gt;" in page  # client id of the late update
    assert "arrived after round 2 was sealed" in page
    # Timeline: round 3 open with one update, 2 and 1 committed with their tree's nodes.
    assert re.search(r'id="round-3"><td>3</td><td>open', page)
    assert re.search(r'id="round-2"><td>2</td><td>committed', page)
    assert page.count('class="node built"') == 2 * 2  # 3 updates, fan-in 2: two leaves, the top
    assert "client-in-3" in page and '<span id="updates">1</span> of 3' in page
    # Charts, server-side SVG: participation, and one per metric name.
    assert page.count('<svg class="chart"') == 1 + 3  # participation, one per metric name
    assert page.count('<svg class="chart gantt"') == 1  # the timeline
    assert 'aria-label="loss per round"' in page
    # The committed models, downloadable as stored.
    for v in (0, 1, 2):
        assert f'href="/jobs/{busy}/models/{v}"' in page
    answer = client.get(f"/jobs/{busy}/models/2")
    assert answer.data == store.read(model_key(busy, 2))
    assert answer.headers["Content-Disposition"] == (
        f'attachment; filename="{busy}-00000002.safetensors"'
    )
    assert client.get(f"/jobs/{busy}/models/3").status_code == 404


def test_async_job_pages(client, world) -> None:
    store, _, _ = world
    sign_in(client)
    [job] = [r for r in console.view.jobs_view(store, "*") if r.get("mode") == "async"]
    assert job["state"] == "running"
    page = " ".join(client.get(f"/jobs/{job['job']}").data.decode().split())
    assert 'buffer 1 has <span id="updates">0</span> of 2 updates' in page
    assert "<th>Version</th>" in page and "3 versions" in page


def test_live_fragment_follows_the_round(client, world) -> None:
    _, busy, _ = world
    sign_in(client)
    fragment = client.get(f"/fragments/jobs/{busy}").data.decode()
    assert fragment.startswith('<div class="live" data-version="2" data-state="open">')
    assert "round 3" in fragment and "client-in-3" in fragment


def test_an_admin_of_one_job_sees_that_job_only(client, world) -> None:
    _, busy, other = world
    sign_in(client, job=other)
    page = client.get("/").data.decode()
    assert other in page and busy not in page
    assert client.get(f"/jobs/{other}").status_code == 200
    for path in (f"/jobs/{busy}", f"/fragments/jobs/{busy}", f"/jobs/{busy}/models/0"):
        answer = client.get(path)
        assert answer.status_code == 404 and busy in answer.data.decode(), path  # named: escaped


def test_sign_in_from_another_origin_is_refused(client) -> None:
    token = issue_token(SECRET.encode(), "*", admin=True)
    answer = client.post(
        "/signin", data={"token": token}, headers={"Origin": "https://evil.example"}
    )
    assert answer.status_code == 403 and "Set-Cookie" not in answer.headers


def test_charts_escape_and_skip_what_is_not_finite() -> None:
    svg = str(consolepages.chart(HOSTILE, [(1, 0.5), (2, float("nan")), (3, 0.25)]))
    assert "<img" not in svg and "&lt;img" in svg
    assert svg.count("<circle") == 2
    assert str(consolepages.chart("empty", [])) == ""
    bars = str(consolepages.participation_chart([{"round": 1, "included": 3, "excluded": 1}]))
    assert bars.count('class="included"') == 1 and bars.count('class="excluded"') == 1
