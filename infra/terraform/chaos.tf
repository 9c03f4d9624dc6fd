# Chaos Mesh, for the fault experiments of the paper (kill brokers and function instances,
# partition the network) against the running platform. Its daemon runs privileged on every
# node and reaches containers through the node's containerd (GKE's COS_CONTAINERD image),
# which is why the cluster is GKE Standard: Autopilot refuses privileged pods.

locals {
  chaos_mesh_values = {
    chaosDaemon = {
      runtime    = "containerd"
      socketPath = "/run/containerd/containerd.sock"
    }
    dashboard = {
      securityMode = true                   # the dashboard asks for a service account token
      service      = { type = "ClusterIP" } # reach it with kubectl port-forward only
    }
  }
}

resource "helm_release" "chaos_mesh" {
  count = var.enable_chaos_mesh ? 1 : 0

  name             = "chaos-mesh"
  repository       = "https://charts.chaos-mesh.org"
  chart            = "chaos-mesh"
  version          = var.chaos_mesh_chart_version
  namespace        = "chaos-mesh"
  create_namespace = true

  values = [yamlencode(local.chaos_mesh_values)]

  depends_on = [google_container_node_pool.main]
}
