"""`microfl flower-client`: an existing Flower NumPyClient, named as module:object, trains in a
Micro-FL job (microfl.client.flower does the work; flwr is needed only by the app itself).

`--app module:object` names, in the app's module (found on sys.path, plus --app-dir):
- a NumPyClient instance (or the flwr Client its to_client() made), or
- a callable returning one: a class or factory taking no arguments, or a Flower `client_fn`
  taking a context, given one with `node_config` (--node-config) and `run_config` (--config),
  as Flower's quickstart client_fn reads `context.node_config["partition-id"]`.
A Flower `ClientApp` itself is not run: point --app at the client_fn it was made with."""

from __future__ import annotations

import argparse
import base64
import importlib
import inspect
import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microfl.client.flower import FlowerRunner

__all__ = [
    "AppContext",
    "add_arguments",
    "load_app",
    "parse_values",
    "runner_from_args",
    "token_job",
]


@dataclass
class AppContext:
    """What a Flower client_fn reads from its flwr.common.Context."""

    node_config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


def parse_values(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings (several may share one argument, space-separated, as Flower's
    --node-config takes them): values as JSON where they parse (5, 0.1, true, "x"), else text."""
    out: dict[str, Any] = {}
    for pair in (p for arg in pairs for p in arg.split()):
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def load_app(spec: str, context: AppContext) -> Any:
    """The NumPyClient that `module:object` names (see the module docstring)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--app must be module:object (e.g. flower_app:client_fn), got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if type(obj).__name__ == "ClientApp":  # called with a Message: not a client factory
        raise ValueError(
            f"{spec} is a Flower ClientApp: point --app at the client_fn it was made with"
        )
    made = isinstance(obj, type)  # a class is called, even though it has fit
    if not made and (callable(getattr(obj, "fit", None)) or hasattr(obj, "numpy_client")):
        return obj
    if not callable(obj):
        raise ValueError(f"{spec} is neither a NumPyClient nor a callable that returns one")
    required = [
        p
        for p in inspect.signature(obj).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return obj(context) if required else obj()


def token_job(token: str) -> str:
    """The job a token names, read without verifying it (the server verifies it): --job's
    default."""
    try:
        body = token.split(".")[-2]
        job = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["job"]
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise ValueError("cannot read the job from --token; pass --job JOB") from exc
    if not isinstance(job, str) or job == "*":
        raise ValueError("the token names no single job; pass --job JOB")
    return job


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", required=True, help="the ingest URL (microfl status --json: ingest_url)"
    )
    p.add_argument("--token", required=True, help="a client token of the job (microfl token issue)")
    p.add_argument("--app", required=True, metavar="MODULE:OBJECT", help="the Flower client")
    p.add_argument("--job", help="the job (default: the one the token names)")
    p.add_argument("--rounds", type=int, help="updates to send (default: until the job is done)")
    p.add_argument("--app-dir", default=".", help="a folder to import the app's module from")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="added to the config fit and evaluate receive, and the client_fn's run_config",
    )
    p.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the client_fn's context.node_config (e.g. partition-id=0 num-partitions=10)",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="also call evaluate on each global model; its loss and metrics go with the update "
        "as eval_loss, eval_<name>",
    )
    p.add_argument(
        "--tensor-order",
        metavar="NAME,NAME,...",
        help="the model's tensor names in the order of the client's parameter list (default: "
        "matched by shape to its get_parameters, else names sorted)",
    )
    p.set_defaults(func=run)


def runner_from_args(args: argparse.Namespace) -> FlowerRunner:
    """The FlowerRunner a `microfl flower-client` command line describes."""
    from microfl.client import Client
    from microfl.client.flower import FlowerRunner

    job = args.job or token_job(args.token)
    config = parse_values(args.config)
    if args.app_dir not in sys.path:
        sys.path.insert(0, args.app_dir)
    app = load_app(args.app, AppContext(parse_values(args.node_config), dict(config)))
    names = args.tensor_order.split(",") if args.tensor_order else None
    client = Client(args.url.rstrip("/"), job, args.token)
    return FlowerRunner(client, app, config, names, args.evaluate)


def run(args: argparse.Namespace) -> int:
    runner = runner_from_args(args)
    keys = ("version", "status", "round", "update", "num_examples", "metrics")
    sent = 0
    for answer in runner.run(args.rounds):
        sent += 1
        print(json.dumps({k: answer[k] for k in keys if k in answer}), flush=True)
    print(
        f"microfl flower-client: {sent} update(s) sent to job {runner.client.job}", file=sys.stderr
    )
    return 0
