# Providers and how they reach the cluster this configuration creates.
#
# Everything is applied with one `terraform apply` (or `tofu apply`): Kubernetes objects go
# through Helm only (operators from their charts, their custom resources through the small
# local chart in charts/manifests), so nothing needs the custom resource definitions to exist
# at plan time, as kubernetes_manifest would.

terraform {
  required_version = ">= 1.6"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

# The caller's own credentials (gcloud auth application-default login) also reach the cluster:
# a short-lived access token, no static kubeconfig in the state.
data "google_client_config" "current" {}

provider "helm" {
  kubernetes = {
    host                   = "https://${google_container_cluster.microfl.endpoint}"
    token                  = data.google_client_config.current.access_token
    cluster_ca_certificate = base64decode(google_container_cluster.microfl.master_auth[0].cluster_ca_certificate)
  }
}
