"""infra/terraform and `make deploy`, checked offline (nothing here reaches a cloud): OpenTofu's
formatting, checkov's static analysis with every skipped check justified, the properties the
platform relies on read from the parsed HCL (for either event bus, Kafka or Pub/Sub), and
knative/ and its Pub/Sub overlay infra/knative-pubsub/ rendered for GKE exactly as `make deploy`
renders them, passing the manifest check of the local runtime.

The tools come from `make infra-tools` (.cache/bin); a missing tool fails the test, it is not
skipped, so a run that checked nothing cannot pass."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections import defaultdict
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import yaml

from microfl.events import TOPICS
from microfl.manifests import (
    check_documents,
    load_documents,
    load_platform,
    platform_from_documents,
)

REPO = Path(__file__).resolve().parents[1]
TERRAFORM = REPO / "infra" / "terraform"
KNATIVE = REPO / "knative"
KNATIVE_PUBSUB = REPO / "infra" / "knative-pubsub"
TOOLS = REPO / ".cache" / "bin"
FUNCTIONS = {"ingest", "aggregate", "finalize"}
HCL = dict[str, Any]


def tool(name: str) -> str:
    path = TOOLS / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path} is missing: run `make infra-tools` (builds OpenTofu and kustomize from the "
            "Go module proxy, installs checkov)",
            pytrace=False,
        )
    return str(path)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


# --- formatting and static analysis -------------------------------------------------------


def terraform() -> str:
    """The machine's terraform where it has one, else OpenTofu (make infra-tools)."""
    return tool("terraform" if (TOOLS / "terraform").exists() else "tofu")


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


# --- the HCL, parsed ----------------------------------------------------------------------


