"""Wire encodings: safetensors (ours against the safetensors package, and every way a hostile
header can be wrong) and the CloudEvents Kafka and HTTP bindings."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open

from microfl.errors import InvalidUpdate, PoisonEvent
from microfl.serde import (
    DTYPES,
    Event,
    KafkaRecord,
    PartialMeta,
    event_from_http,
    event_from_kafka,
    event_to_http,
    event_to_kafka,
    partial_from_safetensors,
    partial_to_safetensors,
    tensors_from_safetensors,
    tensors_to_safetensors,
)

SHAPES = [(0,), (3, 0), (5,), (2, 3), (2, 1, 4)]  # 0-d tensors have their own tests below


# The safetensors package's numpy API has no BF16 (numpy has no bfloat16; its uint16 is U16):
# BF16 interoperability is tested with its torch API in tests/test_compression.py.
NUMPY_CODES = sorted(c for c in DTYPES if c != "BF16")


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that exercise the dtype: negatives, extremes, fractions."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[code]
    size = int(np.prod(shape))
    if dtype.kind == "b":
        values = rng.integers(0, 2, size).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True)
    else:
        values = (rng.standard_normal(size) * 1000).astype(dtype)
    return values.reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN-safe)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raw_file(header: object, data: bytes = b"", pad: bool = True) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(code: str, shape: tuple[int, ...]) -> None:
    arr = sample(code, shape)
    data = tensors_to_safetensors({"t": arr, "u": sample(code, shape, 1)}, {"num_examples": "7"})
    tensors, metadata = tensors_from_safetensors(data)
    assert metadata == {"num_examples": "7"}
    assert sorted(tensors) == ["t", "u"]
    assert same(tensors["t"], arr)
    assert same(tensors["u"], sample(code, shape, 1))
    assert tensors["t"].dtype == DTYPES[code]


def test_zero_dim_tensors_round_trip_with_shape_kept() -> None:
    """A scalar (shape ()) must come back as a scalar, in every dtype."""
    model = {code: sample(code, ()) for code in DTYPES}
    data = tensors_to_safetensors(model)
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert {code: header[code]["shape"] for code in DTYPES} == {code: [] for code in DTYPES}
    tensors, _ = tensors_from_safetensors(data)
    for code, arr in model.items():
        assert same(tensors[code], arr), code


def test_zero_dim_tensors_interoperate_with_the_safetensors_package() -> None:
    model = {code: sample(code, ()) for code in NUMPY_CODES}
    tensors, _ = tensors_from_safetensors(st_numpy.save(model))
    for code, arr in model.items():
        assert same(tensors[code], arr), code
    loaded = st_numpy.load(tensors_to_safetensors(model))
    for code, arr in model.items():
        assert same(np.asarray(loaded[code]), arr), code


def test_mixed_dtypes_in_one_file_round_trip() -> None:
    model = {f"{code}.{i}": sample(code, shape, i)
             for i, (code, shape) in enumerate(zip(sorted(DTYPES), SHAPES * 2, strict=False))}
    tensors, metadata = tensors_from_safetensors(tensors_to_safetensors(model))
    assert metadata == {}
    assert sorted(tensors) == sorted(model)
    for name, arr in model.items():
        assert same(tensors[name], arr), name


def test_big_endian_and_non_contiguous_inputs_encode_as_little_endian() -> None:
    base = np.arange(12, dtype="<f4").reshape(3, 4)
    swapped = base.astype(">f4")
    strided = np.asfortranarray(base)
    expected = tensors_to_safetensors({"w": base})
    assert tensors_to_safetensors({"w": swapped}) == expected
    assert tensors_to_safetensors({"w": strided}) == expected
    assert tensors_to_safetensors({"w": base.T.copy().T}) == expected


def test_header_is_padded_and_parsed_arrays_are_read_only_views() -> None:
    data = tensors_to_safetensors({"a": np.ones(3, np.float32)}, {"k": "v"})
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    assert len(data) == 8 + n + 12
    tensors, _ = tensors_from_safetensors(data)
    assert not tensors["a"].flags.writeable
    with pytest.raises(ValueError):
        tensors["a"][0] = 2.0


@pytest.mark.parametrize("code", NUMPY_CODES)
def test_our_bytes_load_with_the_safetensors_package(code: str, tmp_path: Path) -> None:
    model = {f"s{i}": sample(code, shape, i) for i, shape in enumerate(SHAPES)}
    data = tensors_to_safetensors(model, {"num_examples": "12", "note": "ü"})
    loaded = st_numpy.load(data)
    assert sorted(loaded) == sorted(model)
    for name, arr in model.items():
        assert same(np.asarray(loaded[name]), arr), name
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"num_examples": "12", "note": "ü"}


@pytest.mark.parametrize("code", NUMPY_CODES)
def test_package_bytes_load_with_ours(code: str) -> None:
    model = {f"s{i}": sample(code, shape, i) for i, shape in enumerate(SHAPES)}
    data = st_numpy.save(model, metadata={"num_examples": "3", "format": "np"})
    tensors, metadata = tensors_from_safetensors(data)
    assert metadata == {"num_examples": "3", "format": "np"}
    assert sorted(tensors) == sorted(model)
    for name, arr in model.items():
        assert same(tensors[name], arr), name


def test_package_bytes_without_metadata_load_with_ours() -> None:
    model = {"w": sample("F32", (4, 4)), "b": sample("I64", (4,))}
    tensors, metadata = tensors_from_safetensors(st_numpy.save(model))
    assert metadata == {}
    assert same(tensors["w"], model["w"]) and same(tensors["b"], model["b"])


def test_encoding_is_deterministic_whatever_the_insertion_order() -> None:
    items = [(f"layer{i}.w", sample("F32", (i + 1, 2), i)) for i in range(6)]
    meta = [("num_examples", "5"), ("a", "1"), ("z", "2")]
    forward = tensors_to_safetensors(dict(items), dict(meta))
    backward = tensors_to_safetensors(dict(reversed(items)), dict(reversed(meta)))
    assert forward == backward
    assert tensors_to_safetensors(dict(items), dict(meta)) == forward
    assert forward != tensors_to_safetensors(dict(items), {"num_examples": "6"})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
    st.sampled_from(sorted(DTYPES)).flatmap(
        lambda code: hnp.arrays(DTYPES[code], hnp.array_shapes(min_dims=1, max_dims=3,
                                                               min_side=0, max_side=4))),
    max_size=5),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_round_trip_property(model: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    data = tensors_to_safetensors(model, meta)
    tensors, metadata = tensors_from_safetensors(data)
    assert metadata == meta
    assert sorted(tensors) == sorted(model)
    for name, arr in model.items():
        assert same(tensors[name], arr.astype(arr.dtype.newbyteorder("<")))
    assert tensors_to_safetensors(tensors, metadata) == data


# --- malformed input: InvalidUpdate, never another exception ------------------------------------

F32_4 = entry("F32", [4], [0, 16])
GOOD_DATA = b"\0" * 16

MALFORMED = {
    "empty body": b"",
    "short body": b"\x10\0\0\0",
    "seven bytes": b"\0" * 7,
    "header length larger than body": struct.pack("<Q", 100) + b"{}",
    "huge declared header length": struct.pack("<Q", 2**63) + b"{}      ",
    "max declared header length": b"\xff" * 8 + b"{}      ",
    "non-JSON header": raw_file(b"{not json"),
    "non-UTF-8 header": raw_file(b'{"\xff\xfe":1}'),
    "JSON list header": raw_file([1, 2]),
    "JSON string header": raw_file("hello"),
    "JSON null header": raw_file(b"null"),
    "tensor entry not an object": raw_file({"a": [1, 2]}),
    "unknown dtype": raw_file({"a": entry("F128", [4], [0, 16])}, GOOD_DATA),
    "lowercase dtype": raw_file({"a": entry("f32", [4], [0, 16])}, GOOD_DATA),
    "BF16 sized as F32": raw_file({"a": entry("BF16", [4], [0, 16])}, GOOD_DATA),
    "missing dtype": raw_file({"a": {"shape": [4], "data_offsets": [0, 16]}}, GOOD_DATA),
    "negative shape": raw_file({"a": entry("F32", [-4], [0, 16])}, GOOD_DATA),
    "float shape": raw_file({"a": entry("F32", [4.0], [0, 16])}, GOOD_DATA),
    "bool shape": raw_file({"a": entry("F32", [True, 4], [0, 16])}, GOOD_DATA),
    "shape not a list": raw_file({"a": entry("F32", 4, [0, 16])}, GOOD_DATA),  # type: ignore[arg-type]
    "missing shape": raw_file({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, GOOD_DATA),
    "shape product overflows": raw_file({"a": entry("F32", [2**62, 2**62], [0, 16])}, GOOD_DATA),
    "offsets past the end": raw_file({"a": entry("F32", [4], [16, 32])}, GOOD_DATA),
    "negative offsets": raw_file({"a": entry("F32", [4], [-16, 0])}, GOOD_DATA),
    "reversed offsets": raw_file({"a": entry("F32", [4], [16, 0])}, GOOD_DATA),
    "offsets size mismatch": raw_file({"a": entry("F32", [4], [0, 12])}, GOOD_DATA),
    "float offsets": raw_file({"a": entry("F32", [4], [0.0, 16.0])}, GOOD_DATA),
    "three offsets": raw_file({"a": entry("F32", [4], [0, 16, 16])}, GOOD_DATA),
    "missing offsets": raw_file({"a": {"dtype": "F32", "shape": [4]}}, GOOD_DATA),
    "huge offsets": raw_file({"a": entry("F32", [4], [2**70, 2**70 + 16])}, GOOD_DATA),
    "overlapping offsets": raw_file({"a": entry("F32", [4], [0, 16]),
                                     "b": entry("F32", [2], [8, 16])}, GOOD_DATA),
    "identical offsets": raw_file({"a": F32_4, "b": F32_4}, GOOD_DATA),
    "gap between tensors": raw_file({"a": entry("F32", [2], [0, 8]),
                                     "b": entry("F32", [1], [12, 16])}, GOOD_DATA),
    "gap before the first tensor": raw_file({"a": entry("F32", [3], [4, 16])}, GOOD_DATA),
    "trailing bytes": raw_file({"a": F32_4}, GOOD_DATA + b"\0\0\0\0"),
    "data without tensors": raw_file({}, b"\0"),
    "metadata with an int value": raw_file({"__metadata__": {"num_examples": 5}}),
    "metadata with a null value": raw_file({"__metadata__": {"num_examples": None}}),
    "metadata with a list value": raw_file({"__metadata__": {"a": ["1"]}}),
    "metadata with a nested object": raw_file({"__metadata__": {"a": {"b": "c"}}}),
    "metadata a non-empty list": raw_file({"__metadata__": ["a"]}),
    "metadata a string": raw_file({"__metadata__": "num_examples=5"}),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_input_raises_invalid_update(data: bytes) -> None:
    with pytest.raises(InvalidUpdate) as info:
        tensors_from_safetensors(data)
    assert str(info.value)  # a message that says what is wrong


def test_the_malformed_cases_differ_from_a_valid_file_only_in_the_flaw() -> None:
    """Guard for the table above: the same layout without the flaw parses."""
    tensors, metadata = tensors_from_safetensors(
        raw_file({"__metadata__": {"num_examples": "5"}, "a": F32_4}, GOOD_DATA))
    assert metadata == {"num_examples": "5"}
    assert same(tensors["a"], np.zeros(4, np.float32))
    tensors, _ = tensors_from_safetensors(raw_file({"a": entry("F32", [2], [0, 8]),
                                                    "b": entry("F32", [2], [8, 16])}, GOOD_DATA))
    assert same(tensors["b"], np.zeros(2, np.float32))
    tensors, _ = tensors_from_safetensors(raw_file({"a": F32_4}, GOOD_DATA, pad=False))
    assert tensors["a"].shape == (4,)


# Headers that the json module rejects with something other than JSONDecodeError, and a dtype
# that is not hashable: these escape as ValueError/RecursionError/TypeError (a 500 at ingest).
ESCAPING = {
    "dtype is a list": raw_file({"a": entry(["F32"], [4], [0, 16])}, GOOD_DATA),  # type: ignore[arg-type]
    "dtype is an object": raw_file({"a": entry({"F32": 1}, [4], [0, 16])}, GOOD_DATA),  # type: ignore[arg-type]
    "integer with 5000 digits": raw_file(b'{"a":' + b"1" * 5000 + b"}"),
    "deeply nested header": raw_file(b"[" * 100_000 + b"]" * 100_000),
    "deeply nested tensor entry": raw_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
}


@pytest.mark.parametrize("data", list(ESCAPING.values()), ids=list(ESCAPING))
def test_hostile_headers_raise_invalid_update_not_another_error(data: bytes) -> None:
    with pytest.raises(InvalidUpdate):
        tensors_from_safetensors(data)


@pytest.mark.parametrize("meta", [b"[]", b"0", b'""', b"false"])
def test_falsy_non_object_metadata_is_invalid(meta: bytes) -> None:
    """The safetensors package rejects these ("expected a map"); so should we."""
    with pytest.raises(InvalidUpdate):
        tensors_from_safetensors(raw_file(b'{"__metadata__":' + meta + b"}"))


def _parses_or_invalid(data: bytes) -> None:
    try:
        tensors, metadata = tensors_from_safetensors(data)
    except InvalidUpdate:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for arr in tensors.values():
        assert isinstance(arr, np.ndarray)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_invalid_update(data: bytes) -> None:
    _parses_or_invalid(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_header_after_a_valid_length_parses_or_raises_invalid_update(head: bytes) -> None:
    _parses_or_invalid(struct.pack("<Q", len(head)) + head + b"\0" * 16)


VALID = tensors_to_safetensors({"w": sample("F32", (3, 2)), "b": sample("I16", (3,)),
                                "z": sample("F64", ()), "e": sample("U8", (0, 2))},
                               {"num_examples": "9"})

mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID)), st.just(0)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutations_of_a_valid_file_parse_or_raise_invalid_update(ops: list[tuple]) -> None:
    data = bytearray(VALID)
    for op, at, arg in ops:
        at = min(at, len(data))
        if op == "set" and at < len(data):
            data[at] = arg
        elif op == "insert":
            data[at:at] = arg
        elif op == "delete":
            del data[at:at + arg]
        elif op == "truncate":
            del data[at:]
    _parses_or_invalid(bytes(data))


def test_valid_file_used_for_mutations_parses() -> None:
    tensors, metadata = tensors_from_safetensors(VALID)
    assert metadata == {"num_examples": "9"} and sorted(tensors) == ["b", "e", "w", "z"]


# --- CloudEvents -------------------------------------------------------------------------------

EVENTS = [
    Event("io.microfl.update.accepted.v1", "/microfl/jobs/j", "j/1/update/c",
          {"job": "j", "round": 1, "client": "c"}, "rounds/1/updates/c"),
    Event("io.microfl.partial.ready.v1", "/microfl/jobs/j", "j/2/partial-ready/3",
          {"job": "j", "round": 2, "chunk": 3, "nested": {"a": [1, 2.5, None, "ü"]}}),
    Event("dev.knative.sources.ping", "/apis/v1/namespaces/default/pingsources/p", "ping-1"),
    Event("io.microfl.x.v1", "/s", "id-1", {"k": "v"}, None, {"key": "j", "traceparent": "00-ab"}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_kafka_binding_round_trip(event: Event) -> None:
    record = event_to_kafka(event, key="j")
    assert record.key == b"j"
    assert dict(record.headers)["ce_type"] == event.type.encode()
    assert dict(record.headers)["ce_specversion"] == b"1.0"
    assert json.loads(record.value) == event.data
    assert event_from_kafka(record) == event
    assert event_to_kafka(event).key is None
    assert event_from_kafka(event_to_kafka(event)) == event


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_http_binary_binding_round_trip(event: Event) -> None:
    headers, body = event_to_http(event)
    assert headers["ce-id"] == event.id and headers["content-type"] == "application/json"
    assert json.loads(body) == event.data
    assert event_from_http(headers, body) == event
    # header names are case-insensitive on the wire
    assert event_from_http({k.title(): v for k, v in headers.items()}, body) == event


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_http_structured_binding(event: Event) -> None:
    doc = {**event.attributes(), "data": event.data, "datacontenttype": "application/json",
           "time": "2026-01-01T00:00:00Z"}
    got = event_from_http({"Content-Type": "application/cloudevents+json; charset=utf-8"},
                          json.dumps(doc).encode())
    assert got == event


def test_http_structured_binding_with_data_base64() -> None:
    data = {"job": "j", "round": 4}
    doc = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1",
           "data_base64": base64.b64encode(json.dumps(data).encode()).decode()}
    got = event_from_http({"content-type": "application/cloudevents+json"},
                          json.dumps(doc).encode())
    assert got == Event("t", "/s", "1", data)


def test_empty_body_is_empty_data_and_non_object_data_is_wrapped() -> None:
    headers = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "ce-id": "1"}
    assert event_from_http(headers, b"").data == {}
    assert event_from_http(headers, b"[1, 2]").data == {"value": [1, 2]}
    assert event_from_http(headers, b'"tick"').data == {"value": "tick"}


FULL = {"specversion": "1.0", "type": "t", "source": "/s", "id": "1"}


@pytest.mark.parametrize("missing", sorted(FULL))
def test_missing_attribute_is_a_poison_event_in_every_binding(missing: str) -> None:
    attrs = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(PoisonEvent, match=missing):
        event_from_http({f"ce-{k}": v for k, v in attrs.items()}, b"{}")
    with pytest.raises(PoisonEvent, match=missing):
        event_from_kafka(KafkaRecord(tuple((f"ce_{k}", v.encode()) for k, v in attrs.items()),
                                     None, b"{}"))
    with pytest.raises(PoisonEvent, match=missing):
        event_from_http({"content-type": "application/cloudevents+json"},
                        json.dumps({**attrs, "data": {}}).encode())
    with pytest.raises(PoisonEvent, match=missing):  # present but empty
        event_from_http({f"ce-{k}": ("" if k == missing else v) for k, v in FULL.items()},
                        b"{}")


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b'{"a": 1'])
def test_non_json_data_is_a_poison_event(body: bytes) -> None:
    with pytest.raises(PoisonEvent):
        event_from_http({f"ce-{k}": v for k, v in FULL.items()}, body)
    with pytest.raises(PoisonEvent):
        event_from_kafka(KafkaRecord(tuple((f"ce_{k}", v.encode()) for k, v in FULL.items()),
                                     None, body))


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"42",
                                  b'{"specversion": "1.0", "type": "t", "source": "/s", "id": "1",'
                                  b' "data_base64": "/w=="}'])
def test_bad_structured_events_are_poison_events(body: bytes) -> None:
    with pytest.raises(PoisonEvent):
        event_from_http({"content-type": "application/cloudevents+json"}, body)


def test_no_ce_headers_at_all_is_a_poison_event() -> None:
    with pytest.raises(PoisonEvent):
        event_from_http({"content-type": "application/json"}, b"{}")
    with pytest.raises(PoisonEvent):
        event_from_kafka(KafkaRecord((), b"k", b"{}"))


# Event bodies the json module rejects with something other than JSONDecodeError escape as
# ValueError/RecursionError/UnicodeDecodeError: the functions answer 500, so delivery retries a
# poison event instead of dead-lettering it.
STRUCTURED = {"content-type": "application/cloudevents+json"}
ESCAPING_EVENTS = {
    "binary: integer with 5000 digits":
        lambda: event_from_http({f"ce-{k}": v for k, v in FULL.items()},
                                b'{"a":' + b"1" * 5000 + b"}"),
    "binary: deeply nested data":
        lambda: event_from_http({f"ce-{k}": v for k, v in FULL.items()},
                                b"[" * 100_000 + b"]" * 100_000),
    "structured: deeply nested":
        lambda: event_from_http(STRUCTURED, b"[" * 100_000 + b"]" * 100_000),
    "structured: NaN in data":
        lambda: event_from_http(STRUCTURED, json.dumps({**FULL, "data": {"x": float("nan")}})
                                .encode()),
    "kafka: non-UTF-8 attribute":
        lambda: event_from_kafka(KafkaRecord((("ce_specversion", b"1.0"), ("ce_type", b"\xff"),
                                              ("ce_source", b"/s"), ("ce_id", b"1")),
                                             None, b"{}")),
}


@pytest.mark.parametrize("decode", list(ESCAPING_EVENTS.values()), ids=list(ESCAPING_EVENTS))
def test_hostile_event_bodies_are_poison_events(decode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PoisonEvent):
        decode()


# --- partial sums ------------------------------------------------------------------------------


def test_partial_meta_carries_the_unclipped_count_and_reads_older_partials() -> None:
    arrays = {"hi/w": np.zeros(2, np.int64), "lo/w": np.ones(2, np.int64)}
    meta = PartialMeta((("a", 3), ("b", 4)), (("c", "missing"),), unclipped=1)
    assert partial_from_safetensors(partial_to_safetensors(arrays, meta))[1] == meta
    assert (meta + PartialMeta((("d", 1),), (), 1)).unclipped == 2
    # a partial written before the field existed: no "unclipped" in its __metadata__
    tensors, header = tensors_from_safetensors(partial_to_safetensors(arrays, meta))
    del header["unclipped"]
    older = partial_from_safetensors(tensors_to_safetensors(tensors, header))[1]
    assert older == PartialMeta(meta.examples, meta.excluded, 0)
    header["unclipped"] = "3"  # more than the partial holds: corruption
    with pytest.raises(ValueError, match="unclipped"):
        partial_from_safetensors(tensors_to_safetensors(tensors, header))
