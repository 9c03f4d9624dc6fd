"""infra/terraform and `make deploy`, checked offline (nothing here reaches a cloud): OpenTofu's
formatting, checkov's static analysis with every skipped check justified, the properties the
platform relies on read from the parsed HCL, and knative/ rendered for GKE exactly as
`make deploy` renders it, passing the manifest check of the local runtime.

The tools come from `make infra-tools` (.cache/bin); a missing tool fails the test, it is not
skipped, so a run that checked nothing cannot pass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from microfl.events import TOPICS
from microfl.manifests import check_documents, load_documents, platform_from_documents

REPO = Path(__file__).resolve().parents[1]
TERRAFORM = REPO / "infra" / "terraform"
KNATIVE = REPO / "knative"
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


def test_terraform_is_formatted() -> None:
    """terraform fmt where the machine has terraform, else OpenTofu's (make infra-tools)."""
    name = "terraform" if (TOOLS / "terraform").exists() else "tofu"
    done = run([tool(name), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)])
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
    """All of infra/terraform/*.tf: resources[type][name], data, locals, variables, outputs."""
    try:
        import hcl2
    except ImportError:
        pytest.fail("python-hcl2 is missing: pip install -e '.[infra]'", pytrace=False)
    merged: dict[str, Any] = {
        "resource": defaultdict(dict),
        "locals": {},
        "variable": {},
        "output": {},
        "files": {},
    }
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as f:
            tree = hcl2.load(f)
        merged["files"][path.name] = tree
        for block in tree.get("resource", []):
            for rtype, named in plain(block).items():
                merged["resource"][rtype].update(named)
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


def test_files_by_concern() -> None:
    for name in (
        "versions.tf",
        "variables.tf",
        "gke.tf",
        "storage.tf",
        "iam.tf",
        "registry.tf",
        "kafka.tf",
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
    """Against the object keys of functions/microfl/jobs.py: a new kind of object, or a function
    writing another's, fails here until iam.tf grants it."""
    from microfl import jobs

    keys = {
        "job": jobs.job_key("mnist"),
        "model": jobs.model_key("mnist", 3),
        "optimizer": jobs.optimizer_key("mnist", 3),
        "update": jobs.update_key("mnist", 2, "hospital-7"),
        "closing": jobs.closing_key("mnist", 2),
        "seal": jobs.seal_key("mnist", 2),
        "partial": jobs.partial_key("mnist", 2, 0),
        "record": jobs.record_key("mnist", 2),
    }
    writes = {
        "ingest": {"update"},
        "aggregate": {"partial"},
        "finalize": {"closing", "seal", "model", "optimizer", "record"},
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


def test_knative_with_the_kafka_source(tf: dict[str, Any]) -> None:
    assert resource(tf, "helm_release", "knative_operator")["chart"] == "knative-operator"
    eventing = tf["locals"]["knative_eventing"]
    assert eventing["spec"]["source"] == {"kafka": {"enabled": True}}
    assert any("eventing-kafka-sink" in m["URL"] for m in eventing["spec"]["additionalManifests"])
    serving = tf["locals"]["knative_serving"]
    assert serving["spec"]["ingress"]["kourier"]["enabled"] is True


def test_chaos_mesh_on_containerd(tf: dict[str, Any]) -> None:
    release = resource(tf, "helm_release", "chaos_mesh")
    assert release["chart"] == "chaos-mesh"
    assert release["values"] == ["${yamlencode(local.chaos_mesh_values)}"]
    daemon = tf["locals"]["chaos_mesh_values"]["chaosDaemon"]
    assert daemon == {"runtime": "containerd", "socketPath": "/run/containerd/containerd.sock"}


# --- knative/ rendered for GKE ------------------------------------------------------------

TEMPLATE = TERRAFORM / "templates" / "knative-gke.kustomization.yaml.tftpl"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
GKE = {
    "bucket": "test-project-microfl",
    "kafka_bootstrap": "microfl-kafka-bootstrap.kafka.svc.cluster.local:9092",
    "ingest_service_account": "microfl-ingest@test-project.iam.gserviceaccount.com",
    "aggregate_service_account": "microfl-aggregate@test-project.iam.gserviceaccount.com",
    "finalize_service_account": "microfl-finalize@test-project.iam.gserviceaccount.com",
}
REGISTRY = "europe-west1-docker.pkg.dev/test-project/microfl/microfl"


def test_template_gets_every_value_it_names(tf: dict[str, Any]) -> None:
    value = tf["output"]["knative_kustomization"]["value"]  # templatefile("...", {k = v, ...})
    path, _, variables = value.partition(", {")
    assert path.endswith(f'templates/{TEMPLATE.name}"')
    given = set(re.findall(r"(\w+) = ", variables))
    assert set(PLACEHOLDER.findall(TEMPLATE.read_text())) == given == set(GKE)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`make deploy DRY_RUN=1` in a copy of the checkout, with a stand-in for `terraform output`
    that prints what the real one would for a cluster (the template rendered with GKE)."""
    root = tmp_path_factory.mktemp("deploy")
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copytree(KNATIVE, root / "knative")
    overlay = PLACEHOLDER.sub(lambda m: GKE[m.group(1)], TEMPLATE.read_text())
    (root / "kustomization.out").write_text(overlay)
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


def test_rendered_for_gke_passes_the_manifest_check(rendered: list[dict[str, Any]]) -> None:
    assert check_documents(rendered) == []
    platform = platform_from_documents(rendered)
    assert {s.function for s in platform.services} == FUNCTIONS


def test_rendered_for_gke_has_the_cluster_values(rendered: list[dict[str, Any]]) -> None:
    kinds = defaultdict(list)
    for doc in rendered:
        kinds[doc["kind"]].append(doc)
        assert doc["metadata"]["namespace"] == "microfl", doc["metadata"]
    assert "Secret" not in kinds, "make deploy creates the secret; the example must not be applied"
    [config] = kinds["ConfigMap"]
    assert config["data"] == {
        "MICROFL_STORE": f"gs://{GKE['bucket']}",
        "MICROFL_KAFKA_BOOTSTRAP": GKE["kafka_bootstrap"],
    }
    for service in kinds["Service"]:
        [container] = service["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{REGISTRY}:0123abcd"
    for doc in kinds["KafkaSource"] + kinds["KafkaSink"]:
        assert doc["spec"]["bootstrapServers"] == [GKE["kafka_bootstrap"]], doc["metadata"]
    for account in kinds["ServiceAccount"]:
        function = account["metadata"]["name"].removeprefix("microfl-")
        assert account["metadata"]["annotations"] == {
            "iam.gke.io/gcp-service-account": GKE[f"{function}_service_account"]
        }
