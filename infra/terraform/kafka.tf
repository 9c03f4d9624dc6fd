# Kafka for the platform's events, the same topology as the local 3-node cluster
# (`microfl up --kafka-nodes 3`): 3 brokers, replication factor 3, min ISR 2, so a write
# acknowledged with acks=all survives the loss of any one broker and one broker may be down
# without stopping producers. The default is Strimzi in the cluster (KRaft, node pools);
# kafka_mode = "managed" uses Google Managed Service for Apache Kafka instead. Nothing here is
# created with event_bus = "pubsub" (pubsub.tf).

locals {
  kafka_bus       = var.event_bus == "kafka"
  strimzi         = local.kafka_bus && var.kafka_mode == "strimzi"
  managed_kafka   = local.kafka_bus && var.kafka_mode == "managed"
  kafka_namespace = "kafka"
  kafka_cluster   = "microfl"

  kafka_bootstrap = (local.strimzi
    ? "${local.kafka_cluster}-kafka-bootstrap.${local.kafka_namespace}.svc.cluster.local:9092"
    : "bootstrap.${var.cluster_name}.${var.region}.managedkafka.${var.project_id}.cloud.goog:9092"
  )

  # The topics of functions/microfl/events.py and their dead-letter topics (knative/sources.yaml
  # writes failed events there through KafkaSinks that expect 3 partitions).
  kafka_topics = {
    "microfl.aggregate"     = var.kafka_topic_partitions
    "microfl.finalize"      = var.kafka_topic_partitions
    "microfl.rounds"        = var.kafka_topic_partitions
    "microfl.aggregate.dlq" = 3
    "microfl.finalize.dlq"  = 3
    "microfl.rounds.dlq"    = 3
  }
  kafka_replication_factor  = 3
  kafka_min_insync_replicas = 2

  # Strimzi custom resources, applied by helm_release.kafka through charts/manifests.
  kafka = {
    apiVersion = "kafka.strimzi.io/v1beta2"
    kind       = "Kafka"
    metadata = {
      name      = local.kafka_cluster
      namespace = local.kafka_namespace
      annotations = {
        "strimzi.io/node-pools" = "enabled" # brokers and controllers come from KafkaNodePools
        "strimzi.io/kraft"      = "enabled" # no ZooKeeper
      }
    }
    spec = {
      kafka = {
        version = var.kafka_version
        listeners = [
          # In-cluster only, plaintext: the functions and Knative's Kafka dispatchers run in
          # this cluster, whose pod network Dataplane V2 keeps private.
          { name = "plain", port = 9092, type = "internal", tls = false },
        ]
        # One broker per zone: replicas of a partition land in different zones.
        rack = { topologyKey = "topology.kubernetes.io/zone" }
        config = {
          "default.replication.factor"               = local.kafka_replication_factor
          "min.insync.replicas"                      = local.kafka_min_insync_replicas
          "offsets.topic.replication.factor"         = local.kafka_replication_factor
          "transaction.state.log.replication.factor" = local.kafka_replication_factor
          "transaction.state.log.min.isr"            = local.kafka_min_insync_replicas
          "unclean.leader.election.enable"           = false # never lose acknowledged events
          "auto.create.topics.enable"                = false # a misspelt topic fails loudly
        }
      }
      entityOperator = {
        topicOperator = {} # reconciles the KafkaTopics below
      }
    }
  }

  # A KRaft quorum of 3 controllers, and 3 brokers for replication factor 3, one per zone.
  kafka_node_pools = [
    {
      apiVersion = "kafka.strimzi.io/v1beta2"
      kind       = "KafkaNodePool"
      metadata = {
        name      = "controllers"
        namespace = local.kafka_namespace
        labels    = { "strimzi.io/cluster" = local.kafka_cluster }
      }
      spec = {
        replicas = 3
        roles    = ["controller"]
        storage = {
          type    = "jbod"
          volumes = [{ id = 0, type = "persistent-claim", size = "10Gi", deleteClaim = false }]
        }
        resources = { requests = { cpu = "250m", memory = "1Gi" }, limits = { memory = "1Gi" } }
      }
    },
    {
      apiVersion = "kafka.strimzi.io/v1beta2"
      kind       = "KafkaNodePool"
      metadata = {
        name      = "brokers"
        namespace = local.kafka_namespace
        labels    = { "strimzi.io/cluster" = local.kafka_cluster }
      }
      spec = {
        replicas = 3
        roles    = ["broker"]
        storage = {
          type = "jbod"
          # deleteClaim false: the data outlives a deleted Kafka resource.
          volumes = [{ id = 0, type = "persistent-claim", size = "${var.kafka_broker_storage_gb}Gi", deleteClaim = false }]
        }
        resources = { requests = { cpu = "500m", memory = "2Gi" }, limits = { memory = "2Gi" } }
      }
    },
  ]

  kafka_topic_resources = [
    for name, partitions in local.kafka_topics : {
      apiVersion = "kafka.strimzi.io/v1beta2"
      kind       = "KafkaTopic"
      metadata = {
        name      = replace(name, ".", "-") # a Kubernetes name; spec.topicName is Kafka's
        namespace = local.kafka_namespace
        labels    = { "strimzi.io/cluster" = local.kafka_cluster }
      }
      spec = {
        topicName  = name
        partitions = partitions
        replicas   = local.kafka_replication_factor
        config     = { "min.insync.replicas" = local.kafka_min_insync_replicas }
      }
    }
  ]
}

