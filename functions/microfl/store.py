"""Object storage, the platform's only state: one interface, a filesystem and a GCS backend.

Every write the platform makes is create-only (`create`), so two racing or retried writers can
never leave different bytes under one key: the first wins and the others learn it (False)."""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from microfl.errors import ConfigError, StorageUnavailable

__all__ = ["FileStore", "GcsStore", "ObjectStore", "open_store"]

WRITER_METADATA = "microfl-writer"  # custom metadata key: the nonce of the create that wrote it


class ObjectStore(ABC):
    """Keys are '/'-separated paths of safe segments; values are bytes."""

    url: str

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write data under key unless key exists; True if this call created it."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The bytes under key, or None if there is no such object."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Sorted keys that start with prefix."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key if present."""

    @abstractmethod
    def children(self, prefix: str) -> builtins.list[str]:
        """Sorted names one level below prefix (which ends with '/'), objects or folders."""

    def exists(self, key: str) -> bool:
        return self.read(key) is not None


class FileStore(ObjectStore):
    """A directory tree; create-only by hard-linking a fully written, fsynced temp file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # atomic, fails if path exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageUnavailable(f"file store {self.root}: {exc}") from exc

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailable(f"file store {self.root}: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        if prefix.startswith("/") or any(p in (".", "..") for p in prefix.split("/")):
            raise ValueError(f"invalid object key prefix {prefix!r}")
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def children(self, prefix: str) -> builtins.list[str]:
        try:
            names = os.listdir(self._path(prefix.rstrip("/")))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not n.startswith(".tmp-"))


class GcsStore(ObjectStore):
    """A GCS bucket (or the emulator named by STORAGE_EMULATOR_HOST), create-only through
    `if_generation_match=0`."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        from google.cloud import storage

        if client is None:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project="microfl-local", credentials=AnonymousCredentials())
            else:
                client = storage.Client()
        self.bucket = client.bucket(bucket)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"gs://{bucket}/{self.prefix}"

    def _call(self, what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from google.api_core import exceptions as gexc

        try:
            return fn(*args, **kwargs)
        except (gexc.NotFound, gexc.PreconditionFailed):
            raise
        except (gexc.GoogleAPIError, OSError) as exc:
            raise StorageUnavailable(f"{self.url}: {what} failed: {exc}") from exc
        except Exception as exc:  # requests' ConnectionError, timeouts
            if "Connection" in type(exc).__name__ or "Timeout" in type(exc).__name__:
                raise StorageUnavailable(f"{self.url}: {what} failed: {exc}") from exc
            raise

    def create(self, key: str, data: bytes) -> bool:
        return self._create_once(
            key,
            lambda blob: blob.upload_from_string(
                data, content_type="application/octet-stream", if_generation_match=0
            ),
        )

    def _create_once(self, key: str, upload: Callable[[Any], None]) -> bool:
        """Run a create-only upload (if_generation_match=0) of a blob tagged with a nonce of
        this call. google-cloud-storage retries such uploads on transient errors, so a 412 can
        answer the retry of an attempt that did write (its answer lost): the nonce on the
        object tells "this call created it" from "another writer did"."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        nonce = secrets.token_hex(16)
        blob = self.bucket.blob(self.prefix + key)
        blob.metadata = {WRITER_METADATA: nonce}
        try:
            self._call(f"create {key}", upload, blob)
            return True
        except PreconditionFailed:
            pass
        try:
            found = self._call(f"create {key}", self.bucket.get_blob, self.prefix + key)
        except NotFound:
            found = None
        return found is not None and (found.metadata or {}).get(WRITER_METADATA) == nonce

    def read(self, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            data = self._call(f"read {key}", self.bucket.blob(self.prefix + key).download_as_bytes)
            return bytes(data)
        except NotFound:
            return None

    def list(self, prefix: str) -> list[str]:
        blobs = self._call(
            f"list {prefix}", lambda: list(self.bucket.list_blobs(prefix=self.prefix + prefix))
        )
        n = len(self.prefix)
        return sorted(b.name[n:] for b in blobs)

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._call(f"delete {key}", self.bucket.blob(self.prefix + key).delete)

    def children(self, prefix: str) -> builtins.list[str]:
        def names() -> builtins.list[str]:
            pages = self.bucket.list_blobs(prefix=self.prefix + prefix, delimiter="/")
            found = [b.name.rsplit("/", 1)[-1] for b in pages]
            return found + [p.rstrip("/").rsplit("/", 1)[-1] for p in pages.prefixes]

        return sorted(self._call(f"list {prefix}", names))


def open_store(url: str) -> ObjectStore:
    """`file:///path` or `gs://bucket[/prefix]`."""
    parsed = urlparse(url)
    if parsed.scheme == "file" and not parsed.netloc and parsed.path.startswith("/"):
        return FileStore(parsed.path)
    if parsed.scheme == "gs" and parsed.netloc:
        return GcsStore(parsed.netloc, parsed.path)
    raise ConfigError(f"MICROFL_STORE must be file:///path or gs://bucket[/prefix], not {url!r}")
