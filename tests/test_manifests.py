"""The shipped knative/ manifests pass the check and describe the expected platform; each kind of
malformation is caught with a message that names the problem."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from microfl.errors import ConfigError
from microfl.events import PARTIAL_READY, PARTIAL_REQUESTED, TOPICS, UPDATE_ACCEPTED
from microfl.local.dispatcher import Delivery
from microfl.local.manifests import (
    PingSpec,
    ServiceSpec,
    check_directory,
    check_documents,
    load_documents,
    load_platform,
    main,
    platform_from_documents,
)

KNATIVE = Path(__file__).resolve().parents[1] / "knative"
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def shipped() -> Docs:
    return load_documents(KNATIVE)


def find(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod(docs: Docs, name: str) -> dict[str, Any]:
    return find(docs, "Service", name)["spec"]["template"]["spec"]


def annotations(docs: Docs, name: str) -> dict[str, Any]:
    return find(docs, "Service", name)["spec"]["template"]["metadata"]["annotations"]


def test_shipped_directory_passes() -> None:
    assert check_directory(KNATIVE) == []
    assert main([str(KNATIVE)]) == 0


def test_shipped_platform() -> None:
    platform = load_platform(KNATIVE)
    assert {s.function: s for s in platform.services} == {
        "ingest": ServiceSpec("microfl-ingest", "ingest", 0, 10, 50.0, 100, 60),
        "aggregate": ServiceSpec("microfl-aggregate", "aggregate", 1, 4, 1.0, 1, 300),
        "finalize": ServiceSpec("microfl-finalize", "finalize", 0, 2, 4.0, 8, 300),
        "console": ServiceSpec("microfl-console", "console", 0, 1, 20.0, 20, 60),
    }
    sources = {s.name: s for s in platform.sources}
    assert set(sources) == {"microfl-aggregate", "microfl-finalize"}
    for name, ordering in (("microfl-aggregate", "unordered"), ("microfl-finalize", "ordered")):
        source = sources[name]
        assert source.topics == (name.replace("-", "."),)
        assert (source.consumer_group, source.sink) == (name, name)
        assert (source.ordering, source.initial_offset) == (ordering, "earliest")
        assert source.delivery == Delivery(10, "exponential", 0.2, 300.0, f"{source.topics[0]}.dlq")
    assert platform.ping == PingSpec("microfl-deadlines", "* * * * *", "microfl-finalize")
    assert platform.service("aggregate") is platform.service("microfl-aggregate")


def test_events_reach_the_function_that_handles_them() -> None:
    """events.TOPICS and the KafkaSources agree: each event type's topic feeds its function."""
    platform = load_platform(KNATIVE)
    consumer = {
        topic: platform.service(source.sink).function
        for source in platform.sources
        for topic in source.topics
    }
    assert consumer[TOPICS[PARTIAL_REQUESTED]] == "aggregate"
    assert consumer[TOPICS[UPDATE_ACCEPTED]] == consumer[TOPICS[PARTIAL_READY]] == "finalize"


def test_documents_remember_their_file(shipped: Docs) -> None:
    docs = copy.deepcopy(shipped)
    del find(docs, "KafkaSource", "microfl-finalize")["spec"]["topics"]
    [problem] = check_documents(docs)
    assert problem.startswith(f"{KNATIVE / 'sources.yaml'}: KafkaSource microfl-finalize: ")


def _set(value: Any, *path: str | int) -> Callable[[Docs], None]:
    """A mutation: the shipped document (kind, name) gets `value` at the rest of `path`."""
    kind, name, *keys = path

    def mutate(docs: Docs) -> None:
        node: Any = find(docs, str(kind), str(name))
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


_DELETE = object()
_ANNOTATIONS = ("spec", "template", "metadata", "annotations")
_SCALE = "autoscaling.knative.dev/"
_AGGREGATE = ("Service", "microfl-aggregate")
_AGG_SOURCE = ("KafkaSource", "microfl-aggregate")
_AGG_CONTAINER = (*_AGGREGATE, "spec", "template", "spec", "containers", 0)


def _add_document(docs: Docs) -> None:
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "extra"}})


