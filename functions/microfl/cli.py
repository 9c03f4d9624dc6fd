"""The `microfl` operator command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def cmd_setup(args: argparse.Namespace) -> int:
    from microfl.local.gcs import fake_gcs_binary
    from microfl.local.kafka import ensure_kafka_libs

    libs = ensure_kafka_libs()
    print(f"Kafka jars: {libs}\nGCS emulator: {fake_gcs_binary()}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from microfl.local.platform import LocalPlatform

    platform = LocalPlatform(kafka_nodes=args.kafka_nodes, gcs=args.gcs)
    t0 = time.monotonic()
    try:
        state = platform.start()
    except BaseException:
        platform.stop()
        raise
    print(f"Micro-FL local platform up in {time.monotonic() - t0:.1f}s")
    for p in state["processes"]:
        print(f"  {p['role']:<16} pid {p['pid']:<8} 127.0.0.1:{p['port']:<6} log {p['log']}")
    print(f"  Kafka bootstrap  {state['kafka_bootstrap']}\n  object store     {state['store']}")
    if args.detach:
        print("running in the background; stop it with `microfl down`")
        return 0
    print("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        platform.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from microfl.local.platform import stop_recorded

    stopped = stop_recorded()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import psutil

    from microfl.local.platform import read_state

    state = read_state() or {"processes": []}
    for p in state["processes"]:
        p["alive"] = psutil.pid_exists(p["pid"])
    if args.json:
        print(json.dumps(state, indent=2))
    elif not state["processes"]:
        print("the local platform is not running (start it with `microfl up`)")
    else:
        for p in state["processes"]:
            mark = "up" if p["alive"] else "DEAD"
            print(f"{p['role']:<16} {mark:<4} pid {p['pid']:<8} 127.0.0.1:{p['port']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from microfl.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="assemble the local Kafka from Maven Central (first run)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("up", help="start the local platform")
    p.add_argument("--detach", action="store_true", help="return once up; stop with `down`")
    p.add_argument("--kafka-nodes", type=int, choices=(1, 3), default=1,
                   help="1 combined node, or 3 nodes with RF 3 and min ISR 2")
    p.add_argument("--gcs", action="store_true", help="also start the GCS emulator")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local platform started with --detach")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="list the local platform's processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="run the demo end to end on the local platform")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"microfl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