resource "helm_release" "strimzi" {
  count = local.strimzi ? 1 : 0

  name             = "strimzi"
  repository       = "https://strimzi.io/charts/"
  chart            = "strimzi-kafka-operator"
  version          = var.strimzi_chart_version
  namespace        = local.kafka_namespace
  create_namespace = true

  depends_on = [google_container_node_pool.main]
}

resource "helm_release" "kafka" {
  count = local.strimzi ? 1 : 0

  name      = "microfl-kafka"
  chart     = "${path.module}/charts/manifests"
  namespace = local.kafka_namespace
  values = [yamlencode({
    manifests = concat([local.kafka], local.kafka_node_pools, local.kafka_topic_resources)
  })]

  depends_on = [helm_release.strimzi]
}

# --- Alternative: Google Managed Service for Apache Kafka (kafka_mode = "managed") ----------
# Google runs the brokers (replication factor 3 across zones) in this VPC. It only accepts
# authenticated TLS clients (SASL OAUTHBEARER with the workload's Google identity, or SASL
# PLAIN with a service account key) on port 9092. Before switching:
# - the functions' producer (functions/microfl/bus.py) connects without SASL today; it needs
#   the security settings for this cluster, and each function account roles/managedkafka.client;
# - the KafkaSources and KafkaSinks of knative/ need spec.net.sasl and spec.net.tls pointing at
#   a Secret with the credentials.
# The bootstrap address below follows Google's documented name for the cluster.

resource "google_managed_kafka_cluster" "microfl" {
  count = local.managed_kafka ? 1 : 0

  cluster_id = var.cluster_name
  location   = var.region
  labels     = var.labels

  capacity_config {
    vcpu_count   = 3
    memory_bytes = 6 * 1024 * 1024 * 1024
  }
  gcp_config {
    access_config {
      network_configs {
        subnet = google_compute_subnetwork.nodes.id
      }
    }
  }
  rebalance_config {
    mode = "AUTO_REBALANCE_ON_SCALE_UP"
  }
}

resource "google_managed_kafka_topic" "microfl" {
  for_each = local.managed_kafka ? local.kafka_topics : {}

  topic_id           = each.key
  cluster            = google_managed_kafka_cluster.microfl[0].cluster_id
  location           = var.region
  partition_count    = each.value
  replication_factor = local.kafka_replication_factor
  configs = {
    "min.insync.replicas" = tostring(local.kafka_min_insync_replicas)
  }
}
