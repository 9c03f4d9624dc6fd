"""The Chaos Mesh experiments of load/chaos/ are valid Chaos Mesh resources aimed at our own.

Schema: every resource is validated against the openAPIV3Schema of its kind's CustomResource-
Definition, vendored from Chaos Mesh into load/chaos/schema/ (see load/chaos/README.md), the way
the API server does with strict field validation: an unknown field is an error unless the schema
preserves unknown fields, `x-kubernetes-int-or-string` takes an integer or a string, `nullable`
takes null. Then the rules of Chaos Mesh's admission webhook that a schema cannot express
(api/v1alpha1/*_webhook.go: workflow structure, durations, modes). Then that every selector
names our namespaces, Knative Services (knative/) and Strimzi cluster (infra/terraform/kafka.tf),
and that the experiments cover the faults of the scenario."""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

import crd_schema
from crd_schema import load_crds, structural_to_json_schema

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT / "load" / "chaos"
SCHEMAS = CHAOS / "schema"
API_VERSION = "chaos-mesh.org/v1alpha1"

# Vendored CRDs, unchanged from github.com/chaos-mesh/chaos-mesh config/crd/bases/ at
# v0.9.1-0.20260902003049-47411975a8cb (load/chaos/README.md says why this version).
VENDORED = {
    "chaos-mesh.org_podchaos.yaml": (
        "60b1a4aca7588b8e14768f4868e5b348475dfc2cbe47707ef38269860f220396"
    ),
    "chaos-mesh.org_networkchaos.yaml": (
        "d151d3d38cfb4e906df457a2927a8bad8872241655b0267e08e3315b1b615974"
    ),
    "chaos-mesh.org_stresschaos.yaml": (
        "db0c878183757ac240de8ddf2e616b8bb66830bfad2f4b8328fe29d4e1588847"
    ),
    "chaos-mesh.org_workflows.yaml": (
        "4892418247ccea8f76210f3790387d2ef83630e76285acdcfdf99ba61e0bb884"
    ),
}
# A Workflow template of a chaos type carries its spec under this field (Template.EmbedChaos).
EMBEDDED = {"PodChaos": "podChaos", "NetworkChaos": "networkChaos", "StressChaos": "stressChaos"}
FLOW_TYPES = {"Serial", "Parallel", "Suspend"}
_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


# --- the CRDs as JSON Schema ----------------------------------------------------------------


@functools.cache
def crds() -> dict[tuple[str, str], Draft7Validator]:
    """(apiVersion, kind) -> a validator for resources of that kind and served version."""
    return load_crds(SCHEMAS)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return crd_schema.schema_errors(crds(), doc)


