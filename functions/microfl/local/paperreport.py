"""The report of `microfl paper` (microfl.local.paper): results.json, a Markdown summary and the
plots the paper draws, healthy vs faulty with the fault windows shaded (accuracy and time per
iteration, CPU per component, broker throughput)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["failures", "pairs", "summary_markdown", "write_report"]

FUNCTIONS = ("ingest", "aggregate", "finalize")
PLOTS = ("accuracy.png", "time.png", "cpu.png", "throughput.png")


def pairs(results: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(healthy run, faulty run or None if it has not run yet) per size."""
    runs = results["runs"]
    healthy = [r for r in runs if not r["faulty"]]
    faulty = {r["users"]: r for r in runs if r["faulty"]}
    return [(h, faulty.get(h["users"])) for h in healthy]


def same_models(healthy: dict[str, Any], faulty: dict[str, Any] | None) -> bool | None:
    if faulty is None:
        return None
    return _hashes(healthy) == _hashes(faulty)


def _hashes(run: dict[str, Any]) -> list[str]:
    return [row["model_sha256"] for row in run["rows"]]


def failures(results: dict[str, Any]) -> list[str]:
    out = [
        f"{r['users']} users {'faulty' if r['faulty'] else 'healthy'}: "
        + ("; ".join(r["verdict"]["problems"]) or "not every iteration committed")
        for r in results["runs"]
        if not r["verdict"]["ok"]
    ]
    for healthy, faulty in pairs(results):
        if same_models(healthy, faulty) is False:
            out.append(f"{healthy['users']} users: the faulty run's models differ from healthy")
    return out


