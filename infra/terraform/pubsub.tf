# Google Cloud Pub/Sub for the platform's events (event_bus = "pubsub"): no brokers to run. The
# functions publish each event as a message in the CloudEvents Pub/Sub binding (data = the
# event's JSON, attributes = ce-* and Content-Type, ordering key = the job;
# functions/microfl/bus.py), and two push subscriptions deliver them to aggregate and finalize as
# the KafkaSources of knative/sources.yaml do: one binary-mode CloudEvent HTTP request per
# message, retried with backoff, dead-lettered after 11 attempts. infra/knative-pubsub/ is the
# matching overlay of knative/, and functions/microfl/local/pubsub.py creates the same topics
# and subscriptions in the local emulator (tests/test_infra.py checks that the two agree).
#
# Pub/Sub pushes only to public HTTPS endpoints with a publicly trusted certificate. So in this
# mode aggregate and finalize have public routes, https://microfl-<function>.microfl.<domain>/
# (the Knative route of var.domain), and check every request's OIDC token instead: signed by
# Google for the pusher account below, with the endpoint as audience (MICROFL_PUSH_INVOKER and
# MICROFL_PUSH_AUDIENCE in infra/knative-pubsub/). Serving *.microfl.<domain> with such a certificate
# is the operator's part (README, "Kafka or Pub/Sub").
#
# The same check would refuse knative/ping.yaml's PingSource, which sends no token: here Cloud
# Scheduler pings finalize instead (the end of this file), and infra/knative-pubsub/ deletes the
# PingSource with the Kafka delivery, so this mode needs neither Kafka nor Knative Eventing.
#
# Whoever applies this needs iam.serviceAccounts.actAs on the pusher account to name it in the
# subscriptions and the scheduler job (roles/iam.serviceAccountUser; project owners have it).

locals {
  pubsub_bus = var.event_bus == "pubsub"

  # The topics of functions/microfl/events.py (named as the Kafka topics) and the dead-letter
  # topic of each push subscription. microfl.rounds has no subscription here: it is for
  # observers, who add their own (Pub/Sub keeps nothing for a topic without subscriptions).
  pubsub_topics = [
    "microfl.aggregate",
    "microfl.finalize",
    "microfl.rounds",
    "microfl.aggregate.dlq",
    "microfl.finalize.dlq",
  ]

  # SUBSCRIPTIONS of functions/microfl/local/pubsub.py: aggregate in parallel (chunks are
  # independent), finalize in order per job, as the KafkaSources do.
  push_subscriptions = {
    microfl-aggregate = { topic = "microfl.aggregate", function = "aggregate", ordered = false }
    microfl-finalize  = { topic = "microfl.finalize", function = "finalize", ordered = true }
  }

  # Delivery, the KafkaSources' (knative/sources.yaml) in Pub/Sub's terms: the push request
  # times out after the ack deadline (the functions' 300 s timeoutSeconds), a failed push is
  # retried with exponential backoff from 1 s up to 60 s, and after the first attempt and 10
  # retries the message goes to the dead-letter topic.
  push_delivery = {
    ack_deadline_seconds  = 300
    minimum_backoff       = "1s"
    maximum_backoff       = "60s"
    max_delivery_attempts = 11
  }

  # The Knative routes of aggregate and finalize (Service microfl-<function> in namespace
  # microfl), over HTTPS; each is also the audience of its push requests' tokens.
  push_endpoints = {
    aggregate = "https://microfl-aggregate.${local.namespace}.${local.domain}/"
    finalize  = "https://microfl-finalize.${local.namespace}.${local.domain}/"
  }

  # Who publishes what (functions/microfl/events.py): each function's account may publish to
  # the topics of its own events and to no other.
  pubsub_publishers = {
    "ingest microfl.finalize"    = { function = "ingest", topic = "microfl.finalize" }    # update.accepted
    "aggregate microfl.finalize" = { function = "aggregate", topic = "microfl.finalize" } # partial.ready
    "finalize microfl.aggregate" = { function = "finalize", topic = "microfl.aggregate" } # partial.requested
    "finalize microfl.rounds"    = { function = "finalize", topic = "microfl.rounds" }    # round.committed
  }

  # Pub/Sub's own service agent: it moves failed messages to the dead-letter topics and signs
  # the push requests' tokens.
  pubsub_agent = local.pubsub_bus ? "serviceAccount:service-${data.google_project.current[0].number}@gcp-sa-pubsub.iam.gserviceaccount.com" : ""
  # Cloud Scheduler's: it signs the deadline pings' tokens.
  scheduler_agent = local.pubsub_bus ? "serviceAccount:service-${data.google_project.current[0].number}@gcp-sa-cloudscheduler.iam.gserviceaccount.com" : ""
}

data "google_project" "current" {
  count = local.pubsub_bus ? 1 : 0

  project_id = var.project_id
}

resource "google_pubsub_topic" "microfl" {
  #checkov:skip=CKV_GCP_83:Events carry job names, round numbers, client ids and object keys only, never model data or secrets; Google-managed encryption is enough, as for the bucket, and a customer-managed key would add a KMS key ring to run and pay for.
  for_each = local.pubsub_bus ? toset(local.pubsub_topics) : []

  name   = each.key
  labels = var.labels
}

