"""One image, in three stages run by the pipeline: download → codec → storage.

What an image ends as is decided here, and only failures that belong to the image are
final: its host answered an error (after the fetcher's retries, and after waiting as long as
a ``Retry-After`` asked, within the download deadline), its bytes are not an image we can
decode, it is too large, its address is blocked. Anything that is our side's trouble (the
database or the storage unavailable, the process stopping) leaves the image unfinished
(``Result.outcome`` None) for another pass by whoever holds the request. An exception of any
other kind is a bug: logged with its traceback and recorded as "internal error".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from imgproc import codec, metrics
from imgproc.codec import CodecError, Encoded
from imgproc.config import Settings
from imgproc.documents import ImageOutcome
from imgproc.fetcher import Budget, Fetched, Fetcher, FetchError
from imgproc.logs import about
from imgproc.models import ImageStatus, OutputFormat
from imgproc.storage import Storage, StorageUnavailable, image_key
from imgproc.store import DatabaseError, Store
from imgproc.worker.plan import Result

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error while processing the image"
STORAGE_TRIES = 4  # puts per pass: ~2 s of backoff before the image is left for a later pass


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

    def ended(self, outcome: ImageOutcome | None) -> Result:
        """This image's one result."""
        return Result(self.product_id, self.index, outcome)


class RetryLater(Exception):
    """The host asked to be left alone for ``seconds`` (429/503 with Retry-After)."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.seconds = seconds
        self.reason = reason


class ImageWork:
    """The stages of an image; shared by every job of the process."""

    def __init__(
        self,
        settings: Settings,
        fetcher: Fetcher,
        storage: Storage,
        store: Store,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.storage = storage
        self.store = store
        self.sleep = sleep
        # Suspects go through the codec one at a time, each attempt counted just before, so
        # a process that dies of an image is charged to that image and to no neighbour.
        self.suspect_lane = threading.Lock()

    # ---- the stages (each returns the next stage's input, or the image's Result) ----------

    def download(
        self, task: ImageTask, halted: Callable[[], bool], budget: Budget, deadline: float
    ) -> Fetched | Result:
        """The image's bytes (holding their share of ``budget``), or how it ended.
        RetryLater when the host asked for a pause that still fits before ``deadline``."""
        if halted():
            return task.ended(None)  # not started: left for the next claim
        with self._ending(task, halted) as over:
            started = time.perf_counter()
            try:
                fetched = self.fetcher.fetch(task.url, budget)
            except FetchError as exc:
                if exc.retry_after is not None and time.monotonic() + exc.retry_after < deadline:
                    raise RetryLater(exc.retry_after, exc.reason) from None
                raise
            metrics.DOWNLOAD_SECONDS.observe(time.perf_counter() - started)
            return fetched
        return over.result

    def compress(
        self, task: ImageTask, data: bytes, halted: Callable[[], bool]
    ) -> Encoded | Result:
        """The output image, or how it ended."""
        with self._ending(task, halted) as over:
            if task.suspect:
                with self.suspect_lane:
                    self.store.count_attempt(task.product_id, task.index)
                    try:
                        return self._compress(task, data)
                    finally:
                        # It came back (encoded or refused): not a decode that killed the
                        # process. Taken back before the next suspect is counted: should
                        # that one kill the process before this one's outcome is written,
                        # this one is redone, but not charged.
                        self.store.count_attempt(task.product_id, task.index, -1)
            return self._compress(task, data)
        return over.result

    def store_output(
        self, task: ImageTask, input_bytes: int, encoded: Encoded, halted: Callable[[], bool]
    ) -> Result:
        """Store the output and say the image is done (or how it ended)."""
        with self._ending(task, halted) as over:
            key = image_key(task.request_id, task.row, task.index, encoded.extension)
            self._put(key, encoded.data, halted)
            outcome = ImageOutcome(
                ImageStatus.DONE,
                output_key=key,
                input_bytes=input_bytes,
                output_bytes=len(encoded.data),
                width=encoded.width,
                height=encoded.height,
                format=encoded.format,
                kept_original=encoded.kept_original,
            )
            log.debug(
                "row %d image %d done: %d -> %d bytes",
                task.row,
                task.index,
                input_bytes,
                len(encoded.data),
                extra={"url": task.url},
            )
            return task.ended(outcome)
        return over.result

    def settle(self, results: list[Result]) -> list[Result]:
        """``results`` with their outputs made durable, so their outcomes may be written;
        when the storage cannot do that now, the images they finish are left for another
        pass instead (their outputs are put again then)."""
        keys = [r.outcome.output_key for r in results if r.outcome and r.outcome.output_key]
        if not keys:
            return results
        try:
            self.storage.sync(keys)
        except StorageUnavailable as exc:
            log.warning("%d images left for another pass: %s", len(keys), exc)
            return [
                Result(r.product_id, r.index, None) if r.outcome and r.outcome.output_key else r
                for r in results
            ]
        return results

    def sweep(self, request_id: str) -> None:
        """Clear what puts of a request, every image of which has its outcome, left in the
        storage when a crash cut them short. Never in the way of finishing the request: when
        it cannot be done, they stay (nothing reads them) and the log says so."""
        try:
            removed = self.storage.sweep(request_id)
        except StorageUnavailable as exc:
            log.warning("leftovers of interrupted puts were not cleared: %s", exc)
            return
        except Exception:  # a bug: logged as one, and the request still finishes
            log.exception("internal error clearing the leftovers of interrupted puts")
            return
        if removed:
            log.info("removed %d temporary files of puts cut short by a crash", removed)

    # ---- helpers --------------------------------------------------------------------------

    @contextmanager
    def _ending(self, task: ImageTask, halted: Callable[[], bool]) -> Iterator[_Holder]:
        """Run a stage in the request's log context; what it raises becomes the image's end,
        by whose trouble it is (see the module docstring)."""
        holder = _Holder()
        where = {"url": task.url}
        with about(task.request_id):
            try:
                yield holder
            except RetryLater:
                raise
            except (FetchError, CodecError) as exc:
                log.info(
                    "row %d image %d failed: %s", task.row, task.index, exc.reason, extra=where
                )
                holder.result = task.ended(ImageOutcome.failed(exc.reason))
            except (StorageUnavailable, DatabaseError) as exc:  # our side's trouble
                log.warning(
                    "row %d image %d left for another pass: %s",
                    task.row,
                    task.index,
                    exc,
                    extra=where,
                )
                holder.result = task.ended(None)
            except Exception:
                if halted():  # the process is stopping under it: not the image's fault
                    log.info("row %d image %d interrupted by shutdown", task.row, task.index)
                    holder.result = task.ended(None)
                else:
                    log.exception(
                        "row %d image %d: unexpected error", task.row, task.index, extra=where
                    )
                    holder.result = task.ended(ImageOutcome.failed(INTERNAL_ERROR))

    def _compress(self, task: ImageTask, data: bytes) -> Encoded:
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
        return encoded

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


class _Holder:
    """Where :meth:`ImageWork._ending` leaves the result of a stage that ended the image."""

    result: Result
