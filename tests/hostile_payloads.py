"""Hostile update uploads for tests/test_hostile.py: hypothesis strategies, each a family of bodies
that ingest must refuse with a 4xx JSON answer (and store nothing for). The raw HTTP helpers that
send them unnormalised are in raw_http.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from microfl.jobs import MAX_EXAMPLES
from microfl.serde import DTYPES, tensors_to_safetensors

# The job's model: two float32 tensors, 64 bytes of data.
SCHEMA: dict[str, tuple[int, ...]] = {"dense.bias": (4,), "dense.weight": (4, 3)}
NAMES = sorted(SCHEMA)
MAX_U64 = 2**64 - 1
NAN_BITS = [0x7FC00000, 0x7F800001, 0xFFC00000, 0xFFFFFFFF]  # quiet, signalling, negative NaNs
INF_BITS = [0x7F800000, 0xFF800000]


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SCHEMA.items()}


def valid_update(seed: int = 0, num_examples: str = "10") -> bytes:
    return tensors_to_safetensors(model(seed), {"num_examples": num_examples})


def safetensors_file(
    header: object, data: bytes = b"", *, length: int | None = None, pad: bool = True
) -> bytes:
    """A file with any header (JSON value or raw bytes) and any declared header length."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def entry(dtype: object, shape: object, offsets: object) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def valid_layout() -> dict[str, dict[str, object]]:
    """The header entries of a valid update, offsets tiling 64 bytes in name order."""
    layout, offset = {}, 0
    for name in NAMES:
        size = math.prod(SCHEMA[name]) * 4
        layout[name] = entry("F32", list(SCHEMA[name]), [offset, offset + size])
        offset += size
    return layout


def sign(secret: bytes, payload: object) -> str:
    """A token with a valid signature over any payload (what only the secret's holder can make):
    the handlers must still refuse what the payload names."""
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    mac = hmac.new(secret, f"mfl1.{body}".encode(), hashlib.sha256).digest()
    return f"mfl1.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


# --- strategies --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

# Data sections are 0xFF bytes: as float32 that is NaN, so a header that happened to be valid
# would still be refused (422), never stored.
nan_data = st.integers(0, 160).map(lambda n: b"\xff" * n)
good_examples = st.integers(1, MAX_EXAMPLES).map(str)
optional_metadata = st.none() | st.builds(lambda n: {"num_examples": n}, good_examples)


def _with_metadata(header: Mapping[str, object], metadata: dict[str, str] | None) -> object:
    return dict(header) if metadata is None else {"__metadata__": metadata, **header}


def _accepted_num_examples(value: str) -> bool:
    """What the server legitimately takes (unicode decimal digits included, see the report)."""
    return value.isdecimal() and len(value) <= 13 and 0 < int(value) <= MAX_EXAMPLES


@st.composite
def random_json_headers(draw: st.DrawFn) -> bytes:
    keys = st.sampled_from([*NAMES, "__metadata__"]) | st.text(max_size=8)
    header = draw(json_values | st.dictionaries(keys, json_values, max_size=4))
    return safetensors_file(header, draw(nan_data), pad=draw(st.booleans()))


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """Entries whose dtype, shape or data_offsets have the wrong type, value or are missing."""
    oddballs = st.lists(st.floats() | st.booleans() | st.text(max_size=3), min_size=1, max_size=3)
    dtype = st.sampled_from([*DTYPES, "BF16", "F128", "f32", "float32", "", "F8_E4M3", "C64"])
    fields = {
        "dtype": dtype | json_values,
        "shape": st.lists(st.integers(-(2**65), 2**65), max_size=4) | oddballs | json_values,
        "data_offsets": st.lists(st.integers(-(2**65), 2**65), max_size=3) | oddballs | json_values,
    }
    entries = st.fixed_dictionaries({}, optional=fields) | json_values
    names = st.sampled_from(NAMES) | st.text(max_size=8).filter(lambda s: s != "__metadata__")
    header = draw(st.dictionaries(names, entries, min_size=1, max_size=3))
    return safetensors_file(_with_metadata(header, draw(optional_metadata)), draw(nan_data))


