"""knative/ and its Pub/Sub overlay infra/knative-pubsub/ rendered for GKE exactly as `make
deploy` renders them, passing the manifest check of the local runtime (offline: the tools of
`make infra-tools`, a missing one fails the test)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra_hcl import (
    KNATIVE,
    KNATIVE_PUBSUB,
    REPO,
    SERVICES,
    TERRAFORM,
    block,
    hcl_value,
    resource,
    run,
    seconds,
    terraform,
    terraform_tree,
    tool,
)
from microfl.local.manifests import (
    check_documents,
    load_documents,
    load_platform,
    platform_from_documents,
)

tf = pytest.fixture(scope="module")(terraform_tree)


# --- knative/ rendered for GKE ------------------------------------------------------------

TEMPLATE = TERRAFORM / "templates" / "knative-gke.kustomization.yaml.tftpl"
# What outputs.tf gives the template for a cluster of project test-project with domain
# fl.example.com: with event_bus = "kafka", and with "pubsub".
GKE = {
    "event_bus": "kafka",
    "bucket": "test-project-microfl",
    "kafka_bootstrap": "microfl-kafka-bootstrap.kafka.svc.cluster.local:9092",
    "project_id": "test-project",
    "pusher_service_account": "",
    "aggregate_push_audience": "https://microfl-aggregate.microfl.fl.example.com/",
    "finalize_push_audience": "https://microfl-finalize.microfl.fl.example.com/",
    "ingest_service_account": "microfl-ingest@test-project.iam.gserviceaccount.com",
    "aggregate_service_account": "microfl-aggregate@test-project.iam.gserviceaccount.com",
    "finalize_service_account": "microfl-finalize@test-project.iam.gserviceaccount.com",
    "console_service_account": "microfl-console@test-project.iam.gserviceaccount.com",
}
GKE_PUBSUB = GKE | {
    "event_bus": "pubsub",
    "pusher_service_account": "microfl-pusher@test-project.iam.gserviceaccount.com",
}
REGISTRY = "europe-west1-docker.pkg.dev/test-project/microfl/microfl"
Docs = list[dict[str, Any]]


def test_template_gets_every_value_it_names(tf: dict[str, Any]) -> None:
    value = tf["output"]["knative_kustomization"]["value"]  # templatefile("...", {k = v, ...})
    path, _, variables = value.partition(", {")
    assert path.endswith(f'templates/{TEMPLATE.name}"')
    given = dict(re.findall(r"(\w+) = (.+?)(?=, \w+ = |\}\)\}$)", variables))
    text = TEMPLATE.read_text()
    named = set(re.findall(r"\$\{(\w+)\}", text)) | set(re.findall(r"%\{ *if (\w+)", text))
    assert named == set(given) == set(GKE)
    # The push settings are pubsub.tf's, for the overlay's microfl-push ConfigMap.
    assert given["event_bus"] == "var.event_bus"
    assert given["aggregate_push_audience"] == 'local.push_endpoints["aggregate"]'
    assert given["finalize_push_audience"] == 'local.push_endpoints["finalize"]'
    assert "google_service_account.pusher[0].email" in given["pusher_service_account"]


def render_template(values: dict[str, str], workdir: Path) -> str:
    """templatefile() of the template, evaluated by Terraform itself (a configuration without
    providers needs no `terraform init`, so this runs offline)."""
    workdir.mkdir()
    (workdir / "main.tf").write_text(
        'variable "values" {\n  type = map(string)\n}\n'
        f'output "text" {{\n  value = templatefile({json.dumps(str(TEMPLATE))}, var.values)\n}}\n'
    )
    (workdir / "values.auto.tfvars.json").write_text(json.dumps({"values": values}))
    env = os.environ | {"TF_CLI_CONFIG_FILE": os.devnull, "TF_IN_AUTOMATION": "1"}
    applied = run(
        [terraform(), f"-chdir={workdir}", "apply", "-auto-approve", "-input=false", "-no-color"],
        env=env,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    output = run([terraform(), f"-chdir={workdir}", "output", "-raw", "text"], env=env)
    assert output.returncode == 0, output.stderr
    return output.stdout


def deploy_dry_run(values: dict[str, str], root: Path) -> Docs:
    """`make deploy DRY_RUN=1` in a copy of the checkout, with a stand-in for `terraform output`
    that prints what the real one would for a cluster (the template rendered with values)."""
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copytree(KNATIVE, root / "knative")
    shutil.copytree(KNATIVE_PUBSUB, root / "infra" / "knative-pubsub")
    (root / "kustomization.out").write_text(render_template(values, root / "template"))
    fake = root / "terraform"
    fake.write_text(
        "#!/bin/sh\n# terraform -chdir=infra/terraform output -raw NAME\n"
        f'case "$4" in\n  knative_kustomization) cat {root / "kustomization.out"} ;;\n'
        f"  image_repository) echo {REGISTRY} ;;\n  *) exit 1 ;;\nesac\n"
    )
    fake.chmod(0o755)
    done = run(
        [
            "make",
            "-s",
            "deploy",
            "DRY_RUN=1",
            f"TF={fake}",
            f"KUSTOMIZE={tool('kustomize')}",
            "IMAGE_TAG=0123abcd",
        ],
        cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: Docs) -> dict[str, dict[str, dict[str, Any]]]:
    """docs[kind][name]."""
    kinds: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for doc in docs:
        kinds[doc["kind"]][doc["metadata"]["name"]] = doc
    return kinds


def env_of(service: dict[str, Any], docs: Docs) -> dict[str, str]:
    """A Service's container env as the pod gets it: literal values, and configMapKeyRef values
    looked up in the rendered ConfigMaps (envFrom left out)."""
    maps = by_kind(docs)["ConfigMap"]
    [container] = service["spec"]["template"]["spec"]["containers"]
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]]["data"][ref["key"]]
    return env


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    return deploy_dry_run(GKE, tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def rendered_pubsub(tmp_path_factory: pytest.TempPathFactory) -> Docs:
    return deploy_dry_run(GKE_PUBSUB, tmp_path_factory.mktemp("deploy-pubsub"))


def test_rendered_for_gke_passes_the_manifest_check(rendered: Docs, rendered_pubsub: Docs) -> None:
    for docs in (rendered, rendered_pubsub):
        assert check_documents(docs) == []
        platform = platform_from_documents(docs)
        assert {s.function for s in platform.services} == SERVICES
    pubsub = platform_from_documents(rendered_pubsub)
    assert pubsub.sources == () and pubsub.ping is None


def test_rendered_for_gke_has_the_cluster_values(rendered: Docs, rendered_pubsub: Docs) -> None:
    for docs in (rendered, rendered_pubsub):
        kinds = by_kind(docs)
        for doc in docs:
            assert doc["metadata"]["namespace"] == "microfl", doc["metadata"]
        assert "Secret" not in kinds, (
            "make deploy creates the secret; the example must not be applied"
        )
        for service in kinds["Service"].values():
            [container] = service["spec"]["template"]["spec"]["containers"]
            assert container["image"] == f"{REGISTRY}:0123abcd"
        for account in kinds["ServiceAccount"].values():
            function = account["metadata"]["name"].removeprefix("microfl-")
            assert account["metadata"]["annotations"] == {
                "iam.gke.io/gcp-service-account": GKE[f"{function}_service_account"]
            }
    kinds = by_kind(rendered)
    assert kinds["ConfigMap"]["microfl-config"]["data"] == {
        "MICROFL_STORE": f"gs://{GKE['bucket']}",
        "MICROFL_KAFKA_BOOTSTRAP": GKE["kafka_bootstrap"],
    }
    assert set(kinds["KafkaSource"]) == {"microfl-aggregate", "microfl-finalize"}
    for doc in [*kinds["KafkaSource"].values(), *kinds["KafkaSink"].values()]:
        assert doc["spec"]["bootstrapServers"] == [GKE["kafka_bootstrap"]], doc["metadata"]


def test_rendered_for_gke_with_pubsub_has_the_push_settings(
    rendered: Docs, rendered_pubsub: Docs
) -> None:
    kinds = by_kind(rendered_pubsub)
    assert eventing_objects(rendered_pubsub) == set()
    assert kinds["ConfigMap"]["microfl-config"]["data"] == {
        "MICROFL_STORE": f"gs://{GKE['bucket']}",
        "MICROFL_BUS": "pubsub",
        "MICROFL_PUBSUB_PROJECT": GKE_PUBSUB["project_id"],
    }
    for function in ("aggregate", "finalize"):
        env = env_of(kinds["Service"][f"microfl-{function}"], rendered_pubsub)
        assert env["MICROFL_PUSH_AUDIENCE"] == GKE_PUBSUB[f"{function}_push_audience"]
        assert env["MICROFL_PUSH_INVOKER"] == GKE_PUBSUB["pusher_service_account"]
    ingest = kinds["Service"]["microfl-ingest"]
    assert ingest == by_kind(rendered)["Service"]["microfl-ingest"]
    assert "MICROFL_PUSH_AUDIENCE" not in env_of(ingest, rendered_pubsub)


# --- infra/knative-pubsub/: knative/ with Pub/Sub instead of Kafka ------------------------------

VISIBILITY = "networking.knative.dev/visibility"


def eventing_objects(docs: Docs) -> set[tuple[str, str]]:
    """(kind, name) of the objects of Knative Eventing's API groups (sources.knative.dev,
    eventing.knative.dev, ...: every *.knative.dev but Serving's)."""
    found = set()
    for doc in docs:
        group = doc["apiVersion"].partition("/")[0]
        if group.endswith(".knative.dev") and group != "serving.knative.dev":
            found.add((doc["kind"], doc["metadata"]["name"]))
    return found


