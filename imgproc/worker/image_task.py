"""One image: fetch → codec → storage → outcome.

What an image ends as is decided here, and only failures that belong to the image are
final: its host answered an error (after the fetcher's retries), its bytes are not an image
we can decode, it is too large, its address is blocked. Anything that is our side's trouble
(the database or the storage unavailable, the process stopping) leaves the image unfinished
(``Result.outcome`` None) for another pass by whoever holds the request. An exception of any
other kind is a bug: logged with its traceback and recorded as "internal error".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imgproc import codec, metrics
from imgproc.codec import CodecError
from imgproc.config import Settings
from imgproc.documents import ImageOutcome
from imgproc.fetcher import Fetcher, FetchError
from imgproc.logs import about
from imgproc.models import ImageStatus, OutputFormat
from imgproc.storage import Storage, StorageUnavailable, image_key
from imgproc.store import DatabaseError, Store
from imgproc.worker.plan import Result

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error while processing the image"
STORAGE_TRIES = 4  # puts per pass: ~3 s of backoff before the image is left for a later pass


@dataclass(frozen=True)
class ImageTask:
    """One image of a claimed request, as the pipeline runs it."""

    request_id: str
    product_id: str
    row: int
    index: int
    url: str
    quality: int
    output_format: OutputFormat
    suspect: bool = False  # after a crash take-over: through the codec alone, attempt counted


class ImageWork:
    """Runs image tasks; shared by all jobs of the process."""

    def __init__(
        self,
        settings: Settings,
        fetcher: Fetcher,
        storage: Storage,
        store: Store,
        cpu: threading.Semaphore,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.storage = storage
        self.store = store
        self.cpu = cpu
        self.sleep = sleep
        # Suspects go through the codec one at a time, each attempt counted just before, so
        # a process that dies of an image is charged to that image and to no neighbour.
        self.suspect_lane = threading.Lock()

    def run(self, task: ImageTask, halted: Callable[[], bool]) -> Result:
        """Process ``task``; always returns its one result."""
        with about(task.request_id), metrics.IN_FLIGHT.track_inprogress():
            outcome = self._outcome(task, halted)
        if outcome is not None:
            metrics.image_finished(outcome.fields())
        return Result(task.product_id, task.index, outcome)

    def _outcome(self, task: ImageTask, halted: Callable[[], bool]) -> ImageOutcome | None:
        where = {"url": task.url}
        try:
            if halted():
                return None
            started = time.perf_counter()
            fetched = self.fetcher.fetch(task.url)
            metrics.DOWNLOAD_SECONDS.observe(time.perf_counter() - started)
            if task.suspect:
                with self.suspect_lane:
                    self.store.count_attempt(task.product_id, task.index)
                    outcome = self._compress_and_store(task, fetched.data, halted)
            else:
                outcome = self._compress_and_store(task, fetched.data, halted)
        except (FetchError, CodecError) as exc:
            log.info("row %d image %d failed: %s", task.row, task.index, exc.reason, extra=where)
            return ImageOutcome.failed(exc.reason)
        except (StorageUnavailable, DatabaseError) as exc:  # our side's trouble
            log.warning(
                "row %d image %d left for another pass: %s", task.row, task.index, exc, extra=where
            )
            return None
        except Exception:
            if halted():  # the process is stopping under it: not the image's fault
                log.info("row %d image %d interrupted by shutdown", task.row, task.index)
                return None
            log.exception("row %d image %d: unexpected error", task.row, task.index, extra=where)
            return ImageOutcome.failed(INTERNAL_ERROR)
        log.debug(
            "row %d image %d done: %s -> %s bytes",
            task.row,
            task.index,
            outcome.input_bytes,
            outcome.output_bytes,
            extra=where,
        )
        return outcome

    def _compress_and_store(
        self, task: ImageTask, data: bytes, halted: Callable[[], bool]
    ) -> ImageOutcome:
        with self.cpu:
            log.debug("row %d image %d: decoding %d bytes", task.row, task.index, len(data))
            started = time.perf_counter()
            encoded = codec.compress(
                data,
                quality=task.quality,
                output_format=task.output_format,
                max_pixels=self.settings.max_pixels,
                keep_metadata=self.settings.keep_metadata,
                jpeg_optimize=self.settings.jpeg_optimize,
            )
            metrics.COMPRESS_SECONDS.observe(time.perf_counter() - started)
        key = image_key(task.request_id, task.row, task.index, encoded.extension)
        self._put(key, encoded.data, halted)
        return ImageOutcome(
            ImageStatus.DONE,
            output_key=key,
            input_bytes=len(data),
            output_bytes=len(encoded.data),
            width=encoded.width,
            height=encoded.height,
            format=encoded.format,
            kept_original=encoded.kept_original,
        )

    def _put(self, key: str, data: bytes, halted: Callable[[], bool]) -> None:
        """Store, riding out a short storage blip; StorageUnavailable if it lasts."""
        delay = 0.25
        for attempt in range(1, STORAGE_TRIES + 1):
            try:
                self.storage.put(key, data)
                return
            except StorageUnavailable:
                if attempt == STORAGE_TRIES or halted():
                    raise
            self.sleep(delay)
            delay *= 2
