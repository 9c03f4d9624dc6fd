"""Object storage, the platform's only state: one interface, a filesystem and a GCS backend.

Every write the platform makes is create-only (`create`), so two racing or retried writers can
never leave different bytes under one key: the first wins and the others learn it (False).
Uploads of any size go through `create_from_file` and `read_to_file`, which hold one block in
memory at a time, never the whole object."""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from microfl.errors import ConfigError, StorageUnavailable

__all__ = ["FileStore", "GcsStore", "ObjectStore", "open_store"]

WRITER_METADATA = "microfl-writer"  # custom metadata key: the nonce of the create that wrote it
BLOCK = 256 * 1024  # bytes of a file copied at a time
GCS_CHUNK = 4 * BLOCK  # of a resumable upload: one request each, held in memory while it goes


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
        """Whether key holds an object (the backends answer without reading it)."""
        return self.read(key) is not None

    def read_range(self, key: str, start: int, length: int) -> bytes | None:
        """Bytes [start, start + length) of the object, fewer where it ends first (b"" past its
        end), or None if there is no such object. The backends read only those bytes: how a
        coordinate shard reads its slice of every update (microfl.shards)."""
        if start < 0 or length < 0:
            raise ValueError(f"a range needs start >= 0 and length >= 0, not {start}, {length}")
        data = self.read(key)
        return None if data is None else data[start : start + length]

    def create_from_file(self, key: str, file: IO[bytes]) -> bool:
        """create() with the bytes of a binary file from its start; the backends stream them."""
        file.seek(0)
        return self.create(key, file.read())

    def read_to_file(self, key: str, out: IO[bytes]) -> bool:
        """Write the object's bytes to out (anything with a write method); False if there is no
        such object. The backends stream them."""
        data = self.read(key)
        if data is not None:
            out.write(data)
        return data is not None


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
        return self._create(path, lambda f: f.write(data))

    def create_from_file(self, key: str, file: IO[bytes]) -> bool:
        path = self._path(key)
        file.seek(0)
        return self._create(path, lambda f: shutil.copyfileobj(file, f, BLOCK))

    def _create(self, path: Path, write: Callable[[IO[bytes]], object]) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
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

    def read_range(self, key: str, start: int, length: int) -> bytes | None:
        if start < 0 or length < 0:
            raise ValueError(f"a range needs start >= 0 and length >= 0, not {start}, {length}")
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailable(f"file store {self.root}: {exc}") from exc
        try:
            parts, position, end = [], start, start + length
            while position < end:  # pread may return less than asked before the end
                part = os.pread(fd, end - position, position)
                if not part:
                    break
                parts.append(part)
                position += len(part)
            return b"".join(parts)
        except OSError as exc:
            raise StorageUnavailable(f"file store {self.root}: {exc}") from exc
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise StorageUnavailable(f"file store {self.root}: {exc}") from exc

    def read_to_file(self, key: str, out: IO[bytes]) -> bool:
        try:
            with self._path(key).open("rb") as f:
                shutil.copyfileobj(f, out, BLOCK)
            return True
        except FileNotFoundError:
            return False
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

    def create_from_file(self, key: str, file: IO[bytes]) -> bool:
        """Files above GCS_CHUNK go as resumable uploads in chunks of GCS_CHUNK: the library
        would read a file of up to 8 MiB whole (multipart), and holds 100 MiB chunks by default.
        A resumable upload first looks whether the object exists: no large upload only to learn
        412 at its end (and fake-gcs-server ignores preconditions on resumable uploads, its
        issue #1967; GCS itself enforces them, which is what makes this create-only)."""
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        if size > GCS_CHUNK and self._call(
            f"create {key}", self.bucket.blob(self.prefix + key).exists
        ):
            return False

        def upload(blob: Any) -> None:
            blob.chunk_size = GCS_CHUNK
            blob.upload_from_file(
                file,
                size=size if size <= GCS_CHUNK else None,  # None: resumable, whatever the size
                content_type="application/octet-stream",
                if_generation_match=0,
            )

        return self._create_once(key, upload)

    def read(self, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            data = self._call(f"read {key}", self.bucket.blob(self.prefix + key).download_as_bytes)
            return bytes(data)
        except NotFound:
            return None

    def read_range(self, key: str, start: int, length: int) -> bytes | None:
        """One ranged GET (`end` is inclusive there); a range past the object's end (416) is
        b"", as a short file read is."""
        from google.api_core.exceptions import NotFound, RequestRangeNotSatisfiable

        if start < 0 or length < 0:
            raise ValueError(f"a range needs start >= 0 and length >= 0, not {start}, {length}")
        blob = self.bucket.blob(self.prefix + key)
        if length == 0:
            return b"" if self.exists(key) else None

        def download() -> bytes:
            try:
                return bytes(blob.download_as_bytes(start=start, end=start + length - 1))
            except RequestRangeNotSatisfiable:
                return b""

        try:
            data: bytes = self._call(f"read {key}", download)
        except NotFound:
            return None
        if data == b"" and not self.exists(key):  # a 416 says nothing of whether it exists
            return None
        return data

    def exists(self, key: str) -> bool:
        """A metadata request: the object's bytes are not downloaded."""
        return bool(self._call(f"read {key}", self.bucket.blob(self.prefix + key).exists))

    def read_to_file(self, key: str, out: IO[bytes]) -> bool:
        from google.api_core.exceptions import NotFound

        try:
            self._call(f"read {key}", self.bucket.blob(self.prefix + key).download_to_file, out)
            return True
        except NotFound:
            return False

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