def kustomize_build(path: Path) -> Docs:
    done = run([tool("kustomize"), "build", str(path)])
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def kafka_docs() -> Docs:
    return kustomize_build(KNATIVE)


@pytest.fixture(scope="module")
def pubsub_docs() -> Docs:
    return kustomize_build(KNATIVE_PUBSUB)


def test_pubsub_overlay_passes_the_manifest_check(pubsub_docs: Docs) -> None:
    assert check_documents(pubsub_docs) == []
    platform = platform_from_documents(pubsub_docs)
    assert {s.function for s in platform.services} == SERVICES
    assert platform.sources == () and platform.ping is None


def test_pubsub_overlay_has_no_knative_eventing(kafka_docs: Docs, pubsub_docs: Docs) -> None:
    """No Kafka, and nothing that needs Knative Eventing, which a Pub/Sub cluster does not
    install (infra/terraform/knative.tf): no KafkaSources and KafkaSinks (push subscriptions
    and Pub/Sub's dead-letter topics instead) and no PingSource (Cloud Scheduler instead)."""
    assert {kind for kind, _ in eventing_objects(kafka_docs)} == {
        "KafkaSource",
        "KafkaSink",
        "PingSource",
    }
    assert eventing_objects(pubsub_docs) == set()
    kinds = by_kind(pubsub_docs)
    # The bus and the topics' project; no Kafka bootstrap servers left behind.
    assert kinds["ConfigMap"]["microfl-config"]["data"] == {
        "MICROFL_STORE": "gs://BUCKET",
        "MICROFL_BUS": "pubsub",
        "MICROFL_PUBSUB_PROJECT": "PROJECT_ID",
    }


