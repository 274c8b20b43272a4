"""One claimed request while this process works on it.

A job works in passes. A pass reads the request's open products page by page, hands each
open image to the pipeline and writes the results in batches (see :mod:`plan`). After a
pass the job recounts the request from its products: nothing open, and it finishes the
request (exactly once); otherwise it repairs what disagrees (products marked finished with
an image open are reopened, the live counters overwritten) and goes again, or, when the
pass could not record anything (the storage is down, say), hands the request back with a
retry time that grows with each such pass. A hand-back is clean: the next claim is not a
take-over, and only a take-over after a crash treats the dead owner's products as suspects.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import TypeVar

from imgproc import metrics
from imgproc.config import Settings
from imgproc.documents import Counters, Doc, ImageOutcome
from imgproc.logs import about
from imgproc.models import TERMINAL_IMAGE, OutputFormat
from imgproc.store import Claim, DatabaseDown, DatabaseError, Store
from imgproc.worker.image_task import ImageTask
from imgproc.worker.pipeline import Pipeline
from imgproc.worker.plan import OpenProduct, Result, plan_flush

log = logging.getLogger(__name__)

PAGE = 100  # products read (and marked fed) per query
FLUSH_RESULTS = 128  # write results once this many are waiting...
FLUSH_SECONDS = 1.0  # ...or once the oldest has waited this long (or, once every open
# image is fed, once as many are waiting as are still coming)
MAX_RETRY_DELAY = 60.0  # seconds between passes that could not make progress, at most

T = TypeVar("T")


@dataclass
class Shared:
    """What every job of the process uses."""

    settings: Settings
    store: Store
    pipeline: Pipeline
    owner: str
    stopping: threading.Event
    wake: Callable[[], None]
    stop_deadline: list[float] = field(default_factory=lambda: [float("inf")])

    @property
    def feed_ahead(self) -> int:
        """Tasks a job keeps queued in the pipeline: enough to fill every download slot."""
        return self.settings.download_slots


class Job:
    """Works on one claimed request until it is finished, handed back, lost or stopped."""

    def __init__(self, claim: Claim, shared: Shared) -> None:
        self.request = claim.request
        self.suspect_rows = claim.suspect_rows
        self.takeover = claim.takeover
        self.shared = shared
        self.products: dict[str, OpenProduct] = {}
        self.results: queue.Queue[Result] = queue.Queue()
        self.lost = False  # another process holds the lease now
        self.renewed_at = time.monotonic()

    @property
    def id(self) -> str:
        """The request id."""
        return str(self.request["_id"])

    @property
    def total(self) -> int:
        """How many products the request has."""
        return int(self.request.get("products_total", 0))

    def halted(self) -> bool:
        """True once the job must stop starting images (lease lost, process stopping)."""
        return self.lost or self.shared.stopping.is_set()

    # ---- the life of a job ---------------------------------------------------------------

    def run(self) -> None:
        """The job thread's body: work, then always leave the request in a clean state."""
        with about(self.id):
            try:
                self._work()
            except DatabaseError as exc:
                log.warning("request %s: database unavailable (%s); handing it back", self.id, exc)
                self._release()
            except Exception:
                log.exception("request %s: unexpected error; handing it back", self.id)
                self._release()
            else:
                if self.shared.stopping.is_set() and not self.lost:
                    self._release()  # what was in flight is recorded: hand the rest over now

    def _work(self) -> None:
        store = self.shared.store
        if self.takeover:
            log.info(
                "request %s: taken over from %s; rows below %d are suspects",
                self.id,
                self.request.get("lease_owner"),
                self.suspect_rows,
            )
            store.set_counters(self.id, store.count_outcomes(self.id, self.total))
        while not self.halted():
            recorded = self._pass()
            self.suspect_rows = 0  # suspects are the first pass's only
            if self.halted():
                return
            counts = self._retrying(partial(store.count_outcomes, self.id, self.total))
            if not counts.open_images:
                self.shared.pipeline.work.sweep(self.id)
                self._finish(counts)
                return
            reopened = store.reopen_products(list(counts.misfinished))
            if reopened:
                log.warning(
                    "request %s: %d products were marked finished with an image open; reopened",
                    self.id,
                    reopened,
                )
            store.set_counters(self.id, counts)
            if not recorded and not reopened:
                self._hand_back(counts)
                return

    def _hand_back(self, counts: Counters) -> None:
        """Nothing could be recorded in a whole pass: let the request rest, then any process
        may try again (later each time, up to a minute)."""
        stalls = int(self.request.get("stalls", 0))
        delay = min(self.shared.settings.poll_seconds * 2 ** min(stalls, 16), MAX_RETRY_DELAY)
        log.warning(
            "request %s: %d images could not be finished this pass; retrying in %.1f s",
            self.id,
            counts.open_images,
            delay,
        )
        retry_at = self.shared.store.clock() + timedelta(seconds=delay)
        self.shared.store.release_lease(self.id, self.shared.owner, retry_at=retry_at)

    def _release(self) -> None:
        try:
            self.shared.store.release_lease(self.id, self.shared.owner)
        except DatabaseError:
            pass  # the lease expires by itself

    def _finish(self, counts: Counters) -> None:
        has_webhook = bool((self.request.get("webhook") or {}).get("url"))
        if self.shared.store.finish_request(self.id, counts, has_webhook=has_webhook):
            status = counts.terminal_status()
            metrics.REQUESTS_FINISHED.labels(status.value).inc()
            log.info(
                "request %s %s: %d done, %d failed",
                self.id,
                status.value,
                counts.images_done,
                counts.images_failed,
            )
            if has_webhook:
                self.shared.wake()

    # ---- one pass ------------------------------------------------------------------------

    def _pass(self) -> int:
        """Feed every open image to the pipeline and write the results; how many were
        recorded. Waits for everything it started before returning."""
        pipeline = self.shared.pipeline
        pages = self._pages()
        feeding = True
        failure: DatabaseError | None = None
        buffer: list[Result] = []
        first_at = 0.0
        recorded = 0
        pipeline.attach(self, self.results.put, self.halted)
        try:
            while True:
                if feeding and self.halted():
                    feeding = False
                    pipeline.drop_queued(self)  # not started: left open for the next claim
                while feeding and pipeline.queued(self) < self.shared.feed_ahead:
                    try:
                        page = next(pages, None)
                    except DatabaseError as exc:
                        failure, page = exc, None
                    if page is None:
                        feeding = False
                        break
                    pipeline.add(self, page)
                buffer.extend(self._collect(0.05))
                if buffer and not first_at:
                    first_at = time.monotonic()
                out_of_grace = time.monotonic() > self.shared.stop_deadline[0]
                # Outstanding first: the pipeline hands a result over before it counts it
                # delivered, so with nothing outstanding every result is already queued.
                outstanding = pipeline.outstanding(self) if not feeding else -1
                drained = not feeding and (not outstanding or out_of_grace) and self.results.empty()
                if buffer and (
                    drained
                    or len(buffer) >= FLUSH_RESULTS
                    or time.monotonic() - first_at >= FLUSH_SECONDS
                    # The last images: written once as many wait as are still coming, so
                    # that the last flush, which the request's finish waits for, is small.
                    or 0 < outstanding <= len(buffer)
                ):
                    recorded += self._flush(buffer)
                    buffer, first_at = [], 0.0
                if drained and not buffer:
                    if failure is not None:
                        raise failure
                    return recorded
        finally:
            pipeline.detach(self)

    def _collect(self, timeout: float) -> list[Result]:
        """The results waiting now (after up to ``timeout`` for a first one)."""
        collected: list[Result] = []
        try:
            if timeout:
                collected.append(self.results.get(timeout=timeout))
            while True:
                collected.append(self.results.get_nowait())
        except queue.Empty:
            pass
        return collected

    def _pages(self) -> Iterator[list[ImageTask]]:
        """The open images of the request, a page of products at a time (products whose
        images are all written already go straight to the results, to be marked finished).
        Products still in the upload's parts are inserted a page at a time just before
        they are read, so a big upload's expansion is spread over its processing."""
        store = self.shared.store
        parts = int(self.request.get("parts", 0))
        unexpanded: list[Doc] = []  # what is left of the part being expanded
        next_part = 0
        for start in range(0, self.total, PAGE):
            if self.halted():
                return
            stop = start + PAGE
            while parts and next_part < parts and (not unexpanded or unexpanded[-1]["row"] < stop):
                part = self._retrying(partial(store.upload_part, self.id, next_part))
                unexpanded += part["products"] if part else []
                next_part += 1
            if parts:
                page = [p for p in unexpanded if p["row"] < stop]
                unexpanded = unexpanded[len(page) :]
                self._retrying(partial(store.insert_products, page))
            products = self._retrying(partial(store.open_products, self.id, start, stop))
            if products:
                last = products[-1]["row"] + 1
                self._retrying(partial(store.mark_fed, self.id, last))
            tasks = [task for product in products for task in self._open_images(product)]
            if tasks:
                yield tasks
        if parts:  # every product is in: the parts are no longer needed
            self._retrying(partial(store.drop_upload_parts, self.id, parts))
            self.request["parts"] = 0

    def _open_images(self, product: Doc) -> Iterator[ImageTask]:
        images = product["images"]
        todo = [i for i, image in enumerate(images) if image["status"] not in TERMINAL_IMAGE]
        failed = any(image["status"] == "failed" for image in images)
        self.products[product["_id"]] = OpenProduct(len(images), frozenset(todo), failed)
        if not todo:  # all images written, the product not: a crash in between
            self.results.put(Result(product["_id"], None, None))
            return
        suspect = product["row"] < self.suspect_rows
        max_attempts = self.shared.settings.max_image_attempts
        for index in todo:
            if suspect and images[index].get("attempts", 0) >= max_attempts:
                outcome = ImageOutcome.failed(f"gave up after {max_attempts} attempts")
                metrics.image_finished(outcome.fields())
                log.warning("row %d image %d: %s", product["row"], index, outcome.error)
                self.results.put(Result(product["_id"], index, outcome))
                continue
            yield ImageTask(
                self.id,
                product["_id"],
                product["row"],
                index,
                images[index]["input_url"],
                int(self.request["quality"]),
                OutputFormat(self.request["output_format"]),
                suspect=suspect,
            )

    def _flush(self, results: list[Result]) -> int:
        """Write a batch of results; how many outcomes it recorded."""
        store = self.shared.store
        results = self.shared.pipeline.work.settle(results)  # outputs durable first

        def write() -> int:
            plan = plan_flush(self.products, results)
            if not plan.writes:
                return 0  # nothing finished (all left for another pass): nothing to write
            written = store.record_outcomes(plan.writes)
            if written == len(plan.writes):
                store.add_progress(
                    self.id, done=plan.done, failed=plan.failed, products=plan.finished
                )
            else:  # written before (a retried flush, another process): count from the truth
                store.set_counters(self.id, store.count_outcomes(self.id, self.total))
            for product in plan.closed:
                self.products.pop(product, None)
            self.products.update(plan.after)
            return plan.done + plan.failed

        return self._retrying(write)

    def _retrying(self, operation: Callable[[], T]) -> T:
        """Run a database operation, riding out an outage of up to a lease."""
        deadline = time.monotonic() + self.shared.settings.lease_seconds
        delay = 0.2
        while True:
            try:
                return operation()
            except DatabaseDown:
                if time.monotonic() > min(deadline, self.shared.stop_deadline[0]):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