@st.composite
def bad_offsets(draw: st.DrawFn) -> bytes:
    """Right names, dtypes and shapes; offsets beyond the body, reversed, overlapping or gapped."""
    header: dict[str, object] = {}
    for name in NAMES:
        size = math.prod(SCHEMA[name]) * 4
        begin = draw(st.integers(-16, 160) | st.integers(2**31, 2**64 + 16))
        end = begin + draw(st.just(size) | st.integers(-64, 160))
        header[name] = entry("F32", list(SCHEMA[name]), [begin, end])
    return safetensors_file(_with_metadata(header, draw(optional_metadata)), draw(nan_data))


@st.composite
def huge_header_length(draw: st.DrawFn) -> bytes:
    """A valid update whose 8-byte header length lies: far more than the body, up to 2**64-1,
    or less than the JSON it announces."""
    good = valid_update()
    (actual,) = struct.unpack("<Q", good[:8])
    unpadded = len(good[8 : 8 + actual].rstrip(b" "))
    declared = draw(
        st.sampled_from([MAX_U64, MAX_U64 - 1, 2**63, 2**63 - 1, 2**32, 16 * 2**20 + 1])
        | st.integers(len(good), MAX_U64)
        | st.integers(0, unpadded - 1)
    )
    tail = draw(st.integers(0, len(good) - 8))
    return struct.pack("<Q", declared) + good[8 : 8 + tail]


@st.composite
def huge_tensor_sizes(draw: st.DrawFn) -> bytes:
    """Tensors declaring up to exabytes of data (offsets consistent) inside a body of a few
    bytes: the server must notice without allocating anything of that size."""
    header: dict[str, object] = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=2, unique=True)):
        shape = draw(
            st.sampled_from([[2**38], [2**20, 2**20], [2**62], [2**64], [2**31, 2**31, 4]])
            | st.lists(st.integers(2**10, 2**40), min_size=1, max_size=3)
        )
        code = draw(st.sampled_from(["F32", "F64", "U8"]))
        size = math.prod(shape) * DTYPES[code].itemsize
        header[name] = entry(code, shape, [offset, offset + size])
        offset += size
    return safetensors_file(
        _with_metadata(header, draw(optional_metadata)), draw(nan_data.map(lambda b: b[:64]))
    )


@st.composite
def schema_mismatches(draw: st.DrawFn) -> bytes:
    """Valid safetensors files whose tensors differ from the model's: a name, a dtype, a shape,
    one tensor missing or one too many. All values finite, num_examples valid."""
    tensors = model(draw(st.integers(0, 3)))
    name = draw(st.sampled_from(NAMES))
    how = draw(st.sampled_from(["rename", "drop", "extra", "dtype", "shape"]))
    other_name = st.text(max_size=20).filter(lambda s: s not in (*NAMES, "__metadata__"))
    if how == "rename":
        tensors[draw(other_name)] = tensors.pop(name)
    elif how == "drop":
        del tensors[name]
    elif how == "extra":
        tensors[draw(other_name)] = np.zeros(draw(hnp.array_shapes(min_dims=0)), np.float32)
    elif how == "dtype":
        code = draw(st.sampled_from(sorted(set(DTYPES) - {"F32", "F16", "BF16"})))  # taken
        tensors[name] = tensors[name].astype(DTYPES[code])
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
        if shape == SCHEMA[name]:
            shape = (*shape, 1)
        tensors[name] = np.ones(shape, np.float32)
    return tensors_to_safetensors(tensors, {"num_examples": draw(good_examples)})