def test_pubsub_overlay_opens_aggregate_and_finalize_to_checked_pushes_only(
    tf: dict[str, Any], kafka_docs: Docs, pubsub_docs: Docs
) -> None:
    """aggregate and finalize: public routes (Pub/Sub pushes to public HTTPS endpoints only)
    and the OIDC check of each push, for the endpoint and account pubsub.tf sets; otherwise the
    very Services of knative/. ingest unchanged."""
    kafka, pubsub = by_kind(kafka_docs), by_kind(pubsub_docs)
    invoker = (
        f"{tf['variable']['cluster_name']['default']}-pusher@PROJECT_ID.iam.gserviceaccount.com"
    )
    for function in ("aggregate", "finalize"):
        name = f"microfl-{function}"
        base, service = kafka["Service"][name], pubsub["Service"][name]
        assert base["metadata"]["labels"][VISIBILITY] == "cluster-local"  # on Kafka
        assert VISIBILITY not in service["metadata"]["labels"]
        env = env_of(service, pubsub_docs)
        endpoint = hcl_value(tf, tf["locals"]["push_endpoints"][function], "", {})
        assert env["MICROFL_PUSH_AUDIENCE"] == endpoint.replace("${local.domain}", "DOMAIN")
        assert env["MICROFL_PUSH_INVOKER"] == invoker
        assert env_of(base, kafka_docs).items() <= env.items()
        expected = copy.deepcopy(base)
        del expected["metadata"]["labels"][VISIBILITY]
        unpushed = copy.deepcopy(service)
        [container] = unpushed["spec"]["template"]["spec"]["containers"]
        container["env"] = [
            v for v in container["env"] if not v["name"].startswith("MICROFL_PUSH_")
        ]
        assert unpushed == expected
    assert pubsub["Service"]["microfl-ingest"] == kafka["Service"]["microfl-ingest"]


