"""The check of knative/ and the Platform the local runtime reads from it. Generic validators
accept any field of a kind they have no schema for; this knows ours. For people and CI:

    python -m microfl.local.manifests knative/    # prints the problems; exit status 1 if any
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from microfl.errors import ConfigError
from microfl.local.dispatcher import Delivery, parse_duration

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

Doc = dict[str, Any]

SERVICE = ("serving.knative.dev/v1", "Service")
KAFKA_SOURCE = ("sources.knative.dev/v1beta1", "KafkaSource")
PING_SOURCE = ("sources.knative.dev/v1", "PingSource")
KAFKA_SINK = ("eventing.knative.dev/v1alpha1", "KafkaSink")
KNOWN = {SERVICE, KAFKA_SOURCE, PING_SOURCE, KAFKA_SINK} | {
    ("v1", kind) for kind in ("ConfigMap", "Secret", "ServiceAccount")
}
API_OF = {kind: api for api, kind in KNOWN}
TARGETS = ("ingest", "aggregate", "finalize")
CLOUDEVENT_TARGETS = ("aggregate", "finalize")  # answer POST only
SCALE = "autoscaling.knative.dev/"
KUSTOMIZATION = "kustomization.yaml"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NUMBER = r"[0-9]*\.?[0-9]+"
_CRON_ITEM = re.compile(r"(\*|\d+(-\d+)?)(/\d+)?")
_CRON_TZ = re.compile(r"(CRON_TZ|TZ)=\S+\s+")


class _Document(dict[str, Any]):
    """A YAML document that remembers its file for messages (copy.deepcopy keeps it)."""

    path: Path | None = None


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
            doc = _Document(raw)
            doc.path = file
            docs.append(doc)
    return docs


def check_documents(docs: Sequence[Doc]) -> list[str]:
    """Human-readable problems, each naming file, kind and name, and what to fix; [] if fine."""
    defined = {(doc.get("kind"), _name(doc)) for doc in docs}
    seen: set[tuple[Any, str]] = set()
    problems: list[str] = []
    for doc in docs:
        found = _check_document(doc, defined)
        key = (doc.get("kind"), _name(doc))
        if key in seen:
            found.append("is defined twice; rename or remove one")
        seen.add(key)
        problems += [f"{_where(doc)}: {problem}" for problem in found]
    return problems


def check_directory(path: Path) -> list[str]:
    """check_documents on a directory's manifests, plus its kustomization.yaml's resources."""
    path = Path(path)
    problems = _check_kustomization(path)
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
    dlq_topics = {_name(d): d["spec"]["topic"] for d in docs if d.get("kind") == "KafkaSink"}
    sources = tuple(
        _source_spec(d, names, dlq_topics) for d in docs if d.get("kind") == "KafkaSource"
    )
    pings = [
        PingSpec(_name(d), d["spec"]["schedule"], _sink_service(d, d["spec"]["sink"], names))
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


# --- checks: each returns problems without the "file: Kind name: " prefix -------------------


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _name(doc: Doc) -> str:
    name = _map(doc.get("metadata")).get("name")
    return name if isinstance(name, str) else ""


def _where(doc: Doc) -> str:
    path = getattr(doc, "path", None)
    prefix = f"{path}: " if path is not None else ""
    return f"{prefix}{doc.get('kind') or '(no kind)'} {_name(doc) or '(no name)'}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _texts(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_text(v) for v in value)


def _check_document(doc: Doc, defined: set[tuple[Any, str]]) -> list[str]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if (api, kind) not in KNOWN:
        if isinstance(kind, str) and kind in API_OF:
            return [f"apiVersion {api!r} is wrong for {kind}; use {API_OF[kind]}"]
        return [f"unknown kind {kind!r} ({api!r}); use one of {', '.join(sorted(API_OF))}"]
    problems = []
    name, pattern = _name(doc), _LABEL if kind == "Service" else rf"{_LABEL}(\.{_LABEL})*"
    if not re.fullmatch(pattern, name) or len(name) > (63 if kind == "Service" else 253):
        problems.append(f"metadata.name {name!r} must be a DNS-1123 name (a-z, 0-9, '-')")
    check = _CHECKS.get(str(kind))
    return problems + (check(_map(doc.get("spec")), defined) if check else [])


def _function_target(container: dict[str, Any]) -> Any:
    env = container.get("env")
    for var in env if isinstance(env, list) else []:
        if _map(var).get("name") == "FUNCTION_TARGET":
            return var.get("value")
    return None


def _scale(annotations: dict[str, Any], key: str, default: int) -> int | None:
    """An annotation's non-negative integer; None if it is not one."""
    raw = annotations.get(SCALE + key, str(default))
    return int(raw) if isinstance(raw, str) and re.fullmatch(r"[0-9]+", raw) else None


