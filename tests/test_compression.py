"""Compressed updates (microfl.compress): F16/BF16 for F32 tensors and int8 blockwise deltas,
from the client's encoding through ingest's checks to the exact fold and the committed model."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microfl import exactsum, foldloops
from microfl.compress import (
    Q8,
    Q8_BLOCK,
    bf16_from_f32,
    bf16_to_f32,
    decode,
    dense,
    encode,
    scale_name,
)
from microfl.exactsum import ExactSum
from microfl.jobs import JobSpec, validate_update
from microfl.local.reference import fedavg, fedavg_mismatch, statistic
from microfl.privacy import clip_update
from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
from test_rounds_inprocess import Platform, apps, body  # noqa: F401  (fixture)

Tensors = dict[str, np.ndarray]


def model(seed: int = 0) -> Tensors:
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": rng.standard_normal((40, 30)).astype(np.float32),  # 1200: 5 blocks
        "fc.bias": rng.standard_normal(30).astype(np.float32),
        "steps": np.array([10, 20], np.int64),
    }


def trained(base: Tensors, seed: int) -> tuple[Tensors, int]:
    rng = np.random.default_rng(seed)
    out = {
        k: (v + rng.standard_normal(v.shape) * 0.05).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in base.items()
    }
    return out, int(rng.integers(1, 500))


def roundtrip(tensors: Tensors, n: int = 7) -> Tensors:
    return tensors_from_safetensors(tensors_to_safetensors(tensors, {"num_examples": str(n)}))[0]


@pytest.mark.parametrize("how", ["fp16", "bf16", "int8"])
def test_each_encoding_round_trips_within_its_precision(how: str) -> None:
    m0 = model()
    x, n = trained(m0, 1)
    sent = roundtrip(encode(x, how, m0))
    spec = JobSpec.for_model("j", m0)
    assert validate_update(spec, sent, {"num_examples": str(n)}) == n
    got = dense(sent, m0)
    assert got["steps"].dtype == np.int64 and np.array_equal(got["steps"], x["steps"])
    for k in ("fc.weight", "fc.bias"):
        err = np.abs(got[k] - x[k].astype(np.float64))
        if how == "fp16":
            assert np.array_equal(got[k], x[k].astype(np.float16).astype(np.float32))
        elif how == "bf16":
            assert got[k].dtype == np.float32 and np.all(err <= np.abs(x[k]) * 2.0**-8)
        else:
            q = decode(sent, m0)[k]
            assert isinstance(q, Q8) and q.scales.size == -(-x[k].size // Q8_BLOCK)
            per = np.repeat(q.scales.astype(np.float64), Q8_BLOCK)[: x[k].size].reshape(x[k].shape)
            assert np.all(err <= per / 2 * 1.0001 + 1e-12)  # half a step (and the f32 sum)
    body_bytes = {
        "fp16": 2,
        "bf16": 2,
        "int8": 1,
    }[how]
    assert sent["fc.weight"].dtype.itemsize == body_bytes


def test_bf16_is_the_top_half_of_a_float32_exactly() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = bf16_to_f32(bits)
    finite = np.isfinite(wide)
    assert np.array_equal(bf16_from_f32(wide)[finite], bits[finite])  # exact both ways
    x = np.array([1.0, 1.00390625, 1.01171875, -1.01171875], np.float32)  # ties: to even
    assert np.array_equal(bf16_to_f32(bf16_from_f32(x)), [1.0, 1.0, 1.015625, -1.015625])


@pytest.mark.parametrize("how", ["fp16", "bf16"])
def test_a_half_update_folds_to_the_bytes_of_its_float32_widening(how: str) -> None:
    m0 = model()
    ups = [trained(m0, s) for s in range(5)]
    half = [(roundtrip(encode(u, how)), n) for u, n in ups]
    a, b = ExactSum(m0), ExactSum(m0)
    a.fold_many([u for u, _ in half], [n for _, n in half])
    b.fold_many([dense(u, None) for u, _ in half], [n for _, n in half])
    assert all(np.array_equal(a.to_arrays()[k], b.to_arrays()[k]) for k in a.to_arrays())


def test_numba_and_numpy_folds_give_the_same_bytes_for_every_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m0 = model()
    ups = []
    for s in range(9):
        u, n = trained(m0, s)
        how = ("fp16", "bf16", "int8", None)[s % 4]
        ups.append((decode(roundtrip(encode(u, how, m0) if how else u), m0), n))
    big = {"w": np.random.default_rng(3).standard_normal(5000).astype(np.float32)}
    for s in range(3):  # int8 across the accumulator's 4096-element blocks
        u = {"w": big["w"] + np.float32(0.01) * s}
        ups.append((decode(roundtrip(encode(u, "int8", big)), big), 5 + s))

    def fold(base: Tensors, group: list) -> dict[str, np.ndarray]:
        acc = ExactSum(base)
        assert acc.fold_many([u for u, _ in group], [n for _, n in group]) == []
        return acc.to_arrays()

    compiled = fold(m0, ups[:9]), fold(big, ups[9:])
    assert foldloops.kernel("q8") is not None and foldloops.kernel("half") is not None
    monkeypatch.setattr(foldloops, "kernel", lambda kind="float": None)
    plain = fold(m0, ups[:9]), fold(big, ups[9:])
    for c, p in zip(compiled, plain, strict=True):
        assert all(np.array_equal(c[k], p[k]) for k in c)
    # and a dequantised copy folds to the same bytes as the codes (base + code * scale)
    again = fold(big, [({"w": u["w"].dense()}, n) for u, n in ups[9:]])
    assert all(np.array_equal(again[k], plain[1][k]) for k in again)


def test_an_int8_update_out_of_range_is_refused_and_rolled_back() -> None:
    m0 = {"w": np.ones(600, np.float32)}
    good = decode(roundtrip(encode({"w": m0["w"] * 1.1}, "int8", m0)), m0)
    acc, ref = ExactSum(m0), ExactSum(m0)
    huge = Q8(np.full(600, 127, np.int8), np.array([0.0, 1e30, 0.0], np.float32), m0["w"])
    refused = acc.fold_many([good, {"w": huge}], [3, 4])
    assert [k for k, _ in refused] == [1] and "value of" in str(refused[0][1])
    ref.fold(good, 3)
    assert all(np.array_equal(acc.to_arrays()[k], ref.to_arrays()[k]) for k in ref.to_arrays())


def test_clipping_an_int8_update_clips_its_dequantised_delta() -> None:
    m0 = model()
    u, _ = trained(m0, 4)
    q = decode(roundtrip(encode(u, "int8", m0)), m0)
    got, within = clip_update(q, m0, 0.1)
    want, within2 = clip_update(dense(roundtrip(encode(u, "int8", m0)), m0), m0, 0.1)
    assert within is within2 is False
    assert all(np.allclose(got[k], want[k], rtol=0, atol=1e-12) for k in want)


# --- through the functions --------------------------------------------------------------------


def test_a_round_of_mixed_encodings_commits_the_fedavg_of_what_was_sent(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=2, min_clients=8, fan_in=3)
    sent: list[tuple[Tensors, int]] = []
    for i in range(8):
        u, n = trained(m0, 10 + i)
        how = ("fp16", "bf16", "int8", None)[i % 4]
        enc = encode(u, how, m0) if how else u
        status, answer = p.post(1, f"c{i}", body(enc, n))
        assert status == 202, answer
        sent.append((dense(roundtrip(enc), m0), n))
    p.drain()
    record = p.record(1)
    assert record is not None and len(record["included"]) == 8 and record["excluded"] == []
    got = p.model(1)
    assert got["fc.weight"].dtype == np.float32
    assert fedavg_mismatch(got, fedavg(sent)) is None
    # round 2: int8 deltas are from model 1, the round's base
    m1 = p.model(1)
    sent2 = []
    for i in range(8):
        u, n = trained(m1, 30 + i)
        enc = encode(u, "int8", m1)
        assert p.post(2, f"c{i}", body(enc, n))[0] == 202
        sent2.append((dense(roundtrip(enc), m1), n))
    p.drain()
    assert fedavg_mismatch(p.model(2), fedavg(sent2)) is None


def test_median_over_f16_updates(tmp_path: Path, apps: dict[str, Any]) -> None:  # noqa: F811
    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=1, min_clients=5, fan_in=2, strategy="median")
    sent = []
    for i in range(5):
        u, n = trained(m0, 50 + i)
        enc = encode(u, "fp16" if i % 2 else "bf16")
        assert p.post(1, f"c{i}", body(enc, n))[0] == 202
        sent.append(dense(roundtrip(enc), None))
    u, n = trained(m0, 60)
    status, answer = p.post(1, "c9", body(encode(u, "int8", m0), n))
    assert status == 422 and "compress='fp16'" in answer["message"]
    p.drain()
    want = statistic("median", {}, sent, sorted(m0))
    got = p.model(1)
    for k in ("fc.weight", "fc.bias"):
        assert np.array_equal(got[k], want[k].astype(np.float32))


def _raw(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def _bad_rows(m0: Tensors) -> dict[str, tuple[bytes, int, str]]:
    u, n = trained(m0, 2)
    q = encode(u, "int8", m0)
    w, s = "fc.weight", scale_name("fc.weight")

    def with_(change: dict[str, np.ndarray]) -> bytes:
        return body({**q, **change}, n)

    nan_half = encode(u, "fp16")
    nan_half["fc.bias"] = nan_half["fc.bias"].copy()
    nan_half["fc.bias"][3] = np.nan
    inf_bf = encode(u, "bf16")
    inf_bf["fc.bias"] = inf_bf["fc.bias"].copy()
    inf_bf["fc.bias"][0] = 0x7F80  # +Inf
    scales = q[s]
    return {
        "scales missing": (body({k: v for k, v in q.items() if k != s}, n), 422, s),
        "too few scales": (with_({s: scales[:-1]}), 422, "shape (5,)"),
        "too many scales": (with_({s: np.append(scales, 1.0)}), 422, "shape (5,)"),
        "scales as F16": (with_({s: scales.astype(np.float16)}), 422, "F32"),
        "NaN scale": (with_({s: np.where(np.arange(5) == 2, np.nan, scales)}), 422, "NaN"),
        "Inf scale": (with_({s: np.where(np.arange(5) == 0, np.inf, scales)}), 422, "NaN"),
        "negative scale": (with_({s: -scales}), 422, ">= 0"),
        "codes as I16": (with_({w: q[w].astype(np.int16)}), 422, "only with the I8 codes"),
        "codes as U8": (with_({w: q[w].view(np.uint8)}), 422, "only with the I8 codes"),
        "I16 without scales": (body({**u, w: q[w].astype(np.int16)}, n), 422, "F16, BF16, or I8"),
        "scales without codes": (body({**u, s: scales}, n), 422, "come only with the I8 codes"),
        "int8 for an int64 tensor": (with_({"steps": np.array([1, 2], np.int8)}), 422, "I64"),
        "F16 for an int64 tensor": (with_({"steps": np.array([1, 2], np.float16)}), 422, "I64"),
        "NaN in F16": (body(nan_half, n), 422, "NaN or Inf"),
        "Inf in BF16": (body(inf_bf, n), 422, "NaN or Inf"),
        "BF16 data cut short": (
            _raw(
                {"fc.bias": {"dtype": "BF16", "shape": [30], "data_offsets": [0, 30]}}, b"\0" * 30
            ),
            400,
            "data_offsets",
        ),
    }


def test_every_bad_encoding_is_answered_with_what_to_fix(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=1, min_clients=2)
    for what, (data, status, says) in _bad_rows(m0).items():
        got, answer = p.post(1, "c1", data)
        assert got == status, (what, answer)
        assert says in answer["message"], (what, answer["message"])
    u, n = trained(m0, 2)
    assert p.post(1, "c1", body(encode(u, "int8", m0), n))[0] == 202  # the good one passes


def test_a_bf16_model_is_refused_at_job_creation(tmp_path: Path, apps: dict[str, Any]) -> None:  # noqa: F811
    p = Platform(tmp_path, apps)
    with pytest.raises(ValueError, match="BF16"):
        p.create({"w": bf16_from_f32(np.ones(4, np.float32))})


def test_bf16_interoperates_with_torch_and_the_safetensors_package() -> None:
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    x = torch.randn(3, 70) * 100
    ours, _ = tensors_from_safetensors(st_save({"w": x.to(torch.bfloat16)}))
    assert np.array_equal(bf16_to_f32(ours["w"]), x.to(torch.bfloat16).float().numpy())
    back = st_load(tensors_to_safetensors({"w": bf16_from_f32(x.numpy())}))["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, x.to(torch.bfloat16))


def test_an_async_job_takes_int8_deltas_from_each_update_s_base_version(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    from microfl.local.invariants import check_job
    from microfl.local.reference import TOLERANCE, fedavg_error, fedbuff
    from test_async import AsyncPlatform, abody

    p = AsyncPlatform(tmp_path, apps)
    m0 = model()
    p.create(m0, mode="async", buffer=2, rounds=2, max_staleness=1, fan_in=1)
    sent: dict[str, tuple[Tensors, int, int]] = {}

    def upload(client: str, base_v: int, how: str, seed: int) -> None:
        base = p.model(base_v)
        u, n = trained(base, seed)
        enc = encode(u, how, base)
        status, answer = p.upload(client, abody(enc, n, base_v))
        assert status == 202, answer
        sent[f"{client}@{base_v}"] = (dense(roundtrip(enc), base), n, base_v)

    upload("a", 0, "int8", 1)
    upload("b", 0, "fp16", 2)
    p.drain()
    upload("c", 0, "int8", 3)  # one version stale: its codes are still from model 0
    upload("a", 1, "int8", 4)
    p.drain()
    for v in (1, 2):
        record = p.get(f"/versions/{v}")
        assert record["excluded"] == [], record
        ups = [
            (sent[uid][0], sent[uid][1], p.model(sent[uid][2]), v - 1 - sent[uid][2])
            for uid in record["included"]
        ]
        exact = fedbuff(p.model(v - 1), ups, 0.5)
        assert fedavg_error(p.model(v), exact) <= TOLERANCE, v
    assert check_job(p.store, "job-1", {(0, "a"), (0, "b"), (0, "c"), (1, "a")}).ok


def test_the_client_sdk_encodes_against_the_model_it_trained_on() -> None:
    from types import SimpleNamespace

    from microfl.client import Client

    m0 = model()
    gets: list[dict] = []
    posted: list[bytes] = []

    class Recorded(Client):
        def _request(self, method: str, path: str, **kw: Any) -> Any:
            if method == "GET":
                gets.append(kw.get("params", {}))
                version = str(kw.get("params", {}).get("version", 4))
                return SimpleNamespace(
                    content=tensors_to_safetensors(m0), headers={"MicroFL-Model-Version": version}
                )
            posted.append(kw["data"])
            return SimpleNamespace(json=lambda: {"status": "accepted"})

    c = Recorded("http://x", "j", "t", compress="int8")
    base, version = c.model()
    u, n = trained(base, 3)
    c.post_update(version + 1, u, n)  # int8 from the model just fetched: no second fetch
    assert len(gets) == 1 and c.bytes_sent == len(posted[0])
    sent, meta = tensors_from_safetensors(posted[0])
    assert meta == {"num_examples": str(n)} and sent["fc.weight"].dtype == np.int8
    got = dense(sent, m0)["fc.weight"]  # half a quantisation step from what it trained
    step = float(np.max(sent[scale_name("fc.weight")]))
    assert np.max(np.abs(got - u["fc.weight"])) <= step / 2 * 1.0001
    c.post_async_update(u, n, 6)  # another base version: fetched
    assert gets[-1] == {"version": 6} and len(gets) == 2
    c.post_update(5, u, n, compress="fp16")
    assert tensors_from_safetensors(posted[-1])[0]["fc.bias"].dtype == np.float16
    assert c.bytes_sent == sum(map(len, posted))
    with pytest.raises(ValueError, match="compress must be one of"):
        c.post_update(5, u, n, compress="int4")


@pytest.mark.parametrize("how", ["fp16", "bf16"])
def test_every_finite_half_value_folds_as_its_float32_widening(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All 2**16 bit patterns (subnormals, signed zeros, the largest): numba's widening, numpy's
    table and float32's fold give the same bytes; a non-finite one is refused by both."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    half = bits.view(np.float16) if how == "fp16" else bits
    wide = dense({"w": half}, None)["w"]
    finite = np.isfinite(wide)
    big = 1e38 if how == "bf16" else 1.0
    base = {"w": np.full(int(finite.sum()), big, np.float32)}
    update = {"w": half[finite]}

    def fold(u: Tensors) -> dict[str, np.ndarray]:
        acc = ExactSum(base)
        acc.fold(u, 7)
        return acc.to_arrays()

    compiled, as_f32 = fold(update), fold({"w": wide[finite]})
    bad = {"w": half[: base["w"].size].copy()}
    bad["w"][5] = half[~finite][0]
    with pytest.raises(exactsum.ValueOutOfRange, match="NaN or Inf"):
        ExactSum(base).fold(bad, 1)
    monkeypatch.setattr(foldloops, "kernel", lambda kind="float": None)
    plain = fold(update)
    for k in compiled:
        assert np.array_equal(compiled[k], plain[k]) and np.array_equal(compiled[k], as_f32[k])
    with pytest.raises(exactsum.ValueOutOfRange, match="NaN or Inf"):
        ExactSum(base).fold(bad, 1)


def test_a_clipped_round_clips_each_int8_delta_before_the_sum(
    tmp_path: Path,
    apps: dict[str, Any],  # noqa: F811
) -> None:
    from microfl.local.reference import clipped

    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=1, min_clients=4, fan_in=2, strategy_options={"clip": 0.5})
    sent = []
    for i in range(4):
        u, n = trained(m0, 70 + i)
        enc = encode(u, ("int8", "fp16", "int8", "bf16")[i], m0)
        assert p.post(1, f"c{i}", body(enc, n))[0] == 202
        sent.append((clipped(dense(roundtrip(enc), m0), m0, 0.5)[0], n))
    p.drain()
    record = p.record(1)
    assert record is not None and len(record["included"]) == 4
    assert fedavg_mismatch(p.model(1), fedavg(sent)) is None
