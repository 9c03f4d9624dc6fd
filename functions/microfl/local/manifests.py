"""The check of knative/ and the Platform the local runtime reads from it. Generic validators
accept any field of a kind they have no schema for; this knows ours. For people and CI:

    python -m microfl.local.manifests knative/    # prints the problems; exit status 1 if any
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from microfl.errors import ConfigError
from microfl.local.dispatcher import Delivery, parse_duration
from microfl.local.manifest_checks import (
    KAFKA_SINK,
    KUSTOMIZATION,
    SCALE,
    SERVICE,
    Doc,
    Document,
    as_map,
    check_document,
    check_kustomization,
    function_target,
    name_of,
    scale_of,
    where,
)

__all__ = [
    "PingSpec",
    "Platform",
    "ServiceSpec",
    "SourceSpec",
    "check_directory",
    "check_documents",
    "load_documents",
    "load_platform",
    "main",
    "platform_from_documents",
]


@dataclass(frozen=True)
class ServiceSpec:
    """A Knative Service: `function` is its FUNCTION_TARGET, `target_concurrency` the autoscaling
    target (requests per instance); 0 for max_scale and container_concurrency means unlimited."""

    name: str
    function: str
    min_scale: int
    max_scale: int
    target_concurrency: float
    container_concurrency: int
    timeout_seconds: int


@dataclass(frozen=True)
class SourceSpec:
    """A KafkaSource; `sink` names the Service it posts to."""

    name: str
    topics: tuple[str, ...]
    consumer_group: str
    sink: str
    ordering: str
    initial_offset: str
    delivery: Delivery


@dataclass(frozen=True)
class PingSpec:
    """The PingSource; `sink` names the Service it posts to."""

    name: str
    schedule: str
    sink: str


@dataclass(frozen=True)
class Platform:
    services: tuple[ServiceSpec, ...]
    sources: tuple[SourceSpec, ...]
    ping: PingSpec | None

    def service(self, name: str) -> ServiceSpec:
        """The Service with this name or FUNCTION_TARGET."""
        for spec in self.services:
            if name in (spec.name, spec.function):
                return spec
        raise KeyError(f"no Service named or running {name!r} in the manifests")


def load_documents(path: Path) -> list[Doc]:
    """Every YAML document of a file, or of each *.yaml of a directory but kustomization.yaml."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.yaml") if p.name != KUSTOMIZATION)
    docs: list[Doc] = []
    for file in files:
        try:
            loaded = list(yaml.safe_load_all(file.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{file}: cannot read it as YAML: {exc}") from exc
        for i, raw in enumerate(loaded, 1):
            if raw is None:  # an empty document, e.g. after a trailing ---
                continue
            if not isinstance(raw, dict):
                raise ConfigError(f"{file}: document {i} is not a mapping (apiVersion, kind, ...)")
            doc = Document(raw)
            doc.path = file
            docs.append(doc)
    return docs


def check_documents(docs: Sequence[Doc]) -> list[str]:
    """Human-readable problems, each naming file, kind and name, and what to fix; [] if fine."""
    defined = {(doc.get("kind"), name_of(doc)) for doc in docs}
    seen: set[tuple[Any, str]] = set()
    problems: list[str] = []
    for doc in docs:
        found = check_document(doc, defined)
        key = (doc.get("kind"), name_of(doc))
        if key in seen:
            found.append("is defined twice; rename or remove one")
        seen.add(key)
        problems += [f"{where(doc)}: {problem}" for problem in found]
    return problems


def check_directory(path: Path) -> list[str]:
    """check_documents on a directory's manifests, plus its kustomization.yaml's resources."""
    path = Path(path)
    problems = check_kustomization(path)
    try:
        return problems + check_documents(load_documents(path))
    except ConfigError as exc:
        return [*problems, str(exc)]


def platform_from_documents(docs: Sequence[Doc]) -> Platform:
    """What the local runtime runs; ConfigError listing every problem if the check fails."""
    problems = check_documents(docs)
    if problems:
        raise ConfigError("the manifests have problems:\n  " + "\n  ".join(problems))
    services = tuple(_service_spec(d) for d in docs if d.get("kind") == "Service")
    names = {s.name for s in services}
    dlq_topics = {name_of(d): d["spec"]["topic"] for d in docs if d.get("kind") == "KafkaSink"}
    sources = tuple(
        _source_spec(d, names, dlq_topics) for d in docs if d.get("kind") == "KafkaSource"
    )
    pings = [
        PingSpec(name_of(d), d["spec"]["schedule"], _sink_service(d, d["spec"]["sink"], names))
        for d in docs
        if d.get("kind") == "PingSource"
    ]
    if len(pings) > 1:
        raise ConfigError(f"the local runtime runs one PingSource; found {len(pings)}")
    return Platform(services, sources, pings[0] if pings else None)


def load_platform(path: Path) -> Platform:
    """The Platform of a manifest directory such as knative/; ConfigError if it has problems."""
    problems = check_directory(path)
    if problems:
        raise ConfigError("the manifests have problems:\n  " + "\n  ".join(problems))
    return platform_from_documents(load_documents(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Check a manifest directory (default knative/); 1 if there are problems."""
    args = sys.argv[1:] if argv is None else list(argv)
    path = Path(args[0] if args else "knative")
    problems = check_directory(path)
    print("\n".join(problems) or f"{path}: manifests OK")
    return 1 if problems else 0


# --- platform -------------------------------------------------------------------------------


def _sink_service(doc: Doc, dest: dict[str, Any], services: set[str]) -> str:
    ref = as_map(dest.get("ref"))
    if (ref.get("apiVersion"), ref.get("kind")) != SERVICE or ref.get("name") not in services:
        raise ConfigError(f"{where(doc)}: locally, a sink must be a Service of the manifests")
    return str(ref["name"])


def _service_spec(doc: Doc) -> ServiceSpec:
    template = doc["spec"]["template"]
    pod = template["spec"]
    annotations = as_map(as_map(template.get("metadata")).get("annotations"))
    return ServiceSpec(
        name=name_of(doc),
        function=function_target(pod["containers"][0]),
        min_scale=scale_of(annotations, "min-scale", 0) or 0,
        max_scale=scale_of(annotations, "max-scale", 0) or 0,
        target_concurrency=float(annotations.get(SCALE + "target", "100")),
        container_concurrency=pod.get("containerConcurrency", 0),
        timeout_seconds=pod.get("timeoutSeconds", 300),
    )


_DELIVERY_FIELDS = {
    "retry": "retry",
    "backoffPolicy": "backoff_policy",
    "backoffDelay": "backoff_delay",
    "timeout": "timeout",
}


def _source_spec(doc: Doc, services: set[str], dlq_topics: dict[str, str]) -> SourceSpec:
    spec = doc["spec"]
    block = as_map(spec.get("delivery"))
    fields: dict[str, Any] = {
        field: parse_duration(block[key]) if key in ("backoffDelay", "timeout") else block[key]
        for key, field in _DELIVERY_FIELDS.items()
        if key in block
    }
    if "deadLetterSink" in block:
        ref = as_map(block["deadLetterSink"].get("ref"))
        if (ref.get("apiVersion"), ref.get("kind")) != KAFKA_SINK:
            raise ConfigError(f"{where(doc)}: locally, a deadLetterSink must be a KafkaSink")
        fields["dead_letter_topic"] = dlq_topics[ref["name"]]
    return SourceSpec(
        name=name_of(doc),
        topics=tuple(spec["topics"]),
        consumer_group=spec["consumerGroup"],
        sink=_sink_service(doc, spec["sink"], services),
        ordering=spec.get("ordering", "ordered"),
        initial_offset=spec.get("initialOffset", "latest"),  # Knative's default
        delivery=Delivery(**fields),
    )


if __name__ == "__main__":
    sys.exit(main())
