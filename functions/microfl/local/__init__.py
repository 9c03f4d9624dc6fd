"""The real parts of the local platform, started by the project itself: a Kafka broker or cluster
assembled from Maven Central jars, and fake-gcs-server as the GCS emulator."""
