"""Micro-FL: serverless, fault-tolerant federated learning.

Three stateless functions (ingest, aggregate, finalize) keep all state in object storage and are
triggered over HTTP and by Kafka events. See the README and shared design documents.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
