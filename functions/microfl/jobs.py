"""A job's configuration, its job-level storage layout, and what an update must be to fit it.

Layout under `jobs/{job}/` (every object written once, create-only; rounds.py owns `rounds/`):

    job.json                                  JobSpec
    models/{v:08d}.safetensors                global model version v (0 = initial)
    optimizer/{v:08d}.safetensors             server optimiser state after version v (FedAdam)
    revoked/{client}                          the client's tokens no longer admit it (JSON)
    rounds/{r:08d}/...                        round r (microfl.rounds); in an async job, the
                                              buffer that makes version r
    async/{base:08d}/...                      an async job's updates by base version (buffers)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from microfl.clientmetrics import client_metrics
from microfl.compress import BF16, Q8_BLOCK, SCALE_SUFFIX, bf16_to_f32, scale_name, scales_for
from microfl.errors import ConfigError, InvalidUpdate, JobNotFound, SchemaMismatch
from microfl.faults import failpoint
from microfl.serde import (
    DTYPES,
    FileTensor,
    dtype_code,
    json_from_bytes,
    json_to_bytes,
    tensor_blocks,
    tensors_from_safetensors,
)
from microfl.store import ObjectStore
from microfl.strategy import SHARDED, check_options

__all__ = [
    "ASYNC_STRATEGIES",
    "MODES",
    "JobSpec",
    "TensorSpec",
    "check_model",
    "create_job",
    "job_key",
    "load_job",
    "model_key",
    "optimizer_key",
    "revoke_client",
    "revoked_key",
    "validate_update",
]

MAX_EXAMPLES = 10**12  # the most any job may allow; a num_examples above it is malformed (400)
# One client's default share of a FedAvg round: a million examples outweighs any honest device;
# a job with bigger clients raises it (`--max-examples`).
DEFAULT_MAX_EXAMPLES = 1_000_000
# The largest |value| an F64 update may carry. The float64 sum of a round is bounded by
# clients * max_examples * |x| <= clients * 1e12 * 1e150, finite (< 1.7e308) for any round of
# fewer than 1e146 clients (each one an object in storage: no job comes near), and FedAdam's
# squared pseudo-gradient (|mean - x| <= 2e150)^2 = 4e300 stays finite too. F32 and F16 values
# need no such bound: |x| <= 3.4e38 makes a term at most 3.4e50, finite summed over fewer than
# 5e257 clients, squared at most 4.7e77, and their FedAvg mean (within the range of the values)
# casts back without overflow. Whatever still overflows is caught at commit (finalize).
MAX_F64_MAGNITUDE = 1e150
HEADER_ROOM = 4 * 1024  # bytes of an update's header beyond twice the model's: its __metadata__
# Bytes of update values one instance may hold for a coordinate-wise statistic (median,
# trimmed mean, Krum): it sets the coordinate shard's width, N updates x width x 8 bytes.
DEFAULT_MEMORY_BUDGET = 256 << 20
MODES = ("sync", "async")
# Strategies an async job may use: each buffered update is a delta from its own base version,
# which the summing strategies weigh and add. The coordinate-wise statistics (median,
# trimmed-mean, krum) compare whole updates against one another, which mean nothing across
# different base versions; dp-fedavg's accounting assumes one contribution per client per
# release, which a client that posts again on every new version breaks.
ASYNC_STRATEGIES = ("fedavg", "fedadam")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class JobSpec:
    job: str
    schema: tuple[TensorSpec, ...]
    rounds: int = 10
    min_clients: int = 2
    round_timeout: float = 300.0
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    fan_in: int = 10
    max_update_bytes: int = 0  # 0: the model's size plus 1 MiB of header room
    created_at: float = 0.0
    max_examples: int = DEFAULT_MAX_EXAMPLES  # job.json files without it load with the default
    model_sha256: str = ""  # model 0's hash, set by create_job ("" in older jobs)
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes; see DEFAULT_MEMORY_BUDGET
    # Asynchronous (FedBuff) jobs, microfl.buffers: `rounds` is the number of versions made,
    # every `buffer` accepted updates make one; an update's weight is (1 + staleness) ** -a.
    mode: str = "sync"
    buffer: int = 0  # K, updates per version (async only)
    max_staleness: int = 10  # versions an update's base may lag the latest (async only)
    staleness_exponent: float = 0.5  # a: weight 1/sqrt(1 + staleness) by default

    def __post_init__(self) -> None:
        problems = []
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        if self.min_clients < 1:
            problems.append("min_clients must be >= 1")
        if self.round_timeout <= 0:
            problems.append("round_timeout must be > 0 seconds")
        if self.fan_in < 1:
            problems.append("fan_in must be >= 1")
        if not 1 <= self.max_examples <= MAX_EXAMPLES:
            problems.append(f"max_examples must be between 1 and {MAX_EXAMPLES}")
        try:
            options = check_options(self.strategy, self.strategy_options)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if self.strategy == "krum" and self.min_clients < 2 * options["f"] + 3:
                problems.append(
                    f"krum with f={options['f']:g} needs min_clients >= 2f+3 = "
                    f"{2 * options['f'] + 3:g}; raise --min-clients or lower f"
                )
        if self.memory_budget < 1 << 20:
            problems.append("memory_budget must be at least 1 MiB")
        problems += self._mode_problems()
        if not self.schema:
            problems.append("the model has no tensors")
        if problems:
            raise ConfigError(f"job {self.job!r}: " + "; ".join(problems))

    def _mode_problems(self) -> list[str]:
        if self.mode not in MODES:
            return [f"mode must be one of {', '.join(MODES)}, not {self.mode!r}"]
        if self.mode == "sync":
            return ["buffer is for async jobs (--mode async)"] if self.buffer else []
        problems = []
        if self.buffer < 1:
            problems.append("an async job needs --buffer K >= 1 (updates per version)")
        if self.max_staleness < 0:
            problems.append("max_staleness must be >= 0 versions")
        if not 0 <= self.staleness_exponent < math.inf:
            problems.append("staleness_exponent must be a finite number >= 0")
        if self.strategy not in ASYNC_STRATEGIES:
            why = (
                "dp-fedavg's privacy accounting assumes one update per client per release"
                if self.strategy == "dp-fedavg"
                else f"{self.strategy} compares whole updates, which trained on different "
                "versions in an async job"
            )
            problems.append(
                f"async jobs take the strategies {', '.join(ASYNC_STRATEGIES)} (with clip), "
                f"not {self.strategy}: {why}; use --mode sync for it"
            )
        return problems

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def options(self) -> dict[str, float]:
        """The strategy's options, defaults filled in (strategy.OPTIONS)."""
        return check_options(self.strategy, self.strategy_options)

    @property
    def sharded(self) -> bool:
        """A coordinate-wise statistic: no eager folding; shards computed after the seal."""
        return self.strategy in SHARDED

    @property
    def update_limit(self) -> int:
        return self.max_update_bytes or sum(t.nbytes for t in self.schema) + (1 << 20)

    @property
    def header_limit(self) -> int:
        """The largest safetensors header an update may have: twice the model's own with an
        int8 scales entry per F32 tensor (other writers order and space their JSON differently)
        plus HEADER_ROOM. It bounds the CPU a hostile header can cost to a small multiple of
        parsing the model's."""
        layout, offset = {}, 0
        for t in self.schema:
            span = [offset, offset + t.nbytes]
            layout[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": span}
            if t.dtype == "F32":
                blocks = [scales_for(math.prod(t.shape))]
                layout[scale_name(t.name)] = {"dtype": "F32", "shape": blocks, "data_offsets": span}
            offset += t.nbytes
        return 2 * len(json_to_bytes(layout)) + HEADER_ROOM

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["schema"] = [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.schema
        ]
        return json_to_bytes(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> JobSpec:
        doc = json_from_bytes(data)
        doc["schema"] = tuple(
            TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in doc["schema"]
        )
        return cls(**doc)

    @classmethod
    def for_model(cls, job: str, tensors: dict[str, np.ndarray], **options: Any) -> JobSpec:
        schema = tuple(
            TensorSpec(name, dtype_code(tensors[name].dtype), tuple(tensors[name].shape))
            for name in sorted(tensors)
        )
        return cls(job=job, schema=schema, **options)


def job_key(job: str) -> str:
    return f"jobs/{job}/job.json"


def model_key(job: str, version: int) -> str:
    return f"jobs/{job}/models/{version:08d}.safetensors"


def optimizer_key(job: str, version: int) -> str:
    return f"jobs/{job}/optimizer/{version:08d}.safetensors"


def revoked_key(job: str, client: str) -> str:
    """`microfl token revoke` writes it (create-only); ingest refuses the client's tokens."""
    return f"jobs/{job}/revoked/{client}"


def revoke_client(store: ObjectStore, job: str, client: str, now: float) -> bool:
    """Refuse every token of the client from now on; False if it was revoked already."""
    load_job(store, job)  # the job exists (JobNotFound otherwise)
    record = json_to_bytes({"client": client, "revoked_at": int(now)})
    return store.create(revoked_key(job, client), record)


def create_job(store: ObjectStore, spec: JobSpec, model: bytes) -> bool:
    """Create a job with model version 0; True if this call created it, False if the job exists
    already with the same spec and model (a retry). Safe to retry after a crash at any line.

    job.json, which names model 0's sha256, is the commit point: a job either does not exist or
    its job.json is the one its creator committed. Model 0 without a job.json is debris of a
    crashed attempt and is replaced. Two racers with different models: one job.json wins, the
    other is told the job exists; a loser that stalled between replacing the debris and trying
    to commit can still overwrite the winner's model 0 afterwards. Readers then refuse model 0
    (`check_model`), and running the winner's create again repairs it."""
    tensors, _ = tensors_from_safetensors(model)
    schema = JobSpec.for_model(spec.job, tensors).schema
    for t in schema:
        if t.dtype == "BF16" or t.name.endswith(SCALE_SUFFIX):
            raise ConfigError(
                f"model tensor {t.name!r}: a model holds no BF16 tensors or names ending in "
                f"{SCALE_SUFFIX!r} (updates use them); save it as F32 with other names"
            )
    if schema != spec.schema:
        raise ConfigError(f"job {spec.job!r}: the model file does not match the job's schema")
    digest = hashlib.sha256(model).hexdigest()
    if spec.model_sha256 not in ("", digest):
        raise ConfigError(f"job {spec.job!r}: the model file's sha256 is not the spec's")
    spec = replace(spec, model_sha256=digest)
    key = model_key(spec.job, 0)
    committed = store.read(job_key(spec.job))
    created = False
    if committed is None:
        if store.read(key) not in (None, model):
            store.delete(key)  # uncommitted debris of a crashed attempt with another model
        store.create(key, model)
        failpoint("jobs.after_model")
        created = store.create(job_key(spec.job), spec.to_bytes())
        committed = spec.to_bytes() if created else store.read(job_key(spec.job))
    if committed is None or not _same_job(JobSpec.from_bytes(committed), spec):
        raise ConfigError(
            f"job {spec.job!r} exists already with another spec or model; pick another id"
        )
    for _ in range(3):  # a racer replaced model 0 after job.json was committed: put it back
        current = store.read(key)
        if current == model:
            return created
        if current is not None:
            store.delete(key)
        store.create(key, model)
    raise ConfigError(
        f"job {spec.job!r}: model 0 keeps changing; another `microfl job create {spec.job}` "
        "with another model is running. Stop it, then run this command again"
    )


def _same_job(a: JobSpec, b: JobSpec) -> bool:
    """The same job, whenever each was made (retries get a new created_at)."""
    return replace(a, created_at=0.0) == replace(b, created_at=0.0)


def check_model(spec: JobSpec, version: int, data: bytes) -> bytes:
    """Model 0's bytes, if they are the ones its job.json names (other versions pass)."""
    if version == 0 and spec.model_sha256 and hashlib.sha256(data).hexdigest() != spec.model_sha256:
        raise ConfigError(
            f"job {spec.job!r}: model 0 is not the model the job was created with; run "
            f"`microfl job create {spec.job}` again with the same model and options to repair it"
        )
    return data


def load_job(store: ObjectStore, job: str) -> JobSpec:
    data = store.read(job_key(job))
    if data is None:
        raise JobNotFound(f"no job {job!r}; create it with `microfl job create {job} ...`")
    return JobSpec.from_bytes(data)


def validate_update(
    spec: JobSpec,
    tensors: Mapping[str, np.ndarray | FileTensor],
    metadata: dict[str, str],
    values: bool = True,
) -> int:
    """The update's num_examples, once its tensors match the job's model exactly. Values are
    checked block by block (tensor_blocks), so a spooled upload is never read whole; aggregate
    passes values=False because its exact fold refuses non-finite values in the same pass."""
    raw = metadata.get("num_examples")
    if raw is None or not re.fullmatch(r"[0-9]{1,13}", raw) or not 0 < int(raw) <= MAX_EXAMPLES:
        raise InvalidUpdate(
            f"__metadata__.num_examples must be a positive integer as a string "
            f"(at most {MAX_EXAMPLES}), got {raw!r}"
        )
    if int(raw) > spec.max_examples:
        raise SchemaMismatch(
            f"__metadata__.num_examples is {raw}; job {spec.job!r} takes at most "
            f"{spec.max_examples} examples per update; send at most that (its operator sets the "
            "limit with `microfl job create ... --max-examples N`)"
        )
    client_metrics(metadata)  # optional `metrics`: a JSON object of finite numbers
    expected = {t.name: t for t in spec.schema}
    coded = {n for n, t in expected.items() if _is_q8(t, tensors.get(n))}
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected) - {scale_name(n) for n in coded})
    if missing or unknown:
        stray = [n for n in unknown if n.endswith(SCALE_SUFFIX)]
        hint = (
            f"; scales {stray} come only with the I8 codes of an F32 tensor of the same name"
            if stray
            else ""
        )
        raise SchemaMismatch(
            f"update tensors differ from the model's: missing {missing}, unknown {unknown}{hint}"
        )
    for name, t in expected.items():
        arr = tensors[name]
        if arr.shape != t.shape:
            raise SchemaMismatch(
                f"update tensor {name!r} has shape {arr.shape}; the job's model expects {t.shape}"
            )
        code = dtype_code(arr.dtype)
        if name in coded:
            _check_q8(spec, name, arr, tensors.get(scale_name(name)), values)
        elif code != t.dtype and not (t.dtype == "F32" and code in HALF):
            also = " (or F16, BF16, or I8 codes with their scales)" if t.dtype == "F32" else ""
            raise SchemaMismatch(
                f"update tensor {name!r} has dtype {code}; the job's model expects {t.dtype}{also}"
            )
        if values and (arr.dtype.kind == "f" or code == "BF16"):
            _check_values(name, arr)
    return int(raw)


