"""Where output images live, behind one contract that every backend keeps.

The contract (ARCHITECTURE, durability rule 8):

- ``put(key, data)`` may be repeated, or race with another ``put`` of the same key from
  another thread, process or host, and still leaves exactly one complete, readable version;
  no reader ever sees a partial file or a gap between a delete and a write.
- Once ``put`` has returned, ``get(key)`` answers with complete bytes; once ``sync`` of
  the key has returned too, it does so for good, a crash of the machine included (the
  outcome that says ``done`` is written only after that). Backends whose puts are durable
  when acknowledged (GridFS with its journaled writes, S3) have nothing to sync.
- Anything that keeps the storage from taking or giving an image right now (down, full,
  refused, a reset connection) is :class:`StorageUnavailable`: transient, never a reason to
  fail the image; the image stays unfinished and is retried.

Keys are deterministic (request, row, index), so redoing an image stores under the same key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

if TYPE_CHECKING:
    from imgproc.config import Settings
    from imgproc.store import Store

__all__ = [
    "CONTENT_TYPES",
    "Storage",
    "StorageUnavailable",
    "StoredFile",
    "content_type",
    "image_key",
    "open_storage",
    "public_base",
    "valid_key",
    "valid_request_id",
]

_REQUEST_ID = r"[0-9a-f-]{36}"
_KEY = re.compile(rf"^{_REQUEST_ID}/\d{{1,7}}-\d{{1,3}}\.(jpg|webp|png)$")
CONTENT_TYPES = {"jpg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


class StorageUnavailable(Exception):
    """The storage cannot take or give an image right now; try again later."""


def image_key(request_id: str, row: int, index: int, extension: str) -> str:
    """The storage key of one output image."""
    return f"{request_id}/{row}-{index}.{extension}"


def valid_key(key: str) -> bool:
    """True for a key :func:`image_key` can produce (no traversal, no other names)."""
    return bool(_KEY.match(key))


def valid_request_id(request_id: str) -> bool:
    """True for a request id a key can start with (the name of a request's directory)."""
    return bool(re.fullmatch(_REQUEST_ID, request_id))


def content_type(key: str) -> str:
    """The MIME type of the image stored under a valid ``key``."""
    return CONTENT_TYPES[key.rsplit(".", 1)[1]]


@dataclass(frozen=True)
class StoredFile:
    """A stored image as the HTTP layer serves it: a local file, or bytes with their ETag."""

    content_type: str
    path: str | None = None
    data: bytes | None = None
    etag: str | None = None


class Storage(Protocol):
    """Output image storage (see the module docstring for the contract)."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; StorageUnavailable when that cannot be done now."""

    def sync(self, keys: Iterable[str]) -> None:
        """Make the puts of ``keys`` durable; StorageUnavailable when that cannot be done."""

    def get(self, key: str) -> StoredFile | None:
        """The stored image, or None; StorageUnavailable when it cannot be read now."""

    def sweep(self, request_id: str) -> int:
        """Remove what interrupted puts of the request left behind; how many of them. Called
        once every image of it has its outcome: a put of it still running then is for a job
        that can no longer record it (a lost lease, an earlier job of the request), so one
        whose leftover is removed under it fails with nothing lost. StorageUnavailable when
        it cannot be done."""


def public_base(settings: Settings) -> str | None:
    """The base that output URLs hang from when the images are served without the service
    (``IMGPROC_S3_PUBLIC_URL``: a CDN or a public bucket, plus the key prefix); None when
    the service serves them at ``/images/<key>``."""
    if settings.storage != "s3" or not settings.s3_public_url:
        return None
    return settings.s3_public_url.rstrip("/") + "/" + quote(settings.s3_prefix, safe="/")


def open_storage(settings: Settings, store: Store) -> Storage:
    """The backend ``IMGPROC_STORAGE`` names."""
    if settings.storage == "s3":
        from imgproc.storage.s3 import S3Storage

        assert settings.s3_bucket  # validated with the settings
        return S3Storage(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            # One connection for each storage thread of the pipeline and each HTTP thread
            # serving /images/.
            pool_size=32,
        )
    if settings.storage == "gridfs":
        from imgproc.storage.gridfs_bucket import GridFSStorage

        return GridFSStorage(store)
    from imgproc.storage.local import LocalStorage

    return LocalStorage(settings.images_dir)