def write_report(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    _plots(out, results)


# --- the summary -----------------------------------------------------------------------------


def _totals(run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    cpu: dict[str, float] = {}
    peak: dict[str, float] = {}
    for row in rows:
        for comp, use in row["components"].items():
            key = "brokers" if comp.startswith("broker") else comp
            cpu[key] = cpu.get(key, 0.0) + use["cpu_s"]
            peak[key] = max(peak.get(key, 0.0), use["peak_rss_mib"])
    down = [row["seconds"] for row in rows if row["broker_down"]]
    up = [row["seconds"] for row in rows if not row["broker_down"]]
    return {
        "accuracy": rows[-1]["accuracy"] if rows else float("nan"),
        "time": sum(row["seconds"] for row in rows),
        "mean_up": sum(up) / len(up) if up else None,
        "mean_down": sum(down) / len(down) if down else None,
        "cpu": cpu,
        "peak": peak,
        "records": sum(row["kafka_records"] or 0 for row in rows),
        "log_kb": sum(sum(row["kafka_log_bytes"].values()) for row in rows) / 1e3,
    }


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_markdown(results: dict[str, Any]) -> str:
    cfg, machine = results["config"], results["machine"]
    windows = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in results["windows"])
    lines = [
        "# Micro-FL's paper evaluation, on the local platform",
        "",
        f"Written by `microfl paper --users {' '.join(map(str, cfg['users']))} --iterations "
        f"{cfg['iterations']} --down {cfg['down']}` on {machine['date']} ({machine['cpus']} "
        f"cores, Python {machine['python']}; load average at the start "
        f"{' '.join(map(str, machine['load_average']))}), {results.get('seconds', 0):g} s in all. "
        "3 Kafka brokers (KRaft, RF 3, min ISR 2), fake-gcs-server, the three functions; users "
        f"are torch clients over HTTP training the demo's MLP (64-64-10) on digits, Dirichlet "
        f"alpha {cfg['alpha']}, {cfg['epochs']} local epochs, FedAvg of every user each "
        "iteration. Faulty runs: one broker SIGKILLed as the first iteration of each window "
        f"(iterations {windows}) starts, restarted once the window's last one committed.",
        "",
        "| users | run | final accuracy | models = healthy | time (s) | s/iteration, brokers "
        "up | s/iteration, one down | CPU s ingest / aggregate / finalize / brokers / GCS "
        "emulator | peak RSS "
        "MiB ingest / aggregate / finalize / broker | Kafka records | broker log kB | "
        "invariants |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for healthy, faulty in pairs(results):
        same = same_models(healthy, faulty)
        for run in (healthy, faulty):
            if run is None:
                continue
            t = _totals(run)
            cpu = " / ".join(f"{t['cpu'].get(c, 0):.1f}" for c in (*FUNCTIONS, "brokers"))
            cpu += f" / {t['cpu']['store']:.1f}" if "store" in t["cpu"] else " / -"
            peak = " / ".join(f"{t['peak'].get(c, 0):.0f}" for c in (*FUNCTIONS, "brokers"))
            v = run["verdict"]
            verdict = "ok" if v["ok"] else "FAILED: " + "; ".join(v["problems"])[:200]
            equal = "-" if not run["faulty"] else {None: "-", True: "yes, every iteration",
                                                    False: "NO"}[same]  # fmt: skip
            lines.append(
                f"| {run['users']} | {'faulty' if run['faulty'] else 'healthy'} "
                f"| {t['accuracy']:.3f} | {equal} | {t['time']:.1f} | {_f(t['mean_up'])} "
                f"| {_f(t['mean_down'])} | {cpu} | {peak} | {t['records']} | {t['log_kb']:.0f} "
                f"| {verdict} (lost {v['lost']}, counted twice {v['double_counted']}) |"
            )
    lines += ["", "Broker faults:", ""]
    for run in results["runs"]:
        for f in run["faults"]:
            lines.append(
                f"- {run['users']} users: broker {f['broker']} killed as iteration {f['first']} "
                f"started, back after {f.get('down_s', '?')} s (iterations {f['first']}-"
                f"{f['last']} ran on two brokers)"
            )
    lines += [
        "",
        "CPU: user + system seconds of each component's process trees, sampled every 0.5 s "
        "(function instances: every functions-framework process; brokers: the three JVMs, "
        "summed; the GCS emulator, '-' where not measured). Peak RSS: the largest sum of a "
        "component's resident memory over the samples "
        "(for brokers the largest one JVM). Kafka records: records produced on the platform's "
        "topics (high watermarks); broker log kB: growth of the log segments on the three "
        "brokers' disks, replicas included. Invariants: the checker recomputes every model from "
        "storage; every update answered 2xx counted exactly once.",
        "",
        *(f"![{p[:-4]}]({p})" for p in PLOTS),
        "",
    ]
    return "\n".join(lines)


# --- the plots -------------------------------------------------------------------------------


def _plots(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = pairs(results)
    if not sizes:
        return
    for name, draw, ylabel in (
        ("accuracy.png", lambda run: [r["accuracy"] for r in run["rows"]], "test accuracy"),
        ("time.png", lambda run: [r["seconds"] for r in run["rows"]], "seconds per iteration"),
    ):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.6), dpi=110,
                                 squeeze=False)  # fmt: skip
        for ax, (healthy, faulty) in zip(axes[0], sizes, strict=True):
            _shade(ax, results["windows"] if faulty else [])
            for run, style in ((healthy, "-o"), (faulty, "--x")):
                if run is not None:
                    xs = [r["iteration"] for r in run["rows"]]
                    ax.plot(xs, draw(run), style, markersize=4,
                            label="faulty" if run["faulty"] else "healthy")  # fmt: skip
            ax.set_title(f"{healthy['users']} users")
            ax.set_xlabel("iteration")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
    _cpu_plot(plt, out, results)
    _throughput_plot(plt, out, results, sizes)


def _shade(ax: Any, windows: list[list[int]]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k, (first, last) in enumerate(windows):
        ax.axvspan(first - 0.5, last + 0.5, color="tab:red", alpha=0.12,
                   label="one broker down" if k == 0 else None)  # fmt: skip


def _cpu_plot(plt: Any, out: Path, results: dict[str, Any]) -> None:
    runs = results["runs"]
    names = [f"{r['users']}\n{'faulty' if r['faulty'] else 'healthy'}" for r in runs]
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 2, 3.6), dpi=110)
    bottom = [0.0] * len(runs)
    for comp in (*FUNCTIONS, "brokers"):
        values = [_totals(r)["cpu"].get(comp, 0.0) for r in runs]
        ax.bar(names, values, bottom=bottom, label=comp)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("CPU seconds (user + system)")
    ax.set_title("CPU per component, whole run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cpu.png")
    plt.close(fig)


def _throughput_plot(plt: Any, out: Path, results: dict[str, Any], sizes: list[Any]) -> None:
    """Bytes each broker wrote to its log segments per second of each iteration."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.6), dpi=110,
                             squeeze=False)  # fmt: skip
    for ax, (healthy, faulty) in zip(axes[0], sizes, strict=True):
        _shade(ax, results["windows"] if faulty else [])
        for run in (healthy, faulty):
            if run is None or not run["rows"]:
                continue
            xs = [r["iteration"] for r in run["rows"]]
            rates = {
                b: [r["kafka_log_bytes"][b] / 1e3 / max(r["seconds"], 1e-3) for r in run["rows"]]
                for b in sorted(run["rows"][0]["kafka_log_bytes"])
            }
            if not run["faulty"]:  # the three brokers write the same replicas: one line
                mean = [sum(v) / len(v) for v in zip(*rates.values(), strict=True)]
                ax.plot(xs, mean, ":", color="grey", label="healthy (mean of 3 brokers)")
                continue
            for broker, kbs in rates.items():
                ax.plot(xs, kbs, "-", marker=".", label=f"{broker}, faulty")
        ax.set_title(f"{healthy['users']} users: broker log writes")
        ax.set_xlabel("iteration")
        ax.set_ylabel("kB/s written")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "throughput.png")
    plt.close(fig)
