# The registry for the functions' image (functions/Dockerfile; `make image` pushes to it).

resource "google_artifact_registry_repository" "microfl" {
  #checkov:skip=CKV_GCP_84:Images hold code and public packages only, no data or secrets; Google-managed encryption is enough and a customer-managed key would add a KMS key ring to run and pay for.
  repository_id = var.cluster_name
  location      = var.region
  format        = "DOCKER"
  description   = "Micro-FL function images (one image, three Knative Services)"
  labels        = var.labels

  docker_config {
    immutable_tags = true # make image tags each build with its git commit: a tag never moves
  }

  # Keep the last 10 images; untagged layers from interrupted pushes go after a week.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }
  cleanup_policies {
    id     = "delete-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "604800s"
    }
  }
}

resource "google_artifact_registry_repository_iam_member" "nodes" {
  repository = google_artifact_registry_repository.microfl.name
  location   = google_artifact_registry_repository.microfl.location
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.nodes.member
}

locals {
  image_repository = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.microfl.repository_id}/microfl"
}
