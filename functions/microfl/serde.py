"""All wire encodings in one place: safetensors, CloudEvents (Kafka and HTTP bindings), JSON.

safetensors is parsed here rather than by the safetensors package so that every way a hostile
header can be wrong gets a precise message, and so arrays are zero-copy views of the request body
(or, for an upload spooled to a file, tensors read block by block). The work spent on a header is
bounded before any arithmetic: its size (the caller's max_header), integers of at most 20 digits,
at most 16 dimensions per tensor. Nothing here ever unpickles."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from microfl.clientmetrics import MetricSums
from microfl.errors import InvalidUpdate, PoisonEvent

__all__ = [
    "DTYPES",
    "Event",
    "FileTensor",
    "KafkaRecord",
    "PartialMeta",
    "dtype_code",
    "event_from_http",
    "event_from_kafka",
    "event_to_http",
    "event_to_kafka",
    "json_from_bytes",
    "json_to_bytes",
    "partial_from_safetensors",
    "partial_to_safetensors",
    "safetensors_data_size",
    "tensor_blocks",
    "tensors_from_safetensors",
    "tensors_from_safetensors_file",
    "tensors_to_safetensors",
]

# safetensors dtype code <-> numpy dtype (little-endian). numpy has no bfloat16: BF16 tensors are
# held as their uint16 bit patterns (there is no U16 code here, so uint16 arrays are BF16) and
# widened exactly by microfl.compress.bf16_to_f32.
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER = 16 * 1024 * 1024  # for callers that know no model; ingest passes the job's limit
MAX_DIMS = 16  # per tensor: models use 5 or 6 at most (numpy allows 64)
MAX_DIGITS = 20  # per integer of a header: 2**64 - 1 has 20
MAX_BYTES = 2**63 - 1  # numpy's limit on an array's size (npy_intp), empty dimensions aside
BLOCK = 256 * 1024  # bytes of a tensor checked at a time (tensor_blocks)


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors code of a numpy dtype of either byte order."""
    code = _CODES.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise ValueError(f"dtype {dtype} has no safetensors code here; use one of {sorted(DTYPES)}")
    return code


# --- safetensors -------------------------------------------------------------------------------


def tensors_to_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Deterministic bytes: tensors sorted by name, compact sorted JSON header padded to 8.
    Each tensor's data is copied once, straight into the result."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    blobs: list[memoryview] = []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])  # keeps 0-d tensors 0-d
        code = dtype_code(arr.dtype)
        arr = np.asarray(arr, dtype=DTYPES[code], order="C")  # no copy when it already is
        raw = arr.reshape(-1).view(np.uint8).data
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
        blobs.append(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])


