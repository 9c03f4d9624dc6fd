# What `make deploy`, the README's steps and the load tests need.

output "ingest_url" {
  description = "Base URL of the ingest API (clients, Locust); answers once `make deploy` has run."
  value       = local.ingest_url
}

output "bucket" {
  description = "Name of the bucket holding models, updates and round records."
  value       = google_storage_bucket.store.name
}

output "store_url" {
  description = "MICROFL_STORE for the functions and for the operator's microfl CLI."
  value       = "gs://${google_storage_bucket.store.name}"
}

output "kafka_bootstrap_servers" {
  description = "MICROFL_KAFKA_BOOTSTRAP: Kafka's bootstrap servers, reachable from inside the cluster (event_bus = \"kafka\"; null otherwise)."
  value       = local.kafka_bus ? local.kafka_bootstrap : null
}

output "push_endpoints" {
  description = "Where Pub/Sub pushes (event_bus = \"pubsub\"; empty otherwise): Kourier must serve these with a publicly trusted certificate."
  value       = local.pubsub_bus ? local.push_endpoints : {}
}

output "image_repository" {
  description = "Where `make image` pushes the functions' image (tagged with the git commit)."
  value       = local.image_repository
}

output "function_service_accounts" {
  description = "Google service account of each function (Workload Identity)."
  value       = { for name, account in google_service_account.function : name => account.email }
}

output "console_service_account" {
  description = "Google service account of the operator console (Workload Identity; reads only)."
  value       = google_service_account.console.email
}

output "ingress_ip" {
  description = "Kourier's load balancer address; point *.<domain> at it when var.domain is set."
  value       = google_compute_address.ingress.address
}

output "get_credentials" {
  description = "Command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.microfl.name} --region ${var.region} --project ${var.project_id}"
}

output "knative_kustomization" {
  description = "kustomization.yaml that adapts knative/ (or, by event_bus, its Pub/Sub overlay infra/knative-pubsub/) to this cluster; `make deploy` applies it."
  value = templatefile("${path.module}/templates/knative-gke.kustomization.yaml.tftpl", {
    event_bus                 = var.event_bus
    bucket                    = google_storage_bucket.store.name
    kafka_bootstrap           = local.kafka_bootstrap
    project_id                = var.project_id
    pusher_service_account    = local.pubsub_bus ? google_service_account.pusher[0].email : ""
    aggregate_push_audience   = local.push_endpoints["aggregate"]
    finalize_push_audience    = local.push_endpoints["finalize"]
    ingest_service_account    = google_service_account.function["ingest"].email
    aggregate_service_account = google_service_account.function["aggregate"].email
    finalize_service_account  = google_service_account.function["finalize"].email
    console_service_account   = google_service_account.console.email
  })
}
