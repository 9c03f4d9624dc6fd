"""Micro-FL: serverless, fault-tolerant federated learning.

Three stateless functions (ingest, aggregate, finalize) keep all state in object storage and are
triggered over HTTP and by Kafka events. See the README and shared design documents.

The modules here are the core the functions' image runs; `microfl.client` (the client SDK) and
`microfl.local` (the local platform) sit above it and it never imports them (pyproject.toml's
import-linter contracts).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
