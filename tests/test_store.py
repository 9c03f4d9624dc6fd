"""The ObjectStore contract, run against the file store and against GCS on the real emulator."""

from __future__ import annotations

import io
import random
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from microfl.errors import ConfigError
from microfl.local.gcs import FakeGcsServer
from microfl.store import BLOCK, GCS_CHUNK, FileStore, GcsStore, ObjectStore, open_store

KEYS = [
    "jobs/j/job.json",
    "jobs/j/models/0001",
    "jobs/j/models/0002",
    "jobs/j/models/0010",
    "jobs/j/models/1000",
    "jobs/j/rounds/00000001/updates/client-a",
    "jobs/j/rounds/00000001/updates/client-b",
    "jobs/j2/models/0001",
    "jobs/jx",
    "other",
]


def gcs_client() -> storage.Client:
    return storage.Client(project="microfl-test", credentials=AnonymousCredentials())


@pytest.fixture
def new_bucket(gcs: FakeGcsServer) -> Callable[[], str]:
    """Make a fresh, empty emulator bucket; the emulator runs once per session."""

    def make() -> str:
        return str(gcs_client().create_bucket(f"b-{uuid.uuid4().hex[:12]}").name)

    return make


@pytest.fixture(params=["file", "gcs", "gcs-prefix"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return FileStore(tmp_path / "store")
    bucket = request.getfixturevalue("new_bucket")()
    return GcsStore(bucket, prefix="tenant/a" if request.param == "gcs-prefix" else "")


class Recorded(io.BytesIO):
    """A file that records the size of every read and write: how much a store held at once."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.sizes.append(len(data))
        return data

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return super().write(data)


class TestObjectStore:
    def test_create_is_first_writer_wins(self, store: ObjectStore) -> None:
        assert store.create("jobs/j/models/0001", b"first")
        assert not store.create("jobs/j/models/0001", b"second")
        assert not store.create("jobs/j/models/0001", b"first")
        assert store.read("jobs/j/models/0001") == b"first"

    def test_bytes_round_trip_exactly(self, store: ObjectStore) -> None:
        data = bytes(range(256)) * 3 + b"\x00\r\n"
        assert store.create("a/b/c", data)
        assert store.create("empty", b"")
        assert store.read("a/b/c") == data
        assert store.read("empty") == b""
        assert store.exists("empty")

    def test_near_limit_blob(self, store: ObjectStore) -> None:
        data = random.Random(7).randbytes(7 * 1024 * 1024)
        assert store.create("big", data)
        assert not store.create("big", b"small")
        assert store.read("big") == data

    def test_missing_key_reads_none(self, store: ObjectStore) -> None:
        assert store.read("jobs/none/job.json") is None
        assert not store.exists("jobs/none/job.json")
        store.create("jobs/j/job.json", b"{}")
        assert store.read("jobs/j/job.jso") is None
        assert store.read("jobs/j/job.json.bak") is None

    def test_list_is_sorted_and_by_prefix(self, store: ObjectStore) -> None:
        for key in random.Random(1).sample(KEYS, len(KEYS)):
            assert store.create(key, key.encode())
        assert store.list("") == KEYS
        assert store.list("jobs/j/") == KEYS[:7]
        assert store.list("jobs/j/models/") == KEYS[1:5]
        assert store.list("jobs/j/rounds/") == KEYS[5:7]
        assert store.list("jobs/j") == KEYS[:9]
        assert store.list("jobs/j/models/0001") == ["jobs/j/models/0001"]
        assert store.list("nothing/") == []
        assert store.list("jobs/j/nothing/") == []
        assert store.list("jobs/j/models/0001/") == []  # a key is not a directory

    def test_list_prefix_ending_mid_segment(self, store: ObjectStore) -> None:
        for key in KEYS:
            store.create(key, b"x")
        assert store.list("jobs/j/models/00") == KEYS[1:4]
        assert store.list("jobs/j/models/000") == KEYS[1:3]
        assert store.list("jobs/j/rounds/00000001/updates/client-") == KEYS[5:7]
        assert store.list("oth") == ["other"]
        assert store.list("jobs/j/models/2") == []

    def test_delete_is_idempotent(self, store: ObjectStore) -> None:
        store.delete("never/was")
        assert store.create("jobs/j/rounds/1/updates/c", b"v1")
        store.delete("jobs/j/rounds/1/updates/c")
        assert store.read("jobs/j/rounds/1/updates/c") is None
        assert store.list("jobs/") == []
        store.delete("jobs/j/rounds/1/updates/c")
        assert store.create("jobs/j/rounds/1/updates/c", b"v2")  # free again after a delete
        assert store.read("jobs/j/rounds/1/updates/c") == b"v2"

    def test_delete_leaves_other_keys(self, store: ObjectStore) -> None:
        for key in KEYS:
            store.create(key, b"x")
        store.delete("jobs/j/models/0002")
        assert store.list("jobs/j/models/") == [KEYS[1], KEYS[3], KEYS[4]]

    def test_create_from_file_streams_a_file_create_only(self, store: ObjectStore) -> None:
        data = random.Random(3).randbytes(3 * GCS_CHUNK + 17)  # GCS: resumable, in 4 chunks
        upload = Recorded(data)
        upload.seek(len(data))  # the file's position does not matter: it is sent from its start
        assert store.create_from_file("up/big", upload)
        assert max(upload.sizes) <= GCS_CHUNK, "read more than a chunk of the file at once"
        assert not store.create_from_file("up/big", Recorded(b"other"))
        assert store.read("up/big") == data
        assert store.create_from_file("up/small", Recorded(b"small"))  # GCS: one request
        assert not store.create_from_file("up/small", Recorded(data))
        assert store.create_from_file("up/empty", Recorded())
        assert store.read("up/small") == b"small" and store.read("up/empty") == b""

    def test_read_to_file_streams_an_object_or_says_there_is_none(self, store: ObjectStore) -> None:
        data = random.Random(4).randbytes(2 * BLOCK + 5)
        assert store.create("a/b", data)
        out = Recorded()
        assert store.read_to_file("a/b", out)
        assert out.getvalue() == data
        assert max(out.sizes) <= BLOCK, "wrote more than a block at once"
        missing = Recorded()
        assert not store.read_to_file("a/none", missing)
        assert missing.getvalue() == b""

    def test_read_range_reads_the_bytes_asked_for(self, store: ObjectStore) -> None:
        data = random.Random(5).randbytes(3 * BLOCK + 7)
        assert store.create("a/ranged", data)
        for start, length in [(0, 8), (1, 1), (BLOCK - 3, 10), (5, 2 * BLOCK), (0, len(data))]:
            assert store.read_range("a/ranged", start, length) == data[start : start + length]

    def test_read_range_past_the_end_is_short_or_empty(self, store: ObjectStore) -> None:
        assert store.create("a/short", b"0123456789")
        assert store.read_range("a/short", 8, 5) == b"89"
        assert store.read_range("a/short", 9, 2) == b"9"  # how a shard checks an object's size
        assert store.read_range("a/short", 10, 2) == b""
        assert store.read_range("a/short", 1000, 3) == b""
        assert store.read_range("a/short", 3, 0) == b""

    def test_read_range_of_a_missing_object_is_none(self, store: ObjectStore) -> None:
        assert store.read_range("a/none", 0, 8) is None
        assert store.read_range("a/none", 100, 8) is None
        assert store.read_range("a/none", 0, 0) is None
        assert store.create("a/empty", b"")
        assert store.read_range("a/empty", 0, 8) == b""

    def test_read_range_refuses_negative_ranges(self, store: ObjectStore) -> None:
        with pytest.raises(ValueError, match="start >= 0"):
            store.read_range("a/x", -1, 4)
        with pytest.raises(ValueError, match="length >= 0"):
            store.read_range("a/x", 0, -4)

    def test_concurrent_creates_of_one_key_have_one_winner(self, store: ObjectStore) -> None:
        n = 8
        start = threading.Barrier(n)
        results: list[bool | BaseException] = [False] * n

        def write(i: int) -> None:
            start.wait()
            try:
                results[i] = store.create("jobs/j/rounds/00000001/seal.json", b"writer %d" % i)
            except BaseException as exc:  # reported below, not lost in the thread
                results[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r for r in results if not isinstance(r, bool)] == []
        assert results.count(True) == 1
        winner = results.index(True)
        assert store.read("jobs/j/rounds/00000001/seal.json") == b"writer %d" % winner


class TestFileStore:
    @pytest.mark.parametrize(
        "key", ["", "/abs", "/", "a//b", "a/", "..", "../x", "a/../b", "a/..", ".", "./a", "a/./b"]
    )
    def test_rejects_unsafe_keys(self, tmp_path: Path, key: str) -> None:
        store = FileStore(tmp_path / "store")
        for op in (
            lambda: store.create(key, b"x"),
            lambda: store.read(key),
            lambda: store.delete(key),
        ):
            with pytest.raises(ValueError, match="invalid object key"):
                op()
        assert list(tmp_path.rglob("*")) == [tmp_path / "store"]

    @pytest.mark.parametrize("prefix", ["../", "..", "a/../../", "../store/", "a/./", "/", "/etc/"])
    def test_list_never_leaves_the_root(self, tmp_path: Path, prefix: str) -> None:
        (tmp_path / "outside").write_bytes(b"secret")
        store = FileStore(tmp_path / "store")
        store.create("a/b", b"x")
        with pytest.raises(ValueError, match="invalid object key prefix"):
            store.list(prefix)

    def test_never_lists_or_leaves_temp_files(self, tmp_path: Path) -> None:
        store = FileStore(tmp_path)
        assert store.create("jobs/j/models/0001", b"x")
        assert not store.create("jobs/j/models/0001", b"y")
        # what a writer killed between write and link leaves behind
        (tmp_path / "jobs" / "j" / "models" / ".tmp-abc123").write_bytes(b"partial")
        (tmp_path / ".tmp-top").write_bytes(b"partial")
        assert store.list("") == ["jobs/j/models/0001"]
        assert store.list("jobs/j/models/") == ["jobs/j/models/0001"]
        on_disk = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
        assert on_disk == [".tmp-abc123", ".tmp-top", "0001"]

    def test_keys_are_files_under_the_root(self, tmp_path: Path) -> None:
        store = FileStore(tmp_path / "s")
        store.create("jobs/j/job.json", b"{}")
        assert (tmp_path / "s" / "jobs" / "j" / "job.json").read_bytes() == b"{}"
        assert store.url == f"file://{tmp_path / 's'}"


class TestGcsStore:
    def test_prefix_scopes_every_operation(self, new_bucket: Callable[[], str]) -> None:
        name = new_bucket()
        bucket = gcs_client().bucket(name)
        bucket.blob("tenant/ab").upload_from_string(b"sibling")  # shares the prefix's characters
        bucket.blob("outside").upload_from_string(b"other")
        store = GcsStore(name, prefix="/tenant/a/")
        assert store.url == f"gs://{name}/tenant/a/"
        assert store.create("jobs/j/job.json", b"{}")
        assert bucket.blob("tenant/a/jobs/j/job.json").download_as_bytes() == b"{}"
        assert store.list("") == ["jobs/j/job.json"]
        assert store.read("outside") is None
        store.delete("outside")
        assert bucket.blob("outside").exists()
        assert sorted(b.name for b in bucket.list_blobs()) == [
            "outside",
            "tenant/a/jobs/j/job.json",
            "tenant/ab",
        ]


class TestOpenStore:
    def test_file_url(self, tmp_path: Path) -> None:
        store = open_store(f"file://{tmp_path}/s")
        assert isinstance(store, FileStore)
        assert store.root == tmp_path / "s" and (tmp_path / "s").is_dir()

    @pytest.mark.usefixtures("gcs")
    @pytest.mark.parametrize(
        ("url", "prefix"),
        [("gs://b/p", "p/"), ("gs://b/p/q/", "p/q/"), ("gs://b", ""), ("gs://b/", "")],
    )
    def test_gs_url(self, url: str, prefix: str) -> None:
        store = open_store(url)
        assert isinstance(store, GcsStore)
        assert store.bucket.name == "b"
        assert store.prefix == prefix
        assert store.url == f"gs://b/{prefix}"

    @pytest.mark.parametrize(
        "url",
        [
            "",
            "/var/microfl",
            "s3://b/p",
            "gs:///p",
            "gs:b",
            "http://127.0.0.1/b",
            "memory://",
            "file://",
            "file:",
            "file://relative/store",
            "file:relative/store",
        ],
    )
    def test_other_urls_are_config_errors(self, url: str) -> None:
        with pytest.raises(ConfigError, match="MICROFL_STORE must be"):
            open_store(url)