def test_cloud_scheduler_pings_finalize_as_the_ping_source_does(
    tf: dict[str, Any], pubsub_docs: Docs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Pub/Sub finalize refuses every request without the pusher's OIDC token, which
    knative/ping.yaml's PingSource cannot send; pubsub.tf's Cloud Scheduler job sends its ping
    instead: on the same schedule, to finalize, as a CloudEvent finalize sweeps on, with a token
    finalize accepts."""
    from microfl import events
    from microfl import finalize as finalize_service
    from microfl.serde import event_from_http

    [source] = [d for d in load_documents(KNATIVE) if d["kind"] == "PingSource"]
    platform = load_platform(KNATIVE)
    ping, finalize = platform.ping, platform.service("finalize")
    assert ping is not None and ping.sink == finalize.name
    job = resource(tf, "google_cloud_scheduler_job", "deadlines")

    def value(attribute: Any) -> Any:
        return hcl_value(tf, attribute, "", {})

    # When: the PingSource's schedule, which Knative reads in UTC (no spec.timezone).
    assert job["name"] == ping.name
    assert job["schedule"] == ping.schedule
    assert "timezone" not in source["spec"] and job["time_zone"] == "Etc/UTC"
    # Where: finalize's Knative route, where the push subscription delivers too.
    target = block(job["http_target"])
    endpoint = f"https://{finalize.name}.{tf['locals']['namespace']}.${{local.domain}}/"
    assert target["http_method"] == "POST"
    assert value(target["uri"]) == endpoint == value(tf["locals"]["push_endpoints"]["finalize"])
    # What: the PingSource's data, in a binary-mode CloudEvent that finalize decodes as a ping
    # and answers with the sweep.
    body = re.fullmatch(r'\$\{base64encode\(("(?:[^"\\]|\\.)*")\)\}', target["body"])
    assert body, f"the body is not base64encode() of a literal: {target['body']}"
    data = json.loads(body.group(1))
    assert data == source["spec"]["data"]
    headers = {name: value(v) for name, v in target["headers"].items()}
    assert headers["Content-Type"] == source["spec"]["contentType"]
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-source"].endswith(f"/jobs/{job['name']}")
    event = event_from_http(headers, data.encode())
    assert event.type == events.PING and event.data == json.loads(data)
    swept: list[Any] = []
    monkeypatch.setattr(finalize_service, "sweep", swept.append)
    backends = object()
    finalize_service.handle(backends, event)  # type: ignore[arg-type]
    assert swept == [backends]
    # Who: a token for the pusher account with finalize's endpoint as audience, which is what
    # finalize checks (MICROFL_PUSH_INVOKER, MICROFL_PUSH_AUDIENCE from the microfl-push
    # ConfigMap; outputs.tf fills it from the same local.push_endpoints).
    oidc = block(target["oidc_token"])
    assert oidc["service_account_email"] == "${google_service_account.pusher[0].email}"
    assert value(oidc["audience"]) == endpoint
    env = env_of(by_kind(pubsub_docs)["Service"][finalize.name], pubsub_docs)
    assert env["MICROFL_PUSH_AUDIENCE"] == endpoint.replace("${local.domain}", "DOMAIN")
    # How long: no attempt cut off while finalize may still be sweeping (within Scheduler's 30
    # minutes for HTTP targets); a few retries, each before the next ping would come anyway.
    assert finalize.timeout_seconds <= seconds(job["attempt_deadline"]) <= 1800
    retry = block(job["retry_config"])
    assert 1 <= retry["retry_count"] <= 5
    assert seconds(retry["min_backoff_duration"]) <= seconds(retry["max_backoff_duration"]) < 60
    # Scheduler's service agent may sign the pusher's tokens, as Pub/Sub's may, before the job
    # first runs; its API is among those the project must enable.
    grant = resource(tf, "google_service_account_iam_member", "scheduler_token_creator")
    assert grant["role"] == "roles/iam.serviceAccountTokenCreator"
    assert grant["service_account_id"] == "${google_service_account.pusher[0].name}"
    assert grant["member"] == "${local.scheduler_agent}"
    number = "${data.google_project.current[0].number}"
    agent = f"serviceAccount:service-{number}@gcp-sa-cloudscheduler.iam.gserviceaccount.com"
    assert tf["locals"]["scheduler_agent"] == f'${{local.pubsub_bus ? "{agent}" : ""}}'
    assert job["depends_on"] == ["${google_service_account_iam_member.scheduler_token_creator}"]
    assert "cloudscheduler" in tf["variable"]["project_id"]["description"]