resource "google_pubsub_subscription" "push" {
  for_each = local.pubsub_bus ? local.push_subscriptions : {}

  name   = each.key
  topic  = google_pubsub_topic.microfl[each.value.topic].id
  labels = var.labels

  ack_deadline_seconds    = local.push_delivery.ack_deadline_seconds
  enable_message_ordering = each.value.ordered # messages of one ordering key (job) one at a time

  push_config {
    push_endpoint = local.push_endpoints[each.value.function]
    # The message as the request a KafkaSource would send: data as the body, attributes as
    # headers (binary-mode CloudEvent), plus x-goog-pubsub-* headers with its id and attempt.
    no_wrapper {
      write_metadata = true
    }
    oidc_token {
      service_account_email = google_service_account.pusher[0].email
      audience              = local.push_endpoints[each.value.function]
    }
  }

  retry_policy {
    minimum_backoff = local.push_delivery.minimum_backoff
    maximum_backoff = local.push_delivery.maximum_backoff
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.microfl["${each.value.topic}.dlq"].id
    max_delivery_attempts = local.push_delivery.max_delivery_attempts
  }

  # Pub/Sub deletes a subscription after 31 days without activity by default: an idle platform
  # would lose its event delivery.
  expiration_policy {
    ttl = ""
  }

  depends_on = [google_service_account_iam_member.pusher_token_creator]
}

# Dead letters stay here (7 days, as Kafka's dead-letter topics) to inspect and replay by hand:
# Pub/Sub drops what is published to a topic without subscriptions.
resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.pubsub_bus ? local.push_subscriptions : {}

  name   = "${each.key}-dlq"
  topic  = google_pubsub_topic.microfl["${each.value.topic}.dlq"].id
  labels = var.labels

  message_retention_duration = "604800s"
  expiration_policy {
    ttl = "" # nothing pulls from it until something fails: it must not expire meanwhile
  }
}

# --- who may do what --------------------------------------------------------------------------

# The identity Pub/Sub and Cloud Scheduler sign their requests' OIDC tokens for. It has no
# roles: the functions only check that a token names it.
resource "google_service_account" "pusher" {
  count = local.pubsub_bus ? 1 : 0

  account_id   = "${var.cluster_name}-pusher"
  display_name = "Micro-FL push: the identity of the Pub/Sub pushes and Cloud Scheduler pings"
}

resource "google_service_account_iam_member" "pusher_token_creator" {
  count = local.pubsub_bus ? 1 : 0

  service_account_id = google_service_account.pusher[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

# Dead-lettering: the service agent publishes the failed message to the dead-letter topic and
# acknowledges it on the subscription it failed on.
resource "google_pubsub_topic_iam_member" "dead_letter" {
  for_each = local.pubsub_bus ? local.push_subscriptions : {}

  topic  = google_pubsub_topic.microfl["${each.value.topic}.dlq"].name
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter" {
  for_each = local.pubsub_bus ? local.push_subscriptions : {}

  subscription = google_pubsub_subscription.push[each.key].name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# Each function's account (iam.tf) publishes to the topics of its own events only.
resource "google_pubsub_topic_iam_member" "publisher" {
  for_each = local.pubsub_bus ? local.pubsub_publishers : {}

  topic  = google_pubsub_topic.microfl[each.value.topic].name
  role   = "roles/pubsub.publisher"
  member = google_service_account.function[each.value.function].member
}

resource "google_service_account_iam_member" "scheduler_token_creator" {
  count = local.pubsub_bus ? 1 : 0

  service_account_id = google_service_account.pusher[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.scheduler_agent
}

# --- round deadlines --------------------------------------------------------------------------

# knative/ping.yaml's PingSource, sent by Cloud Scheduler with the pusher's token: the same
# request every minute, a binary-mode CloudEvent of type dev.knative.sources.ping with data {},
# on which finalize checks round deadlines and sweeps for lost work. The
# cloudscheduler.googleapis.com API must be enabled (variables.tf, project_id); Terraform enables
# no APIs here.
resource "google_cloud_scheduler_job" "deadlines" {
  count = local.pubsub_bus ? 1 : 0

  name        = "microfl-deadlines"
  description = "Micro-FL: round deadlines and the recovery sweep (finalize), as knative/ping.yaml"
  region      = var.region
  schedule    = "* * * * *" # knative/ping.yaml's; cron's resolution is a minute
  time_zone   = "Etc/UTC"   # a PingSource's schedule is in UTC too

  # finalize may take its whole timeoutSeconds (300, knative/finalize.yaml) over a sweep.
  attempt_deadline = "320s"

  # A missed ping only delays deadlines until the next one, a minute later: a few quick retries
  # (after 5, 10 and 20 s) are enough.
  retry_config {
    retry_count          = 3
    min_backoff_duration = "5s"
    max_backoff_duration = "20s"
    max_doublings        = 2
  }

  http_target {
    http_method = "POST"
    uri         = local.push_endpoints["finalize"]
    body        = base64encode("{}")
    headers = {
      "Content-Type"   = "application/json" # else application/octet-stream
      "ce-specversion" = "1.0"
      "ce-type"        = "dev.knative.sources.ping" # microfl.events.PING
      "ce-source"      = "//cloudscheduler.googleapis.com/projects/${var.project_id}/locations/${var.region}/jobs/microfl-deadlines"
      # Scheduler cannot vary a header per run, so every ping has this id; finalize does not
      # deduplicate pings (each one sweeps), so that is harmless.
      "ce-id" = "microfl-deadlines"
    }
    # What finalize checks (MICROFL_PUSH_AUDIENCE and MICROFL_PUSH_INVOKER): its endpoint as the
    # audience and the pusher account, as for the push subscription's requests.
    oidc_token {
      service_account_email = google_service_account.pusher[0].email
      audience              = local.push_endpoints["finalize"]
    }
  }

  depends_on = [google_service_account_iam_member.scheduler_token_creator]
}