def tensors_from_safetensors(
    data: bytes | memoryview, max_header: int = MAX_HEADER
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> read-only array view, metadata); InvalidUpdate says what is wrong."""
    view = memoryview(data)
    n = _header_length(view[:8], len(view), max_header)
    slots, metadata = _layout(bytes(view[8 : 8 + n]), len(view) - 8 - n)
    body = view[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in slots.items():
        try:
            tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        except ValueError as exc:  # a dimension numpy cannot hold
            raise InvalidUpdate(
                f"tensor {name!r}: shape {list(shape)} is unusable: {exc}"
            ) from None
    return tensors, metadata


@dataclass(frozen=True)
class FileTensor:
    """A tensor of a safetensors file that stays on disk (a spooled upload): dtype, shape and
    its data at bytes [begin, end) of the file, read with tensor_blocks."""

    file: IO[bytes]
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def tensors_from_safetensors_file(
    file: IO[bytes], size: int, max_header: int = MAX_HEADER
) -> tuple[dict[str, FileTensor], dict[str, str]]:
    """tensors_from_safetensors for a file of size bytes: the same checks and messages, but only
    the header is read into memory."""
    file.seek(0)
    n = _header_length(file.read(8), size, max_header)
    slots, metadata = _layout(file.read(n), size - 8 - n)
    start = 8 + n
    tensors = {
        name: FileTensor(file, dtype, shape, start + begin, start + end)
        for name, (dtype, shape, begin, end) in slots.items()
    }
    return tensors, metadata


def tensor_blocks(tensor: np.ndarray | FileTensor, nbytes: int = BLOCK) -> Iterator[np.ndarray]:
    """A tensor's values, flat, in pieces of at most nbytes (at least one value): a check over a
    whole tensor never needs a temporary the size of the tensor."""
    step = max(1, nbytes // tensor.dtype.itemsize)
    if isinstance(tensor, np.ndarray):
        flat = tensor.reshape(-1)
        for i in range(0, flat.size, step):
            yield flat[i : i + step]
        return
    position, step = tensor.begin, step * tensor.dtype.itemsize
    while position < tensor.end:
        tensor.file.seek(position)
        data = tensor.file.read(min(step, tensor.end - position))
        yield np.frombuffer(data, dtype=tensor.dtype)
        position += len(data)


def safetensors_data_size(head: bytes) -> int:
    """The data section's size a complete header declares (the largest end offset), for a
    reader that has the header but not yet the whole object; InvalidUpdate as
    tensors_from_safetensors when the header is not one. The full checks come after."""
    ends = [end for _, _, _, end in _layout(head, None)[0].values()]
    return max(ends, default=0)


def _header_length(first: bytes | memoryview, size: int, max_header: int) -> int:
    if size < 8:
        raise InvalidUpdate(
            f"body is {size} bytes; a safetensors file starts with an 8-byte header length"
        )
    (n,) = struct.unpack("<Q", first)
    if n > size - 8:
        raise InvalidUpdate(
            f"safetensors header declares {n} bytes but the body has "
            f"{size - 8} after the length field"
        )
    if n > max_header:
        raise InvalidUpdate(
            f"safetensors header is {n} bytes; at most {max_header} are accepted here (the "
            "tensors' entries and a short __metadata__ fit well within that)"
        )
    return n


_Slot = tuple[np.dtype, tuple[int, ...], int, int]  # dtype, shape, data offsets [begin, end)


def _layout(head: bytes, data_size: int | None) -> tuple[dict[str, _Slot], dict[str, str]]:
    """The tensors a header declares, checked against a data section of data_size bytes (the
    offsets must tile it exactly; None: only each entry is checked), and its metadata."""
    try:
        header = json.loads(
            head, parse_int=_header_int, parse_float=_header_float, parse_constant=_header_float
        )
    except InvalidUpdate:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, deep nesting
        raise InvalidUpdate(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidUpdate("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidUpdate("safetensors __metadata__ must map strings to strings")
    slots: dict[str, _Slot] = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = _tensor_info(name, info)
        # At most MAX_DIMS integers of at most MAX_DIGITS digits: small arithmetic.
        size = math.prod(shape) * dtype.itemsize
        limit = end if data_size is None else data_size
        if not (0 <= begin <= end <= limit) or end - begin != size:
            raise InvalidUpdate(
                f"tensor {name!r}: data_offsets [{begin}, {end}] do not hold "
                f"{size} bytes of {shape} inside a {limit}-byte data section"
            )
        if math.prod(d for d in shape if d) * dtype.itemsize > MAX_BYTES:
            raise InvalidUpdate(
                f"tensor {name!r}: shape {list(shape)} is unusable: its non-empty dimensions "
                f"describe more than {MAX_BYTES} bytes"
            )
        slots[name] = (dtype, shape, begin, end)
    if data_size is None:
        return slots, metadata

    position = 0
    for begin, end, name in sorted((b, e, name) for name, (_, _, b, e) in slots.items()):
        if begin != position:
            raise InvalidUpdate(
                f"tensor {name!r} overlaps another or leaves a gap in the data "
                "section (offsets must tile it exactly)"
            )
        position = end
    if position != data_size:
        raise InvalidUpdate(f"{data_size - position} trailing bytes after the last tensor")
    return slots, metadata


def _header_int(token: str) -> int:
    """json's parse_int for headers: a long integer is refused before Python builds it (building
    and multiplying integers of thousands of digits costs seconds of CPU)."""
    if len(token) > MAX_DIGITS and len(token.lstrip("-")) > MAX_DIGITS:  # one test per int
        raise InvalidUpdate(
            f"safetensors header has an integer of {len(token.lstrip('-'))} digits; shapes and "
            f"data_offsets have at most {MAX_DIGITS}"
        )
    return int(token)


def _header_float(token: str) -> float:
    raise InvalidUpdate(
        f"safetensors header has the number {token[:24]!r}; the only numbers of a header are "
        "the integers of shapes and data_offsets"
    )


def _tensor_info(name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict):
        raise InvalidUpdate(f"tensor {name!r}: header entry must be an object")
    code = info.get("dtype")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise InvalidUpdate(
            f"tensor {name!r}: dtype {info.get('dtype')!r} is not one of {sorted(DTYPES)}"
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:
        raise InvalidUpdate(
            f"tensor {name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS} are accepted"
        )
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidUpdate(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    ):
        raise InvalidUpdate(f"tensor {name!r}: data_offsets must be two integers")
    return dtype, tuple(shape), (offsets[0], offsets[1])


# --- partial sums --------------------------------------------------------------------------

PARTIAL_FORMAT = "microfl.exactsum.v1"


@dataclass(frozen=True)
class PartialMeta:
    """What a node of the aggregation tree sums: the updates folded (client, num_examples) and
    those left out (client, reason), in position order, how many of those folded were
    within the round's clip bound (0 when the strategy does not clip), and the exact
    example-weighted sums of the metrics those folded reported (clientmetrics)."""

    examples: tuple[tuple[str, int], ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()
    unclipped: int = 0
    metrics: MetricSums = MetricSums()

    @property
    def weight(self) -> int:
        return sum(n for _, n in self.examples)

    def __add__(self, other: PartialMeta) -> PartialMeta:
        return PartialMeta(
            self.examples + other.examples,
            self.excluded + other.excluded,
            self.unclipped + other.unclipped,
            self.metrics + other.metrics,
        )


def partial_to_safetensors(arrays: Mapping[str, np.ndarray], meta: PartialMeta) -> bytes:
    """An exact partial sum (exactsum.ExactSum.to_arrays) with its members in __metadata__
    (and its metric sums, when any: a partial without them has the bytes it always had)."""
    metadata = {
        "format": PARTIAL_FORMAT,
        "examples": json.dumps([list(e) for e in meta.examples], separators=(",", ":")),
        "excluded": json.dumps([list(e) for e in meta.excluded], separators=(",", ":")),
        "num_examples": str(meta.weight),
        "unclipped": str(meta.unclipped),
    }
    if meta.metrics.sums:
        metadata["metrics"] = meta.metrics.to_text()
    return tensors_to_safetensors(arrays, metadata)


def partial_from_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], PartialMeta]:
    """The inverse of partial_to_safetensors; ValueError for anything else (a partial is the
    platform's own object, so this is corruption, not a client's mistake)."""
    tensors, metadata = tensors_from_safetensors(data)
    if metadata.get("format") != PARTIAL_FORMAT:
        raise ValueError(f"not a partial sum of format {PARTIAL_FORMAT}")
    examples = tuple((str(c), int(n)) for c, n in json.loads(metadata["examples"]))
    excluded = tuple((str(c), str(why)) for c, why in json.loads(metadata["excluded"]))
    metrics = MetricSums.from_text(metadata.get("metrics", "[]"))  # older: no metrics, no unclipped
    meta = PartialMeta(examples, excluded, int(metadata.get("unclipped", "0")), metrics)
    if meta.weight != int(metadata["num_examples"]):
        raise ValueError("a partial sum's num_examples is not the sum of its examples")
    if not 0 <= meta.unclipped <= len(examples):
        raise ValueError("a partial sum counts more unclipped updates than it holds")
    return tensors, meta


# --- JSON documents ----------------------------------------------------------------------------


def json_to_bytes(doc: Any) -> bytes:
    """Canonical JSON: the same document always gives the same bytes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def json_from_bytes(data: bytes) -> Any:
    return json.loads(data)


