"""infra/terraform's event buses, checked offline from the parsed HCL: each bus creates only its
own resources, the Pub/Sub topics and push subscriptions are the local platform's, dead letters
are kept, each function publishes only to its own topics; and Chaos Mesh on containerd."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from itertools import product
from typing import Any

import pytest

from infra_hcl import (
    FUNCTIONS,
    KNATIVE,
    REPO,
    block,
    exists,
    hcl_value,
    plain,
    resource,
    seconds,
    settings,
    terraform_tree,
)
from microfl.events import TOPICS
from microfl.local.manifests import (
    load_platform,
)

tf = pytest.fixture(scope="module")(terraform_tree)


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
