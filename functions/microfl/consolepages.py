"""The operator console's pages: Jinja2 templates (autoescaped: client ids, metric names and
reasons come from clients) and charts drawn here as SVG, so the console needs no CDN and no
script but its own small poller (ASSETS, served from the package). Nothing inline that the
console's CSP would refuse: no <script> bodies, no style attributes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import jinja2
from markupsafe import Markup, escape

__all__ = ["ASSETS", "chart", "participation_chart", "render", "timeline_chart"]

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}Micro-FL console{% endblock %}</title>
<link rel="stylesheet" href="/assets/console.css">
<script src="/assets/console.js" defer></script>
</head><body>
<header><a class="brand" href="/">Micro-FL console</a>
{% if signed_in %}<span class="who">admin of {{ 'every job' if scope == '*' else scope }}</span>
<form method="post" action="/signout"><button type="submit">Sign out</button></form>{% endif %}
</header>
<main>{% block main %}{% endblock %}</main>
</body></html>"""

_SIGNIN = """{% extends "base" %}{% block title %}Sign in · Micro-FL console{% endblock %}
{% block main %}<h1>Sign in</h1>
<p>Paste an admin token (<code>microfl token issue --admin</code>). It is checked once; the
console then keeps a session cookie until it expires.</p>
{% if problem %}<p class="problem" id="problem">{{ problem }}</p>{% endif %}
<form method="post" action="/signin" class="signin">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit" id="signin">Sign in</button></form>{% endblock %}"""

_JOBS = """{% extends "base" %}{% block main %}<h1>Jobs</h1>
<div data-live="/fragments/jobs">{% include "jobs_table" %}</div>{% endblock %}"""

_JOBS_TABLE = """{% if not jobs %}<p>No jobs yet (<code>microfl job create</code>).</p>
{% else %}<table class="jobs"><thead><tr><th>Job</th><th>State</th><th>Mode</th>
<th>Strategy</th><th>Version</th><th>Last commit</th></tr></thead><tbody>
{% for j in jobs %}<tr class="state-{{ j.state }}">
<td><a href="/jobs/{{ j.job }}">{{ j.job }}</a></td>
{% if 'problem' in j %}<td>unreadable</td><td colspan="4">{{ j.problem }}</td>{% else %}
<td>{{ j.state }}</td><td>{{ j.mode }}</td><td>{{ j.strategy }}</td>
<td>{{ j.version }} / {{ j.rounds }}</td><td>{{ j.last_commit | when }}</td>{% endif %}</tr>
{% endfor %}</tbody></table>{% endif %}"""

_LIVE = """<div class="live" data-version="{{ live.version }}" data-state="{{ live.state }}">
<p><strong>{{ live.state }}</strong>: model version {{ live.version }}
{%- if live.round %}; {{ 'buffer' if live.mode == 'async' else 'round' }} {{ live.round.round }}
has <span id="updates">{{ live.round.updates }}</span> of {{ live.round.needed }} updates
{%- if live.round.closing %} (sealing: {{ live.round.closing }}){% endif -%}
{%- if live.round.age is not none %}, opened {{ live.round.age | seconds }} ago{% endif -%}
{%- if live.round.deadline_in is not none %}, deadline
{{ 'in ' ~ (live.round.deadline_in | seconds) if live.round.deadline_in > 0 else 'passed' }}
{%- endif %}{% endif %}.</p>
{% if live.round and live.round.clients %}<p class="clients">Updates from:
{% for c in live.round.clients %}<span class="client">{{ c }}</span> {% endfor %}
{% if live.round.more_clients %}and {{ live.round.more_clients }} more{% endif %}</p>{% endif %}
</div>"""

