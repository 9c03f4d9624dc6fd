"""Terminal progress: `microfl status`'s view of a partly filled round read from a real store
(updates towards the quorum or the buffer's K, time to the deadline, in the text and in
--json), and the progress helper's plain lines when stdout is not a terminal."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from fl import make_model, new_job, update_bytes
from microfl.buffers import Buffers
from microfl.jobs import load_job, model_key
from microfl.local import cli
from microfl.local.progress import bar
from microfl.local.statusview import print_progress, round_progress
from microfl.rounds import Rounds
from microfl.store import FileStore


def _rendered(jobs: list[dict]) -> str:
    out = io.StringIO()
    print_progress(jobs, Console(file=out, width=160))
    return out.getvalue()


def test_sync_round_partly_filled(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    model = make_model()
    job = new_job(store, model, rounds=2, min_clients=5, round_timeout=120.0)
    spec = load_job(store, job)
    rounds = Rounds(store, spec)
    for c in ("c1", "c2", "c3"):  # as ingest stores an update: the object, then its slot
        assert rounds.create_update(1, c, io.BytesIO(update_bytes(model, 10)))
        rounds.claim_slot(1, c)

    p = round_progress(store, spec, spec.created_at + 30)
    assert p == {
        "round": 1,
        "updates": 3,
        "target": 5,
        "target_is": "quorum",
        "state": "open",
        "opened_at": spec.created_at,
        "deadline_at": spec.created_at + 120,
        "seconds_left": 90.0,
    }
    text = _rendered([{"job": job, "progress": p}])
    assert "round 1" in text and "3/5 updates (quorum)" in text
    assert "90 s to the deadline" in text
    assert "━" in text  # rich's bar

    late = round_progress(store, spec, spec.created_at + 500)
    assert late is not None and late["seconds_left"] == 0
    assert "deadline passed; seals at the next sweep" in _rendered([{"job": job, "progress": late}])

    rounds.create_closing(1, "deadline")
    closing = round_progress(store, spec, spec.created_at + 500)
    assert closing is not None and closing["state"] == "sealing"
    assert "3/5 updates (quorum), sealing" in _rendered([{"job": job, "progress": closing}])


def test_async_buffer_and_finished_job(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    model = make_model()
    job = new_job(store, model, rounds=3, mode="async", buffer=4, round_timeout=60.0)
    spec = load_job(store, job)
    buffers = Buffers(store, spec)
    for c in ("a", "b"):
        assert buffers.create_update(0, c, io.BytesIO(update_bytes(model, 5)))
        taken, _ = buffers.place(0, c)
        assert taken is not None and taken.buffer == 1
    p = round_progress(store, spec, spec.created_at + 10)
    assert p is not None
    assert (p["round"], p["updates"], p["target"], p["target_is"]) == (1, 2, 4, "buffer")
    assert p["seconds_left"] == 50.0
    text = _rendered([{"job": job, "progress": p}])
    assert "version 1" in text and "2/4 updates (buffer)" in text and "50 s to the deadline" in text

    done = new_job(store, model, rounds=1, min_clients=1)
    store.create(model_key(done, 1), b"x")  # its one round committed
    assert round_progress(store, load_job(store, done), 0.0) is None
    assert _rendered([{"job": done, "progress": None}]) == ""


def test_status_command_shows_and_reports_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`microfl status` against a platform's state file: the bar in the text, `progress` in
    --json beside the keys it had."""
    store = FileStore(tmp_path / "store")
    model = make_model()
    job = new_job(store, model, rounds=2, min_clients=4, round_timeout=600.0)
    spec = load_job(store, job)
    rounds = Rounds(store, spec)
    assert rounds.create_update(1, "c1", io.BytesIO(update_bytes(model, 10)))
    rounds.claim_slot(1, "c1")
    state = {
        "ingest_url": "http://127.0.0.1:9",
        "store": store.url,
        "processes": [{"role": "supervisor", "pid": os.getpid(), "port": None, "log": "-"}],
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    monkeypatch.setenv("MICROFL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MICROFL_STORE", raising=False)

    assert cli.main(["status", "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)["jobs"]
    assert {"job", "mode", "strategy", "model_version", "rounds", "metrics"} <= set(found)
    assert found["progress"]["updates"] == 1 and found["progress"]["target"] == 4
    assert 0 < found["progress"]["seconds_left"] <= 600

    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"{job}" in out and "1/4 updates (quorum)" in out and "s to the deadline" in out


def test_plain_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with bar("chaos", 2, "scenarios", stream=out) as outer:
        outer.status("running broker-kill")  # a terminal only: no line in a log
        assert out.getvalue() == ""
        with bar("demo", 2, "rounds", stream=out) as inner:
            inner.advance(status="accuracy 0.500")
            inner.advance(status="accuracy 0.750")
        outer.advance(status="broker-kill ok")
        outer.advance()
    assert out.getvalue().splitlines() == [
        "demo: 1/2 rounds (accuracy 0.500)",
        "demo: 2/2 rounds (accuracy 0.750)",
        "chaos: 1/2 scenarios (broker-kill ok)",
        "chaos: 2/2 scenarios (broker-kill ok)",
    ]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_bars_redraw_and_nest_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal (forced here) the bars are rows of one live display, lines printed while
    it runs land above it, and nothing is left of it in the helper afterwards."""
    from microfl.local import progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    out = io.StringIO()
    with bar("robustness", 1, "runs", stream=out) as outer:
        with bar("demo", 2, "rounds", stream=out) as inner:
            assert len(progress._live) == 1
            inner.advance(status="accuracy 0.812")
        outer.advance()
    assert not progress._live
    text = out.getvalue()
    assert "\x1b[" in text and "robustness" in text
    assert "demo" in text and "accuracy 0.812" in text
    assert "demo: 1/2 rounds" not in text  # no plain lines on a terminal