MALFORMED: dict[str, tuple[Callable[[Docs], None], str]] = {
    "wrong apiVersion": (
        _set("serving.knative.dev/v1alpha1", "Service", "microfl-ingest", "apiVersion"),
        "Service microfl-ingest: apiVersion 'serving.knative.dev/v1alpha1' is wrong",
    ),
    "unknown kind": (_add_document, "Deployment extra: unknown kind 'Deployment'"),
    "kind typo": (
        _set("KafkaSinc", "KafkaSink", "microfl-finalize-dlq", "kind"),
        "unknown kind 'KafkaSinc'",
    ),
    "missing sink": (_set(_DELETE, *_AGG_SOURCE, "spec", "sink"), "spec.sink is missing"),
    "max-scale abc": (
        _set("abc", *_AGGREGATE, *_ANNOTATIONS, _SCALE + "max-scale"),
        "annotation autoscaling.knative.dev/max-scale is 'abc'",
    ),
    "min-scale -1": (
        _set("-1", *_AGGREGATE, *_ANNOTATIONS, _SCALE + "min-scale"),
        "annotation autoscaling.knative.dev/min-scale is '-1'",
    ),
    "min-scale unquoted": (
        _set(1, *_AGGREGATE, *_ANNOTATIONS, _SCALE + "min-scale"),
        "annotation autoscaling.knative.dev/min-scale is 1",
    ),
    "target 0": (
        _set("0", *_AGGREGATE, *_ANNOTATIONS, _SCALE + "target"),
        "annotation autoscaling.knative.dev/target is '0'",
    ),
    "min-scale > max-scale": (
        _set("5", *_AGGREGATE, *_ANNOTATIONS, _SCALE + "min-scale"),
        "min-scale 5 > max-scale 4",
    ),
    "httpGet probe on a CloudEvent service": (
        _set({"httpGet": {"path": "/"}}, *_AGG_CONTAINER, "readinessProbe"),
        "readinessProbe uses httpGet, but the CloudEvent function 'aggregate'",
    ),
    "httpGet liveness probe on a CloudEvent service": (
        _set({"httpGet": {"path": "/"}}, *_AGG_CONTAINER, "livenessProbe"),
        "livenessProbe uses httpGet",
    ),
    "bad backoffDelay": (
        _set("0.2s", *_AGG_SOURCE, "spec", "delivery", "backoffDelay"),
        "spec.delivery.backoffDelay '0.2s' is not a valid ISO-8601 duration",
    ),
    "bad delivery timeout": (
        _set("PT0S", *_AGG_SOURCE, "spec", "delivery", "timeout"),
        "spec.delivery.timeout 'PT0S' is not a valid ISO-8601 duration above zero",
    ),
    "bad backoffPolicy": (
        _set("random", *_AGG_SOURCE, "spec", "delivery", "backoffPolicy"),
        "spec.delivery.backoffPolicy is 'random'; use one of linear, exponential",
    ),
    "negative retry": (
        _set(-1, *_AGG_SOURCE, "spec", "delivery", "retry"),
        "spec.delivery.retry -1",
    ),
    "sink to an undefined Service": (
        _set("microfl-finalise", "KafkaSource", "microfl-finalize", "spec", "sink", "ref", "name"),
        "spec.sink.ref names Service 'microfl-finalise', which the manifests do not define",
    ),
    "dead-letter sink to an undefined KafkaSink": (
        _set("nope", *_AGG_SOURCE, "spec", "delivery", "deadLetterSink", "ref", "name"),
        "spec.delivery.deadLetterSink.ref names KafkaSink 'nope'",
    ),
    "missing topics": (
        _set(_DELETE, *_AGG_SOURCE, "spec", "topics"),
        "KafkaSource microfl-aggregate: spec.topics must list at least one topic",
    ),
    "empty topics": (_set([], *_AGG_SOURCE, "spec", "topics"), "spec.topics must list"),
    "missing consumerGroup": (
        _set(_DELETE, *_AGG_SOURCE, "spec", "consumerGroup"),
        "set spec.consumerGroup",
    ),
    "bad ordering": (
        _set("fifo", *_AGG_SOURCE, "spec", "ordering"),
        "spec.ordering is 'fifo'; use one of ordered, unordered",
    ),
    "bad initialOffset": (
        _set("oldest", *_AGG_SOURCE, "spec", "initialOffset"),
        "spec.initialOffset is 'oldest'",
    ),
    "missing bootstrapServers": (
        _set(_DELETE, *_AGG_SOURCE, "spec", "bootstrapServers"),
        "spec.bootstrapServers must list",
    ),
    "KafkaSink without topic": (
        _set(_DELETE, "KafkaSink", "microfl-aggregate-dlq", "spec", "topic"),
        "KafkaSink microfl-aggregate-dlq: set spec.topic",
    ),
    "cron with 4 fields": (
        _set("* * * *", "PingSource", "microfl-deadlines", "spec", "schedule"),
        "spec.schedule '* * * *' is not a 5-field cron schedule",
    ),
    "cron with a bad field": (
        _set("*/x * * * *", "PingSource", "microfl-deadlines", "spec", "schedule"),
        "spec.schedule '*/x * * * *' is not a 5-field cron schedule",
    ),
    "timeoutSeconds 0": (
        _set(0, *_AGGREGATE, "spec", "template", "spec", "timeoutSeconds"),
        "timeoutSeconds 0: use an integer from 1 to 3600",
    ),
    "timeoutSeconds 3601": (
        _set(3601, *_AGGREGATE, "spec", "template", "spec", "timeoutSeconds"),
        "timeoutSeconds 3601",
    ),
    "timeoutSeconds as a string": (
        _set("60", *_AGGREGATE, "spec", "template", "spec", "timeoutSeconds"),
        "timeoutSeconds '60'",
    ),
    "negative containerConcurrency": (
        _set(-1, *_AGGREGATE, "spec", "template", "spec", "containerConcurrency"),
        "containerConcurrency -1",
    ),
    "unknown FUNCTION_TARGET": (
        _set("train", *_AGG_CONTAINER, "env", 0, "value"),
        "FUNCTION_TARGET is 'train'",
    ),
    "no image": (_set("", *_AGG_CONTAINER, "image"), "set the container's image"),
    "two containers": (
        _set(
            [{"image": "a"}, {"image": "b"}], *_AGGREGATE, "spec", "template", "spec", "containers"
        ),
        "needs exactly one container",
    ),
    "name not DNS-1123": (
        _set("Microfl_Ingest", "Service", "microfl-ingest", "metadata", "name"),
        "metadata.name 'Microfl_Ingest' must be a DNS-1123 name",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed(shipped: Docs, case: str) -> None:
    mutate, expected = MALFORMED[case]
    docs = copy.deepcopy(shipped)
    mutate(docs)
    problems = check_documents(docs)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ConfigError, match="the manifests have problems"):
        platform_from_documents(docs)


def test_duplicate_names(shipped: Docs) -> None:
    docs = copy.deepcopy(shipped)
    docs.append(copy.deepcopy(find(docs, "Service", "microfl-ingest")))
    assert any("Service microfl-ingest: is defined twice" in p for p in check_documents(docs))


def _copy_knative(tmp_path: Path) -> Path:
    target = tmp_path / "knative"
    shutil.copytree(KNATIVE, target)
    return target


def test_directory_needs_its_kustomization(tmp_path: Path) -> None:
    directory = _copy_knative(tmp_path)
    (directory / "kustomization.yaml").unlink()
    assert check_directory(directory) == [
        f"{directory / 'kustomization.yaml'} is missing; add one that lists the manifests "
        "under resources"
    ]


def test_directory_resources_exist_and_are_listed(tmp_path: Path) -> None:
    directory = _copy_knative(tmp_path)
    (directory / "ping.yaml").rename(directory / "deadlines.yaml")
    problems = check_directory(directory)
    assert any("resource 'ping.yaml' does not exist" in p for p in problems), problems
    assert any("deadlines.yaml is not listed under resources" in p for p in problems), problems
    with pytest.raises(ConfigError):
        load_platform(directory)


def test_unreadable_yaml(tmp_path: Path) -> None:
    directory = _copy_knative(tmp_path)
    (directory / "ping.yaml").write_text("kind: [unclosed\n")
    [problem] = check_directory(directory)
    assert problem.startswith(f"{directory / 'ping.yaml'}: cannot read it as YAML")


def test_module_entry_point(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "microfl.local.manifests", str(KNATIVE)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "manifests OK" in ok.stdout
    directory = _copy_knative(tmp_path)
    ping = directory / "ping.yaml"
    ping.write_text(ping.read_text().replace('"* * * * *"', '"every minute"'))
    bad = subprocess.run(
        [sys.executable, "-m", "microfl.local.manifests", str(directory)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "PingSource microfl-deadlines: spec.schedule 'every minute'" in bad.stdout
