"""Helper of tests/test_flower.py, run with flwr on PYTHONPATH: `microfl flower-client` command
lines for load/flower_app.py's client_fn, one per client token, each run in a thread of this
process until the job is done; prints one JSON line: the flwr version and updates per client.

    python tests/flower_clients.py URL NUM_CLIENTS TOKEN...  (from the repository's root)"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version

import torch

from microfl.local.cli import build_parser
from microfl.local.flowercli import runner_from_args


def main(url: str, clients: int, tokens: list[str]) -> None:
    torch.set_num_threads(1)
    runners = [
        runner_from_args(
            build_parser().parse_args(
                [
                    "flower-client",
                    "--url",
                    url,
                    "--token",
                    tok,
                    "--app",
                    "flower_app:client_fn",
                    "--app-dir",
                    "load",
                    "--node-config",
                    f"partition-id={i} num-partitions={clients}",
                    "--config",
                    "local-epochs=5 lr=0.2 batch-size=16",
                    "--evaluate",
                ]
            )
        )
        for i, tok in enumerate(tokens)
    ]
    for r in runners:
        r.client.retries = 10
    with ThreadPoolExecutor(len(runners)) as threads:
        updates = [len(answers) for answers in threads.map(lambda r: r.run(), runners)]
    print(json.dumps({"flwr": version("flwr"), "updates": updates}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
