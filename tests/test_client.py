"""The client side: torch state_dicts over safetensors, local training (FedProx, determinism),
and numpy-only and torch clients against the real local runtime (functions as processes, Kafka)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import pytest
import safetensors.numpy
import torch

from fl import SECRET, assert_fedavg, new_job
from microfl.client import Client
from microfl.client.torch import (
    StaleModel,
    TorchClient,
    evaluate,
    fit_local,
    load_into_module,
    mlp,
    tensors_from_module,
    train_local,
)
from microfl.local.runtime import LocalRuntime
from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def seeded_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return mlp()


def with_batchnorm(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


# --- state_dict <-> safetensors ------------------------------------------------------------------


def test_state_dict_round_trips_through_safetensors() -> None:
    source = with_batchnorm(0)
    with torch.no_grad():  # running statistics and num_batches_tracked move off their defaults
        for _ in range(3):
            source(torch.randn(32, 8))
    tensors = tensors_from_module(source)
    state = source.state_dict()
    assert list(tensors) == list(state)
    assert tensors["1.num_batches_tracked"].dtype == np.int64
    assert tensors["1.num_batches_tracked"].shape == () and tensors["1.num_batches_tracked"] == 3
    assert all(a.flags.c_contiguous for a in tensors.values())

    data = tensors_to_safetensors(tensors)
    decoded, _ = tensors_from_safetensors(data)
    target = with_batchnorm(1)
    load_into_module(target, decoded)
    for name, want in state.items():
        got = target.state_dict()[name]
        assert got.dtype == want.dtype and torch.equal(got, want), name

    by_the_library = safetensors.numpy.load(data)
    assert sorted(by_the_library) == sorted(tensors)
    for name, want in tensors.items():
        assert by_the_library[name].dtype == want.dtype
        np.testing.assert_array_equal(by_the_library[name], want)


def test_load_into_module_refuses_other_names_and_shapes() -> None:
    tensors = tensors_from_module(with_batchnorm(0))
    module = with_batchnorm(1)
    with pytest.raises(ValueError, match=r"missing \['1.running_var'\]"):
        load_into_module(module, {k: v for k, v in tensors.items() if k != "1.running_var"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        load_into_module(module, {**tensors, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"'0.bias' has shape \(15,\); the module expects \(16,\)"):
        load_into_module(module, {**tensors, "0.bias": np.zeros(15, np.float32)})


# --- local training ------------------------------------------------------------------------------


def test_fedprox_keeps_the_update_closer_to_the_global_model() -> None:
    x, y = digits()
    x, y = x[:256], y[:256]
    start = tensors_from_module(seeded_mlp(0))
    trained = {}
    for mu in (0.0, 1.0):
        module = seeded_mlp(99)
        load_into_module(module, start)
        train_local(module, x, y, epochs=5, lr=0.1, prox_mu=mu, seed=7)
        trained[mu] = tensors_from_module(module)
    assert distance(trained[0.0], trained[1.0]) > 0
    assert distance(trained[1.0], start) < distance(trained[0.0], start)


def test_training_is_deterministic_for_a_seed() -> None:
    x, y = digits()
    x, y = x[:200], y[:200]
    start = tensors_from_module(seeded_mlp(0))

    def run(seed: int) -> tuple[bytes, float]:
        module = seeded_mlp(123)
        load_into_module(module, start)
        loss = train_local(module, x, y, epochs=3, lr=0.1, batch_size=16, prox_mu=0.1, seed=seed)
        return tensors_to_safetensors(tensors_from_module(module)), loss

    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    first, again, other = run(3), run(3), run(4)
    assert first == again
    module = seeded_mlp(123)
    load_into_module(module, start)
    fitted = fit_local(module, x, y, epochs=3, lr=0.1, batch_size=16, prox_mu=0.1, seed=3)
    assert tensors_to_safetensors(tensors_from_module(module)) == first[0], "the same training"
    assert fitted["loss"] == first[1] and 0.2 < fitted["accuracy"] <= 1
    assert other[0] != first[0], "the seed decides the shuffling"
    module = seeded_mlp(0)
    torch.manual_seed(5)
    train_local(module, x, y, epochs=1, lr=0.1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG state is untouched"


# --- against the real runtime --------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(
    kafka: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalRuntime, FileStore]]:
    work = tmp_path_factory.mktemp("client")
    store = FileStore(work / "store")
    with LocalRuntime(
        store.url,
        kafka.bootstrap,  # type: ignore[attr-defined]
        SECRET,
        work,
        ping_interval=1.0,
    ) as rt:
        yield rt, store


def client(rt: LocalRuntime, job: str, name: str) -> Client:
    return Client(rt.ingest_url, job, issue_token(SECRET.encode(), job, name))


def test_numpy_clients_commit_the_fedavg_of_their_updates(
    platform: tuple[LocalRuntime, FileStore],
) -> None:
    rt, store = platform
    model = tensors_from_module(seeded_mlp(0))
    job = new_job(store, model, rounds=1, min_clients=4, fan_in=2)
    rng = np.random.default_rng(1)
    updates = {
        f"client-{i}": (
            {
                k: v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                for k, v in model.items()
            },
            int(rng.integers(1, 200)),
        )
        for i in range(4)
    }
    clients = {name: client(rt, job, name) for name in updates}

    first = "client-0"
    assert clients[first].post_update(1, *updates[first])["status"] == "accepted"
    assert clients[first].post_update(1, *updates[first])["status"] == "replay"
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(lambda c: clients[c].post_update(1, *updates[c]), sorted(updates)[1:])
        )
    assert [a["status"] for a in answers] == ["accepted"] * 3

    clients[first].wait_for_version(1, timeout=60)
    committed, version = clients[first].model()
    assert version == 1
    assert_fedavg(committed, updates)
    assert clients[first].round(1)["included"] == sorted(updates)


def test_torch_clients_train_two_rounds(platform: tuple[LocalRuntime, FileStore]) -> None:
    rt, store = platform
    x, y = digits()
    x_test, y_test = x[:300], y[:300]
    shards = [(x[s : s + 200], y[s : s + 200]) for s in (300, 500, 700)]
    job = new_job(store, tensors_from_module(seeded_mlp(0)), rounds=2, min_clients=3)
    clients = [TorchClient(client(rt, job, f"torch-{i}"), mlp()) for i in range(3)]

    for r in (1, 2):
        sent = []
        for i, (tc, (xs, ys)) in enumerate(zip(clients, shards, strict=True)):
            answer = tc.run_round(xs, ys, epochs=5, lr=0.1, prox_mu=0.01, seed=100 * r + i)
            assert (answer["round"], answer["status"]) == (r, "accepted")
            assert np.isfinite(answer["loss"]) and answer["metrics"]["loss"] == answer["loss"]
            assert 0 <= answer["metrics"]["accuracy"] <= 1
            sent.append(answer["metrics"])
        clients[0].client.wait_for_version(r, timeout=60)
        # the record averages what the clients reported (200 examples each)
        expected = {k: float(sum(Fraction(m[k]) * 200 for m in sent) / 600) for k in sent[0]}
        assert clients[0].client.round(r)["metrics"] == expected

    info = clients[0].client.job_info()
    assert (info["model_version"], info["state"]) == (2, "done")
    final, version = clients[0].client.model()
    assert version == 2
    module = mlp()
    load_into_module(module, final)
    loss, accuracy = evaluate(module, x_test, y_test)
    assert accuracy > 0.3 and np.isfinite(loss)
    with pytest.raises(StaleModel, match="open round is None"):
        clients[1].run_round(*shards[1], epochs=1, lr=0.1)
