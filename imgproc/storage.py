"""Where output images live. Keys are deterministic (request, row, index), so redoing an
image overwrites its earlier output instead of adding another."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import Protocol

_KEY = re.compile(r"^[0-9a-f-]{36}/\d{1,7}-\d{1,3}\.(jpg|webp|png)$")
CONTENT_TYPES = {"jpg": "image/jpeg", "webp": "image/webp", "png": "image/png"}


def image_key(request_id: str, row: int, index: int, extension: str) -> str:
    """The storage key of one output image."""
    return f"{request_id}/{row}-{index}.{extension}"


def valid_key(key: str) -> bool:
    """True for a key :func:`image_key` can produce (no traversal, no other names)."""
    return bool(_KEY.match(key))


@dataclass(frozen=True)
class StoredFile:
    """A stored image as the HTTP layer serves it: a local file, or bytes with their ETag."""

    content_type: str
    path: str | None = None
    data: bytes | None = None
    etag: str | None = None


class Storage(Protocol):
    """Output image storage."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    def get(self, key: str) -> StoredFile | None:
        """The stored image, or None."""


class LocalStorage:
    """A directory on local disk (``$IMGPROC_DATA_DIR/images``)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def put(self, key: str, data: bytes) -> None:
        """Write atomically: a reader sees the old file or the new one, never a half."""
        if not valid_key(key):
            raise ValueError(f"bad storage key {key!r}")
        path = os.path.join(self.root, key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def get(self, key: str) -> StoredFile | None:
        """The file for ``key`` if it exists."""
        if not valid_key(key):
            return None
        path = os.path.join(self.root, key)
        if not os.path.isfile(path):
            return None
        return StoredFile(CONTENT_TYPES[key.rsplit(".", 1)[1]], path=path)


class ImageBlobs(Protocol):
    """What GridFSStorage needs from the database layer (``Store`` provides it)."""

    def put_image(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""

    def get_image(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and their digest, or None."""


class GridFSStorage:
    """A GridFS bucket in the service's MongoDB, so every instance serves every image."""

    def __init__(self, blobs: ImageBlobs) -> None:
        self.blobs = blobs

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; earlier versions are removed."""
        if not valid_key(key):
            raise ValueError(f"bad storage key {key!r}")
        self.blobs.put_image(key, data)

    def get(self, key: str) -> StoredFile | None:
        """The image for ``key`` if it exists."""
        if not valid_key(key):
            return None
        found = self.blobs.get_image(key)
        if found is None:
            return None
        data, digest = found
        return StoredFile(CONTENT_TYPES[key.rsplit(".", 1)[1]], data=data, etag=digest)
