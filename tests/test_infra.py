"""infra/terraform checked offline (nothing here reaches a cloud): OpenTofu's formatting,
checkov's static analysis with every skipped check justified, and the cluster, bucket, accounts,
IAM conditions, Kafka and Knative the platform relies on, read from the parsed HCL. The event
buses' resources are in test_infra_events.py, knative/ rendered for GKE in test_infra_knative.py.

The tools come from `make infra-tools` (.cache/bin); a missing tool fails the test, it is not
skipped, so a run that checked nothing cannot pass."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from infra_hcl import (
    FUNCTIONS,
    KNATIVE,
    SERVICES,
    TERRAFORM,
    block,
    hcl_true,
    local,
    plain,
    resource,
    run,
    settings,
    terraform,
    terraform_tree,
    tool,
)
from microfl.events import TOPICS
from microfl.local.manifests import (
    load_documents,
)

tf = pytest.fixture(scope="module")(terraform_tree)


# --- formatting and static analysis -------------------------------------------------------


def test_terraform_is_formatted() -> None:
    """terraform fmt where the machine has terraform, else OpenTofu's (make infra-tools)."""
    name = Path(terraform()).name
    done = run([terraform(), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)])
    assert done.returncode == 0, (
        f"run `.cache/bin/{name} fmt -recursive infra/terraform`:\n{done.stdout}{done.stderr}"
    )


