"""What a schema cannot say about the manifests of knative/: the checks of each kind that the
local runtime and the deployment rely on (function targets, scaling, delivery, sinks, the
kustomization). microfl.local.manifests runs them and builds the local Platform."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from microfl.local.dispatcher import parse_duration

Doc = dict[str, Any]

SERVICE = ("serving.knative.dev/v1", "Service")
KAFKA_SOURCE = ("sources.knative.dev/v1beta1", "KafkaSource")
PING_SOURCE = ("sources.knative.dev/v1", "PingSource")
KAFKA_SINK = ("eventing.knative.dev/v1alpha1", "KafkaSink")
KNOWN = {SERVICE, KAFKA_SOURCE, PING_SOURCE, KAFKA_SINK} | {
    ("v1", kind) for kind in ("ConfigMap", "Secret", "ServiceAccount")
}
API_OF = {kind: api for api, kind in KNOWN}
TARGETS = ("ingest", "aggregate", "finalize", "console")
CLOUDEVENT_TARGETS = ("aggregate", "finalize")  # answer POST only
SCALE = "autoscaling.knative.dev/"
KUSTOMIZATION = "kustomization.yaml"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_NUMBER = r"[0-9]*\.?[0-9]+"
_CRON_ITEM = re.compile(r"(\*|\d+(-\d+)?)(/\d+)?")
_CRON_TZ = re.compile(r"(CRON_TZ|TZ)=\S+\s+")


class Document(dict[str, Any]):
    """A YAML document that remembers its file for messages (copy.deepcopy keeps it)."""

    path: Path | None = None


# --- checks: each returns problems without the "file: Kind name: " prefix -------------------


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def name_of(doc: Doc) -> str:
    name = as_map(doc.get("metadata")).get("name")
    return name if isinstance(name, str) else ""


def where(doc: Doc) -> str:
    path = getattr(doc, "path", None)
    prefix = f"{path}: " if path is not None else ""
    return f"{prefix}{doc.get('kind') or '(no kind)'} {name_of(doc) or '(no name)'}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _texts(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_text(v) for v in value)


def check_document(doc: Doc, defined: set[tuple[Any, str]]) -> list[str]:
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if (api, kind) not in KNOWN:
        if isinstance(kind, str) and kind in API_OF:
            return [f"apiVersion {api!r} is wrong for {kind}; use {API_OF[kind]}"]
        return [f"unknown kind {kind!r} ({api!r}); use one of {', '.join(sorted(API_OF))}"]
    problems = []
    name, pattern = name_of(doc), _LABEL if kind == "Service" else rf"{_LABEL}(\.{_LABEL})*"
    if not re.fullmatch(pattern, name) or len(name) > (63 if kind == "Service" else 253):
        problems.append(f"metadata.name {name!r} must be a DNS-1123 name (a-z, 0-9, '-')")
    check = _CHECKS.get(str(kind))
    return problems + (check(as_map(doc.get("spec")), defined) if check else [])


def function_target(container: dict[str, Any]) -> Any:
    env = container.get("env")
    for var in env if isinstance(env, list) else []:
        if as_map(var).get("name") == "FUNCTION_TARGET":
            return var.get("value")
    return None


def scale_of(annotations: dict[str, Any], key: str, default: int) -> int | None:
    """An annotation's non-negative integer; None if it is not one."""
    raw = annotations.get(SCALE + key, str(default))
    return int(raw) if isinstance(raw, str) and re.fullmatch(r"[0-9]+", raw) else None


def _check_service(spec: dict[str, Any], defined: set[tuple[Any, str]]) -> list[str]:
    template = as_map(spec.get("template"))
    pod = as_map(template.get("spec"))
    containers = pod.get("containers")
    if not isinstance(containers, list) or len(containers) != 1 or not as_map(containers[0]):
        return ["needs exactly one container in spec.template.spec.containers"]
    container, problems = containers[0], []
    if not _text(container.get("image")):
        problems.append("set the container's image (spec.template.spec.containers[0].image)")
    target = function_target(container)
    if target not in TARGETS:
        problems.append(
            f"container env FUNCTION_TARGET is {target!r}; use ingest, aggregate, finalize or "
            "console"
        )
    annotations = as_map(as_map(template.get("metadata")).get("annotations"))
    for key in ("min-scale", "max-scale"):
        if scale_of(annotations, key, 0) is None:
            raw = annotations[SCALE + key]
            problems.append(f'annotation {SCALE}{key} is {raw!r}; use an integer string >= 0: "0"')
    raw = annotations.get(SCALE + "target", "100")
    if not isinstance(raw, str) or not re.fullmatch(_NUMBER, raw) or float(raw) <= 0:
        problems.append(f'annotation {SCALE}target is {raw!r}; use a positive number string: "10"')
    low, high = scale_of(annotations, "min-scale", 0), scale_of(annotations, "max-scale", 0)
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
            if "httpGet" in as_map(container.get(probe)):
                problems.append(
                    f"{probe} uses httpGet, but the CloudEvent function {target!r} answers only "
                    "POST; remove the probe (Knative's default TCP probe fits)"
                )
    return problems


def _check_destination(dest: Any, where: str, defined: set[tuple[Any, str]]) -> list[str]:
    ref, uri = as_map(dest).get("ref"), as_map(dest).get("uri")
    if ref is None and not _text(uri):
        return [f"{where} is missing; set {where}.ref (apiVersion, kind, name) or {where}.uri"]
    if ref is None:
        return []
    ref = as_map(ref)
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
    return problems + _check_delivery(as_map(spec.get("delivery")), defined)


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


def check_kustomization(path: Path) -> list[str]:
    """Its resources exist, and every manifest here is one: the cluster and the local runtime
    must run the same files."""
    file = path / KUSTOMIZATION
    if not file.is_file():
        return [f"{file} is missing; add one that lists the manifests under resources"]
    try:
        resources = as_map(yaml.safe_load(file.read_text())).get("resources")
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
