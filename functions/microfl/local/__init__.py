"""The local platform, never imported by the image's core: the `microfl` command (`cli`), the real
parts it starts (a Kafka broker or cluster from Maven Central jars, fake-gcs-server, the Pub/Sub
emulator), the runtime that serves knative/ with them, the demo, the manifests check, the chaos
scenarios and their invariant checker. Installed with the `local` extra."""
