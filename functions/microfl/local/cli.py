"""The `microfl` operator command."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from microfl.errors import MicroFLError
from microfl.local.chaoscli import cmd_chaos
from microfl.local.jobargs import add_async_arguments, add_strategy_arguments, async_options
from microfl.local.jobargs import strategy_options as _strategy_options

__all__ = ["main"]


def cmd_setup(args: argparse.Namespace) -> int:
    from microfl.local.setupcmd import run_setup

    return run_setup()


def cmd_up(args: argparse.Namespace) -> int:
    from microfl.local.platform import LocalPlatform, detach, local_secret

    t0 = time.monotonic()
    if args.detach:
        argv = ["--kafka-nodes", str(args.kafka_nodes), "--bus", args.bus]
        argv += ["--gcs"] if args.gcs else []
        print("starting the local platform in the background ...", flush=True)
        _print_state(detach(argv), time.monotonic() - t0)
        print("stop it with `microfl down`; `microfl status` lists its processes")
        return 0
    platform = LocalPlatform(
        local_secret(), kafka_nodes=args.kafka_nodes, gcs=args.gcs, bus=args.bus
    )
    try:
        _print_state(platform.start(), time.monotonic() - t0)
        print("press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        platform.stop()
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _print_state(state: dict, seconds: float) -> None:
    print(f"Micro-FL local platform up in {seconds:.1f}s")
    for p in state["processes"]:
        port = f"127.0.0.1:{p['port']}" if p["port"] else "-"
        print(f"  {p['role']:<16} pid {p['pid']:<8} {port:<16} log {p['log']}")
    print(
        f"  ingest URL       {state['ingest_url']}\n  console          {state.get('console')}\n"
        f"  {_BUS_LABEL[state['bus']]:<16} {state['events_at']}\n"
        f"  object store     {state['store']}",
        flush=True,
    )


_BUS_LABEL = {"kafka": "Kafka bootstrap", "pubsub": "Pub/Sub emulator"}


def cmd_down(args: argparse.Namespace) -> int:
    from microfl.local.platform import stop_recorded

    stopped = stop_recorded()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import psutil

    from microfl.local.metricsview import job_lines, job_metrics
    from microfl.local.platform import read_state
    from microfl.local.statusview import add_progress, print_progress

    state = read_state() or {"processes": []}
    for p in state["processes"]:
        p["alive"] = psutil.pid_exists(p["pid"])
    if state["processes"]:  # each job's latest round and its client metrics
        state["jobs"] = job_metrics(_store())
        add_progress(_store(), state["jobs"])  # each running job's open round: updates, deadline
    if args.json:
        print(json.dumps(state, indent=2))
    elif not state["processes"]:
        print("the local platform is not running (start it with `microfl up`)")
    else:
        for p in state["processes"]:
            mark = "up" if p["alive"] else "DEAD"
            port = f"127.0.0.1:{p['port']}" if p["port"] else "-"
            print(f"{p['role']:<16} {mark:<4} pid {p['pid']:<8} {port}")
        print(f"ingest URL: {state['ingest_url']}")
        print("\n".join(["jobs:", *job_lines(state["jobs"])]) if state["jobs"] else "no jobs")
        print_progress(state["jobs"])
    return 0


def _store():  # type: ignore[no-untyped-def]
    import os

    from microfl.local.platform import read_state, state_dir
    from microfl.store import open_store

    url = os.environ.get("MICROFL_STORE") or (read_state() or {}).get("store")
    return open_store(url or f"file://{state_dir() / 'store'}")


def cmd_job_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_from_safetensors
    from microfl.tokens import valid_id

    if not valid_id(args.job):
        raise ValueError(f"job id {args.job!r}: use 1-64 letters, digits, '.', '_', '-'")
    model = Path(args.model).read_bytes()
    tensors, _ = tensors_from_safetensors(model)
    spec = JobSpec.for_model(
        args.job,
        tensors,
        rounds=args.rounds,
        min_clients=args.min_clients,
        round_timeout=args.round_timeout,
        strategy=args.strategy,
        strategy_options=_strategy_options(args.strategy_option),
        fan_in=args.fan_in,
        memory_budget=args.memory_budget << 20,
        max_examples=args.max_examples,
        created_at=time.time(),
        **async_options(args),
    )
    store = _store()
    created = create_job(store, spec, model)  # a retry with the same spec and model: False
    params = sum(t.nbytes for t in spec.schema) // 4
    print(
        f"{'created' if created else 'found'} job {args.job} in {store.url}: "
        f"{len(spec.schema)} tensors (~{params:,} float32 parameters), {spec.rounds} rounds, "
        f"quorum {spec.min_clients}, deadline {spec.round_timeout:g}s, {spec.strategy}"
        + (f", async with buffer {spec.buffer}" if spec.is_async else "")
        + ("" if created else " (made earlier with this model and options; nothing changed)")
    )
    return 0


def cmd_token_issue(args: argparse.Namespace) -> int:
    from microfl.local.platform import local_secret
    from microfl.tokens import check_secret, issue_token, max_ttl_from_env

    if args.admin == (args.client is not None):
        raise ValueError("give either --client ID or --admin")
    secret = check_secret(local_secret().encode(), "MICROFL_SECRET")
    max_ttl = max_ttl_from_env()
    print(
        issue_token(secret, args.job, args.client, admin=args.admin, ttl=args.ttl, max_ttl=max_ttl)
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Create-only, so a revocation stays; the client's tokens are refused from now on."""
    from microfl.jobs import revoke_client
    from microfl.tokens import valid_id

    if not (valid_id(args.job) and valid_id(args.client)):
        raise ValueError("--job and --client take ids: 1-64 letters, digits, '.', '_', '-'")
    created = revoke_client(_store(), args.job, args.client, time.time())
    state = "revoked" if created else "was already revoked"
    print(f"client {args.client} of job {args.job} {state}: ingest refuses its tokens (403)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from microfl.local.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "setup",
        help="choose Java and Go, fetch the local Kafka's jars and build the Pub/Sub emulator "
        "(first run)",
    )
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("up", help="start the local platform")
    p.add_argument("--detach", action="store_true", help="return once up; stop with `down`")
    p.add_argument(
        "--kafka-nodes",
        type=int,
        choices=(1, 3),
        default=1,
        help="1 combined node, or 3 nodes with RF 3 and min ISR 2",
    )
    p.add_argument("--gcs", action="store_true", help="also start the GCS emulator")
    p.add_argument(
        "--bus",
        choices=("kafka", "pubsub"),
        default="kafka",
        help="event transport: Kafka (default) or the Pub/Sub emulator",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local platform started with --detach")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="list the local platform's processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    job = sub.add_parser("job", help="manage FL jobs").add_subparsers(dest="job_cmd", required=True)
    p = job.add_parser("create", help="create a job from an initial model (safetensors)")
    p.add_argument("job")
    p.add_argument("--model", required=True, help="the initial model, a .safetensors file")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--min-clients", type=int, default=2, help="quorum that seals a round")
    p.add_argument(
        "--round-timeout",
        type=float,
        default=300.0,
        help="seconds after which a round seals with what it has",
    )
    add_strategy_arguments(p)
    add_async_arguments(p)
    p.add_argument(
        "--memory-budget",
        type=int,
        default=256,
        metavar="MIB",
        help="update values one instance holds for median, trimmed-mean and krum (sets the "
        "coordinate shard width)",
    )
    p.add_argument("--fan-in", type=int, default=10, help="updates per partial aggregation")
    from microfl.jobs import DEFAULT_MAX_EXAMPLES

    p.add_argument(
        "--max-examples",
        type=int,
        default=DEFAULT_MAX_EXAMPLES,
        help="most num_examples one update may claim (its FedAvg weight); above it: 422",
    )
    p.set_defaults(func=cmd_job_create)

    token = sub.add_parser("token", help="issue and revoke access tokens").add_subparsers(
        dest="token_cmd", required=True
    )
    p = token.add_parser("issue", help="print a signed token (MICROFL_SECRET signs it)")
    p.add_argument("--job", required=True, help="job id ('*' with --admin: every job)")
    p.add_argument("--client", help="client id the token names")
    p.add_argument("--admin", action="store_true")
    p.add_argument(
        "--ttl",
        type=int,
        default=86400,
        help="seconds until it expires (at most MICROFL_MAX_TOKEN_TTL, 30 days by default)",
    )
    p.set_defaults(func=cmd_token_issue)
    p = token.add_parser("revoke", help="refuse every token of a client of a job from now on")
    p.add_argument("--job", required=True)
    p.add_argument("--client", required=True)
    p.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser(
        "chaos", help="run a fault scenario on the 3-broker cluster and check the invariants"
    )
    from microfl.local.chaos import SCENARIOS

    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report", type=Path, help="write the Markdown report here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    add_strategy_arguments(p)
    p.add_argument("--mode", choices=("sync", "async"), default="sync", help="async: FedBuff")
    p.add_argument("--buffer", type=int, default=0, help="async: K (default clients - 2)")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser("demo", help="run a real federated training run on the local platform")
    from microfl.local.demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("robustness", help="strategies vs Byzantine clients on the demo")
    from microfl.local import robustness

    robustness.add_arguments(p)  # sets func

    p = sub.add_parser("stragglers", help="sync vs async rounds with slow clients on the demo")
    from microfl.local import stragglers

    stragglers.add_arguments(p)  # sets func

    p = sub.add_parser("flower-client", help="run a Flower NumPyClient in a job")
    from microfl.local import flowercli

    flowercli.add_arguments(p)  # sets func

    p = sub.add_parser("compression", help="updates as float32, fp16, bf16, int8 on the demo")
    from microfl.local import compression

    compression.add_arguments(p)  # sets func

    p = sub.add_parser("paper", help="the paper's evaluation: users x broker failures, report")
    from microfl.local import paper

    paper.add_arguments(p)  # sets func
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so every command stops the processes it started.
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("microfl: interrupted; what it started is stopped", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # the script comes with the core package, the rest does not
        print(
            f"microfl: {exc}: the command needs the `local` extra (pip install 'microfl[local]'; "
            "the demo also needs `client`)",
            file=sys.stderr,
        )
        return 1
    except (MicroFLError, RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"microfl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
