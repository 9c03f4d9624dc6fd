"""`microfl chaos`: run fault scenarios on the 3-broker cluster and the GCS emulator, print and
write the fault report (the scenarios themselves are in microfl.local.chaos)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from microfl.local.jobargs import strategy_options as _strategy_options

if TYPE_CHECKING:  # the chaos module needs the local extra; imported where it runs
    from microfl.local.chaos import ScenarioResult

__all__ = ["cmd_chaos"]


def cmd_chaos(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from microfl.local.chaos import ChaosEnv, run_scenario, scenario_names
    from microfl.local.progress import bar

    names = scenario_names(args.scenario, args.mode)
    work = Path(tempfile.mkdtemp(prefix="microfl-chaos-"))
    print(
        f"starting 3 Kafka nodes (RF 3, min ISR 2) and the GCS emulator in {work} ...", flush=True
    )
    env = ChaosEnv(work).start()
    results = []
    try:
        with bar("chaos", len(names), "scenarios") as progress:
            for name in names:
                progress.status(f"running {name}")
                results.append(
                    run_scenario(
                        env,
                        name,
                        seed=args.seed,
                        clients=args.clients,
                        rounds=args.rounds,
                        say=lambda m: print(m, flush=True),
                        strategy=args.strategy,
                        strategy_options=_strategy_options(args.strategy_option),
                        mode=args.mode,
                        buffer=args.buffer,
                    )
                )
                progress.advance(status=f"{name} {'ok' if results[-1].ok else 'FAILED'}")
    finally:
        env.stop()
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    healthy = results[0].model_sha256
    for res in results[1:] if args.mode == "sync" else ():  # async: who fetched what varies
        res.equals_healthy = res.model_sha256 == healthy
    table = _report_markdown(results)
    print("\n" + table)
    if args.report:
        import platform

        head = (
            f"# Fault scenarios\n\nWritten by `microfl chaos {args.scenario} --seed "
            f"{args.seed} --clients {args.clients} --rounds {args.rounds}"
            + "".join(f" {a}" for a in _strategy_args(args))
            + (f" --mode async --buffer {args.buffer}" if args.mode == "async" else "")
            + "` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}. Kafka: 3 nodes, RF 3, min ISR 2; storage: "
            "fake-gcs-server. Lost and double-counted must be 0; every model must equal the "
            "FedAvg of the updates its round record lists, recomputed offline from storage; "
            "'model = healthy run' compares the final model's bytes.\n\n"
        )
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(head + table)
        print(f"report: {args.report}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r.name for r in results if not r.ok or r.equals_healthy is False]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _strategy_args(args: argparse.Namespace) -> list[str]:
    if args.strategy == "fedavg" and not args.strategy_option:
        return []
    return ["--strategy", args.strategy] + [f"--strategy-option {o}" for o in args.strategy_option]


def _report_markdown(results: list[ScenarioResult]) -> str:
    """The fault report's table, the hostile-clients counts and what each scenario did."""
    lines = [
        "| scenario | rounds committed | updates accepted | lost | double-counted | models = "
        "offline FedAvg | model = healthy run | dead letters | recovery after each fault (s) "
        "| time (s) |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for res in results:
        same = {None: "n/a", True: "yes", False: "NO"}[res.equals_healthy]
        recovery = ", ".join(f"{s:g}" for s in res.recovery_seconds) or "-"
        lines.append(
            f"| {res.name} | {res.rounds_committed}/{res.rounds} | {res.accepted} | {res.lost} "
            f"| {res.double_counted} | {'yes' if not res.wrong_models else 'NO'} | {same} "
            f"| {res.dead_letters} | {recovery} | {res.seconds:g} |"
        )
    for res in results:
        if res.hostile is not None:
            h = res.hostile
            lines += [
                "",
                f"Hostile clients ({res.name}): {h['tried']} hostile uploads tried, "
                f"{h['as_contract']} answered with the contract's 4xx, {h['5xx']} answered 5xx "
                f"(or not at all), {h['stored']} stored, "
                f"{res.rounds - res.rounds_committed} rounds stalled; {h['replays']} replays of "
                f"accepted updates answered 200, {h['announcements']} update.accepted events "
                f"for {h['accepted']} accepted updates (at most one each; none for a replay).",
            ]
    lines.append("")
    for res in results:
        lines.append(
            f"- **{res.name}**: {'; '.join(res.faults) or 'no fault'}"
            + (f". PROBLEMS: {'; '.join(res.problems)}" if res.problems else "")
        )
    return "\n".join(lines) + "\n"
