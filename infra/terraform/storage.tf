# The bucket that holds all platform state: jobs/{job}/job.json, models/, optimizer/, and per
# round updates/, slots/, seal.json, nodes/ and record.json (functions/microfl/rounds.py). Private,
# versioned, and protected from `terraform destroy`.

locals {
  bucket_name = var.bucket_name != "" ? var.bucket_name : "${var.project_id}-microfl"
}

resource "google_storage_bucket" "store" {
  #checkov:skip=CKV_GCP_62:Access logs would go to a second bucket; object reads and writes are audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com) instead.
  name          = local.bucket_name
  location      = var.region # next to the cluster: no inter-region traffic
  storage_class = "STANDARD"
  labels        = var.labels

  uniform_bucket_level_access = true       # IAM only, no object ACLs (needed by IAM conditions)
  public_access_prevention    = "enforced" # never public, whatever IAM says
  force_destroy               = false      # destroy fails while objects exist

  # Every object is written once (create-only); versions keep what a mistaken delete removed.
  versioning {
    enabled = true
  }

  soft_delete_policy {
    retention_duration_seconds = 604800 # 7 days, on top of noncurrent versions
  }

  # Client updates are needed only until their round is committed. GCS lifecycle conditions
  # match object names by prefix or suffix only, and update objects
  # (jobs/{job}/rounds/{r}/updates/{client}) have neither in common with no other object, so
  # the rule keys on customTime instead: ingest is to give each update object a customTime (its
  # upload time) and no other writer sets one, so only updates match. An object without
  # customTime never matches, so until ingest sets it this rule deletes nothing (safe either way).
  lifecycle_rule {
    condition {
      days_since_custom_time = var.update_retention_days
    }
    action {
      type = "Delete"
    }
  }

  # Deleted objects (expired updates; an update ingest withdrew because its round was sealed
  # while it arrived) stay as noncurrent versions for a while, then go for good.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    prevent_destroy = true # models are the product of every client's work: remove by hand
  }
}
