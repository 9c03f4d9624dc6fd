# Knative Serving (with Kourier as its ingress), installed by the Knative Operator; with
# event_bus = "kafka" also Knative Eventing with the Kafka source and sink of
# eventing-kafka-broker. knative/ (applied by `make deploy`) then runs the three functions on
# them. Eventing runs knative/'s KafkaSources, KafkaSinks and PingSource only: with "pubsub",
# push subscriptions and a Cloud Scheduler job (pubsub.tf) take their place, infra/knative-pubsub/
# deletes them, and Eventing is not installed.

# A fixed address for Kourier's load balancer, so the ingest URL is known before the first
# deploy and survives re-creating the Service.
resource "google_compute_address" "ingress" {
  name         = "${var.cluster_name}-ingress"
  region       = var.region
  address_type = "EXTERNAL"
}

locals {
  domain = var.domain != "" ? var.domain : "${google_compute_address.ingress.address}.sslip.io"
  # Pub/Sub pushes over HTTPS only (pubsub.tf), so that deployment serves the domain with TLS:
  # clients then use it too.
  ingest_url = "${local.pubsub_bus ? "https" : "http"}://microfl-ingest.${local.namespace}.${local.domain}"

  knative_manifests = [
    for name in concat(["knative-serving"], local.kafka_bus ? ["knative-eventing"] : []) : {
      apiVersion = "v1"
      kind       = "Namespace"
      metadata   = { name = name }
    }
  ]

  knative_serving = {
    apiVersion = "operator.knative.dev/v1beta1"
    kind       = "KnativeServing"
    metadata   = { name = "knative-serving", namespace = "knative-serving" }
    spec = {
      version = var.knative_version
      ingress = {
        kourier = {
          enabled                    = true
          "service-type"             = "LoadBalancer"
          "service-load-balancer-ip" = google_compute_address.ingress.address
        }
      }
      config = {
        network = { "ingress-class" = "kourier.ingress.networking.knative.dev" }
        domain  = { (local.domain) = "" }
        # min-scale 0 in knative/ means scale to zero; keep the platform default that allows it.
        autoscaler = { "enable-scale-to-zero" = "true" }
      }
    }
  }

  knative_eventing = {
    apiVersion = "operator.knative.dev/v1beta1"
    kind       = "KnativeEventing"
    metadata   = { name = "knative-eventing", namespace = "knative-eventing" }
    spec = {
      version = var.knative_version
      # The KafkaSource (sources.knative.dev/v1beta1) and its controller.
      source = { kafka = { enabled = true } }
      # The KafkaSink data plane (eventing.knative.dev/v1alpha1), for the dead-letter sinks.
      additionalManifests = [
        { URL = "https://github.com/knative-extensions/eventing-kafka-broker/releases/download/knative-v${var.knative_version}/eventing-kafka-sink.yaml" },
      ]
      config = {
        # spec.delivery.timeout of the KafkaSources (knative/sources.yaml).
        features = { "delivery-timeout" = "enabled" }
      }
    }
  }
}

resource "helm_release" "knative_operator" {
  name             = "knative-operator"
  repository       = "https://knative.github.io/operator"
  chart            = "knative-operator"
  version          = "v${var.knative_version}"
  namespace        = "knative-operator"
  create_namespace = true

  depends_on = [google_container_node_pool.main]
}

resource "helm_release" "knative" {
  name      = "microfl-knative"
  chart     = "${path.module}/charts/manifests"
  namespace = "knative-operator"
  values = [yamlencode({
    manifests = concat(local.knative_manifests, [local.knative_serving], local.kafka_bus ? [local.knative_eventing] : [])
  })]

  depends_on = [helm_release.knative_operator]
}
