"""Output images in a GridFS bucket of the service's MongoDB, so every instance serves every
image. The bucket operations themselves live in :mod:`imgproc.store` (the one module that
speaks pymongo); this backend keeps the storage contract on top of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from imgproc.storage import StorageUnavailable, StoredFile, content_type, valid_key
from imgproc.store import DatabaseError


class ImageBlobs(Protocol):
    """What GridFSStorage needs from the database layer (``Store`` provides it)."""

    def put_image(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` unless a complete version is stored already."""

    def get_image(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and their digest, or None."""


class GridFSStorage:
    """First writer wins: a key's files document is unique and written after its chunks, so
    the version a reader finds is complete and is never replaced or deleted."""

    def __init__(self, blobs: ImageBlobs) -> None:
        self.blobs = blobs

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (a no-op when a version is stored already)."""
        if not valid_key(key):
            raise ValueError(f"bad storage key {key!r}")
        try:
            self.blobs.put_image(key, data)
        except DatabaseError as exc:
            raise StorageUnavailable(f"could not store {key} in GridFS: {exc}") from exc

    def sync(self, keys: Iterable[str]) -> None:
        """Nothing to do: a put is durable once the database has acknowledged it (its
        write concern is journaled)."""

    def sweep(self, request_id: str) -> int:
        """Nothing is done: the chunks of a put interrupted by a crash stay. No reader finds
        them (they belong to no files document), but nothing names their request either:
        their ``files_id`` is a fresh ObjectId, and so are a running put's."""
        return 0

    def get(self, key: str) -> StoredFile | None:
        """The image for ``key`` if it exists."""
        if not valid_key(key):
            return None
        try:
            found = self.blobs.get_image(key)
        except DatabaseError as exc:
            raise StorageUnavailable(f"could not read {key} from GridFS: {exc}") from exc
        if found is None:
            return None
        data, digest = found
        return StoredFile(content_type(key), data=data, etag=digest)