@st.composite
def non_finite_values(draw: st.DrawFn) -> bytes:
    """The model's names, shapes and dtypes with NaN (any payload) or +-Inf somewhere."""
    tensors = model(draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        bits = tensors[name].view(np.uint32).reshape(-1)
        bits[draw(st.integers(0, bits.size - 1))] = draw(st.sampled_from(NAN_BITS + INF_BITS))
    return tensors_to_safetensors(tensors, {"num_examples": draw(good_examples)})


bad_num_examples = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "00",
            "-1",
            "-0",
            "+5",
            " 5",
            "5 ",
            "5\n",
            "1.0",
            "1e3",
            "0x10",
            "5_000",
            "NaN",
            "inf",
            "five",
            "10000000000001",
            "9" * 13,
            "1" * 4301,
        ]
    ),
    st.integers(max_value=0).map(str),
    st.integers(min_value=MAX_EXAMPLES + 1, max_value=10**80).map(str),
    st.text(max_size=24).filter(lambda s: not _accepted_num_examples(s)),
)


@st.composite
def metadata_abuse(draw: st.DrawFn) -> bytes:
    """The model's tensors, with __metadata__ missing num_examples, holding a bad one, very
    long values, very many keys, non-string values, or not being an object at all."""
    tensors = model(draw(st.integers(0, 3)))
    how = draw(st.sampled_from(["missing", "bad", "long", "many", "non_string", "not_object"]))
    other_keys = st.text(max_size=16).filter(lambda k: k != "num_examples")
    if how in ("missing", "bad"):
        metadata = draw(st.dictionaries(other_keys, st.text(max_size=64), max_size=8))
        if how == "bad":
            metadata["num_examples"] = draw(bad_num_examples)
        return tensors_to_safetensors(tensors, metadata)
    if how == "long":
        n = draw(
            st.sampled_from([14, 4300, 4301, 100_000, (1 << 20) + 100]) | st.integers(14, 4000)
        )
        key = draw(st.sampled_from(["num_examples", "notes"]))
        return tensors_to_safetensors(tensors, {key: "1" * n})
    if how == "many":
        n = draw(st.integers(100, 30_000))
        return tensors_to_safetensors(tensors, {f"k{i}": "v" for i in range(n)})
    layout = valid_layout()
    data = b"".join(tensors[name].tobytes() for name in NAMES)
    if how == "non_string":
        value = draw(json_values.filter(lambda v: not isinstance(v, str)))
        meta: object = {"num_examples": value}
    else:
        meta = draw(json_values.filter(lambda v: not isinstance(v, dict) and v is not None))
    return safetensors_file({"__metadata__": meta, **layout}, data)


@st.composite
def random_bytes(draw: st.DrawFn) -> bytes:
    """Noise, a valid update cut short, or one with bytes appended."""
    good = valid_update()
    return draw(
        st.binary(max_size=4096)
        | st.integers(0, len(good) - 1).map(lambda n: good[:n])
        | st.binary(min_size=1, max_size=64).map(lambda tail: good + tail)
    )


@dataclass(frozen=True)
class Family:
    name: str
    payloads: st.SearchStrategy[bytes]
    examples: int
    codes: frozenset[str]  # the error codes a rejection of this family may carry


_MALFORMED = frozenset({"invalid_update", "schema_mismatch", "update_too_large"})
FAMILIES = [
    Family("random_json_headers", random_json_headers(), 25, _MALFORMED),
    Family("wrong_types", wrong_types(), 25, _MALFORMED),
    Family("bad_offsets", bad_offsets(), 20, _MALFORMED),
    Family("huge_header_length", huge_header_length(), 20, frozenset({"invalid_update"})),
    Family("huge_tensor_sizes", huge_tensor_sizes(), 20, frozenset({"invalid_update"})),
    Family("schema_mismatches", schema_mismatches(), 25, frozenset({"schema_mismatch"})),
    Family("non_finite_values", non_finite_values(), 20, frozenset({"schema_mismatch"})),
    Family(
        "metadata_abuse", metadata_abuse(), 35, frozenset({"invalid_update", "update_too_large"})
    ),
    Family("random_bytes", random_bytes(), 20, _MALFORMED),
]