_JOB = """{% extends "base" %}{% block title %}{{ job }} · Micro-FL console{% endblock %}
{% block main %}<p><a href="/">Jobs</a></p><h1>Job {{ job }}</h1>
<p class="spec">{{ spec.mode }} · {{ spec.strategy }}{% for k, v in spec.options.items() %}
{{ k }}={{ v }}{% endfor %} · {{ spec.rounds }} {{ 'versions' if is_async else 'rounds' }} ·
{% if is_async %}buffer {{ spec.buffer }}{% else %}quorum {{ spec.min_clients }}{% endif %} ·
deadline {{ spec.round_timeout | seconds }} · fan-in {{ spec.fan_in }} ·
created {{ spec.created_at | when }}</p>
<section id="live" data-live="/fragments/jobs/{{ job }}" data-version="{{ live.version }}">
{% include "live" %}</section>
<h2>Participation</h2>{{ participation }}
{% if charts %}<h2>Client-reported metrics</h2><div class="charts">
{% for c in charts %}{{ c }}{% endfor %}</div>{% endif %}
{% if privacy %}<h2>Privacy spent</h2>{{ privacy }}{% endif %}
<h2>Timeline</h2>{{ gantt }}
<table class="timeline"><thead><tr><th>{{ 'Version' if is_async else 'Round' }}</th><th>State</th>
<th>Opened</th><th>Sealed</th><th>Filling</th><th>Committing</th><th>Partials</th>
<th>Included</th><th>Excluded</th></tr></thead><tbody>
{% for t in timeline %}<tr id="round-{{ t.round }}"><td>{{ t.round }}</td><td>{{ t.state }}</td>
<td>{{ t.opened_at | when }}</td>
<td>{{ t.sealed_at | when }}{% if t.closing %} ({{ t.closing }}){% endif %}</td>
<td>{{ t.fill_seconds | seconds }}</td><td>{{ t.commit_seconds | seconds }}</td>
<td>{% for n in t.nodes %}<span class="node {{ 'built' if n.built else 'missing' }}"
title="level {{ n.level }} node {{ n.j }}{% if n.requested_at %}, requested
{{ n.requested_at | when }}{% endif %}">{{ n.level }}.{{ n.j }}</span>{% endfor %}</td>
<td>{{ t.included | length + t.more_included }}{% if t.examples is not none %}
({{ t.examples }} examples){% endif %}</td>
<td>{{ t.excluded | length + t.more_excluded }}</td></tr>
{% if t.excluded %}<tr class="excluded"><td></td><td colspan="8"><ul>
{% for e in t.excluded %}<li><span class="client">{{ e.client }}</span>: {{ e.reason }}</li>
{% endfor %}{% if t.more_excluded %}<li>and {{ t.more_excluded }} more</li>{% endif %}
</ul></td></tr>{% endif %}{% endfor %}</tbody></table>
<h2>Models</h2><ul class="models">{% for v in models %}<li><a
href="/jobs/{{ job }}/models/{{ v }}" download>version {{ v }}</a> (safetensors)</li>
{% endfor %}</ul>{% endblock %}"""