def experiments() -> list[tuple[str, int, dict[str, Any]]]:
    docs = []
    for path in sorted(CHAOS.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((path.name, i, doc))
    return docs


EXPERIMENTS = experiments()
IDS = [f"{name}#{i}:{doc['metadata']['name']}" for name, i, doc in EXPERIMENTS]


def seconds(duration: str) -> float:
    assert _GO_DURATION.fullmatch(duration), f"{duration!r} is not a Go duration (e.g. 3m, 30s)"
    return sum(
        float(n) * _UNIT_SECONDS[unit]
        for n, unit in re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", duration)
    )


def chaos_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind, chaos spec, where it sits) for a chaos resource or each chaos node of a Workflow."""
    if doc["kind"] != "Workflow":
        yield doc["kind"], doc["spec"], doc
        return
    for template in doc["spec"]["templates"]:
        if template["templateType"] in EMBEDDED:
            yield template["templateType"], template[EMBEDDED[template["templateType"]]], template


def selectors(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield spec["selector"]
    if "target" in spec:
        yield spec["target"]["selector"]


def label_requirements(selector: dict[str, Any]) -> dict[str, set[str]]:
    """label -> the values a selected pod may have, from labelSelectors and `In` expressions."""
    wanted = {k: {v} for k, v in selector.get("labelSelectors", {}).items()}
    for expr in selector.get("expressionSelectors", []):
        assert expr["operator"] == "In", f"only In expressions are used here: {expr}"
        wanted[expr["key"]] = set(expr["values"])
    return wanted


# --- schema -----------------------------------------------------------------------------------


def test_vendored_crds_are_unchanged_and_licensed() -> None:
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SCHEMAS.glob("*.yaml")}
    assert found == VENDORED
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()
    assert {kind for _, kind in crds()} == {"PodChaos", "NetworkChaos", "StressChaos", "Workflow"}


@pytest.mark.parametrize(("path", "index", "doc"), EXPERIMENTS, ids=IDS)
def test_experiment_is_valid_against_its_crd(path: str, index: int, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == API_VERSION
    assert (doc["apiVersion"], doc["kind"]) in crds(), f"{path}: no CRD vendored for {doc['kind']}"
    assert schema_errors(doc) == []


def test_the_validator_catches_mistakes() -> None:
    """Without this, a converter that accepted everything would pass the test above."""
    pod_kill = next(d for _, _, d in EXPERIMENTS if d["kind"] == "PodChaos")
    workflow = next(d for _, _, d in EXPERIMENTS if d["kind"] == "Workflow")
    network = next(d for _, _, d in EXPERIMENTS if d["kind"] == "NetworkChaos")

    def broken(doc: dict[str, Any], change: Any) -> list[str]:
        doc = copy.deepcopy(doc)
        change(doc)
        return schema_errors(doc)

    assert broken(pod_kill, lambda d: d["spec"].update(acton="pod-kill"))  # unknown field
    assert broken(pod_kill, lambda d: d["spec"].update(action="pod-explode"))  # not in the enum
    assert broken(pod_kill, lambda d: d["spec"].pop("selector"))  # required
    assert broken(pod_kill, lambda d: d["spec"].update(gracePeriod="0"))  # wrong type
    assert broken(pod_kill, lambda d: d["spec"]["selector"].update(labelSelector={}))
    assert broken(network, lambda d: d["spec"].update(direction="sideways"))
    assert broken(workflow, lambda d: d["spec"]["templates"][0].update(child=["x"]))
    assert broken(workflow, lambda d: d["spec"].pop("entry"))
    assert broken(
        workflow,
        lambda d: next(t for t in d["spec"]["templates"] if "podChaos" in t)["podChaos"].update(
            actions="pod-kill"
        ),
    )
    # int-or-string and nullable are honoured, not refused.
    assert structural_to_json_schema({"x-kubernetes-int-or-string": True})["anyOf"]
    assert structural_to_json_schema({"type": "string", "nullable": True})["type"] == [
        "string",
        "null",
    ]


# --- what Chaos Mesh's admission webhook checks beyond the schema -------------------------


@pytest.mark.parametrize(("path", "index", "doc"), EXPERIMENTS, ids=IDS)
def test_experiment_passes_the_webhook_rules(path: str, index: int, doc: dict[str, Any]) -> None:
    meta = doc["metadata"]
    assert _DNS1123.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    if doc["kind"] == "Workflow":
        check_workflow(doc["spec"])
    for kind, spec, where in chaos_specs(doc):
        in_workflow = where is not doc
        if in_workflow:
            assert "duration" not in spec, (
                f"{where['name']}: a Workflow node lasts its deadline; Chaos Mesh refuses a "
                "duration in the embedded chaos"
            )
        else:  # a standalone fault must end by itself (pod-kill is one instantaneous action)
            if not (kind == "PodChaos" and spec["action"] == "pod-kill"):
                assert seconds(spec["duration"]) > 0, f"{meta['name']}: give it a duration"
        for sel_owner in (spec, spec.get("target", {})):
            mode = sel_owner.get("mode")
            if mode in ("fixed", "fixed-percent", "random-max-percent"):
                assert int(sel_owner["value"]) > 0
                assert mode == "fixed" or int(sel_owner["value"]) <= 100
        if kind == "PodChaos" and spec["action"] == "container-kill":
            assert spec.get("containerNames")
        if kind == "StressChaos":
            assert spec["stressors"].get("cpu") or spec["stressors"].get("memory")
        if kind == "NetworkChaos" and spec["direction"] in ("from", "both"):
            assert "target" in spec, "direction from/both needs a target"


def check_workflow(spec: dict[str, Any]) -> None:
    templates = {t["name"]: t for t in spec["templates"]}
    assert len(templates) == len(spec["templates"]), "template names must be unique"
    assert spec["entry"] in templates
    for name, t in templates.items():
        assert _DNS1123.fullmatch(name), name
        kind = t["templateType"]
        assert kind in FLOW_TYPES or kind in EMBEDDED, f"{name}: templateType {kind}"
        embedded = {field for field in EMBEDDED.values() if field in t}
        if kind == "Suspend":
            assert seconds(t["deadline"]) > 0 and not embedded and not t.get("children")
        elif kind in ("Serial", "Parallel"):
            assert t["children"] and not embedded
            assert all(child in templates for child in t["children"]), name
        else:
            assert embedded == {EMBEDDED[kind]}, f"{name}: {kind} needs {EMBEDDED[kind]} only"
            assert seconds(t["deadline"]) > 0, f"{name}: a fault in a Workflow needs a deadline"
    # Every template is reached from the entry, and no template contains itself.
    reached: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle through {name}"
        reached.add(name)
        for child in templates[name].get("children", []):
            visit(child, (*path, name))

    visit(spec["entry"], ())
    assert reached == set(templates), f"unused templates: {set(templates) - reached}"


# --- aimed at our resources ---------------------------------------------------------------


def knative_services() -> tuple[str, set[str]]:
    docs = [
        d
        for p in sorted((ROOT / "knative").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    namespace = next(d["namespace"] for d in docs if d["kind"] == "Kustomization")
    services = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Service" and d["apiVersion"].startswith("serving.knative.dev/")
    }
    return namespace, services


def strimzi_cluster() -> dict[str, str]:
    tf = (ROOT / "infra" / "terraform" / "kafka.tf").read_text()

    def local(name: str) -> str:
        match = re.search(rf'^\s*{name}\s*=\s*"([^"]+)"', tf, re.M)
        assert match, f"infra/terraform/kafka.tf has no {name}"
        return match.group(1)

    # A node pool is the quoted name followed, before the next name, by its broker role.
    names = list(re.finditer(r'\bname\s*=\s*"([^"]+)"', tf))
    pools = [
        m.group(1)
        for m, nxt in zip(names, [*names[1:], None], strict=True)
        if re.search(r'\broles?\s*=\s*\[?\s*"broker"', tf[m.end() : nxt.start() if nxt else None])
    ]
    assert len(pools) == 1, f"infra/terraform/kafka.tf: broker node pools {pools}"
    return {
        "namespace": local("kafka_namespace"),
        "cluster": local("kafka_cluster"),
        "pool": pools[0],
    }


def test_selectors_name_our_services_and_kafka_brokers() -> None:
    namespace, services = knative_services()
    kafka = strimzi_cluster()
    # The experiments aim at the functions; the console (read-only, for admins) is left alone.
    functions = {"microfl-ingest", "microfl-aggregate", "microfl-finalize"}
    assert services == functions | {"microfl-console"}
    for path, _, doc in EXPERIMENTS:
        assert doc["metadata"]["namespace"] in (namespace, kafka["namespace"]), path
        for _, spec, _ in chaos_specs(doc):
            for selector in selectors(spec):
                labels = label_requirements(selector)
                assert labels, f"{path}: a selector without labels would hit a whole namespace"
                if "serving.knative.dev/service" in labels:
                    assert selector["namespaces"] == [namespace], path
                    assert labels["serving.knative.dev/service"] <= services, path
                else:
                    assert selector["namespaces"] == [kafka["namespace"]], path
                    assert labels["strimzi.io/cluster"] == {kafka["cluster"]}, path
                    assert labels["strimzi.io/broker-role"] == {"true"}, path
                    assert labels.get("strimzi.io/pool-name", {kafka["pool"]}) == {kafka["pool"]}


def _is_broker_failure(kind: str, spec: dict[str, Any]) -> bool:
    return (
        kind == "PodChaos"
        and spec["action"] == "pod-failure"
        and spec["mode"] == "one"
        and "strimzi.io/cluster" in spec["selector"].get("labelSelectors", {})
    )


def test_the_experiments_cover_the_scenario() -> None:
    standalone = [(k, s) for _, _, d in EXPERIMENTS if d["kind"] != "Workflow"
                  for k, s, _ in chaos_specs(d)]  # fmt: skip
    killed = {
        svc
        for k, s in standalone
        if k == "PodChaos" and s["action"] == "pod-kill"
        for svc in label_requirements(s["selector"])["serving.knative.dev/service"]
    }
    functions = knative_services()[1] - {"microfl-console"}  # the console holds no work
    assert killed == functions, "a pod-kill for every function"
    assert any(_is_broker_failure(k, s) and seconds(s["duration"]) >= 60 for k, s in standalone)
    actions = {s["action"] for k, s in standalone if k == "NetworkChaos"}
    assert actions == {"delay", "partition"}
    stress = [s for k, s in standalone if k == "StressChaos"]
    assert stress and all(
        label_requirements(s["selector"])["serving.knative.dev/service"] == {"microfl-aggregate"}
        and {"cpu", "memory"} <= set(s["stressors"])
        for s in stress
    )

    # The Workflow: the broker failure for minutes at three points, the other faults between.
    order = flatten(workflow("microfl-paper-scenario"))
    broker_at = [
        i
        for i, t in enumerate(order)
        if t["templateType"] == "PodChaos" and _is_broker_failure("PodChaos", t["podChaos"])
    ]
    assert len(broker_at) >= 3
    assert all(seconds(order[i]["deadline"]) >= 60 for i in broker_at)
    assert all(b - a > 1 for a, b in zip(broker_at, broker_at[1:], strict=False))
    kinds = {(t["templateType"], t[EMBEDDED[t["templateType"]]].get("action", "stress"))
             for t in order if t["templateType"] in EMBEDDED}  # fmt: skip
    assert kinds >= {("PodChaos", "pod-kill"), ("PodChaos", "pod-failure"),
                     ("NetworkChaos", "delay"), ("NetworkChaos", "partition"),
                     ("StressChaos", "stress")}  # fmt: skip
    assert order[0]["templateType"] == "Suspend", "let the load settle before the first fault"


def workflow(name: str) -> dict[str, Any]:
    return next(d for _, _, d in EXPERIMENTS if d["metadata"]["name"] == name)["spec"]


def flatten(spec: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
    """A Workflow's leaf templates in the order they run (Serial and Parallel nodes opened)."""
    t = {t["name"]: t for t in spec["templates"]}[name or spec["entry"]]
    if t["templateType"] in ("Serial", "Parallel"):
        return [leaf for child in t["children"] for leaf in flatten(spec, child)]
    return [t]


def test_the_paper_schedule_takes_one_broker_down_at_20_40_60_80_percent() -> None:
    """load/chaos/paper-schedule.yaml, the schedule `microfl paper` runs locally: a broker pod
    failure of minutes starting at 20/40/60/80 % of the run, never two at once, nothing else."""
    spec = workflow("microfl-paper-broker-failures")
    order = flatten(spec)
    assert spec["templates"][0]["templateType"] == "Serial"
    total = sum(seconds(t["deadline"]) for t in order)
    assert total <= seconds(spec["templates"][0]["deadline"]), "the Serial deadline cuts it short"
    starts, elapsed = [], 0.0
    for t in order:
        if t["templateType"] != "Suspend":
            assert _is_broker_failure(t["templateType"], t[EMBEDDED[t["templateType"]]]), t["name"]
            assert seconds(t["deadline"]) >= 60
            starts.append(elapsed / total)
        elapsed += seconds(t["deadline"])
    assert starts == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=0.01)
    kinds = [t["templateType"] for t in order]
    assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False)), "faults never adjoin"
