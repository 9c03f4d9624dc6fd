# One Google service account per function, bound by Workload Identity to the function's
# Kubernetes service account (knative/config.yaml), each with only the bucket access its code
# needs:
#
#   function   reads       creates (never overwrites)                 deletes
#   ingest     everything  jobs/*/rounds/*/updates/*, slots/*,        updates (see below)
#                          claims/*
#   aggregate  everything  jobs/*/rounds/*/nodes/*, claims/*          -
#   finalize   everything  rounds/*/closing.json, rounds/*/seal.json, -
#                          rounds/*/requests/*, models/, optimizer/,
#                          rounds/*/record.json
#
# With event_bus = "pubsub" each may also publish to the topics of the events it emits, and to
# no other (pubsub.tf, local.pubsub_publishers, binds roles/pubsub.publisher per topic):
#
#   ingest     microfl.finalize   update.accepted
#   aggregate  microfl.finalize   partial.ready
#   finalize   microfl.aggregate  partial.requested
#              microfl.rounds     round.committed
#
# What IAM cannot express, and why it is acceptable:
# - Reads are not narrowed: listing objects is checked against the bucket, not an object name,
#   so a name condition would forbid listing, which every function does. Reading is harmless
#   next to writing; the bucket is private to these accounts and the operators.
# - Conditions on resource.name have startsWith, endsWith and extract, no regular expressions:
#   "/rounds/{r}/updates/" matches any object whose name contains that, not only keys of
#   exactly the jobs/{job}/rounds/{r}/updates/{client} shape. Keys are built by
#   functions/microfl/jobs.py and rounds.py, never taken from clients, so the looser match grants nothing the
#   code would use.
# - storage.objects.create without storage.objects.delete cannot replace an existing object, so
#   aggregate and finalize are create-only at the IAM level too. ingest also needs delete: it
#   withdraws an update that arrived while its round was being sealed (functions/microfl/
#   ingest.py). With delete it could also replace an update; IAM cannot tell "delete what you
#   created" apart, so that guarantee stays with ingest's create-only write
#   (if_generation_match=0) and with bucket versioning.
# - The job definitions (jobs/{job}/job.json) are written by operators with the microfl CLI and
#   their own credentials; no function may create them.
# tests/test_infra.py evaluates these conditions against the keys of functions/microfl/jobs.py
# and rounds.py,
# so a new kind of object fails the test until it is granted here; likewise a new kind of event
# a function publishes, until pubsub.tf grants its topic.

locals {
  objects = "projects/_/buckets/${google_storage_bucket.store.name}/objects/jobs/"
  object  = "resource.type == \"storage.googleapis.com/Object\" && resource.name.startsWith(\"${local.objects}\")"

  # Each function's writes, as conditions on the object's name (any one of them allows).
  functions = {
    ingest = {
      description = "Micro-FL ingest: reads jobs and models, writes client updates"
      role        = google_project_iam_custom_role.update_writer.id
      writes      = "client updates and their tree slots (rounds/*/updates/*, slots/*, claims/*)"
      creates = [
        "resource.name.extract(\"/rounds/{round}/updates/\") != \"\"",
        "resource.name.extract(\"/rounds/{round}/slots/\") != \"\"",
        "resource.name.extract(\"/rounds/{round}/claims/\") != \"\"",
      ]
    }
    aggregate = {
      description = "Micro-FL aggregate: reads updates and seals, writes partial sums"
      role        = "roles/storage.objectCreator"
      writes      = "partial sums and the claims of their slots (rounds/*/nodes/*, claims/*)"
      creates = [
        "resource.name.extract(\"/rounds/{round}/nodes/\") != \"\"",
        "resource.name.extract(\"/rounds/{round}/claims/\") != \"\"",
      ]
    }
    finalize = {
      description = "Micro-FL finalize: seals rounds, writes models, optimizer state and round records"
      role        = "roles/storage.objectCreator"
      writes      = "round markers and seals, models, optimizer state and round records"
      creates = [
        "resource.name.endsWith(\"/closing.json\")",
        "resource.name.endsWith(\"/seal.json\")",
        "resource.name.endsWith(\"/record.json\")",
        "resource.name.extract(\"/rounds/{round}/requests/\") != \"\"",
        "resource.name.extract(\"/models/{version}.safetensors\") != \"\"",
        "resource.name.extract(\"/optimizer/{version}.safetensors\") != \"\"",
      ]
    }
  }
}

resource "google_service_account" "function" {
  for_each = local.functions

  account_id   = "${var.cluster_name}-${each.key}"
  display_name = each.value.description
}

# Workload Identity: pods running as Kubernetes service account microfl/microfl-<function>
# (knative/config.yaml) act as this Google service account, with no key anywhere.
resource "google_service_account_iam_member" "workload_identity" {
  for_each = local.functions

  service_account_id = google_service_account.function[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${local.namespace}/microfl-${each.key}]"
}

resource "google_storage_bucket_iam_member" "read" {
  for_each = local.functions

  bucket = google_storage_bucket.store.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.function[each.key].member
}

resource "google_storage_bucket_iam_member" "write" {
  for_each = local.functions

  bucket = google_storage_bucket.store.name
  role   = each.value.role
  member = google_service_account.function[each.key].member

  condition {
    title       = "${each.key}-writes"
    description = "${each.key} creates ${each.value.writes} only"
    expression  = "${local.object} && (${join(" || ", each.value.creates)})"
  }
}

# objectCreator plus delete (see above); nothing else, not even metadata updates.
resource "google_project_iam_custom_role" "update_writer" {
  role_id     = "${replace(var.cluster_name, "-", "_")}_update_writer"
  title       = "Micro-FL update writer"
  description = "Create client update objects and withdraw them; bound on the bucket with a condition to jobs/*/rounds/*/updates/*."
  permissions = ["storage.objects.create", "storage.objects.delete"]
}

# The operator console (knative/console.yaml) only reads: its account gets objectViewer on the
# bucket and nothing else (no create, no delete, no event topic), so a flaw in the console can
# show what is stored but never change it.
resource "google_service_account" "console" {
  account_id   = "${var.cluster_name}-console"
  display_name = "Micro-FL console: reads jobs, rounds and models for admins"
}

resource "google_service_account_iam_member" "console_workload_identity" {
  service_account_id = google_service_account.console.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${local.namespace}/microfl-console]"
}

resource "google_storage_bucket_iam_member" "console_read" {
  bucket = google_storage_bucket.store.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.console.member
}
