"""The dispatcher, the ThreadPoolExecutor, leases and recovery.

One dispatcher thread per process claims requests from MongoDB with a lease, renews the
lease while work goes on, and hands each claimed request to a job thread that submits
its unfinished images to the shared pool. Any process whose lease has expired loses the
request to the next claim, which does only what is not yet done; that claim is also the
recovery sweep. Due webhooks are claimed the same way and delivered from the pool.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import timedelta

from imgproc import codec, metrics
from imgproc.codec import CodecError
from imgproc.config import Settings
from imgproc.fetcher import Fetcher, FetchError
from imgproc.logs import about
from imgproc.models import (
    TERMINAL_IMAGE,
    ImageStatus,
    OutputFormat,
    ProductStatus,
    RequestStatus,
)
from imgproc.reports import base_url, webhook_payload
from imgproc.storage import Storage, image_key
from imgproc.store import DatabaseDown, DatabaseError, Doc, ProductWrite, Store
from imgproc.webhooks import WebhookSender, message_id

log = logging.getLogger(__name__)

WEBHOOK_CLAIM_SECONDS = 120.0
PAGE = 100  # products read (and marked processing) per query
FLUSH_IMAGES = 128  # write outcomes once this many are waiting...
FLUSH_SECONDS = 0.5  # ...or once the oldest has waited this long


@dataclass
class OpenProduct:
    """What the job knows of a product it is working on."""

    open: set[int]
    failed: bool


@dataclass(frozen=True)
class Outcome:
    """One image's result, from a pool thread to its job (``result`` None: not done)."""

    product_id: str
    index: int | None
    result: Doc | None


@dataclass
class Job:
    """One claimed request while this process works on it."""

    request: Doc
    futures: set[Future[None]] = field(default_factory=set)
    outcomes: queue.Queue[Outcome] = field(default_factory=queue.Queue)
    products: dict[str, OpenProduct] = field(default_factory=dict)
    in_flight: int = 0
    lost: bool = False
    renewed_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        """The request id."""
        return str(self.request["_id"])

    @property
    def total(self) -> int:
        """How many products the request has."""
        return int(self.request.get("products_total", 0))


def decide_status(counts: Doc) -> RequestStatus:
    """The terminal status API.md defines for these counters."""
    if counts["images_failed"] == 0:
        return RequestStatus.COMPLETED
    if counts["images_done"] == 0:
        return RequestStatus.FAILED
    return RequestStatus.COMPLETED_WITH_ERRORS


