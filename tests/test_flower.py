"""Flower clients in Micro-FL jobs: the tensor order, metrics and app loading on small arrays; a
duck-typed NumPyClient in sync and async jobs on a real local platform; and the released flwr
1.42.0 package's NumPyClient (load/flower_app.py, unchanged) training the demo's MLP on the digits
shards through `microfl flower-client`, side by side with the native torch client.

flwr clashes with the dev tools' pins, so it lives in a folder of its own (`make flwr-deps`:
.cache/flwr-deps, or MICROFL_FLWR_DEPS) that only the Flower clients' subprocess has on its
PYTHONPATH; a missing folder fails the test, it is not skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microfl.client import Client
from microfl.client.flower import FlowerRunner, finite_metrics, numpy_client, tensor_order
from microfl.local.cli import build_parser
from microfl.local.flowercli import AppContext, load_app, parse_values, token_job

REPO = Path(__file__).resolve().parents[1]
FLWR = "1.42.0"
MLP = {  # the demo's MLP: state_dict order 0.weight, 0.bias, 2.weight, 2.bias; sorted differs
    "0.weight": np.zeros((64, 64), np.float32),
    "0.bias": np.zeros(64, np.float32),
    "2.weight": np.zeros((10, 64), np.float32),
    "2.bias": np.zeros(10, np.float32),
}
STATE_DICT_ORDER = ["0.weight", "0.bias", "2.weight", "2.bias"]


# --- tensor order, metrics, loading ---------------------------------------------------------------


def test_order_follows_the_clients_get_parameters_by_shape() -> None:
    own = [MLP[n] for n in STATE_DICT_ORDER]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shapes all differ: no guess, no warning
        assert tensor_order(MLP, own) == STATE_DICT_ORDER
    assert tensor_order(MLP) == sorted(MLP)  # no get_parameters: the job's order
    assert tensor_order(MLP, [], names=STATE_DICT_ORDER) == STATE_DICT_ORDER


def test_equal_shapes_go_in_natural_name_order_with_a_warning() -> None:
    model = {f"layers.{i}.bias": np.zeros(8, np.float32) for i in (2, 10, 1)}
    model["head"] = np.zeros(3, np.float32)
    own = [np.zeros(8), np.zeros(3), np.zeros(8), np.zeros(8)]
    with pytest.warns(UserWarning, match="layers.1.bias, layers.2.bias, layers.10.bias"):
        order = tensor_order(model, own)
    assert order == ["layers.1.bias", "head", "layers.2.bias", "layers.10.bias"]


def test_mismatches_say_which_position_and_what_to_pass() -> None:
    with pytest.raises(ValueError, match="returns 3 arrays; the job's model has 4 tensors"):
        tensor_order(MLP, [MLP["0.weight"]] * 3)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(5,\); the job's model has no"):
        tensor_order(MLP, [MLP["0.weight"], np.zeros(5), MLP["2.weight"], MLP["2.bias"]])
    with pytest.raises(ValueError, match="no other tensor of that shape"):
        tensor_order(MLP, [MLP["0.weight"], MLP["0.weight"], MLP["2.weight"], MLP["2.bias"]])
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unknown \['x'\]"):
        tensor_order(MLP, None, names=["0.weight", "0.bias", "2.weight", "x"])
    with pytest.raises(ValueError, match=r"array 0 has shape \(64,\).*'0.bias'.*--tensor-order"):
        tensor_order(MLP, [MLP[n] for n in sorted(MLP)], names=STATE_DICT_ORDER)


def test_only_finite_numbers_are_sent_as_metrics() -> None:
    kept, dropped = finite_metrics(
        {
            "loss": 0.25,
            "n": 3,
            "acc": np.float32(0.5),
            "name": "x",
            "flag": True,
            "raw": b"x",
            "bad": float("nan"),
            "big": float("inf"),
        },
        "eval_",
    )
    assert kept == {"eval_loss": 0.25, "eval_n": 3, "eval_acc": 0.5}
    assert sorted(dropped) == ["eval_bad", "eval_big", "eval_flag", "eval_name", "eval_raw"]
    assert json.dumps(kept)  # plain JSON numbers


class Shift:
    """A duck-typed NumPyClient (no flwr): fit adds `by` to every array."""

    def __init__(self, by: float = 1.0, examples: int = 10, shapes: list[tuple] | None = None):
        self.by, self.examples, self.shapes = by, examples, shapes
        self.configs: list[dict[str, Any]] = []
        self.evaluated: list[float] = []

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return [np.zeros(s, np.float32) for s in self.shapes or []]

    def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
        self.configs.append(dict(config))
        out = [p.astype(np.float64) + self.by for p in parameters]  # cast back to float32
        return out, self.examples, {"train_loss": 0.5, "note": "text", "bad": float("nan")}

    def evaluate(self, parameters: list, config: dict) -> tuple[float, int, dict]:
        self.evaluated.append(float(parameters[0].flat[0]))
        return 1.5, 4, {"accuracy": 0.75}


def test_apps_load_as_instance_factory_or_client_fn(tmp_path: Path) -> None:
    (tmp_path / "someapp.py").write_text(
        "class C:\n"
        "    def __init__(self, part=0): self.part = part\n"
        "    def fit(self, p, c): return p, 1, {}\n"
        "class Wrapped:\n"
        "    def __init__(self, inner): self.numpy_client = inner\n"
        "instance = C(7)\n"
        "def factory(): return C(1)\n"
        "def client_fn(context): return Wrapped(C(context.node_config['partition-id']))\n"
        "class ClientApp:\n"
        "    def __call__(self, message, context): pass\n"
        "app = ClientApp()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        context = AppContext(parse_values(["partition-id=3 num-partitions=5"]))
        assert load_app("someapp:instance", context).part == 7
        assert load_app("someapp:factory", context).part == 1
        assert load_app("someapp:C", context).part == 0  # a class with defaults only: C()
        wrapped = load_app("someapp:client_fn", context)
        assert numpy_client(wrapped).part == 3  # to_client()'s wrapper is unwrapped
        with pytest.raises(ValueError, match="ClientApp: point --app at the client_fn"):
            load_app("someapp:app", context)
        with pytest.raises(ValueError, match="module:object"):
            load_app("someapp", context)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("someapp", None)
    with pytest.raises(TypeError, match="has no fit"):
        numpy_client(object())


def test_values_tokens_and_the_command_line() -> None:
    assert parse_values(["local-epochs=5 lr=0.2", "name=digits", "on=true"]) == {
        "local-epochs": 5,
        "lr": 0.2,
        "name": "digits",
        "on": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_values(["epochs"])
    from microfl.tokens import issue_token

    assert token_job(issue_token(bytes(range(32)), "job-7", "c1")) == "job-7"
    with pytest.raises(ValueError, match="pass --job"):
        token_job("nonsense")
    argv = ["flower-client", "--url", "http://x", "--token", "t", "--app", "m:o", "--rounds", "2"]
    args = build_parser().parse_args(
        [*argv, "--evaluate", "--config", "a=1", "--node-config", "p=0"]
    )
    assert (args.rounds, args.evaluate, args.config, args.node_config) == (
        2,
        True,
        ["a=1"],
        ["p=0"],
    )
    assert args.func.__module__ == "microfl.local.flowercli"


# --- on a local platform ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str]]:
    """One local platform (its own state folder and Kafka broker) for the module."""
    from microfl.local.platform import session

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROFL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        for name in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_STORE", "MICROFL_SECRET"):
            mp.delenv(name, raising=False)
        with session("kafka") as (state, secret, _):
            yield state, secret


def new_job(state: dict[str, Any], model: dict[str, np.ndarray], **options: Any) -> str:
    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_to_safetensors
    from microfl.store import open_store

    job = f"flower-{int(time.time() * 1e6)}"
    spec = JobSpec.for_model(job, model, created_at=time.time(), **options)
    create_job(open_store(state["store"]), spec, tensors_to_safetensors(model))
    return job


def token(secret: str, job: str, name: str | None) -> str:
    from microfl.tokens import issue_token

    return issue_token(secret.encode(), job, name, admin=name is None)


def stored_metadata(state: dict[str, Any], key: str) -> dict[str, str]:
    from microfl.serde import tensors_from_safetensors
    from microfl.store import open_store

    data = open_store(state["store"]).read(key)
    assert data is not None, key
    return tensors_from_safetensors(data)[1]


def test_runner_trains_sync_rounds_with_config_metrics_and_evaluation(
    platform: tuple[dict[str, Any], str],
) -> None:
    from microfl.rounds import update_key

    state, secret = platform
    job = new_job(state, MLP, rounds=2, min_clients=1, fan_in=2)
    app = Shift(shapes=[MLP[n].shape for n in STATE_DICT_ORDER])
    client = Client(state["ingest_url"], job, token(secret, job, "c0"), retries=3)
    runner = FlowerRunner(client, app, {"local_epochs": 3}, evaluate=True)
    answers = runner.run()
    assert [(a["round"], a["status"], a["version"]) for a in answers] == [
        (1, "accepted", 0),
        (2, "accepted", 1),
    ]
    assert answers[0]["metrics"] == {"train_loss": 0.5, "eval_loss": 1.5, "eval_accuracy": 0.75}
    assert sorted(answers[0]["dropped_metrics"]) == ["bad", "note"]
    assert [c["server_round"] for c in app.configs] == [1, 2]
    assert app.configs[0] == {
        "server_round": 1,
        "model_version": 0,
        "job": job,
        "mode": "sync",
        "rounds": 2,
        "local_epochs": 3,
    }
    assert app.evaluated == [0.0, 1.0]  # evaluate saw each global model before fit
    model, version = Client(state["ingest_url"], job, token(secret, job, None)).model()
    assert version == 2 and set(model) == set(MLP)
    for name, value in model.items():  # every tensor went back under its own name
        np.testing.assert_array_equal(value, np.full(MLP[name].shape, 2.0, np.float32))
    meta = stored_metadata(state, update_key(job, 1, "c0"))
    assert meta["num_examples"] == "10"
    assert json.loads(meta["metrics"]) == answers[0]["metrics"]
    assert runner.run() == []  # the job is done


def test_runner_trains_async_versions_and_refuses_a_wrong_shape(
    platform: tuple[dict[str, Any], str],
) -> None:
    from microfl.buffers import update_key

    state, secret = platform
    job = new_job(state, MLP, rounds=2, mode="async", buffer=1, fan_in=2)
    app = Shift(by=0.5, examples=3)  # no get_parameters list: names sorted = the job's order
    client = Client(state["ingest_url"], job, token(secret, job, "a0"), retries=3)
    answers = FlowerRunner(client, app, names=sorted(MLP)).run()
    assert [(a["version"], a["status"]) for a in answers] == [(0, "accepted"), (1, "accepted")]
    assert [(c["mode"], c["server_round"]) for c in app.configs] == [("async", 1), ("async", 2)]
    assert json.loads(stored_metadata(state, update_key(job, 0, "a0"))["metrics"]) == {
        "train_loss": 0.5
    }
    model, version = Client(state["ingest_url"], job, token(secret, job, None)).model()
    assert version == 2
    np.testing.assert_array_equal(model["0.weight"], np.full((64, 64), 1.0, np.float32))

    job = new_job(state, MLP, rounds=1, min_clients=1, fan_in=2)
    bad = Shift()
    bad.fit = lambda p, c: ([p[0], p[1][:5], p[2], p[3]], 1, {})  # type: ignore[method-assign]
    client = Client(state["ingest_url"], job, token(secret, job, "c1"), retries=3)
    with pytest.raises(ValueError, match=r"fit array 1 has shape \(5, 64\).*'0.weight'"):
        FlowerRunner(client, bad).step()
    assert client.round(1)["included"] == []  # nothing was posted


# --- the released flwr package, side by side with the native torch client ------------------------

CLIENTS, ROUNDS, EPOCHS, LR, BATCH, ALPHA, SEED = 20, 10, 5, 0.2, 16, 0.5, 0  # the demo's


@pytest.fixture(scope="module")
def flwr_deps() -> Path:
    folder = Path(os.environ.get("MICROFL_FLWR_DEPS", REPO / ".cache" / "flwr-deps"))
    assert (folder / f"flwr-{FLWR}.dist-info").is_dir(), (
        f"flwr {FLWR} is not in {folder}: run `make flwr-deps` (pip install --target; "
        "MICROFL_FLWR_DEPS names another folder)"
    )
    return folder


def test_flwr_numpyclient_reaches_the_native_torch_clients_accuracy(
    platform: tuple[dict[str, Any], str], flwr_deps: Path
) -> None:
    import torch

    from microfl.client.torch import TorchClient, evaluate, load_into_module, mlp
    from microfl.local.demo_data import digits_shards
    from microfl.rounds import update_key

    state, secret = platform
    url = state["ingest_url"]
    torch.manual_seed(SEED)
    start = {k: v.numpy().copy() for k, v in mlp().state_dict().items()}
    shards, (x_test, y_test), _ = digits_shards(CLIENTS, ALPHA, SEED)
    options = {"rounds": ROUNDS, "min_clients": CLIENTS, "fan_in": 5, "round_timeout": 600}

    def accuracy(job: str) -> list[float]:
        admin = Client(url, job, token(secret, job, None))
        net, out = mlp(), []
        for v in range(1, ROUNDS + 1):
            load_into_module(net, admin.model(v)[0])
            out.append(evaluate(net, x_test, y_test)[1])
        return out

    # Flower: load/flower_app.py's client_fn, unchanged, one `microfl flower-client` per client
    # (threads of one subprocess: 20 torch imports would swamp a small CI machine).
    flower = new_job(state, start, **options)
    tokens = [token(secret, flower, f"c{i:02d}") for i in range(CLIENTS)]
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "flower_clients.py"), url, str(CLIENTS), *tokens],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "functions"), str(flwr_deps)]),
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    flower_seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["flwr"] == FLWR
    assert report["updates"] == [ROUNDS] * CLIENTS  # every client in every round
    meta = json.loads(stored_metadata(state, update_key(flower, ROUNDS, "c00"))["metrics"])
    assert set(meta) == {"train_loss", "eval_loss", "eval_accuracy"}  # fit's + evaluate's

    # Native: TorchClient.run_round with the same shards, epochs, lr, batch size and seeds.
    native = new_job(state, start, **options)
    torch.set_num_threads(1)
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as threads:
        for r in range(1, ROUNDS + 1):

            def one(i: int, r: int = r) -> None:
                c = Client(url, native, token(secret, native, f"c{i:02d}"), retries=10)
                x, y = shards[i]
                TorchClient(c, mlp()).run_round(
                    x, y, EPOCHS, LR, seed=SEED * 1_000_003 + r * 1_009 + i, batch_size=BATCH
                )

            list(threads.map(one, range(CLIENTS)))
            Client(url, native, token(secret, native, None)).wait_for_version(r, timeout=300)
    native_seconds = time.monotonic() - t0

    ours, theirs = accuracy(native), accuracy(flower)
    print(
        f"\nflower (flwr {FLWR}) accuracy per round: {[round(a, 4) for a in theirs]} "
        f"({flower_seconds:.1f}s with the subprocess's start)\nnative torch client:      "
        f"{[round(a, 4) for a in ours]} ({native_seconds:.1f}s)"
    )
    for job in (native, flower):
        record = Client(url, job, token(secret, job, None)).round(ROUNDS)
        assert len(record["included"]) == CLIENTS and record["excluded"] == []
    assert theirs[-1] > 0.9
    assert abs(theirs[-1] - ours[-1]) <= 0.01, (theirs, ours)


def test_the_flower_client_command_runs_the_example_app(
    platform: tuple[dict[str, Any], str], flwr_deps: Path
) -> None:
    """`microfl flower-client` as a process: the job read from the token, --rounds, the output."""
    import torch

    from microfl.client.torch import mlp

    state, secret = platform
    torch.manual_seed(SEED)
    start = {k: v.numpy().copy() for k, v in mlp().state_dict().items()}
    job = new_job(state, start, rounds=3, min_clients=1, fan_in=2)
    command = [sys.executable, "-m", "microfl.local.cli", "flower-client", "--url"]
    command += [state["ingest_url"], "--token", token(secret, job, "solo"), "--rounds", "2"]
    command += ["--app", "flower_app:client_fn", "--app-dir", "load", "--evaluate"]
    command += ["--node-config", "partition-id=3 num-partitions=20", "--config", "local-epochs=1"]
    done = subprocess.run(
        command,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "functions"), str(flwr_deps)]),
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["round"], x["status"], x["version"]) for x in lines] == [
        (1, "accepted", 0),
        (2, "accepted", 1),
    ]
    assert set(lines[0]["metrics"]) == {"train_loss", "eval_loss", "eval_accuracy"}
    assert lines[1]["metrics"]["eval_accuracy"] > lines[0]["metrics"]["eval_accuracy"]
    assert f"2 update(s) sent to job {job}" in done.stderr
    assert (
        Client(state["ingest_url"], job, token(secret, job, None)).job_info()["model_version"] == 2
    )