def _check_service(spec: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    template = _map(spec.get("template"))
    pod = _map(template.get("spec"))
    containers = pod.get("containers")
    if not isinstance(containers, list) or len(containers) != 1 or not _map(containers[0]):
        return ["needs exactly one container in spec.template.spec.containers"]
    container, problems = containers[0], []
    if not _text(container.get("image")):
        problems.append("set the container's image (spec.template.spec.containers[0].image)")
    target = _function_target(container)
    if target not in TARGETS:
        problems.append(
            f"container env FUNCTION_TARGET is {target!r}; use ingest, aggregate or finalize"
        )
    annotations = _map(_map(template.get("metadata")).get("annotations"))
    for key in ("min-scale", "max-scale"):
        if _scale(annotations, key, 0) is None:
            raw = annotations[SCALE + key]
            problems.append(f'annotation {SCALE}{key} is {raw!r}; use an integer string >= 0: "0"')
    raw = annotations.get(SCALE + "target", "100")
    if not isinstance(raw, str) or not re.fullmatch(_NUMBER, raw) or float(raw) <= 0:
        problems.append(f'annotation {SCALE}target is {raw!r}; use a positive number string: "10"')
    low, high = _scale(annotations, "min-scale", 0), _scale(annotations, "max-scale", 0)
    if low is not None and high and low > high:
        problems.append(f"min-scale {low} > max-scale {high}; lower min-scale (max 0: unlimited)")
    concurrency = pod.get("containerConcurrency", 0)
    if not _is_int(concurrency) or concurrency < 0:
        problems.append(f"containerConcurrency {concurrency!r}: use an integer >= 0 (0: unlimited)")
    timeout = pod.get("timeoutSeconds", 300)
    if not _is_int(timeout) or not 1 <= timeout <= 3600:
        problems.append(f"timeoutSeconds {timeout!r}: use an integer from 1 to 3600")
    if target in CLOUDEVENT_TARGETS:
        for probe in ("readinessProbe", "livenessProbe"):
            if "httpGet" in _map(container.get(probe)):
                problems.append(
                    f"{probe} uses httpGet, but the CloudEvent function {target!r} answers only "
                    "POST; remove the probe (Knative's default TCP probe fits)"
                )
    return problems


def _check_destination(dest: Any, where: str, defined: set[tuple[Any, str]]) -> list[str]:
    ref, uri = _map(dest).get("ref"), _map(dest).get("uri")
    if ref is None and not _text(uri):
        return [f"{where} is missing; set {where}.ref (apiVersion, kind, name) or {where}.uri"]
    if ref is None:
        return []
    ref = _map(ref)
    if not all(_text(ref.get(k)) for k in ("apiVersion", "kind", "name")):
        return [f"{where}.ref needs apiVersion, kind and name"]
    ours = (ref["apiVersion"], ref["kind"]) in (SERVICE, KAFKA_SINK)
    if ours and (ref["kind"], ref["name"]) not in defined:
        return [
            f"{where}.ref names {ref['kind']} {ref['name']!r}, which the manifests do not "
            "define; fix the name or add it"
        ]
    return []


def _check_choice(
    block: dict[str, Any], key: str, choices: tuple[str, ...], where: str = "spec"
) -> list[str]:
    if key in block and block[key] not in choices:
        return [f"{where}.{key} is {block[key]!r}; use one of {', '.join(choices)}"]
    return []


def _check_servers(spec: dict[str, Any]) -> list[str]:
    if _texts(spec.get("bootstrapServers")):
        return []
    return ["spec.bootstrapServers must list the Kafka bootstrap servers (host:port)"]


def _check_delivery(delivery: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    problems = []
    retry = delivery.get("retry", 0)
    if not _is_int(retry) or retry < 0:
        problems.append(f"spec.delivery.retry {retry!r}: use an integer >= 0")
    problems += _check_choice(delivery, "backoffPolicy", ("linear", "exponential"), "spec.delivery")
    for key in ("backoffDelay", "timeout"):
        if key not in delivery:
            continue
        try:
            seconds = parse_duration(delivery[key]) if isinstance(delivery[key], str) else None
        except ValueError:
            seconds = None
        if seconds is None or (key == "timeout" and seconds <= 0):
            problems.append(
                f"spec.delivery.{key} {delivery[key]!r} is not a valid ISO-8601 duration"
                f"{' above zero' if key == 'timeout' else ''}; write e.g. PT0.2S or PT1M"
            )
    if "deadLetterSink" in delivery:
        where = "spec.delivery.deadLetterSink"
        problems += _check_destination(delivery["deadLetterSink"], where, defined)
    return problems


def _check_kafka_source(spec: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    problems = _check_servers(spec)
    if not _texts(spec.get("topics")):
        problems.append("spec.topics must list at least one topic")
    if not _text(spec.get("consumerGroup")):
        problems.append("set spec.consumerGroup (the Kafka consumer group id)")
    problems += _check_destination(spec.get("sink"), "spec.sink", defined)
    problems += _check_choice(spec, "ordering", ("ordered", "unordered"))
    problems += _check_choice(spec, "initialOffset", ("earliest", "latest"))
    return problems + _check_delivery(_map(spec.get("delivery")), defined)


def _check_ping_source(spec: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    """The schedule loosely: 5 fields of *, */n, n, n-m, n-m/k and lists of them."""
    problems = _check_destination(spec.get("sink"), "spec.sink", defined)
    schedule = spec.get("schedule")
    fields = _CRON_TZ.sub("", schedule, count=1).split() if isinstance(schedule, str) else []
    items = [item for field in fields for item in field.split(",")]
    if len(fields) != 5 or not all(_CRON_ITEM.fullmatch(item) for item in items):
        problems.append(
            f"spec.schedule {schedule!r} is not a 5-field cron schedule "
            '(minute hour day-of-month month day-of-week), e.g. "*/5 * * * *"'
        )
    return problems


def _check_kafka_sink(spec: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    problems = [] if _text(spec.get("topic")) else ["set spec.topic (the Kafka topic to write)"]
    return problems + _check_servers(spec)


_CHECKS: dict[str, Callable[[dict[str, Any], set[tuple[Any, str]]], list[str]]] = {
    "Service": _check_service,
    "KafkaSource": _check_kafka_source,
    "PingSource": _check_ping_source,
    "KafkaSink": _check_kafka_sink,
}


def _check_kustomization(path: Path) -> list[str]:
    """Its resources exist, and every manifest here is one: the cluster and the local runtime
    must run the same files."""
    file = path / KUSTOMIZATION
    if not file.is_file():
        return [f"{file} is missing; add one that lists the manifests under resources"]
    try:
        resources = _map(yaml.safe_load(file.read_text())).get("resources")
    except (OSError, yaml.YAMLError) as exc:
        return [f"{file}: cannot read it as YAML: {exc}"]
    if not isinstance(resources, list) or not _texts(resources):
        return [f"{file}: list the manifests under resources"]
    problems = [
        f"{file}: resource {r!r} does not exist; fix the path or remove it"
        for r in resources
        if "://" not in r and not (path / r).exists()
    ]
    listed = {(path / r).resolve() for r in resources}
    problems += [
        f"{file}: {p.name} is not listed under resources; kubectl apply -k would skip it"
        for p in sorted(path.glob("*.yaml"))
        if p.name != KUSTOMIZATION and p.resolve() not in listed
    ]
    return problems


# --- platform -------------------------------------------------------------------------------


def _sink_service(doc: Doc, dest: dict[str, Any], services: set[str]) -> str:
    ref = _map(dest.get("ref"))
    if (ref.get("apiVersion"), ref.get("kind")) != SERVICE or ref.get("name") not in services:
        raise ConfigError(f"{_where(doc)}: locally, a sink must be a Service of the manifests")
    return str(ref["name"])


def _service_spec(doc: Doc) -> ServiceSpec:
    template = doc["spec"]["template"]
    pod = template["spec"]
    annotations = _map(_map(template.get("metadata")).get("annotations"))
    return ServiceSpec(
        name=_name(doc),
        function=_function_target(pod["containers"][0]),
        min_scale=_scale(annotations, "min-scale", 0) or 0,
        max_scale=_scale(annotations, "max-scale", 0) or 0,
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
    block = _map(spec.get("delivery"))
    fields: dict[str, Any] = {
        field: parse_duration(block[key]) if key in ("backoffDelay", "timeout") else block[key]
        for key, field in _DELIVERY_FIELDS.items()
        if key in block
    }
    if "deadLetterSink" in block:
        ref = _map(block["deadLetterSink"].get("ref"))
        if (ref.get("apiVersion"), ref.get("kind")) != KAFKA_SINK:
            raise ConfigError(f"{_where(doc)}: locally, a deadLetterSink must be a KafkaSink")
        fields["dead_letter_topic"] = dlq_topics[ref["name"]]
    return SourceSpec(
        name=_name(doc),
        topics=tuple(spec["topics"]),
        consumer_group=spec["consumerGroup"],
        sink=_sink_service(doc, spec["sink"], services),
        ordering=spec.get("ordering", "ordered"),
        initial_offset=spec.get("initialOffset", "latest"),  # Knative's default
        delivery=Delivery(**fields),
    )


if __name__ == "__main__":
    sys.exit(main())
