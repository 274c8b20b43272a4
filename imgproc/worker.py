"""The dispatcher, the ThreadPoolExecutor, leases and recovery.

One dispatcher thread per process claims requests from MongoDB with a lease, renews the
lease while work goes on, and hands each claimed request to a feeder thread that submits
its unfinished images to the shared pool. Any process whose lease has expired loses the
request to the next claim, which does only what is not yet done; that claim is also the
recovery sweep. Due webhooks are claimed the same way and delivered from the pool.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from imgproc import codec
from imgproc.codec import CodecError
from imgproc.config import Settings
from imgproc.fetcher import Fetcher, FetchError
from imgproc.models import (
    TERMINAL_IMAGE,
    ImageStatus,
    OutputFormat,
    ProductStatus,
    RequestStatus,
)
from imgproc.reports import base_url, webhook_payload
from imgproc.storage import Storage, image_key
from imgproc.store import DatabaseDown, DatabaseError, Doc, Store
from imgproc.webhooks import WebhookSender, message_id

log = logging.getLogger(__name__)

WEBHOOK_CLAIM_SECONDS = 120.0


@dataclass
class Job:
    """One claimed request while this process works on it."""

    request: Doc
    futures: list[Future[None]] = field(default_factory=list)
    lost: bool = False
    renewed_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        """The request id."""
        return str(self.request["_id"])


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
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    # ---- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool and the dispatcher thread (idempotent)."""
        if self._dispatcher is not None:
            return
        self._executor = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="imgproc")
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="imgproc-dispatch", daemon=True
        )
        self._dispatcher.start()
        log.info("worker %s started with %d threads", self.owner, self.settings.workers)

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
            for future in job.futures:
                future.cancel()
        deadline = time.monotonic() + grace
        self._dispatcher.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            jobs = list(self._jobs.values())
        pending = [f for job in jobs for f in job.futures]
        wait_futures(pending, timeout=max(0.0, deadline - time.monotonic()))
        for job in jobs:
            try:
                self.store.release_lease(job.id, self.owner)
            except DatabaseError as exc:
                log.warning("could not release request %s: %s", job.id, exc)
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.owner)

    @property
    def active_requests(self) -> list[str]:
        """Ids of the requests this process is working on."""
        with self._lock:
            return list(self._jobs)

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
                self._jobs[job.id] = job
            log.info("claimed request %s (%d images)", job.id, request.get("images_total", 0))
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

    def _run_job(self, job: Job) -> None:
        try:
            if job.request.get("claims", 1) > 1:
                # A take-over: the live counters may have missed a write of a dead process.
                self.store.set_counters(job.id, self.store.count_outcomes(job.id))
            self._feed(job)
            wait_futures(job.futures)
            if not (job.lost or self._stopping.is_set()):
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

    def _feed(self, job: Job) -> None:
        assert self._executor is not None
        max_attempts = self.settings.max_image_attempts
        for product in self.store.open_products(job.id):
            if job.lost or self._stopping.is_set():
                return
            todo = [
                i
                for i, image in enumerate(product["images"])
                if image["status"] not in TERMINAL_IMAGE
            ]
            exhausted = [i for i in todo if product["images"][i].get("attempts", 0) >= max_attempts]
            for i in exhausted:  # a poison image that killed its process each time
                self._record(
                    job,
                    product["_id"],
                    i,
                    {
                        "status": ImageStatus.FAILED.value,
                        "error": f"gave up after {max_attempts} attempts",
                    },
                )
            todo = [i for i in todo if i not in exhausted]
            if not todo:
                self._settle_product(job, product["_id"], product)
                continue
            self.store.start_images(product["_id"], todo)
            for i in todo:
                self._slots.acquire()
                if job.lost or self._stopping.is_set():
                    self._slots.release()
                    return
                future = self._executor.submit(
                    self._process_image,
                    job,
                    product["_id"],
                    product["row"],
                    i,
                    product["images"][i]["input_url"],
                )
                future.add_done_callback(lambda _f: self._slots.release())
                job.futures.append(future)

    def _process_image(self, job: Job, product_id: Any, row: int, index: int, url: str) -> None:
        """Download, compress, store and record one image; always records an outcome."""
        if job.lost or self._stopping.is_set():
            return  # left as processing: the next claim redoes it
        outcome: Doc
        try:
            fetched = self.fetcher.fetch(url)
            encoded = codec.compress(
                fetched.data,
                quality=job.request["quality"],
                output_format=OutputFormat(job.request["output_format"]),
                max_pixels=self.settings.max_pixels,
                keep_metadata=self.settings.keep_metadata,
                jpeg_optimize=self.settings.jpeg_optimize,
            )
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
        except (FetchError, CodecError) as exc:
            outcome = {"status": ImageStatus.FAILED.value, "error": exc.reason}
        except Exception:
            log.exception("request %s row %d image %d: unexpected error", job.id, row, index)
            outcome = {
                "status": ImageStatus.FAILED.value,
                "error": "internal error while processing the image",
            }
        self._record_with_retry(job, product_id, index, outcome)

    def _record_with_retry(self, job: Job, product_id: Any, index: int, outcome: Doc) -> None:
        """Record an outcome, riding out a short database outage."""
        deadline = time.monotonic() + self.settings.lease_seconds
        delay = 0.2
        while True:
            try:
                self._record(job, product_id, index, outcome)
                return
            except DatabaseDown as exc:
                if time.monotonic() > deadline or self._stopping.is_set():
                    log.warning(
                        "request %s: could not record an image (%s); it will be redone", job.id, exc
                    )
                    job.lost = True
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("request %s: could not record an image", job.id)
                job.lost = True
                return

    def _record(self, job: Job, product_id: Any, index: int, outcome: Doc) -> None:
        product = self.store.record_image(product_id, index, outcome)
        if product is None:
            return  # already recorded (by us before a retry, or by another process)
        done = outcome["status"] == ImageStatus.DONE.value
        products = self._settle_product(job, product_id, product, count=False)
        self.store.add_progress(job.id, done=int(done), failed=int(not done), products=products)

    def _settle_product(
        self, job: Job, product_id: Any, product: Doc, *, count: bool = True
    ) -> int:
        """Finish the product if all its images are; 1 if this call finished it."""
        statuses = [image["status"] for image in product["images"]]
        if any(s not in TERMINAL_IMAGE for s in statuses):
            return 0
        failed = ImageStatus.FAILED.value in statuses
        status = ProductStatus.FAILED if failed else ProductStatus.PROCESSED
        if not self.store.finish_product(product_id, status):
            return 0
        if count:
            self.store.add_progress(job.id, done=0, failed=0, products=1)
        return 1

    def _finish(self, job: Job) -> None:
        counts = self.store.count_outcomes(job.id)
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
            if delivery.ok:
                log.info("request %s: webhook delivered", request_id)
            else:
                log.warning(
                    "request %s: webhook attempt %d failed: %s%s",
                    request_id,
                    attempt + 1,
                    delivery.error,
                    "" if retry_at else " (giving up)",
                )
        except Exception:
            # The claim expires and the delivery is tried again; never kill the pool thread.
            log.exception("request %s: webhook delivery crashed", request_id)