_ERROR = """{% extends "base" %}{% block main %}<h1>{{ status }}</h1>
<p class="problem">{{ message }}</p><p><a href="/">Jobs</a></p>{% endblock %}"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(
        {
            "base": _BASE,
            "signin": _SIGNIN,
            "jobs": _JOBS,
            "jobs_table": _JOBS_TABLE,
            "live": _LIVE,
            "job": _JOB,
            "error": _ERROR,
        }
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


_ENV.filters["when"] = _when
_ENV.filters["seconds"] = _seconds


def render(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


# --- charts ------------------------------------------------------------------------------------

_W, _H, _L, _B = 480, 180, 48, 24  # width, height, left and bottom margins


def _axes(title: str, y_low: float, y_high: float, x_label: str) -> list[str]:
    parts = [
        f'<text class="title" x="{_L}" y="14">{escape(title)}</text>',
        f'<line class="axis" x1="{_L}" y1="{_H - _B}" x2="{_W - 8}" y2="{_H - _B}"/>',
        f'<line class="axis" x1="{_L}" y1="22" x2="{_L}" y2="{_H - _B}"/>',
        f'<text class="tick" x="{_L - 4}" y="26" text-anchor="end">{_num(y_high)}</text>',
        f'<text class="tick" x="{_L - 4}" y="{_H - _B}" text-anchor="end">{_num(y_low)}</text>',
        f'<text class="tick" x="{_W - 8}" y="{_H - 6}" text-anchor="end">{escape(x_label)}</text>',
    ]
    return parts


def _num(v: float) -> str:
    return f"{v:.3g}"


def _svg(parts: Sequence[str], label: str) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


def _scale(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5
    return low, high


def chart(title: str, points: Sequence[tuple[int, float]], x_label: str = "round") -> Markup:
    """A line chart of (round, value): a metric's mean per round, or epsilon spent so far."""
    points = [(x, float(y)) for x, y in points if math.isfinite(float(y))]
    if not points:
        return Markup("")
    low, high = _scale([y for _, y in points])
    x0, x1 = points[0][0], max(points[-1][0], points[0][0] + 1)

    def xy(x: int, y: float) -> tuple[float, float]:
        px = _L + (x - x0) / (x1 - x0) * (_W - _L - 16)
        py = (_H - _B) - (y - low) / (high - low) * (_H - _B - 26)
        return round(px, 1), round(py, 1)

    coords = [xy(x, y) for x, y in points]
    path = " ".join(f"{px},{py}" for px, py in coords)
    parts = _axes(title, low, high, f"{x_label}s {x0}–{points[-1][0]}")
    parts.append(f'<polyline class="line" points="{path}"/>')
    for (x, y), (px, py) in zip(points, coords, strict=True):
        parts.append(
            f'<circle class="dot" cx="{px}" cy="{py}" r="2.5"><title>{escape(x_label)} {x}: '
            f"{escape(_num(y))}</title></circle>"
        )
    return _svg(parts, f"{title} per {x_label}")


def participation_chart(history: Sequence[dict[str, Any]], x_label: str = "round") -> Markup:
    """Stacked bars per round: updates included in the model, and excluded."""
    if not history:
        return Markup('<p class="empty">No committed round yet.</p>')
    top = max(h["included"] + h["excluded"] for h in history) or 1
    width = (_W - _L - 16) / len(history)
    parts = _axes(
        "updates per " + x_label, 0, top, f"{x_label}s {history[0]['round']}–{history[-1]['round']}"
    )
    scale = (_H - _B - 26) / top
    for i, h in enumerate(history):
        x = round(_L + i * width + 1, 1)
        w = round(max(1.0, width - 2), 1)
        inc, exc = h["included"] * scale, h["excluded"] * scale
        base = _H - _B
        tip = escape(f"{x_label} {h['round']}: {h['included']} included, {h['excluded']} excluded")
        parts.append(
            f'<g><title>{tip}</title><rect class="included" x="{x}" y="{round(base - inc, 1)}" '
            f'width="{w}" height="{round(inc, 1)}"/><rect class="excluded" x="{x}" '
            f'y="{round(base - inc - exc, 1)}" width="{w}" height="{round(exc, 1)}"/></g>'
        )
    return _svg(parts, f"updates included and excluded per {x_label}")


