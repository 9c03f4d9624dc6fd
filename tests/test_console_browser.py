"""The operator console in a real headless browser (Debian's Chromium, driven by Selenium with
Debian's chromedriver), served by the local runtime from knative/console.yaml beside the three
functions on a real Kafka broker: refusal without a session and with a forged cookie, sign-in,
the jobs page, a job page while its round fills (it updates itself) and after the commit, and a
client id and a metric name made of HTML shown as text. Screenshots go to
load/results/console/ (overwritten each run, not committed; the README shows a copy of job.png)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fl import SECRET, make_model, make_updates, new_job
from microfl import console
from microfl.clientmetrics import metrics_to_text
from microfl.jobs import model_key
from microfl.local.runtime import LocalRuntime
from microfl.rounds import update_key
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[1] / "load" / "results" / "console"
# What a script would do if the page ran it: mark the body. Neither may contain '/' (a key
# segment of the file store).
HOSTILE_METRIC = "<img src=x onerror=document.body.dataset.pwned=1>"
HOSTILE_ID = "<svg onload=document.body.dataset.pwned=2>"


@pytest.fixture(scope="module")
def platform(
    kafka: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalRuntime, FileStore]]:
    work = tmp_path_factory.mktemp("console-browser")
    store = FileStore(work / "store")
    with LocalRuntime(store.url, kafka.bootstrap, SECRET, work, ping_interval=1.0) as rt:
        yield rt, store


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            pytest.fail(f"{path} is missing: run `make browser` (apt-get install chromium "
                        "chromium-driver)", pytrace=False)  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1400", "--disable-gpu"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def shot(driver: webdriver.Chrome, name: str) -> None:
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))


def wait_for(driver: webdriver.Chrome, what: str, check: Any, timeout: float = 30) -> None:
    # An element found while the page is being replaced goes stale: look again at the next poll.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=ignored).until(
        lambda d: check(d), message=f"not within {timeout:.0f}s: {what}"
    )


def body_text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def upload(rt: LocalRuntime, job: str, client: str, tensors: Any, n: int, metrics: dict) -> None:
    meta = {"num_examples": str(n), "metrics": metrics_to_text(metrics)}
    answer = requests.post(
        f"{rt.ingest_url}/v1/jobs/{job}/rounds/1/updates",
        data=tensors_to_safetensors(tensors, meta),
        headers={
            "Authorization": f"Bearer {issue_token(SECRET.encode(), job, client)}",
            "Content-Type": "application/octet-stream",
        },
        timeout=60,
    )
    assert answer.status_code == 202, answer.text


def test_console_in_a_browser(platform: tuple[LocalRuntime, FileStore], browser: Any) -> None:
    rt, store = platform
    url = rt.console_url
    assert url is not None
    model = make_model()
    # Quorum 7: six uploads and the update stored directly below.
    job = new_job(store, model, rounds=2, min_clients=7, fan_in=2, round_timeout=600)
    updates = list(make_updates(model, 7).items())

    # Without a session: the sign-in form and nothing else; a forged cookie changes nothing.
    assert requests.get(f"{url}/jobs/{job}", timeout=60).status_code == 401
    browser.get(f"{url}/jobs/{job}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    assert job not in body_text(browser)
    forged = console.session_cookie(b"not-the-platform-secret-0123456789abcdef", "*", 2**31)
    browser.add_cookie({"name": console.COOKIE, "value": forged, "path": "/"})
    browser.get(f"{url}/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
    assert all(c["name"] != console.COOKIE for c in browser.get_cookies())  # forgotten
    shot(browser, "signin")

    # Sign in with an admin token: an HttpOnly, SameSite=Strict session cookie.
    browser.find_element(By.ID, "token").send_keys(issue_token(SECRET.encode(), "*", admin=True))
    browser.find_element(By.ID, "signin").click()
    wait_for(browser, "the jobs page", lambda d: d.find_element(By.TAG_NAME, "h1").text == "Jobs")
    [cookie] = [c for c in browser.get_cookies() if c["name"] == console.COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # scripts cannot read it
    row = browser.find_element(By.LINK_TEXT, job).find_element(By.XPATH, "./../..").text
    assert "open" in row and "sync" in row and "fedavg" in row and "0 / 2" in row
    shot(browser, "jobs")

    # During round 1: three uploads, and an update whose client id is HTML (ingest refuses
    # such ids; it is written to storage directly, as a foreign writer could).
    for client, (tensors, n) in updates[:3]:
        upload(rt, job, client, tensors, n, {"loss": 0.9, HOSTILE_METRIC: 1.0})
    tensors, n = updates[3][1]
    store.create(
        update_key(job, 1, HOSTILE_ID),
        tensors_to_safetensors(tensors, {"num_examples": str(n)}),
    )
    browser.get(f"{url}/jobs/{job}")
    live = browser.find_element(By.ID, "live")
    assert "round 1 has 4 of 7 updates" in live.text, live.text
    assert HOSTILE_ID in live.text  # shown as text
    wait_for(browser, "a leaf folded while the round fills", lambda d: d.find_elements(
        By.CSS_SELECTOR, "#round-1 .node.built") or d.refresh())  # fmt: skip
    shot(browser, "job-during")

    # The page follows the round by itself: the next upload shows up without a reload.
    browser.execute_script("document.body.dataset.stay = 'yes'")
    client, (tensors, n) = updates[4]
    upload(rt, job, client, tensors, n, {"loss": 0.7})
    wait_for(browser, "the live part shows 5 updates",
             lambda d: d.find_element(By.ID, "updates").text == "5")  # fmt: skip
    assert browser.execute_script("return document.body.dataset.stay") == "yes"  # no reload

    # The last uploads reach the quorum; the page reloads itself once model 1 is committed.
    for client, (tensors, n) in updates[5:]:
        upload(rt, job, client, tensors, n, {"loss": 0.5})
    rt.wait_committed(store, job, 1)
    wait_for(browser, "the page shows round 1 committed", lambda d: "committed" in d.find_element(
        By.ID, "round-1").text)  # fmt: skip
    text = body_text(browser)
    assert "round 2 has 0 of 7 updates" in text, text
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    labels = {c.get_attribute("aria-label") for c in charts}
    assert {"updates included and excluded per round", "loss per round"} <= labels, labels
    assert f"{HOSTILE_METRIC} per round" in labels  # the name, as text, in an attribute
    assert browser.execute_script("return document.body.dataset.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, main svg[onload]")
    shot(browser, "job")

    # The model download, with the browser's session: the committed bytes.
    link = browser.find_element(By.CSS_SELECTOR, f'a[href="/jobs/{job}/models/1"]')
    session = {console.COOKIE: browser.get_cookie(console.COOKIE)["value"]}
    got = requests.get(str(link.get_attribute("href")), cookies=session, timeout=60)
    assert got.status_code == 200 and got.content == store.read(model_key(job, 1))

    # Signing out ends the session.
    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    wait_for(browser, "the sign-in page", lambda d: d.find_element(By.TAG_NAME, "h1").text
             == "Sign in")  # fmt: skip
    browser.get(f"{url}/jobs/{job}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Sign in"
