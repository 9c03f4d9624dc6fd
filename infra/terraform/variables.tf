# Inputs. Only project_id and authorized_networks have no default; see terraform.tfvars.example.

variable "project_id" {
  description = "Google Cloud project that holds everything (the APIs container, storage, artifactregistry, compute, iam and, for kafka_mode = \"managed\", managedkafka or, for event_bus = \"pubsub\", pubsub and cloudscheduler must be enabled)."
  type        = string
}

variable "region" {
  description = "Region of the cluster (regional: control plane and nodes in three zones), the bucket, the registry, the ingress IP and, for event_bus = \"pubsub\", the Cloud Scheduler job."
  type        = string
  default     = "europe-west1"
}

variable "cluster_name" {
  description = "Name of the GKE Standard cluster; also the prefix of the network, node and function service accounts."
  type        = string
  default     = "microfl"

  validation {
    condition     = can(regex("^[a-z][-a-z0-9]{0,17}$", var.cluster_name))
    error_message = "cluster_name: a lower-case letter, then up to 17 of a-z, 0-9 and '-' (it prefixes service account ids, which have 30 characters at most)."
  }
}

variable "authorized_networks" {
  description = "CIDR blocks allowed to reach the cluster's control plane (kubectl, helm, terraform), mapped to a description, e.g. { \"203.0.113.7/32\" = \"my workstation\" }. The nodes are private either way."
  type        = map(string)

  validation {
    condition     = length(var.authorized_networks) > 0 && alltrue([for cidr in keys(var.authorized_networks) : can(cidrnetmask(cidr))])
    error_message = "authorized_networks: give at least one IPv4 CIDR block, such as \"203.0.113.7/32\"."
  }
}

variable "node_machine_type" {
  description = "Machine type of the node pool. e2-standard-4 (4 vCPU, 16 GiB) fits Kafka, Knative, Chaos Mesh and the functions on three nodes."
  type        = string
  default     = "e2-standard-4"
}

variable "node_count_per_zone" {
  description = "Nodes per zone when the pool is created (the cluster is regional: three zones, so three times this many nodes)."
  type        = number
  default     = 1
}

variable "node_min_per_zone" {
  description = "Lower bound of the node pool's autoscaler, per zone."
  type        = number
  default     = 1
}

variable "node_max_per_zone" {
  description = "Upper bound of the node pool's autoscaler, per zone (aggregate scales out for wide rounds)."
  type        = number
  default     = 3

  validation {
    condition     = var.node_max_per_zone >= var.node_min_per_zone && var.node_min_per_zone >= 1
    error_message = "node_max_per_zone must be at least node_min_per_zone, which must be at least 1 (Kafka keeps one broker per zone)."
  }
}

variable "node_disk_size_gb" {
  description = "Boot disk of each node, in GB (images and logs; Kafka data lives on its own persistent volumes)."
  type        = number
  default     = 50
}

variable "deletion_protection" {
  description = "Refuse to destroy the cluster. Set false (and apply) before `terraform destroy`. The bucket is protected separately, by lifecycle.prevent_destroy in storage.tf."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Name of the bucket for models and updates (globally unique); empty means \"<project_id>-microfl\"."
  type        = string
  default     = ""
}

variable "update_retention_days" {
  description = "Days after which client update objects (jobs/*/rounds/*/updates/*) are deleted. Longer than the longest round: an update is only read until its round is committed, and the round record keeps which updates went in."
  type        = number
  default     = 30
}

variable "noncurrent_retention_days" {
  description = "Days a deleted or replaced object version is kept (the bucket is versioned) before it is removed for good."
  type        = number
  default     = 7
}

variable "event_bus" {
  description = "Transport of the platform's events: \"kafka\" (kafka.tf: Strimzi or managed Kafka, delivered by Knative KafkaSources) or \"pubsub\" (pubsub.tf: Google Cloud Pub/Sub, delivered by push subscriptions to the functions' public HTTPS routes; var.domain must then be served with a trusted certificate)."
  type        = string
  default     = "kafka"

  validation {
    condition     = contains(["kafka", "pubsub"], var.event_bus)
    error_message = "event_bus is \"kafka\" or \"pubsub\"."
  }
}

variable "kafka_mode" {
  description = "With event_bus = \"kafka\": \"strimzi\" runs Kafka in the cluster (Strimzi operator, KRaft, 3 brokers); \"managed\" uses Google Managed Service for Apache Kafka instead (see kafka.tf for what it still needs)."
  type        = string
  default     = "strimzi"

  validation {
    condition     = contains(["strimzi", "managed"], var.kafka_mode)
    error_message = "kafka_mode is \"strimzi\" or \"managed\"."
  }
}

variable "strimzi_chart_version" {
  description = "Version of the strimzi-kafka-operator Helm chart; it must support kafka_version."
  type        = string
  default     = "0.48.0"
}

variable "kafka_version" {
  description = "Apache Kafka version the Strimzi cluster runs (one the Strimzi release supports)."
  type        = string
  default     = "4.1.0"
}

variable "kafka_broker_storage_gb" {
  description = "Persistent volume per Kafka broker, in GB."
  type        = number
  default     = 20
}

variable "kafka_topic_partitions" {
  description = "Partitions of the event topics. finalize consumes in order, one event in flight per partition, so this bounds how many jobs it advances at once."
  type        = number
  default     = 6
}

variable "knative_version" {
  description = "Knative release (Serving, Eventing and the eventing-kafka-broker sink), x.y.z; the knative-operator chart of the same version installs it."
  type        = string
  default     = "1.21.0"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.knative_version))
    error_message = "knative_version is x.y.z, e.g. 1.21.0."
  }
}

variable "domain" {
  description = "DNS domain of the Knative routes (ingest is http://microfl-ingest.microfl.<domain>). Empty: <ingress IP>.sslip.io, which resolves without any DNS set-up. With event_bus = \"pubsub\" it is also where Pub/Sub pushes (https://microfl-aggregate.microfl.<domain>/ and microfl-finalize), so Kourier must serve *.microfl.<domain> with a publicly trusted certificate."
  type        = string
  default     = ""
}

variable "enable_chaos_mesh" {
  description = "Install Chaos Mesh for fault experiments (a privileged daemon on every node)."
  type        = bool
  default     = true
}

variable "chaos_mesh_chart_version" {
  description = "Version of the chaos-mesh Helm chart."
  type        = string
  default     = "2.8.2"
}

variable "labels" {
  description = "Labels put on every Google Cloud resource that takes them."
  type        = map(string)
  default     = { app = "microfl" }
}
