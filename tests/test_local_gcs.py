"""The GCS emulator through google-cloud-storage: create-only writes are enforced (412)."""

from __future__ import annotations

import uuid

import pytest
from google.api_core.exceptions import PreconditionFailed
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from microfl.local.gcs import FakeGcsServer


@pytest.fixture
def bucket(gcs: FakeGcsServer) -> storage.Bucket:
    client = storage.Client(project="microfl-test", credentials=AnonymousCredentials())
    return client.create_bucket(f"b-{uuid.uuid4().hex[:12]}")


def test_second_create_only_write_gets_412(bucket: storage.Bucket) -> None:
    blob = bucket.blob("jobs/j/models/1")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed) as info:
        bucket.blob("jobs/j/models/1").upload_from_string(b"second", if_generation_match=0)
    assert info.value.code == 412
    assert bucket.blob("jobs/j/models/1").download_as_bytes() == b"first"


def test_replace_only_at_the_generation_read(bucket: storage.Bucket) -> None:
    bucket.blob("state").upload_from_string(b"v1", if_generation_match=0)
    current = bucket.get_blob("state")
    assert current is not None and current.generation
    bucket.blob("state").upload_from_string(b"v2", if_generation_match=current.generation)
    with pytest.raises(PreconditionFailed):  # a writer holding the old generation loses
        bucket.blob("state").upload_from_string(b"v3", if_generation_match=current.generation)
    assert bucket.blob("state").download_as_bytes() == b"v2"


def test_near_limit_blob_is_still_create_only(bucket: storage.Bucket) -> None:
    """The emulator enforces the precondition on single-request uploads under 8 MiB."""
    data = bytes(7 * 1024 * 1024)
    bucket.blob("big").upload_from_string(data, if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("big").upload_from_string(data, if_generation_match=0)
