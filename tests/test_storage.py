"""The storage contract, for every backend against its real store: a put may be repeated or
race with another put of the same key and still leave exactly one complete, readable version;
once a put has returned, the key answers with complete bytes for good; a store that cannot
be reached is StorageUnavailable (transient), never anything else."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gridfs
import pymongo
import pytest
from bson import ObjectId

from imgproc import embedded_db
from imgproc.storage import Storage, StorageUnavailable
from imgproc.storage.gridfs_bucket import GridFSStorage
from imgproc.storage.local import LocalStorage
from imgproc.store import Store, connect

KEY = "0f8fad5b-d9cb-469f-a165-70867728950e/3-0.jpg"
BACKENDS = ["local", "gridfs"]


def versions(count: int, size: int = 700_000) -> list[bytes]:
    """Distinct payloads of ``size`` bytes (several GridFS chunks each)."""
    return [hashlib.sha256(bytes([n])).digest() * (size // 32) for n in range(count)]


@pytest.fixture
def make_storage(mongo: Any, tmp_path: Path) -> Callable[[str], Storage]:
    def make(backend: str) -> Storage:
        if backend == "gridfs":
            store = Store(mongo)
            store.ensure_indexes()
            return GridFSStorage(store)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_put_leaves_one_complete_version(
    backend: str, make_storage: Callable[[str], Storage], mongo: Any, tmp_path: Path
) -> None:
    storage = make_storage(backend)
    first, second = versions(2)
    storage.put(KEY, first)
    storage.put(KEY, first)  # a retry
    storage.put(KEY, second)  # a redo that encoded differently
    assert read(storage, KEY) in (first, second)
    if backend == "gridfs":
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
        assert os.listdir(tmp_path / "images" / KEY.split("/")[0]) == ["3-0.jpg"]
    assert storage.get(KEY.replace("3-0", "4-0")) is None
    assert storage.get("../etc/passwd") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_racing_puts_and_readers_never_see_a_part_or_a_gap(
    backend: str, make_storage: Callable[[str], Storage], mongo: Any
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
