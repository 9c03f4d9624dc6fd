"""The job options several `microfl` commands take (job create, demo, chaos): the strategy and
its options, and the asynchronous (FedBuff) mode."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_async_arguments", "add_strategy_arguments", "async_options", "strategy_options"]


def add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    from microfl.strategy import OPTIONS

    p.add_argument("--strategy", choices=tuple(OPTIONS), default="fedavg")
    p.add_argument(
        "--strategy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy option, repeatable: "
        + "; ".join(f"{n}: {', '.join(o) or '-'}" for n, o in OPTIONS.items()),
    )


def strategy_options(pairs: list[str]) -> dict[str, float]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--strategy-option {pair!r}: write KEY=NUMBER, e.g. beta=0.2")
    return options


def add_async_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=("sync", "async"),
        default="sync",
        help="async: FedBuff-style buffered versions instead of rounds (--rounds counts them)",
    )
    p.add_argument("--buffer", type=int, default=0, metavar="K", help="async: updates per version")
    p.add_argument(
        "--max-staleness",
        type=int,
        default=10,
        help="async: versions an update's base_version may lag the latest (staler: 409)",
    )
    p.add_argument(
        "--staleness-exponent",
        type=float,
        default=0.5,
        metavar="A",
        help="async: an update's weight is (1 + staleness) ** -A (0.5: 1/sqrt(1 + s))",
    )


def async_options(args: argparse.Namespace) -> dict[str, Any]:
    """JobSpec keywords from add_async_arguments' options (none for a sync job)."""
    if args.mode == "sync":
        return {"buffer": args.buffer} if args.buffer else {}
    return {
        "mode": "async",
        "buffer": args.buffer,
        "max_staleness": args.max_staleness,
        "staleness_exponent": args.staleness_exponent,
    }