# --- CloudEvents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A CloudEvent with a JSON object as data. Ids are deterministic, so a re-emitted event is
    recognisably the same event."""

    type: str
    source: str
    id: str
    data: dict[str, Any] = field(default_factory=dict)
    subject: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, str]:
        attrs = {"specversion": "1.0", "type": self.type, "source": self.source, "id": self.id}
        if self.subject is not None:
            attrs["subject"] = self.subject
        return {**attrs, **self.extensions}


@dataclass(frozen=True)
class KafkaRecord:
    headers: tuple[tuple[str, bytes], ...]
    key: bytes | None
    value: bytes


def event_to_kafka(event: Event, key: str | None = None) -> KafkaRecord:
    """Kafka protocol binding, binary mode: attributes as ce_* headers, data as the value."""
    headers = [(f"ce_{k}", v.encode()) for k, v in event.attributes().items()]
    headers.append(("content-type", b"application/json"))
    return KafkaRecord(
        tuple(headers), key.encode() if key is not None else None, json_to_bytes(event.data)
    )


def event_from_kafka(record: KafkaRecord) -> Event:
    try:
        attrs = {k[3:]: v.decode() for k, v in record.headers if k.startswith("ce_")}
    except (UnicodeDecodeError, AttributeError) as exc:
        raise PoisonEvent(f"a ce_ header of the record is not UTF-8 text: {exc}") from None
    return _event_from_attributes(attrs, record.value)


def event_to_http(event: Event) -> tuple[dict[str, str], bytes]:
    """HTTP protocol binding, binary mode."""
    headers = {f"ce-{k}": v for k, v in event.attributes().items()}
    headers["content-type"] = "application/json"
    return headers, json_to_bytes(event.data)


def event_from_http(headers: Mapping[str, str], body: bytes) -> Event:
    """Binary mode (ce-* headers) or structured mode (application/cloudevents+json)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if lowered.get("content-type", "").startswith("application/cloudevents+json"):
        try:
            doc = json.loads(body)
            data = doc.pop("data", None)
            if "data_base64" in doc:
                data = base64.b64decode(doc.pop("data_base64"))
            raw = json_to_bytes(data) if not isinstance(data, bytes) else data
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise PoisonEvent(f"structured CloudEvent is not valid JSON: {exc}") from None
        return _event_from_attributes({k: str(v) for k, v in doc.items()}, raw)
    attrs = {k[3:]: v for k, v in lowered.items() if k.startswith("ce-")}
    return _event_from_attributes(attrs, body)


def _event_from_attributes(attrs: dict[str, str], body: bytes) -> Event:
    missing = [a for a in ("specversion", "type", "source", "id") if not attrs.get(a)]
    if missing:
        raise PoisonEvent(f"not a CloudEvent: missing attribute(s) {', '.join(missing)}")
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:
        raise PoisonEvent(f"event {attrs['id']}: data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        data = {"value": data}
    known = {"specversion", "type", "source", "id", "subject", "time", "datacontenttype"}
    ext = {k: v for k, v in attrs.items() if k not in known}
    return Event(attrs["type"], attrs["source"], attrs["id"], data, attrs.get("subject"), ext)