def plain(value: Any) -> Any:
    """python-hcl2's tree without its markers and with string literals unquoted."""
    if isinstance(value, dict):
        return {
            plain(k): plain(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__")
        }
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    """All of infra/terraform/*.tf: resource[type][name], data[type][name], locals, variables,
    outputs, and each file's own tree."""
    try:
        import hcl2
    except ImportError:
        pytest.fail("python-hcl2 is missing: pip install -e '.[infra]'", pytrace=False)
    merged: dict[str, Any] = {
        "resource": defaultdict(dict),
        "data": defaultdict(dict),
        "locals": {},
        "variable": {},
        "output": {},
        "files": {},
    }
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            tree = hcl2.load(f)
        merged["files"][path.name] = tree
        for kind in ("resource", "data"):
            for block in tree.get(kind, []):
                for rtype, named in plain(block).items():
                    merged[kind][rtype].update(named)
        for block in tree.get("locals", []):
            merged["locals"].update(plain(block))
        for kind in ("variable", "output"):
            for block in tree.get(kind, []):
                merged[kind].update(plain(block))
    return merged


def resource(tf: dict[str, Any], rtype: str, name: str) -> HCL:
    assert name in tf["resource"][rtype], f"infra/terraform has no {rtype}.{name}"
    return tf["resource"][rtype][name]


def local(tf: dict[str, Any], value: Any) -> Any:
    """A value, or the local it names (${local.x})."""
    match = re.fullmatch(r"\$\{local\.(\w+)\}", value) if isinstance(value, str) else None
    return local(tf, tf["locals"][match.group(1)]) if match else value


def block(value: Any) -> HCL:
    """A nested block (python-hcl2 gives a list of one)."""
    assert isinstance(value, list) and len(value) == 1, value
    return value[0]  # type: ignore[no-any-return]


def settings(tf: dict[str, Any], **given: Any) -> dict[str, Any]:
    """The variables' defaults, with some given."""
    return {name: v.get("default") for name, v in tf["variable"].items()} | given


def python_of(tf: dict[str, Any], expr: str, variables: dict[str, Any]) -> str:
    """A boolean HCL expression of variables and locals (==, !=, &&, ||, !) as Python."""
    body = expr[2:-1] if expr.startswith("${") else expr
    body = re.sub(r"!(?!=)", " not ", body).replace("&&", " and ").replace("||", " or ")

    def value(match: re.Match[str]) -> str:
        kind, name = match.groups()
        found = variables[name] if kind == "var" else tf["locals"][name]
        if kind == "local" and isinstance(found, str) and found.startswith("${"):
            return f"({python_of(tf, found, variables)})"
        return repr(found)

    return re.sub(r"\b(var|local)\.(\w+)", value, body)


def hcl_true(tf: dict[str, Any], expr: str, variables: dict[str, Any]) -> bool:
    return bool(eval(python_of(tf, expr, variables)))  # our own HCL, translated above


GATE = re.compile(r"\$\{(.+?) \? .+ : (?:0|\{\}|\[\])\}")  # condition ? ... : nothing


def exists(tf: dict[str, Any], declared: HCL, variables: dict[str, Any]) -> bool:
    """Whether Terraform creates a resource (or reads a data source) with these variables: a
    count or for_each of the form `condition ? ... : 0` (or {} or []) decides, anything else
    always creates it."""
    gate = declared.get("count", declared.get("for_each"))
    match = GATE.fullmatch(gate) if isinstance(gate, str) else None
    return hcl_true(tf, match.group(1), variables) if match else True


INNERMOST = re.compile(r"\$\{([^${}]*)\}")


def hcl_value(tf: dict[str, Any], value: Any, key: str, each: HCL) -> Any:
    """An attribute of a for_each resource for one key: each.key, each.value.x and locals
    resolved; references to resources, and locals that are expressions, stay as ${...} text."""
    if not isinstance(value, str):
        return value

    def with_each(ref: str) -> str:
        ref = re.sub(r"\beach\.key\b", json.dumps(key), ref)
        return re.sub(r"\beach\.value\.(\w+)", lambda m: json.dumps(each[m.group(1)]), ref)

    def lookup(ref: str) -> Any:  # None: not ours to resolve
        try:
            return json.loads(ref)
        except ValueError:
            pass
        path = re.fullmatch(r'local\.(\w+)((?:\.\w+|\["[^"]*"\])*)', ref)
        if path is None:
            return None
        found = tf["locals"][path.group(1)]
        for attr, index in re.findall(r'\.(\w+)|\["([^"]*)"\]', path.group(2)):
            found = found[attr or index]
        if isinstance(found, str) and found.startswith("${") and found.endswith("}"):
            return None
        return hcl_value(tf, found, key, each)

    whole = INNERMOST.fullmatch(value)
    if whole:
        found = lookup(with_each(whole.group(1)))
        return "${" + with_each(whole.group(1)) + "}" if found is None else found
    kept: list[str] = []

    def resolve(match: re.Match[str]) -> str:
        ref = with_each(match.group(1))
        found = lookup(ref)
        if found is None:
            kept.append("${" + ref + "}")
            return f"\0{len(kept) - 1}\0"
        return str(found)

    while (resolved := INNERMOST.sub(resolve, value)) != value:
        value = resolved
    return re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], value)


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
    assert accounts == {f"microfl-{f}" for f in FUNCTIONS}
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
KAFKA_ONLY = {
    ("helm_release", "strimzi"): "strimzi",
    ("helm_release", "kafka"): "strimzi",
    ("google_managed_kafka_cluster", "microfl"): "managed",
    ("google_managed_kafka_topic", "microfl"): "managed",
}


def declared(tree: dict[str, Any], kind: str) -> set[tuple[str, str]]:
    """(type, name) of every resource or data source of one file's tree."""
    return {
        (rtype, name)
        for part in tree.get(kind, [])
        for rtype, named in plain(part).items()
        for name in named
    }


def test_each_event_bus_creates_only_its_own_resources(tf: dict[str, Any]) -> None:
    """Kafka's resources with event_bus = "kafka" only (and its kafka_mode), everything of
    pubsub.tf with "pubsub" only; the cluster, bucket, registry, Knative and the functions'
    accounts with either."""
    pubsub = declared(tf["files"]["pubsub.tf"], "resource")
    assert ("google_pubsub_subscription", "push") in pubsub
    for bus, mode in product(("kafka", "pubsub"), ("strimzi", "managed")):
        variables = settings(tf, event_bus=bus, kafka_mode=mode)
        for rtype, named in tf["resource"].items():
            for name, found in named.items():
                if (rtype, name) in KAFKA_ONLY:
                    wanted = bus == "kafka" and mode == KAFKA_ONLY[rtype, name]
                else:
                    wanted = (rtype, name) not in pubsub or bus == "pubsub"
                assert exists(tf, found, variables) is wanted, (rtype, name, bus, mode)
        project = tf["data"]["google_project"]["current"]  # the Pub/Sub service agent's number
        assert exists(tf, project, variables) is (bus == "pubsub")


def topic_ref(name: str, attr: str = "id") -> str:
    return f'${{google_pubsub_topic.microfl["{name}"].{attr}}}'