def test_checkov_passes_offline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))}
    done = run(
        [
            tool("checkov"),
            "-d",
            str(TERRAFORM),
            "--framework",
            "terraform",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.search(r"Passed checks: (\d+)", done.stdout)
    assert passed and int(passed.group(1)) > 30, f"checkov checked too little:\n{done.stdout}"


def test_every_skipped_check_is_justified() -> None:
    skips = [
        (path.name, match)
        for path in TERRAFORM.rglob("*.tf")
        for match in re.finditer(r"#\s*checkov:skip=([^\n]*)", path.read_text())
    ]
    assert skips, "expected the documented skips (checkov:skip comments)"
    for name, match in skips:
        check, _, reason = match.group(1).partition(":")
        assert re.fullmatch(r"CKV2?_GCP_\d+", check), f"{name}: {match.group(0)}"
        assert len(reason.split()) >= 8, f"{name}: say why {check} does not apply: {reason!r}"


def test_files_by_concern() -> None:
    for name in (
        "versions.tf",
        "variables.tf",
        "gke.tf",
        "storage.tf",
        "iam.tf",
        "registry.tf",
        "kafka.tf",
        "pubsub.tf",
        "knative.tf",
        "chaos.tf",
        "outputs.tf",
        "backend.tf.example",
    ):
        assert (TERRAFORM / name).is_file(), f"infra/terraform/{name} is missing"


def test_variables_and_outputs(tf: dict[str, Any]) -> None:
    for name, variable in tf["variable"].items():
        assert len(variable.get("description", "")) > 20, f"variable {name}: describe it"
    for name, output in tf["output"].items():
        assert output.get("description"), f"output {name}: describe it"
    assert {"ingest_url", "bucket", "kafka_bootstrap_servers"} <= set(tf["output"])
    assert {"node_machine_type", "node_min_per_zone", "node_max_per_zone"} <= set(tf["variable"])
    bus = tf["variable"]["event_bus"]
    assert bus["default"] == "kafka"
    assert (
        block(bus["validation"])["condition"] == '${contains(["kafka", "pubsub"], var.event_bus)}'
    )


def test_remote_state_example() -> None:
    import hcl2

    backend = plain(hcl2.loads((TERRAFORM / "backend.tf.example").read_text()))
    [settings] = [b["backend"] for b in backend["terraform"]]
    assert set(settings[0]) == {"gcs"} and settings[0]["gcs"]["bucket"]


def test_gke_standard_with_workload_identity(tf: dict[str, Any]) -> None:
    cluster = resource(tf, "google_container_cluster", "microfl")
    assert not cluster.get("enable_autopilot"), "Chaos Mesh needs GKE Standard, not Autopilot"
    assert cluster["remove_default_node_pool"] is True
    assert "svc.id.goog" in block(cluster["workload_identity_config"])["workload_pool"]
    assert block(cluster["private_cluster_config"])["enable_private_nodes"] is True
    pool = resource(tf, "google_container_node_pool", "main")
    scaling = block(pool["autoscaling"])
    assert scaling["min_node_count"] == "${var.node_min_per_zone}"
    assert scaling["max_node_count"] == "${var.node_max_per_zone}"
    node = block(pool["node_config"])
    assert node["machine_type"] == "${var.node_machine_type}"
    assert node["image_type"] == "COS_CONTAINERD"
    assert block(node["workload_metadata_config"])["mode"] == "GKE_METADATA"


def test_bucket_is_private_versioned_and_protected(tf: dict[str, Any]) -> None:
    bucket = resource(tf, "google_storage_bucket", "store")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert block(bucket["versioning"])["enabled"] is True
    assert bucket["force_destroy"] is False
    assert block(bucket["lifecycle"])["prevent_destroy"] is True
    rules = [(block(r["condition"]), block(r["action"])["type"]) for r in bucket["lifecycle_rule"]]
    # Old update objects: the rule keyed to them (customTime, see storage.tf), and the
    # noncurrent versions that deleting them leaves.
    assert ({"days_since_custom_time": "${var.update_retention_days}"}, "Delete") in rules
    assert any("days_since_noncurrent_time" in c and a == "Delete" for c, a in rules)
    # Nothing anywhere grants the public.
    text = "".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    assert "allUsers" not in text and "allAuthenticatedUsers" not in text


def test_one_service_account_per_function_with_least_privilege(tf: dict[str, Any]) -> None:
    functions = tf["locals"]["functions"]
    assert set(functions) == FUNCTIONS
    for rtype, name in (
        ("google_service_account", "function"),
        ("google_service_account_iam_member", "workload_identity"),
        ("google_storage_bucket_iam_member", "read"),
        ("google_storage_bucket_iam_member", "write"),
    ):
        assert resource(tf, rtype, name)["for_each"] == "${local.functions}", f"{rtype}.{name}"
    identity = resource(tf, "google_service_account_iam_member", "workload_identity")
    assert identity["role"] == "roles/iam.workloadIdentityUser"
    assert identity["member"].endswith("svc.id.goog[${local.namespace}/microfl-${each.key}]")
    assert tf["locals"]["namespace"] == "microfl"
    # ...which are the Kubernetes service accounts knative/ runs each function as.
    docs = load_documents(KNATIVE)
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts == {f"microfl-{f}" for f in SERVICES}  # and the console's (read-only)
    for doc in docs:
        if doc["kind"] == "Service":
            pod = doc["spec"]["template"]["spec"]
            target = pod["containers"][0]["env"][0]["value"]
            assert pod["serviceAccountName"] == f"microfl-{target}"

    assert resource(tf, "google_storage_bucket_iam_member", "read")["role"] == (
        "roles/storage.objectViewer"
    )
    write = resource(tf, "google_storage_bucket_iam_member", "write")
    assert write["role"] == "${each.value.role}"
    assert block(write["condition"])["expression"] == (
        '${local.object} && (${join(" || ", each.value.creates)})'
    )
    assert (
        functions["aggregate"]["role"]
        == functions["finalize"]["role"]
        == (
            "roles/storage.objectCreator"  # create, never overwrite: no delete permission
        )
    )
    assert functions["ingest"]["role"] == "${google_project_iam_custom_role.update_writer.id}"
    role = resource(tf, "google_project_iam_custom_role", "update_writer")
    assert set(role["permissions"]) == {"storage.objects.create", "storage.objects.delete"}
    text = "".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    assert not re.search(r"roles/(owner|editor|storage\.admin|storage\.objectAdmin)", text)


def test_console_account_only_reads_the_bucket(tf: dict[str, Any]) -> None:
    """The operator console's Google account: Workload Identity for microfl/microfl-console,
    objectViewer on the bucket, and no other binding anywhere names it."""
    assert "console" not in tf["locals"]["functions"]  # no write condition, no topic
    identity = resource(tf, "google_service_account_iam_member", "console_workload_identity")
    assert identity["service_account_id"] == "${google_service_account.console.name}"
    assert identity["member"].endswith("svc.id.goog[${local.namespace}/microfl-console]")
    read = resource(tf, "google_storage_bucket_iam_member", "console_read")
    assert (read["role"], read["member"]) == (
        "roles/storage.objectViewer",
        "${google_service_account.console.member}",
    )
    text = "".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    assert text.count("google_service_account.console.member") == 1
    assert text.count("google_service_account.console.name") == 1


def cel_extract(name: str, template: str) -> str:
    """IAM's resource.name.extract(): the text between the template's prefix and suffix."""
    prefix, rest = template.split("{", 1)
    suffix = rest.split("}", 1)[1]
    start = name.find(prefix)
    if start < 0:
        return ""
    tail = name[start + len(prefix) :]
    end = tail.find(suffix) if suffix else len(tail)
    return tail[:end] if end >= 0 else ""


def condition(tf: dict[str, Any], function: str) -> Any:
    """The bucket IAM condition of a function's writes, as a predicate on object names: the
    CEL subset iam.tf uses (==, startsWith, endsWith, extract, &&, ||) translated to Python."""
    objects = tf["locals"]["objects"].replace("${google_storage_bucket.store.name}", "BUCKET")
    clauses = " || ".join(tf["locals"]["functions"][function]["creates"])
    cel = tf["locals"]["object"].replace("${local.objects}", objects) + f" && ({clauses})"
    python = (
        cel.replace('\\"', '"')
        .replace("&&", " and ")
        .replace("||", " or ")
        .replace("resource.type", "rtype")
        .replace("resource.name.startsWith(", "name.startswith(")
        .replace("resource.name.endsWith(", "name.endswith(")
        .replace("resource.name.extract(", "extract(name, ")
    )
    code = compile(python, f"iam condition of {function}", "eval")
    return lambda key: eval(  # our own expression, translated above
        code,
        {"extract": cel_extract},
        {
            "rtype": "storage.googleapis.com/Object",
            "name": f"projects/_/buckets/BUCKET/objects/{key}",
        },
    )


def test_iam_conditions_grant_exactly_each_functions_writes(tf: dict[str, Any]) -> None:
    """Against the object keys of functions/microfl/jobs.py and rounds.py: a new kind of object,
    or a function writing another's, fails here until iam.tf grants it."""
    from microfl import jobs, rounds

    keys = {
        "job": jobs.job_key("mnist"),
        "model": jobs.model_key("mnist", 3),
        "optimizer": jobs.optimizer_key("mnist", 3),
        "update": rounds.update_key("mnist", 2, "hospital-7"),
        "slot": rounds.slot_key("mnist", 2, 7),
        "claim": rounds.claim_key("mnist", 2, "hospital-7"),
        "closing": rounds.closing_key("mnist", 2),
        "seal": rounds.seal_key("mnist", 2),
        "request": rounds.request_key("mnist", 2, 1, 0, 0),
        "node": rounds.node_key("mnist", 2, 0, 3),
        "record": rounds.record_key("mnist", 2),
    }
    writes = {
        "ingest": {"update", "slot", "claim"},
        "aggregate": {"node", "claim"},
        "finalize": {"closing", "seal", "request", "model", "optimizer", "record"},
    }
    for function, allowed in writes.items():
        granted = condition(tf, function)
        assert {kind for kind, key in keys.items() if granted(key)} == allowed, function
    assert not condition(tf, "finalize")("jobs-other/mnist/models/00000001.safetensors")


def test_strimzi_kafka_replication(tf: dict[str, Any]) -> None:
    kafka = tf["locals"]["kafka"]
    assert kafka["kind"] == "Kafka"
    assert kafka["metadata"]["annotations"] == {
        "strimzi.io/node-pools": "enabled",
        "strimzi.io/kraft": "enabled",
    }
    config = {k: local(tf, v) for k, v in kafka["spec"]["kafka"]["config"].items()}
    assert config["default.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert config["offsets.topic.replication.factor"] == 3
    assert config["transaction.state.log.replication.factor"] == 3
    assert config["transaction.state.log.min.isr"] == 2
    assert config["unclean.leader.election.enable"] is False
    pools = {p["metadata"]["name"]: p["spec"] for p in tf["locals"]["kafka_node_pools"]}
    assert (pools["brokers"]["replicas"], pools["brokers"]["roles"]) == (3, ["broker"])
    assert (pools["controllers"]["replicas"], pools["controllers"]["roles"]) == (3, ["controller"])
    # Every topic the functions and knative/ use, with the same replication.
    topics = set(tf["locals"]["kafka_topics"])
    assert {*TOPICS.values()} | {f"{t}.dlq" for t in TOPICS.values()} == topics
    sinks = [d for d in load_documents(KNATIVE) if d["kind"] == "KafkaSink"]
    for sink in sinks:
        assert tf["locals"]["kafka_topics"][sink["spec"]["topic"]] == sink["spec"]["numPartitions"]
        assert sink["spec"]["replicationFactor"] == 3
    topic_resources = tf["locals"]["kafka_topic_resources"]
    assert "replicas = local.kafka_replication_factor" in topic_resources
    assert '"min.insync.replicas" = local.kafka_min_insync_replicas' in topic_resources.replace(
        '\\"', '"'
    )
    strimzi = resource(tf, "helm_release", "strimzi")
    assert strimzi["chart"] == "strimzi-kafka-operator"
    kafka_release = resource(tf, "helm_release", "kafka")
    assert "local.kafka" in kafka_release["values"][0]
    assert kafka_release["depends_on"] == ["${helm_release.strimzi}"]


def test_managed_kafka_alternative(tf: dict[str, Any]) -> None:
    resource(tf, "google_managed_kafka_cluster", "microfl")
    topic = resource(tf, "google_managed_kafka_topic", "microfl")
    assert local(tf, topic["replication_factor"]) == 3
    assert topic["configs"] == {
        "min.insync.replicas": "${tostring(local.kafka_min_insync_replicas)}"
    }


OPTIONAL = re.compile(r"(\S+(?: [=!]= \S+)?) \? (\[[^\[\]]*\]) : \[\]")  # cond ? [...] : []


def chosen(tf: dict[str, Any], expr: str, variables: dict[str, Any]) -> str:
    """An HCL expression with each `condition ? [...] : []` replaced by the list, or by [], as
    the variables decide."""
    return OPTIONAL.sub(lambda m: m.group(2) if hcl_true(tf, m.group(1), variables) else "[]", expr)


def test_knative_eventing_with_the_kafka_source_and_sink_for_kafka_only(
    tf: dict[str, Any],
) -> None:
    """Serving with either bus; Eventing (its namespace and the KnativeEventing with the Kafka
    source and sink) with event_bus = "kafka" only: on Pub/Sub nothing runs on it (the overlay
    has no Eventing objects, test_pubsub_overlay_has_no_knative_eventing)."""
    assert resource(tf, "helm_release", "knative_operator")["chart"] == "knative-operator"
    serving = tf["locals"]["knative_serving"]
    assert serving["spec"]["ingress"]["kourier"]["enabled"] is True
    eventing = tf["locals"]["knative_eventing"]
    assert eventing["kind"] == "KnativeEventing"
    assert eventing["spec"]["source"] == {"kafka": {"enabled": True}}
    assert any("eventing-kafka-sink" in m["URL"] for m in eventing["spec"]["additionalManifests"])
    assert eventing["spec"]["config"]["features"] == {"delivery-timeout": "enabled"}
    [values] = resource(tf, "helm_release", "knative")["values"]  # the objects of the release
    namespaces = tf["locals"]["knative_manifests"]
    for bus in ("kafka", "pubsub"):
        variables, kafka = settings(tf, event_bus=bus), bus == "kafka"
        installed = chosen(tf, values, variables)
        assert "local.knative_manifests" in installed and "local.knative_serving" in installed
        assert ("local.knative_eventing" in installed) is kafka, (bus, installed)
        named = chosen(tf, namespaces, variables)
        assert '"knative-serving"' in named
        assert ('"knative-eventing"' in named) is kafka, (bus, named)


# Created only with event_bus = "kafka" and this kafka_mode.