class Worker:
    """Runs the image work of this process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        storage: Storage,
        fetcher: Fetcher,
        webhooks: WebhookSender,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.fetcher = fetcher
        self.webhooks = webhooks
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(settings.workers * 2)
        # Decoding and encoding run outside the GIL. One image per core, plus one so that a
        # core never waits while another image is in the Python parts of the codec, keeps
        # the cores busy without thrashing them; the other pool threads download meanwhile.
        self._cpu = threading.BoundedSemaphore(settings.cpu_slots or (os.cpu_count() or 1) + 1)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool and the dispatcher thread (idempotent)."""
        if self._dispatcher is not None:
            return
        self._executor = ThreadPoolExecutor(
            self.settings.workers, thread_name_prefix="imgproc", initializer=self._lower_priority
        )
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="imgproc-dispatch", daemon=True
        )
        self._dispatcher.start()
        log.info("worker %s started with %d threads", self.owner, self.settings.workers)

    def _lower_priority(self) -> None:
        """Image threads yield the CPU to API requests and the database (Linux: per thread)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.settings.worker_nice)
        except OSError as exc:  # not Linux, or not allowed: run at normal priority
            log.debug("could not lower the image threads' priority: %s", exc)

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming, let images in flight finish within ``grace``, release leases."""
        if self._dispatcher is None or self._stopping.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._stopping.set()
        self._wake.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            for future in list(job.futures):
                future.cancel()
        deadline = time.monotonic() + grace
        self._dispatcher.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            jobs = list(self._jobs.values())
        pending = [f for job in jobs for f in list(job.futures)]
        wait_futures(pending, timeout=max(0.0, deadline - time.monotonic()))
        for job in jobs:
            try:
                self.store.release_lease(job.id, self.owner)
            except DatabaseError as exc:
                log.warning("could not release request %s: %s", job.id, exc)
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.owner)

    # ---- dispatcher --------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._renew_leases()
                self._claim_requests()
                self._claim_webhooks()
                failures = 0
            except DatabaseDown as exc:
                failures += 1
                log.warning("database unavailable, dispatcher retrying: %s", exc)
            except Exception:
                failures += 1
                log.exception("dispatcher error")
            delay = self.settings.poll_seconds * min(2**failures, 10)
            self._wake.wait(delay)
            self._wake.clear()

    def _renew_leases(self) -> None:
        every = self.settings.lease_seconds / 3
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if time.monotonic() - job.renewed_at < every:
                continue
            if self.store.renew_lease(job.id, self.owner, self.settings.lease_seconds):
                job.renewed_at = time.monotonic()
            else:
                log.warning("lost the lease on request %s; another process has it", job.id)
                job.lost = True

    def _claim_requests(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if len(self._jobs) >= self.settings.max_active_requests:
                    return
            request = self.store.claim_request(self.owner, self.settings.lease_seconds)
            if request is None:
                return
            job = Job(request)
            with self._lock:
                running = self._jobs.get(job.id)
                if running is not None:
                    # Our own lease ran out (say, during a database outage) and we took the
                    # request again: the job still running keeps it; no second job.
                    running.renewed_at = time.monotonic()
                    continue
                self._jobs[job.id] = job
            log.info(
                "claimed request %s (%d images)",
                job.id,
                request.get("images_total", 0),
                extra={"request_id": job.id},
            )
            threading.Thread(
                target=self._run_job, args=(job,), name=f"imgproc-job-{job.id[:8]}", daemon=True
            ).start()

    def _claim_webhooks(self) -> None:
        assert self._executor is not None
        while not self._stopping.is_set():
            request = self.store.claim_webhook(self.owner, WEBHOOK_CLAIM_SECONDS)
            if request is None:
                return
            self._executor.submit(self._deliver_webhook, request)

    # ---- one request -------------------------------------------------------------------

    def _halted(self, job: Job) -> bool:
        return job.lost or self._stopping.is_set()

    def _run_job(self, job: Job) -> None:
        with about(job.id):
            self._run_job_logged(job)

    def _run_job_logged(self, job: Job) -> None:
        try:
            if job.request.get("claims", 1) > 1:
                # A take-over: the live counters may have missed a write of the process that
                # died, and one of the products it was working on may be what killed it.
                self.store.set_counters(job.id, self.store.count_outcomes(job.id, job.total))
                self._suspects(job)
            self._work(job)
            if not self._halted(job):
                self._finish(job)
        except DatabaseDown as exc:
            log.warning("database unavailable while working on %s: %s; will retry", job.id, exc)
            self._release(job)
        except Exception:
            log.exception("request %s: unexpected error; releasing it for a retry", job.id)
            self._release(job)
        finally:
            if self._stopping.is_set():
                self._release(job)  # in-flight images are recorded: hand the rest over now
            with self._lock:
                self._jobs.pop(job.id, None)
            self._wake.set()

    def _release(self, job: Job) -> None:
        try:
            self.store.release_lease(job.id, self.owner)
        except DatabaseError:
            pass  # the lease expires by itself

    def _work(self, job: Job) -> None:
        """Feed the pool from the request's open products and write outcomes in batches."""
        assert self._executor is not None
        tasks = self._tasks(job)
        feeding = True
        buffer: list[Outcome] = []
        first_at = 0.0
        while True:
            while feeding and not self._halted(job) and self._slots.acquire(timeout=0.01):
                task = next(tasks, None)
                if task is None:
                    self._slots.release()
                    feeding = False
                    break
                job.in_flight += 1
                future = self._executor.submit(self._process_image, job, *task)
                job.futures.add(future)
                future.add_done_callback(self._task_done(job))
            if self._halted(job):
                feeding = False
                wait_futures(list(job.futures))  # cancelled ones never report
                job.in_flight = job.outcomes.qsize()
            try:
                buffer.append(job.outcomes.get(timeout=0.02 if feeding else 0.1))
                while True:
                    buffer.append(job.outcomes.get_nowait())
            except queue.Empty:
                pass
            if buffer and not first_at:
                first_at = time.monotonic()
            drained = not feeding and job.in_flight <= len(buffer)
            if buffer and (
                drained
                or len(buffer) >= FLUSH_IMAGES
                or time.monotonic() - first_at >= FLUSH_SECONDS
            ):
                job.in_flight -= len(buffer)
                self._flush_with_retry(job, buffer)
                buffer, first_at = [], 0.0
            if not feeding and job.in_flight <= 0 and not buffer:
                return

    def _suspects(self, job: Job) -> None:
        """After a take-over: the unfinished products the previous owner had handed to its
        pool (rows below ``fed_rows``), one at a time, each attempt counted and each outcome
        written at once, so an image that kills its process fails after a few attempts
        without taking its neighbours with it."""
        max_attempts = self.settings.max_image_attempts
        suspects = self.store.open_products(job.id, 0, int(job.request.get("fed_rows", 0)))
        for product in suspects:
            if self._halted(job):
                return
            images = product["images"]
            todo = self._track(job, product)
            if product.get("attempts", 0) >= max_attempts:
                outcomes = [
                    Outcome(
                        product["_id"],
                        i,
                        {
                            "status": ImageStatus.FAILED.value,
                            "error": f"gave up after {max_attempts} attempts",
                        },
                    )
                    for i in todo
                ]
                for outcome in outcomes:
                    metrics.image_finished(outcome.result or {})
            else:
                self.store.start_product(product["_id"])
                for i in todo:
                    self._process_image(
                        job, product["_id"], product["row"], i, images[i]["input_url"]
                    )
                outcomes = [job.outcomes.get() for _ in todo]
            self._flush_with_retry(job, outcomes or [Outcome(product["_id"], None, None)])

    @staticmethod
    def _track(job: Job, product: Doc) -> list[int]:
        """Register a product with its job; the indexes of its unfinished images."""
        images = product["images"]
        todo = [i for i, image in enumerate(images) if image["status"] not in TERMINAL_IMAGE]
        failed = any(image["status"] == ImageStatus.FAILED for image in images)
        job.products[product["_id"]] = OpenProduct(set(todo), failed)
        return todo

    def _task_done(self, job: Job) -> Callable[[Future[None]], None]:
        def done(future: Future[None]) -> None:
            job.futures.discard(future)
            self._slots.release()

        return done

    def _tasks(self, job: Job) -> Iterator[tuple[str, int, int, str]]:
        """(product id, row, index, url) of every unfinished image, page by page."""
        total = job.total
        for start in range(0, total, PAGE):
            if self._halted(job):
                return
            products = self.store.open_products(job.id, start, start + PAGE)
            if products:
                self.store.mark_fed(job.id, products[-1]["row"] + 1)
            for product in products:
                images = product["images"]
                todo = self._track(job, product)
                if not todo:  # all images written, the product not: a crash in between
                    job.outcomes.put(Outcome(product["_id"], None, None))
                    job.in_flight += 1
                else:
                    for i in todo:
                        yield product["_id"], product["row"], i, images[i]["input_url"]

    def _process_image(self, job: Job, product_id: str, row: int, index: int, url: str) -> None:
        """Download, compress and store one image; always reports exactly one outcome."""
        with about(job.id), metrics.IN_FLIGHT.track_inprogress():
            self._process_image_logged(job, product_id, row, index, url)

    def _process_image_logged(
        self, job: Job, product_id: str, row: int, index: int, url: str
    ) -> None:
        outcome: Doc | None = None
        try:
            if self._halted(job):
                return  # left unfinished: the next claim redoes it
            started = time.perf_counter()
            fetched = self.fetcher.fetch(url)
            downloaded = time.perf_counter()
            metrics.DOWNLOAD_SECONDS.observe(downloaded - started)
            with self._cpu:
                compress_started = time.perf_counter()
                encoded = codec.compress(
                    fetched.data,
                    quality=job.request["quality"],
                    output_format=OutputFormat(job.request["output_format"]),
                    max_pixels=self.settings.max_pixels,
                    keep_metadata=self.settings.keep_metadata,
                    jpeg_optimize=self.settings.jpeg_optimize,
                )
                metrics.COMPRESS_SECONDS.observe(time.perf_counter() - compress_started)
            key = image_key(job.id, row, index, encoded.extension)
            self.storage.put(key, encoded.data)
            outcome = {
                "status": ImageStatus.DONE.value,
                "error": None,
                "output_key": key,
                "input_bytes": len(fetched.data),
                "output_bytes": len(encoded.data),
                "width": encoded.width,
                "height": encoded.height,
                "format": encoded.format,
                "kept_original": encoded.kept_original,
            }
            log.debug(
                "row %d image %d done: %d -> %d bytes",
                row,
                index,
                len(fetched.data),
                len(encoded.data),
                extra={"url": url},
            )
        except (FetchError, CodecError) as exc:
            outcome = {"status": ImageStatus.FAILED.value, "error": exc.reason}
            log.info("row %d image %d failed: %s", row, index, exc.reason, extra={"url": url})
        except Exception:
            log.exception("row %d image %d: unexpected error", row, index, extra={"url": url})
            outcome = {
                "status": ImageStatus.FAILED.value,
                "error": "internal error while processing the image",
            }
        finally:
            job.outcomes.put(Outcome(product_id, index, outcome))  # first: the job waits on it
            if outcome is not None:
                metrics.image_finished(outcome)

    def _flush_with_retry(self, job: Job, outcomes: list[Outcome]) -> None:
        """Write a batch of outcomes, riding out a short database outage."""
        deadline = time.monotonic() + self.settings.lease_seconds
        delay = 0.2
        while True:
            try:
                self._flush(job, outcomes)
                return
            except DatabaseDown as exc:
                if time.monotonic() > deadline or self._stopping.is_set():
                    log.warning(
                        "request %s: could not record %d images (%s); they will be redone",
                        job.id,
                        len(outcomes),
                        exc,
                    )
                    job.lost = True
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _flush(self, job: Job, outcomes: list[Outcome]) -> None:
        """One write per touched product (outcomes + final status), one counter update.

        The job's own view of its products changes only once the writes have succeeded, so
        a flush retried after a database error computes the same writes again (the
        conditional updates make the repeat harmless).
        """
        writes: dict[str, ProductWrite] = {}
        after: dict[str, OpenProduct] = {}
        done = failed = finished = 0
        for outcome in outcomes:
            state = job.products.get(outcome.product_id)
            if state is not None and outcome.product_id not in after:
                after[outcome.product_id] = OpenProduct(set(state.open), state.failed)
            future = after.get(outcome.product_id)
            write = writes.setdefault(outcome.product_id, ProductWrite(outcome.product_id))
            if outcome.index is not None and outcome.result is not None:
                write.outcomes[outcome.index] = outcome.result
                if outcome.result["status"] == ImageStatus.FAILED.value:
                    failed += 1
                    if future:
                        future.failed = True
                else:
                    done += 1
                if future:
                    future.open.discard(outcome.index)
        for product_id, future in after.items():
            if not future.open:
                writes[product_id].finished = (
                    ProductStatus.FAILED if future.failed else ProductStatus.PROCESSED
                )
                finished += 1
        useful = [w for w in writes.values() if w.outcomes or w.finished]
        written = self.store.record_outcomes(useful)
        if written == len(useful):
            self.store.add_progress(job.id, done=done, failed=failed, products=finished)
        else:  # written before (a retried flush, another process): count from the products
            self.store.set_counters(job.id, self.store.count_outcomes(job.id, job.total))
        for product_id, future in after.items():
            if future.open:
                job.products[product_id] = future
            else:
                job.products.pop(product_id, None)

    def _finish(self, job: Job) -> None:
        counts = self.store.count_outcomes(job.id, job.total)
        if counts["open_images"]:
            log.info(
                "request %s still has %d open images; releasing it for another pass",
                job.id,
                counts["open_images"],
            )
            self._release(job)
            return
        status = decide_status(counts)
        has_webhook = bool((job.request.get("webhook") or {}).get("url"))
        if self.store.finish_request(job.id, status, counts, has_webhook=has_webhook):
            metrics.REQUESTS_FINISHED.labels(status.value).inc()
            log.info(
                "request %s %s: %d done, %d failed",
                job.id,
                status.value,
                counts["images_done"],
                counts["images_failed"],
            )
            if has_webhook:
                self._wake.set()

    # ---- webhooks ----------------------------------------------------------------------

    def _deliver_webhook(self, request: Doc) -> None:
        with about(str(request["_id"])):
            self._deliver_webhook_logged(request)

    def _deliver_webhook_logged(self, request: Doc) -> None:
        request_id = str(request["_id"])
        hook = request["webhook"]
        try:
            root = base_url(request, self.settings.public_url)
            now = self.store.clock()
            delivery = self.webhooks.deliver(
                hook["url"], message_id(request_id), webhook_payload(request, root), now
            )
            delays = self.settings.webhook_retry_delays
            attempt = hook.get("attempts", 0)  # attempts before this one
            retry_at = None
            if not delivery.ok and attempt < len(delays):
                retry_at = now + timedelta(seconds=delays[attempt])
            self.store.record_webhook_attempt(
                request_id,
                self.owner,
                delivered=delivery.ok,
                error=delivery.error,
                retry_at=retry_at,
            )
            outcome = "delivered" if delivery.ok else "retrying" if retry_at else "failed"
            metrics.WEBHOOKS.labels(outcome).inc()
            if delivery.ok:
                log.info("request %s: webhook delivered", request_id)
            else:
                log.log(
                    logging.WARNING if retry_at else logging.ERROR,
                    "request %s: webhook attempt %d failed: %s%s",
                    request_id,
                    attempt + 1,
                    delivery.error,
                    "" if retry_at else " (giving up)",
                )
        except Exception:
            # The claim expires and the delivery is tried again; never kill the pool thread.
            log.exception("request %s: webhook delivery crashed", request_id)