def seconds(duration: str) -> float:
    match = re.fullmatch(r"([0-9.]+)s", duration)
    assert match, f"{duration!r} is not a duration in seconds, such as 1s or 0.5s"
    return float(match.group(1))


def test_pubsub_topics_are_the_events_topics_and_their_dead_letters(tf: dict[str, Any]) -> None:
    from microfl.local.pubsub import SUBSCRIPTIONS

    topics = tf["locals"]["pubsub_topics"]
    assert len(topics) == len(set(topics))
    assert set(topics) == set(TOPICS.values()) | {s.dead_letter_topic for s in SUBSCRIPTIONS}
    assert set(topics) <= set(tf["locals"]["kafka_topics"]), "the Kafka topics' names"
    topic = resource(tf, "google_pubsub_topic", "microfl")
    assert topic["for_each"] == "${local.pubsub_bus ? toset(local.pubsub_topics) : []}"
    assert topic["name"] == "${each.key}"


def test_push_subscriptions_are_the_local_platforms(tf: dict[str, Any]) -> None:
    """Every field of SUBSCRIPTIONS (functions/microfl/local/pubsub.py, what the local platform
    and the data-plane tests run) as pubsub.tf creates it; a new field fails until compared."""
    from microfl.local.pubsub import SUBSCRIPTIONS, PushSubscription

    compared = "name topic function ordered ack_deadline min_backoff max_backoff max_attempts"
    assert [f.name for f in dataclasses.fields(PushSubscription)] == compared.split()
    subscriptions = tf["locals"]["push_subscriptions"]
    assert set(subscriptions) == {s.name for s in SUBSCRIPTIONS}
    push = resource(tf, "google_pubsub_subscription", "push")
    assert push["for_each"] == "${local.pubsub_bus ? local.push_subscriptions : {}}"
    config, retry = block(push["push_config"]), block(push["retry_policy"])
    dead, oidc = block(push["dead_letter_policy"]), block(config["oidc_token"])
    platform = load_platform(KNATIVE)
    for sub in SUBSCRIPTIONS:

        def value(attribute: Any, sub: Any = sub) -> Any:
            return hcl_value(tf, attribute, sub.name, subscriptions[sub.name])

        # The Knative route of the function's Service (knative/), over HTTPS.
        service = platform.service(sub.function)
        endpoint = f"https://{service.name}.{tf['locals']['namespace']}.${{local.domain}}/"
        assert {
            "name": value(push["name"]),
            "topic": value(push["topic"]),
            "endpoint": value(config["push_endpoint"]),
            "ordered": value(push["enable_message_ordering"]),
            "ack_deadline": value(push["ack_deadline_seconds"]),
            "min_backoff": seconds(value(retry["minimum_backoff"])),
            "max_backoff": seconds(value(retry["maximum_backoff"])),
            "max_attempts": value(dead["max_delivery_attempts"]),
            "dead_letter_topic": value(dead["dead_letter_topic"]),
            "audience": value(oidc["audience"]),
        } == {
            "name": sub.name,
            "topic": topic_ref(sub.topic),
            "endpoint": endpoint,
            "ordered": sub.ordered,
            "ack_deadline": sub.ack_deadline,
            "min_backoff": sub.min_backoff,
            "max_backoff": sub.max_backoff,
            "max_attempts": sub.max_attempts,
            "dead_letter_topic": topic_ref(sub.dead_letter_topic),
            "audience": endpoint,
        }, sub.name
        # Pub/Sub's limits; and no redelivery while the function may still be working on it.
        assert 10 <= sub.ack_deadline <= 600 and 5 <= sub.max_attempts <= 100
        assert sub.min_backoff <= sub.max_backoff <= 600
        assert sub.ack_deadline >= service.timeout_seconds, sub.name
    assert block(config["no_wrapper"]) == {"write_metadata": True}  # a binary-mode CloudEvent
    assert oidc["service_account_email"] == "${google_service_account.pusher[0].email}"
    assert block(push["expiration_policy"]) == {"ttl": ""}


