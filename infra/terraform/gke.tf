# A regional GKE Standard cluster (Chaos Mesh's privileged daemon is refused on Autopilot) with
# private nodes in its own VPC, Workload Identity, and one autoscaled node pool.

locals {
  namespace = "microfl" # knative/kustomization.yaml deploys the functions here
}

resource "google_compute_network" "microfl" {
  name                    = var.cluster_name
  auto_create_subnetworks = false
}

resource "google_compute_subnetwork" "nodes" {
  name                     = "${var.cluster_name}-nodes"
  network                  = google_compute_network.microfl.id
  region                   = var.region
  ip_cidr_range            = "10.10.0.0/20"
  private_ip_google_access = true # GCS and Artifact Registry without public IPs

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = "10.16.0.0/14"
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = "10.20.0.0/20"
  }

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Nothing reaches the nodes unless a rule allows it: GKE adds, at higher priority, the rules its
# control plane, health checks and load balancers (Kourier's) need. Explicit rather than implied,
# so the network's policy reads here.
resource "google_compute_firewall" "deny_ingress" {
  name      = "${var.cluster_name}-deny-ingress"
  network   = google_compute_network.microfl.id
  direction = "INGRESS"
  priority  = 65534

  deny {
    protocol = "all"
  }
  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Private nodes still pull public images (Strimzi, Knative, Chaos Mesh): outbound through NAT.
resource "google_compute_router" "nat" {
  name    = "${var.cluster_name}-nat"
  network = google_compute_network.microfl.id
  region  = var.region
}

resource "google_compute_router_nat" "nat" {
  name                               = "${var.cluster_name}-nat"
  router                             = google_compute_router.nat.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# The nodes' own identity: logs, metrics and image pulls only. Functions never use it (Workload
# Identity gives each its own account, iam.tf).
resource "google_service_account" "nodes" {
  account_id   = "${var.cluster_name}-nodes"
  display_name = "Micro-FL GKE nodes"
}

resource "google_project_iam_member" "nodes" {
  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount"
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_cluster" "microfl" {
  #checkov:skip=CKV_GCP_12:Network policy is enforced by GKE Dataplane V2 (datapath_provider ADVANCED_DATAPATH); the legacy network_policy block (Calico) must stay off with it.
  #checkov:skip=CKV_GCP_24:PodSecurityPolicy was removed in Kubernetes 1.25; GKE enforces Pod Security Standards through namespace labels instead.
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Google Workspace gke-security-groups group, which not every project has; access is granted with IAM roles on the project.
  name     = var.cluster_name
  location = var.region # regional: control plane and nodes in three zones

  # The default pool cannot be configured as needed (Workload Identity metadata, shielded
  # nodes, own service account): drop it and use google_container_node_pool.main.
  remove_default_node_pool = true
  initial_node_count       = 1

  deletion_protection = var.deletion_protection
  resource_labels     = var.labels

  network         = google_compute_network.microfl.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }
  datapath_provider           = "ADVANCED_DATAPATH" # Dataplane V2: NetworkPolicy enforcement
  enable_intranode_visibility = true

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false # reached from authorized_networks only, see below
    master_ipv4_cidr_block  = "172.16.0.0/28"
    master_global_access_config {
      enabled = false
    }
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.authorized_networks
      content {
        cidr_block   = cidr_blocks.key
        display_name = cidr_blocks.value
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  release_channel {
    channel = "REGULAR"
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  enable_shielded_nodes = true

  # Applies to the default pool only, which is removed at creation; set anyway so that it too
  # is never created without these settings.
  node_config {
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }

  maintenance_policy {
    daily_maintenance_window {
      start_time = "03:00"
    }
  }

  depends_on = [google_compute_router_nat.nat]
}

resource "google_container_node_pool" "main" {
  name     = "main"
  cluster  = google_container_cluster.microfl.id
  location = var.region

  initial_node_count = var.node_count_per_zone
  autoscaling {
    min_node_count = var.node_min_per_zone
    max_node_count = var.node_max_per_zone
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.node_machine_type
    image_type      = "COS_CONTAINERD" # Chaos Mesh's daemon talks to containerd (chaos.tf)
    disk_type       = "pd-balanced"
    disk_size_gb    = var.node_disk_size_gb
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"] # IAM decides, not scopes
    labels          = var.labels
    metadata = {
      disable-legacy-endpoints = "true"
    }

    workload_metadata_config {
      mode = "GKE_METADATA" # pods get their Kubernetes service account's Google identity
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count] # the autoscaler owns the count after creation
  }
}
