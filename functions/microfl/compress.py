"""Compressed update encodings: how a client makes them and how the platform reads them back.

For a float32 (F32) tensor of the job's model an update may carry, under the same name and shape:

- F16: IEEE float16 values (fp16);
- BF16: bfloat16 values (bf16; numpy has none, so they are held as their uint16 bit patterns and
  widened exactly by a 16-bit shift into float32);
- I8 + F32 scales (int8): 8-bit blockwise quantised delta from the base model (the round's model
  r-1 in a sync job, the update's base_version in an async one). The tensor holds int8 codes; the
  companion tensor `{name}.__q8_scale__` holds one float32 scale per block of Q8_BLOCK
  consecutive elements (row-major, the last block shorter): shape (ceil(size / Q8_BLOCK),). The
  value of element i is base[i] + code[i] * scale[i // Q8_BLOCK], computed in float64 (exact:
  an int8 times a float32 fits in 53 bits). Scales are finite and >= 0 (0: the block is the
  base's).

A widened value is the same number as the value sent, so the exact fold of an F16 or BF16 tensor
gives the bytes of folding its float32 widening. Nothing here is torch: the client SDK and the
platform share it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np

__all__ = [
    "BF16",
    "ENCODINGS",
    "HALF",
    "Q8",
    "Q8_BLOCK",
    "SCALE_SUFFIX",
    "Tensor",
    "bf16_from_f32",
    "bf16_to_f32",
    "decode",
    "delta",
    "dense",
    "encode",
    "is_floating",
    "scale_name",
    "scales_for",
    "widen",
]

BF16 = np.dtype("<u2")  # serde's stand-in for safetensors BF16 (it has no U16 code)
HALF = (np.dtype(np.float16), BF16)  # the 16-bit encodings of a float32 tensor
Q8_BLOCK = 256  # elements per scale: 4 bytes of scale per 256 bytes of codes (1.6 %)
SCALE_SUFFIX = ".__q8_scale__"
ENCODINGS = ("fp16", "bf16", "int8")
Q8_MAX = 127  # the encoder's codes are symmetric, -127..127 (the decoder takes any int8)

Tensor = Union[np.ndarray, "Q8"]


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def scales_for(size: int) -> int:
    """How many scales an int8 tensor of `size` elements carries."""
    return math.ceil(size / Q8_BLOCK)


@dataclass(frozen=True)
class Q8:
    """An int8-coded delta with its scales and the base tensor it is a delta from."""

    codes: np.ndarray  # int8, the tensor's shape
    scales: np.ndarray  # float32, (scales_for(size),)
    base: np.ndarray  # the model tensor (float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.codes.dtype

    def delta(self) -> np.ndarray:
        """code * scale in float64 (exact), the tensor's shape."""
        per = np.repeat(self.scales.astype(np.float64), Q8_BLOCK)[: self.codes.size]
        return (self.codes.reshape(-1) * per).reshape(self.codes.shape)

    def dense(self) -> np.ndarray:
        """base + code * scale in float64, as the fold computes it element by element."""
        return self.base.astype(np.float64) + self.delta()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bfloat16 is the top half of a float32."""
    return (np.asarray(bits, dtype=BF16).astype(np.uint32) << 16).view(np.float32)


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even (NaN stays NaN); the bits as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(BF16)


def is_floating(x: Tensor) -> bool:
    return isinstance(x, Q8) or x.dtype.kind == "f" or x.dtype == BF16


def widen(x: Tensor) -> np.ndarray:
    """A floating tensor as float32 (F16, BF16: exact) or float64 (F64, int8 deltas);
    anything else as it is."""
    if isinstance(x, Q8):
        return x.dense()
    if x.dtype == BF16:
        return bf16_to_f32(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def delta(x: Tensor, base: np.ndarray) -> np.ndarray:
    """x - base in float64 (an int8 delta's own, exactly)."""
    if isinstance(x, Q8):
        return x.delta()
    return np.subtract(widen(x), base, dtype=np.float64)


def decode(
    tensors: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None
) -> dict[str, Tensor]:
    """A validated update's tensors by model name: int8 codes joined with their scales and the
    base (ValueError without one); F16/BF16 and plain tensors as they are."""
    out: dict[str, Tensor] = {}
    for name, arr in tensors.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors:
            continue
        if scale_name(name) in tensors:
            if base is None:
                raise ValueError(f"int8 tensor {name!r} needs its base model to be read")
            out[name] = Q8(arr, tensors[scale_name(name)], base[name])
        else:
            out[name] = arr
    return out


def dense(
    tensors: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """A validated update as plain arrays (decode, then widen): what a reference computation
    or a check takes."""
    return {name: widen(x) for name, x in decode(tensors, base).items()}


def encode(
    tensors: Mapping[str, np.ndarray], how: str, base: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The client's side: every float32 tensor as fp16, bf16 or int8 (a delta from `base`, the
    model trained on); other tensors unchanged. ValueError when fp16 cannot hold a value."""
    if how not in ENCODINGS:
        raise ValueError(f"compress must be one of {', '.join(ENCODINGS)}, not {how!r}")
    if how == "int8" and base is None:
        raise ValueError("int8 encodes the delta from the model trained on: pass base=")
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        x = np.asarray(arr)
        if x.dtype != np.float32:
            out[name] = x
        elif how == "fp16":
            with np.errstate(over="ignore"):
                half = x.astype(np.float16)
            if not np.array_equal(np.isfinite(half), np.isfinite(x)):
                raise ValueError(
                    f"tensor {name!r} has values beyond float16's range (65504); use bf16 or int8"
                )
            out[name] = half
        elif how == "bf16":
            out[name] = bf16_from_f32(x)
        else:
            assert base is not None
            out[name], out[scale_name(name)] = _quantize(x, np.asarray(base[name]))
    return out


def _quantize(x: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block codes of x - base: scale = max|d| / 127, code = rint(d / scale)."""
    d = np.subtract(x, base, dtype=np.float64).reshape(-1)
    blocks = scales_for(d.size)
    padded = np.zeros(blocks * Q8_BLOCK)
    padded[: d.size] = d
    rows = padded.reshape(blocks, Q8_BLOCK)
    scales = (np.max(np.abs(rows), axis=1) / Q8_MAX).astype(np.float32) if blocks else rows[:, 0]
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]
    codes = np.clip(np.rint(rows / safe), -Q8_MAX, Q8_MAX).astype(np.int8)
    return codes.reshape(-1)[: d.size].reshape(x.shape), scales.astype(np.float32)