def test_dead_letters_are_kept_and_the_service_agent_may_move_them(tf: dict[str, Any]) -> None:
    from microfl.local.pubsub import SUBSCRIPTIONS

    subscriptions = tf["locals"]["push_subscriptions"]
    kept = resource(tf, "google_pubsub_subscription", "dead_letter")
    publish = resource(tf, "google_pubsub_topic_iam_member", "dead_letter")
    acknowledge = resource(tf, "google_pubsub_subscription_iam_member", "dead_letter")
    for each in (kept, publish, acknowledge):
        assert each["for_each"] == "${local.pubsub_bus ? local.push_subscriptions : {}}"
    for sub in SUBSCRIPTIONS:

        def value(attribute: Any, sub: Any = sub) -> Any:
            return hcl_value(tf, attribute, sub.name, subscriptions[sub.name])

        # A pull subscription per dead-letter topic, as ensure_pubsub creates locally.
        assert value(kept["name"]) == f"{sub.name}-dlq"
        assert value(kept["topic"]) == topic_ref(sub.dead_letter_topic)
        assert value(publish["topic"]) == topic_ref(sub.dead_letter_topic, "name")
        assert value(acknowledge["subscription"]) == (
            f'${{google_pubsub_subscription.push["{sub.name}"].name}}'
        )
    assert block(kept["expiration_policy"]) == {"ttl": ""}
    assert publish["role"] == "roles/pubsub.publisher"
    assert acknowledge["role"] == "roles/pubsub.subscriber"
    token = resource(tf, "google_service_account_iam_member", "pusher_token_creator")
    assert token["role"] == "roles/iam.serviceAccountTokenCreator"
    assert token["service_account_id"] == "${google_service_account.pusher[0].name}"
    for grant in (publish, acknowledge, token):
        assert grant["member"] == "${local.pubsub_agent}"
    number = "${data.google_project.current[0].number}"
    agent = f"serviceAccount:service-{number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert tf["locals"]["pubsub_agent"] == f'${{local.pubsub_bus ? "{agent}" : ""}}'
    pusher = resource(tf, "google_service_account", "pusher")
    assert pusher["account_id"] == "${var.cluster_name}-pusher"


def emitted_topics() -> dict[str, set[str]]:
    """The topics each function's code publishes to: the events it builds with microfl.events'
    constructors (events.update_accepted(...) is UPDATE_ACCEPTED), through TOPICS."""
    from microfl import events

    found = {}
    for function in FUNCTIONS:
        code = (REPO / "functions" / "microfl" / f"{function}.py").read_text()
        kinds = {
            getattr(events, name.upper(), None) for name in re.findall(r"\bevents\.(\w+)\(", code)
        }
        found[function] = {TOPICS[kind] for kind in kinds if kind in TOPICS}
    return found


def test_each_function_publishes_only_to_its_own_topics(tf: dict[str, Any]) -> None:
    emitted = emitted_topics()
    assert emitted == {
        "ingest": {"microfl.finalize"},  # update.accepted
        "aggregate": {"microfl.finalize"},  # partial.ready
        "finalize": {"microfl.aggregate", "microfl.rounds"},  # partial.requested, round.committed
    }
    granted = defaultdict(set)
    for grant in tf["locals"]["pubsub_publishers"].values():
        granted[grant["function"]].add(grant["topic"])
    assert granted == emitted
    publisher = resource(tf, "google_pubsub_topic_iam_member", "publisher")
    assert publisher["for_each"] == "${local.pubsub_bus ? local.pubsub_publishers : {}}"
    assert publisher["role"] == "roles/pubsub.publisher"
    assert publisher["topic"] == "${google_pubsub_topic.microfl[each.value.topic].name}"
    assert publisher["member"] == "${google_service_account.function[each.value.function].member}"
    # No other grant of a Pub/Sub role anywhere, and none on the project.
    pubsub_grants = {
        (rtype, name)
        for rtype, named in tf["resource"].items()
        for name, found in named.items()
        if rtype.endswith(("_iam_member", "_iam_binding", "_iam_policy"))
        and "pubsub" in str(found.get("role", found.get("policy_data", "")))
    }
    assert pubsub_grants == {
        ("google_pubsub_topic_iam_member", "publisher"),
        ("google_pubsub_topic_iam_member", "dead_letter"),
        ("google_pubsub_subscription_iam_member", "dead_letter"),
    }


def test_chaos_mesh_on_containerd(tf: dict[str, Any]) -> None:
    release = resource(tf, "helm_release", "chaos_mesh")
    assert release["chart"] == "chaos-mesh"
    assert release["values"] == ["${yamlencode(local.chaos_mesh_values)}"]
    daemon = tf["locals"]["chaos_mesh_values"]["chaosDaemon"]
    assert daemon == {"runtime": "containerd", "socketPath": "/run/containerd/containerd.sock"}


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
        assert {s.function for s in platform.services} == FUNCTIONS
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
    assert {s.function for s in platform.services} == FUNCTIONS
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
