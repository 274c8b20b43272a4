"""The storage contract, for every backend against its real store: a put may be repeated or
race with another put of the same key and still leave exactly one complete, readable version;
once a put has returned, the key answers with complete bytes for good; a store that cannot
be reached is StorageUnavailable (transient), never anything else."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gridfs
import pymongo
import pytest
from bson import ObjectId

from imgproc import embedded_db
from imgproc.embedded_db import free_port
from imgproc.storage import Storage, StorageUnavailable
from imgproc.storage.gridfs_bucket import GridFSStorage
from imgproc.storage.local import LocalStorage
from imgproc.storage.s3 import CACHE_CONTROL, S3Storage
from imgproc.store import Store, connect
from tests.conftest import S3_BUCKET
from tests.s3server import S3Server

KEY = "0f8fad5b-d9cb-469f-a165-70867728950e/3-0.jpg"
REQUEST_ID = KEY.split("/")[0]  # the directory of its request
BACKENDS = ["local", "gridfs", "s3"]


def versions(count: int, size: int = 700_000) -> list[bytes]:
    """Distinct payloads of ``size`` bytes (several GridFS chunks each)."""
    return [hashlib.sha256(bytes([n])).digest() * (size // 32) for n in range(count)]


@pytest.fixture
def make_storage(
    mongo: Any, tmp_path: Path, s3_prefix: str, request: pytest.FixtureRequest
) -> Callable[[str], Storage]:
    def make(backend: str) -> Storage:
        if backend == "gridfs":
            store = Store(mongo)
            store.ensure_indexes()
            return GridFSStorage(store)
        if backend == "s3":  # SeaweedFS starts only for the tests that need it
            s3: S3Server = request.getfixturevalue("s3")
            return S3Storage(S3_BUCKET, prefix=s3_prefix, endpoint_url=s3.endpoint)
        return LocalStorage(str(tmp_path / "images"))

    return make


def read(storage: Storage, key: str) -> bytes | None:
    stored = storage.get(key)
    if stored is None:
        return None
    if stored.path is not None:
        return Path(stored.path).read_bytes()
    assert stored.data is not None
    return stored.data


def objects(s3_prefix: str, request: pytest.FixtureRequest) -> list[str]:
    """The keys stored in the S3 bucket under this test's prefix."""
    s3: S3Server = request.getfixturevalue("s3")
    return s3.keys(S3_BUCKET, s3_prefix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_put_leaves_one_complete_version(
    backend: str,
    make_storage: Callable[[str], Storage],
    mongo: Any,
    tmp_path: Path,
    s3_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    storage = make_storage(backend)
    first, second = versions(2)
    storage.put(KEY, first)
    storage.put(KEY, first)  # a retry
    storage.put(KEY, second)  # a redo that encoded differently
    assert read(storage, KEY) in (first, second)
    if backend == "s3":
        # The last complete PUT wins; one object, with its type and a year of caching.
        assert read(storage, KEY) == second
        assert objects(s3_prefix, request) == [s3_prefix + KEY]
        stored = storage.get(KEY)
        assert stored is not None and stored.etag == hashlib.md5(second).hexdigest()
        head = (
            request.getfixturevalue("s3")
            .client()
            .head_object(Bucket=S3_BUCKET, Key=s3_prefix + KEY)
        )
        assert head["ContentType"] == "image/jpeg"
        assert head["CacheControl"] == CACHE_CONTROL
        assert head["ContentLength"] == len(second)
    elif backend == "gridfs":
        # The first complete version stays; nothing else is left behind.
        assert read(storage, KEY) == first
        assert mongo["images.files"].count_documents({}) == 1
        (only,) = mongo["images.files"].find()
        assert mongo["images.chunks"].count_documents({"files_id": only["_id"]}) == 3
        assert mongo["images.chunks"].count_documents({}) == 3
        stored = storage.get(KEY)
        assert stored is not None and stored.etag == hashlib.sha256(first).hexdigest()[:32]
    else:
        assert read(storage, KEY) == second
        assert os.listdir(tmp_path / "images" / REQUEST_ID) == ["3-0.jpg"]
    assert storage.get(KEY.replace("3-0", "4-0")) is None
    assert storage.get("../etc/passwd") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_racing_puts_and_readers_never_see_a_part_or_a_gap(
    backend: str,
    make_storage: Callable[[str], Storage],
    mongo: Any,
    tmp_path: Path,
    s3_prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    storage = make_storage(backend)
    payloads = versions(6)
    stored = threading.Event()  # set once some put has returned
    start = threading.Barrier(len(payloads))
    seen: list[tuple[bool, bytes | None]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            after_a_put = stored.is_set()
            seen.append((after_a_put, read(storage, KEY)))

    def writer(data: bytes) -> None:
        start.wait()
        for _ in range(3):
            storage.put(KEY, data)
            stored.set()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.wait(0.3)  # and read on for a while after the last put
    stop.set()
    for thread in readers:
        thread.join()

    after = [data for after_a_put, data in seen if after_a_put]
    assert len(after) > 10
    assert all(data in payloads for data in after)  # never None after a put, never a part
    assert all(data is None or data in payloads for _, data in seen)
    assert read(storage, KEY) in payloads
    if backend == "gridfs":
        assert mongo["images.files"].count_documents({}) == 1
        assert mongo["images.chunks"].count_documents({}) == 3  # losers' chunks removed
    elif backend == "s3":
        assert objects(s3_prefix, request) == [s3_prefix + KEY]
    else:
        assert os.listdir(tmp_path / "images" / REQUEST_ID) == ["3-0.jpg"]


def test_an_interrupted_gridfs_put_is_invisible_and_the_next_put_completes(mongo: Any) -> None:
    """A writer killed between its chunks and its files document leaves chunks nobody reads;
    the redo stores a complete version beside them."""
    store = Store(mongo)
    store.ensure_indexes()
    # What GridFS leaves when its writer dies: chunks written, no files document yet.
    mongo["images.chunks"].insert_one({"files_id": ObjectId(), "n": 0, "data": b"x" * 1000})
    storage = GridFSStorage(store)
    assert storage.get(KEY) is None
    data = versions(2)[1]
    storage.put(KEY, data)
    assert read(storage, KEY) == data
    assert mongo["images.files"].count_documents({}) == 1


def test_older_gridfs_revisions_are_folded_into_one(mongo: Any) -> None:
    """A database from before the unique image names: the newest revision (what readers were
    served) is kept, the index is created, and puts keep the contract from then on."""
    bucket = gridfs.GridFSBucket(mongo, bucket_name="images")
    old, new = versions(2, size=1000)
    bucket.upload_from_stream(KEY, old)
    bucket.upload_from_stream(KEY, new)
    store = Store(mongo)
    store.ensure_indexes()
    assert mongo["images.files"].count_documents({}) == 1
    assert read(GridFSStorage(store), KEY) == new
    names = [index["name"] for index in mongo["images.files"].list_indexes()]
    assert "filename_unique" in names


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_synced_put_reads_back_and_a_sync_never_loses_a_version(
    backend: str, make_storage: Callable[[str], Storage]
) -> None:
    storage = make_storage(backend)
    first, second = versions(2)
    storage.put(KEY, first)
    storage.sync([KEY])
    assert read(storage, KEY) == first
    storage.put(KEY, second)  # a redo over an output an outcome may already call done
    storage.sync([KEY, KEY])
    assert read(storage, KEY) == (first if backend == "gridfs" else second)  # gridfs: the first


def test_a_local_put_new_or_replacing_leaves_one_whole_file_and_no_temporary_one(
    tmp_path: Path,
) -> None:
    """A new file takes its name by a link, one that replaces a file is renamed over it:
    either way the key's file is a new one with the whole bytes, under one name only."""
    storage = LocalStorage(str(tmp_path / "images"))
    directory = tmp_path / "images" / REQUEST_ID
    first, second = versions(2)
    storage.put(KEY, first)
    new = os.stat(directory / "3-0.jpg")
    storage.put(KEY, second)
    replaced = os.stat(directory / "3-0.jpg")
    assert os.listdir(directory) == ["3-0.jpg"]
    assert new.st_nlink == replaced.st_nlink == 1
    assert new.st_ino != replaced.st_ino
    assert (directory / "3-0.jpg").read_bytes() == second


PUTTING_FOREVER = """
import sys
from imgproc.storage.local import LocalStorage

storage = LocalStorage(sys.argv[1])
data = bytes(64 << 20)  # a put long enough to be killed in the middle of
for n in range(10**6):
    storage.put(sys.argv[2].replace("/3-0.", f"/{n % 3}-0."), data)
"""


def killed_while_putting(root: Path, directory: Path) -> None:
    """Run a process that puts outputs without end and SIGKILL it the moment a put's
    temporary file is there; again until one outlives its process (up to 20 kills)."""
    for _kill in range(20):
        process = subprocess.Popen(
            [sys.executable, "-c", PUTTING_FOREVER, str(root), KEY],
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            deadline = time.monotonic() + 30
            while not (directory.is_dir() and any(directory.glob(".tmp-*"))):
                assert process.poll() is None, "the putting process ended"
                assert time.monotonic() < deadline, "no put started"
                time.sleep(0.0005)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        if any(directory.glob(".tmp-*")):
            return
    raise AssertionError("20 kills and no put was cut short")


def test_a_put_cut_short_by_a_kill_leaves_a_temporary_file_that_the_sweep_removes(
    tmp_path: Path,
) -> None:
    """SIGKILL in the middle of a local put leaves its temporary file (never a part under a
    key's name); once the request is finished the job sweeps its directory, and what is left
    is the outputs, whole."""
    root = tmp_path / "images"
    directory = root / REQUEST_ID
    killed_while_putting(root, directory)
    leftovers = len(list(directory.glob(".tmp-*")))
    outputs = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".tmp-"))
    assert set(outputs) <= {"0-0.jpg", "1-0.jpg", "2-0.jpg"}
    storage = LocalStorage(str(root))
    storage.put(KEY, b"after the kill")
    assert storage.sweep(REQUEST_ID) == leftovers
    assert sorted(os.listdir(directory)) == sorted([*outputs, "3-0.jpg"])
    for name in outputs:  # each one whole: the killed process wrote 64 MiB of zeros
        assert (directory / name).read_bytes() == bytes(64 << 20)
    assert read(storage, KEY) == b"after the kill"


def test_sweeping_a_request_with_nothing_stored_or_a_bad_id(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path / "images"))
    assert storage.sweep(REQUEST_ID) == 0  # no directory: nothing to do
    assert not (tmp_path / "images").exists()
    (tmp_path / "images").mkdir()
    (tmp_path / ".tmp-0123456789abcdef").write_bytes(b"not the service's")
    assert storage.sweep("..") == 0  # no key starts so: nothing outside a request's own
    assert (tmp_path / ".tmp-0123456789abcdef").exists()


def test_a_leftover_that_cannot_be_removed_keeps_no_other_and_is_unavailable(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(str(tmp_path / "images"))
    storage.put(KEY, b"output")
    directory = tmp_path / "images" / REQUEST_ID
    (directory / ".tmp-00000000000000aa").mkdir()  # not a file: unlink refuses it
    (directory / ".tmp-00000000000000bb").write_bytes(b"cut short")
    with pytest.raises(StorageUnavailable, match="could not clear"):
        storage.sweep(REQUEST_ID)
    assert sorted(os.listdir(directory)) == [".tmp-00000000000000aa", "3-0.jpg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sweep_leaves_every_stored_output(
    backend: str, make_storage: Callable[[str], Storage]
) -> None:
    storage = make_storage(backend)
    first, second = versions(2, 1000)
    other = KEY.replace("/3-0.", "/4-0.")
    storage.put(KEY, first)
    storage.put(other, second)
    storage.sync([KEY, other])
    assert storage.sweep(REQUEST_ID) == 0
    assert (read(storage, KEY), read(storage, other)) == (first, second)


def test_syncing_an_output_that_is_gone_is_unavailable(tmp_path: Path) -> None:
    """The file removed under the service (a volume swapped, an operator's clean-up): its
    image must not be recorded done, so the sync says the storage is unavailable."""
    storage = LocalStorage(str(tmp_path / "images"))
    storage.put(KEY, b"data")
    other = KEY.replace("/3-0.", "/4-0.")
    with pytest.raises(StorageUnavailable, match="could not sync"):
        storage.sync([KEY, other])


def test_a_local_output_directory_removed_under_the_service_is_made_again(
    tmp_path: Path,
) -> None:
    """Puts skip making a request's directory once it exists; one removed since (an
    operator's clean-up) is made again, not an error that fails the image."""
    storage = LocalStorage(str(tmp_path / "images"))
    directory = tmp_path / "images" / REQUEST_ID
    storage.put(KEY, b"first")
    shutil.rmtree(directory)
    other = KEY.replace("/3-0.", "/4-0.")
    storage.put(other, b"second")
    storage.sync([other])
    assert os.listdir(directory) == ["4-0.jpg"]
    assert (directory / "4-0.jpg").read_bytes() == b"second"


def test_local_storage_that_cannot_write_is_unavailable(tmp_path: Path) -> None:
    blocked = tmp_path / "images"
    blocked.write_text("a file where the directory should be")
    with pytest.raises(StorageUnavailable, match="could not write"):
        LocalStorage(str(blocked)).put(KEY, b"data")


@pytest.fixture
def stopped_database(tmp_path: Path) -> Iterator[str]:
    """The URI of a real database server that has been stopped."""
    database = embedded_db.start(str(tmp_path / "db"), log_path=str(tmp_path / "db.log"))
    database.stop()
    yield database.uri


def test_gridfs_storage_without_its_database_is_unavailable(stopped_database: str) -> None:
    client = connect(stopped_database, timeout_ms=300, pool_size=2)
    try:
        storage = GridFSStorage(Store(client["gone"]))
        with pytest.raises(StorageUnavailable):
            storage.put(KEY, b"data")
        with pytest.raises(StorageUnavailable):
            storage.get(KEY)
    finally:
        client.close()


def test_s3_storage_that_cannot_be_reached_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the endpoint (a gateway that is down): every call is transient."""
    for name, value in S3Server.credentials_env().items():
        monkeypatch.setenv(name, value)
    storage = S3Storage(S3_BUCKET, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match="could not store"):
        storage.put(KEY, b"data")
    with pytest.raises(StorageUnavailable, match="could not read"):
        storage.get(KEY)


@pytest.mark.parametrize(
    ("bucket", "secret", "hint"),
    [
        ("no-such-bucket", None, "the bucket does not exist"),
        (S3_BUCKET, "wrong-secret", "the secret key does not match"),
    ],
)
def test_s3_misconfiguration_is_an_error_in_the_log_and_still_transient(
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bucket: str,
    secret: str | None,
    hint: str,
) -> None:
    if secret:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage = S3Storage(bucket, endpoint_url=s3.endpoint)
    with caplog.at_level(logging.ERROR, logger="imgproc.storage.s3"):
        for _ in range(3):
            with pytest.raises(StorageUnavailable):
                storage.put(KEY, b"data")
        with pytest.raises(StorageUnavailable):
            storage.get(KEY)
    lines = [r.getMessage() for r in caplog.records if r.name == "imgproc.storage.s3"]
    assert len(lines) == 1, lines  # once a minute, not once per image
    assert hint in lines[0] and f"s3://{bucket}/" in lines[0]
    assert (secret or "no secret") not in lines[0]


def test_s3_storage_without_credentials_says_so(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = S3Storage(S3_BUCKET, endpoint_url=s3.endpoint)
    with caplog.at_level(logging.ERROR, logger="imgproc.storage.s3"):
        with pytest.raises(StorageUnavailable):
            storage.put(KEY, b"data")
    assert "no credentials" in caplog.text


def test_writes_are_journaled_with_majority(mongo_uri: str) -> None:
    """Acknowledged means durable: every collection the store writes through inherits the
    client's journaled majority write concern (GridFS included)."""
    client = connect(mongo_uri, timeout_ms=2000, pool_size=2)
    try:
        store = Store(client["durability"])
        for collection in (store.requests, store.products, store.idempotency):
            assert collection.write_concern.document == {"w": "majority", "j": True}
        assert client["durability"]["images.chunks"].write_concern.acknowledged
        assert client["durability"]["images.files"].write_concern.document["j"] is True
    finally:
        client.close()


def test_the_database_named_in_the_uri_wins(mongo_uri: str, make_app: Any) -> None:
    name = "catalogue_" + os.urandom(4).hex()
    base, _, query = mongo_uri.partition("?")
    app = make_app(mongodb_uri=f"{base.rstrip('/')}/{name}?{query}", start_worker=False)
    store = app.extensions["imgproc"].store
    assert store.db.name == name
    admin: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    admin.drop_database(name)
    admin.close()
