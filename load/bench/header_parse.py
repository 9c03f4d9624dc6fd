"""Hostile safetensors headers: CPU time of the worst headers that fit a job's header limit, as
ingest parses an upload (serde.tensors_from_safetensors_file with the job's header_limit).

The limit is twice the model's own header plus 4 KiB (jobs.HEADER_ROOM); integers have at most
20 digits and shapes at most 16 dimensions. Within those, each candidate fills the limit with
what costs most per byte: integer tokens (each one goes through the integer check), short keys,
empty containers, valid empty tensors (they pass the parser and reach the schema check), escaped
strings, metadata pairs; and, for scale, the attacks of the issue (integers of thousands of
digits, a megabyte of header) and the model's honest header. Per-parse CPU is the median over
REPEATS parses (thread CPU time), for three models: the tests' (2 tensors), ResNet-18-sized
(62 tensors) and ResNet-50-sized (320 tensors, state dict with batch-norm buffers)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "header_parse"
MODELS = {"tests' model": 2, "ResNet-18-sized": 62, "ResNet-50-sized": 320}
REPEATS = 200
QUICK_REPEATS = 30
TARGET_MS = 1.0  # CPU per parse of the worst header within the limit (issue 13, item 1)
TARGET_MODEL = "tests' model"


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    repeats = QUICK_REPEATS if quick else REPEATS
    result = procstat.run_step(Path(__file__), "measure", str(repeats))
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {"repeats": repeats, "target_ms": TARGET_MS, "target_model": TARGET_MODEL},
        "runs": result["runs"],
        "within_target": all(
            r["worst_ms"] < TARGET_MS for r in result["runs"] if r["model"] == TARGET_MODEL
        ),
    }


def _schema(tensors: int) -> list[tuple[str, str, tuple[int, ...]]]:
    if tensors == 2:
        return [("dense.bias", "F32", (4,)), ("dense.weight", "F32", (4, 3))]
    shapes = [(256, 128, 3, 3), (256,), (256,), (256,), (256,)]
    kinds = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    return [
        (f"layer{i // 40 + 1}.{i // 5 % 8}.{kinds[i % 5]}", "F32", shapes[i % 5])
        for i in range(tensors)
    ]


def _candidates(limit: int, honest: bytes) -> dict[str, bytes]:
    """Headers of at most limit bytes (the issue's attacks may exceed it: they are refused on
    their size first)."""

    def fill(head: bytes, unit: bytes, tail: bytes, last: bytes = b"") -> bytes:
        n = (limit - len(head) - len(tail) - len(last)) // len(unit)
        return head + unit * n + last + tail

    empty = b'"t%06d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
    entries = b"".join(empty % i for i in range(limit // len(empty % 0)))
    return {
        "honest header (the model's)": honest,
        "integers: [0,0,0,...]": fill(b'{"a":[', b"0,", b"]}", b"0"),
        "20-digit integers": fill(b'{"a":[', b"9" * 20 + b",", b"]}", b"0"),
        'short keys: {"0":0,...}': fill(b"{", b'"":0,', b"}", b'"":0'),
        "empty lists: [[],[],...]": fill(b"[", b"[],", b"]", b"[]"),
        "empty objects: [{},{},...]": fill(b"[", b"{},", b"]", b"{}"),
        "escaped string": fill(b'{"a":"', b"\\u00e9", b'"}'),
        "metadata pairs": fill(b'{"__metadata__":{', b'"":"",', b"}}", b'"":""'),
        "valid empty tensors": b"{" + entries[: limit - 2].rsplit(b"},", 1)[0] + b"}}",
        "nesting 900 deep": b"[" * 900 + b"]" * 900,
        "shape [10**2200, 10**2200] (the issue's)": b'{"a":{"dtype":"F32","shape":[1'
        + b"0" * 2200
        + b",1"
        + b"0" * 2200
        + b'],"data_offsets":[0,0]}}',
        "1 MB of 4000-digit dimensions (the issue's)": b'{"a":{"dtype":"F32","shape":['
        + b",".join([b"9" * 4000] * 250)
        + b'],"data_offsets":[0,0]}}',
    }


def measure(repeats: int) -> dict[str, Any]:
    import io
    import struct

    from microfl.errors import InvalidUpdate
    from microfl.jobs import JobSpec, TensorSpec
    from microfl.serde import tensors_from_safetensors_file

    runs = []
    for model, count in MODELS.items():
        spec = JobSpec("bench", tuple(TensorSpec(n, d, s) for n, d, s in _schema(count)))
        layout, offset = {}, 0
        for t in spec.schema:
            span = [offset, offset + t.nbytes]
            layout[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": span}
            offset += t.nbytes
        honest = json.dumps(
            {"__metadata__": {"num_examples": "10"}, **layout}, separators=(",", ":")
        ).encode()
        limit = spec.header_limit
        rows = []
        for name, head in _candidates(limit, honest).items():
            data = offset if head is honest else 0
            file = io.BytesIO(struct.pack("<Q", len(head)) + head)  # the data section unread
            size = 8 + len(head) + data
            times, answer = [], "parsed"
            for _ in range(repeats):
                start = time.thread_time_ns()
                try:
                    tensors_from_safetensors_file(file, size, limit)
                except InvalidUpdate as exc:
                    answer = str(exc)[:90]
                times.append((time.thread_time_ns() - start) / 1e6)
            rows.append(
                {
                    "header": name,
                    "bytes": len(head),
                    "median_ms": statistics.median(times),
                    "p95_ms": sorted(times)[int(0.95 * (len(times) - 1))],
                    "answer": answer,
                }
            )
        worst = max(rows, key=lambda r: r["median_ms"])
        procstat.log(
            NAME,
            f"{model}: limit {limit} bytes, worst {worst['header']} {worst['median_ms']:.3f} ms",
        )
        runs.append(
            {
                "model": model,
                "tensors": count,
                "header_limit": limit,
                "honest_bytes": len(honest),
                "worst": worst["header"],
                "worst_ms": worst["median_ms"],
                "rows": rows,
            }
        )
    return {"runs": runs}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"worst safetensors header within the job's limit < {TARGET_MS:g} ms CPU "
            f"({r['model']}, {r['tensors']} tensors)",
            "measured": f"{r['worst_ms']:.3f} ms ({r['worst']}, {r['header_limit']:,} B limit)",
            "met": r["worst_ms"] < TARGET_MS,
        }
        for r in result["runs"]
        if r["model"] == TARGET_MODEL
    ]


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        "## Hostile safetensors headers (CPU per parse)",
        "",
        "What ingest spends on an upload's header before refusing it: `tensors_from_safetensors_"
        "file` with the job's `header_limit` (twice the model's header + 4 KiB), integers of at "
        "most 20 digits, at most 16 dimensions. Median thread CPU of "
        f"{result['config']['repeats']} parses, in ms; the header's size in bytes. Target: the "
        f"worst header < {TARGET_MS:g} ms for the {TARGET_MODEL} (a larger model's limit, and so "
        "its worst header, grows with its own header).",
        "",
        "| header | " + " | ".join(f"{r['model']} ({r['tensors']} tensors)" for r in runs) + " |",
        "| --- |" + " ---: |" * len(runs),
        "| header limit (bytes) | " + " | ".join(f"{r['header_limit']:,}" for r in runs) + " |",
    ]
    for i, row in enumerate(runs[0]["rows"]):
        cells = []
        for r in runs:
            cell = r["rows"][i]
            mark = "**" if cell["header"] == r["worst"] else ""
            cells.append(f"{mark}{cell['median_ms']:.3f}{mark} ({cell['bytes']:,} B)")
        lines.append(f"| {row['header']} | " + " | ".join(cells) + " |")
    lines += ["", "Answers (tests' model):", ""]
    lines += [f"- {row['header']}: {row['answer']}" for row in runs[0]["rows"]]
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


if __name__ == "__main__":
    procstat.step_main(measure)