def timeline_chart(timeline: Sequence[dict[str, Any]], now: float) -> Markup:
    """One row per round, on one time axis: filling (opened to sealed), committing (sealed to
    committed), a tick where each partial of its tree was requested."""
    rows = [t for t in reversed(timeline) if t["opened_at"] is not None]
    if not rows:
        return Markup("")
    start = min(t["opened_at"] for t in rows)
    end = max(now if t["committed_at"] is None else t["committed_at"] for t in rows)
    span = max(end - start, 1e-3)
    row_h = 16
    height = 30 + row_h * len(rows)

    def x(ts: float) -> float:
        return round(_L + (ts - start) / span * (_W - _L - 16), 1)

    parts = [
        f'<text class="tick" x="{_L}" y="12">{escape(_when(start))}</text>',
        f'<text class="tick" x="{_W - 8}" y="12" text-anchor="end">+{escape(_seconds(span))}'
        "</text>",
    ]
    for i, t in enumerate(rows):
        y = 20 + i * row_h
        sealed = t["sealed_at"]
        done = t["committed_at"]
        parts.append(
            f'<text class="tick" x="{_L - 4}" y="{y + 11}" text-anchor="end">{t["round"]}</text>'
        )
        fill_end = sealed if sealed is not None else now
        parts.append(
            f'<rect class="filling" x="{x(t["opened_at"])}" y="{y}" height="12" '
            f'width="{max(1.0, x(fill_end) - x(t["opened_at"]))}"><title>round {t["round"]} '
            f"filling {escape(_seconds(fill_end - t['opened_at']))}</title></rect>"
        )
        if sealed is not None:
            commit_end = done if done is not None else now
            parts.append(
                f'<rect class="committing" x="{x(sealed)}" y="{y}" height="12" '
                f'width="{max(1.0, x(commit_end) - x(sealed))}"><title>round {t["round"]} '
                f"sealed to committed {escape(_seconds(commit_end - sealed))}</title></rect>"
            )
        for n in t["nodes"]:
            if n["requested_at"] is not None:
                px = x(n["requested_at"])
                parts.append(
                    f'<line class="request" x1="{px}" y1="{y}" x2="{px}" y2="{y + 12}">'
                    f"<title>partial {n['level']}.{n['j']} requested</title></line>"
                )
    body = "".join(parts)
    return Markup(
        f'<svg class="chart gantt" viewBox="0 0 {_W} {height}" role="img" '
        f'aria-label="round timeline" xmlns="http://www.w3.org/2000/svg">{body}</svg>'
    )


# --- assets, served as /assets/<name> ----------------------------------------------------------

_JS = """"use strict";
// Refreshes every [data-live] element from its fragment URL while the page is shown; reloads
// the page when a new model version was committed (the charts and the timeline change).
(function () {
  function poll(el) {
    if (document.visibilityState !== "visible") return;
    fetch(el.dataset.live, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/signin"); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.body.firstElementChild;
        var version = fresh && fresh.dataset ? fresh.dataset.version : undefined;
        if (el.dataset.version !== undefined && version !== undefined &&
            version !== el.dataset.version) { window.location.reload(); return; }
        el.replaceChildren.apply(el, Array.from(doc.body.childNodes));
      })
      .catch(function () {});
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      window.setInterval(function () { poll(el); }, 2000);
    });
  });
})();
"""

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f7f8fa}
header{display:flex;gap:1em;align-items:center;padding:.6em 1.2em;background:#1d2330;color:#fff}
header a.brand{color:#fff;font-weight:600;text-decoration:none}header .who{margin-left:auto}
header form{margin:0}main{padding:1em 1.6em;max-width:1100px}h1{font-size:1.5em}
table{border-collapse:collapse;background:#fff;margin:.5em 0}th,td{padding:.3em .6em;
border-bottom:1px solid #dde1e8;text-align:left;vertical-align:top}.problem{color:#a31515}
.client{font-family:ui-monospace,monospace;background:#eef1f6;padding:0 .3em}
.node{display:inline-block;font-size:11px;margin:1px;padding:0 3px;border-radius:3px}
.node.built{background:#2e7d32;color:#fff}.node.missing{background:#dde1e8}
.chart{width:480px;max-width:100%;background:#fff;margin:.3em .6em .3em 0}
.charts{display:flex;flex-wrap:wrap}.axis{stroke:#8a93a6}.tick{font-size:10px;fill:#5b6478}
.title{font-size:12px;font-weight:600;fill:#1d2330}.line{fill:none;stroke:#1565c0;stroke-width:2}
.dot{fill:#1565c0}.included{fill:#2e7d32}.excluded{fill:#c62828}.filling{fill:#90caf9}
.committing{fill:#2e7d32}.request{stroke:#e65100;stroke-width:1.5}
form.signin{display:flex;flex-direction:column;max-width:28em;gap:.5em}
input{font:inherit;padding:.4em}button{font:inherit;padding:.3em .9em}
tr.excluded td{border-bottom:1px solid #dde1e8;color:#5b6478}
"""

ASSETS = {
    "console.js": (_JS.encode(), "text/javascript; charset=utf-8"),
    "console.css": (_CSS.encode(), "text/css; charset=utf-8"),
}
