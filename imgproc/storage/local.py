"""Output images in a local directory (``$IMGPROC_DATA_DIR/images``, or a shared volume)."""

from __future__ import annotations

import contextlib
import os
import tempfile

from imgproc.storage import StorageUnavailable, StoredFile, content_type, valid_key


class LocalStorage:
    """One file per key, written whole to a temporary name, made durable, then renamed."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def put(self, key: str, data: bytes) -> None:
        """Write atomically and durably: a reader sees the old file or the new one, never a
        part, and a renamed file survives a crash of the machine as well as of the process.
        Two puts of one key race harmlessly: each renames a complete file over the other."""
        if not valid_key(key):
            raise ValueError(f"bad storage key {key!r}")
        path = os.path.join(self.root, key)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_directory(directory)
        except OSError as exc:  # full disk, lost volume, permissions: not the image's fault
            raise StorageUnavailable(f"could not write {key}: {exc}") from exc

    def get(self, key: str) -> StoredFile | None:
        """The file for ``key`` if it exists."""
        if not valid_key(key):
            return None
        path = os.path.join(self.root, key)
        if not os.path.isfile(path):
            return None
        return StoredFile(content_type(key), path=path)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