HALF = ("F16", "BF16")  # accepted for an F32 model tensor (microfl.compress)


def _is_q8(t: TensorSpec, arr: np.ndarray | FileTensor | None) -> bool:
    return t.dtype == "F32" and arr is not None and arr.dtype == DTYPES["I8"]


def _check_q8(
    spec: JobSpec,
    name: str,
    codes: np.ndarray | FileTensor,
    scales: np.ndarray | FileTensor | None,
    values: bool,
) -> None:
    """int8 codes of an F32 tensor: their scales are there, F32, one per block, finite, >= 0."""
    if spec.sharded:
        raise SchemaMismatch(
            f"update tensor {name!r} is int8-coded; job {spec.job!r} uses {spec.strategy}, "
            "which compares whole updates and takes only F32, F16 or BF16 tensors: send one of "
            "those (client option compress='fp16' or 'bf16')"
        )
    blocks = scales_for(math.prod(codes.shape))
    what = f"int8 tensor {name!r} needs its scales as {scale_name(name)!r}"
    if scales is None:
        raise SchemaMismatch(f"{what}: F32, shape ({blocks},), one per {Q8_BLOCK} codes")
    if scales.dtype != DTYPES["F32"] or scales.shape != (blocks,):
        raise SchemaMismatch(
            f"{what}: F32, shape ({blocks},), one per {Q8_BLOCK} codes; got "
            f"{dtype_code(scales.dtype)} {scales.shape}"
        )
    if values:
        for block in tensor_blocks(scales):
            if not (np.isfinite(block).all() and (block >= 0).all()):
                raise SchemaMismatch(
                    f"scales {scale_name(name)!r} of int8 tensor {name!r} hold NaN, Inf or a "
                    "negative value; send finite scales >= 0 (the codes carry the sign)"
                )


def _check_values(name: str, tensor: np.ndarray | FileTensor) -> None:
    """Finite, and for F64 within MAX_F64_MAGNITUDE, block by block (no full-size temporary)."""
    bounded = tensor.dtype == np.float64
    for block in tensor_blocks(tensor):
        if not np.isfinite(bf16_to_f32(block) if block.dtype == BF16 else block).all():
            raise SchemaMismatch(f"update tensor {name!r} contains NaN or Inf; send finite values")
        if bounded and block.size and max(-block.min(), block.max()) > MAX_F64_MAGNITUDE:
            raise SchemaMismatch(
                f"update tensor {name!r} has a value of magnitude above {MAX_F64_MAGNITUDE:g}, "
                "which could overflow the round's sum; send values within that bound"
            )
