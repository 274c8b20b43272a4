"""The image work of one process, as the path of the work:

- :mod:`dispatcher`: claims requests and due webhooks with leases, renews them;
- :mod:`job`: one claimed request, in passes: feeds its open images to the pipeline, writes
  results in batches (planned by the pure :mod:`plan`), recounts, finishes or hands back;
- :mod:`pipeline` and :mod:`image_task`: fetch → codec → storage → outcome per image;
- :mod:`outbox`: webhook delivery.

:class:`Worker` wires them up and owns their life cycle.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from imgproc import codec
from imgproc.config import Settings
from imgproc.fetcher import Fetcher
from imgproc.storage import Storage
from imgproc.store import Claim, Store
from imgproc.webhooks import WebhookSender
from imgproc.worker.dispatcher import Dispatcher
from imgproc.worker.image_task import ImageWork
from imgproc.worker.job import Job, Shared
from imgproc.worker.outbox import Outbox
from imgproc.worker.pipeline import Pipeline

__all__ = ["Worker"]

log = logging.getLogger(__name__)


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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.outbox = Outbox(settings, store, webhooks, self.owner, self.wake)
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._jobs: dict[str, tuple[Job, threading.Thread]] = {}
        self._lock = threading.Lock()
        self._pipeline: Pipeline | None = None
        self._shared: Shared | None = None
        self._dispatcher: threading.Thread | None = None

    def start(self) -> None:
        """Start the pipeline and the dispatcher thread (idempotent)."""
        if self._dispatcher is not None:
            return
        try:
            codec.warm_up()  # before the first claim: see there
        except Exception:  # an image that needs what failed to load fails on its own
            log.exception("could not load the image plugins ahead of the first image")
        self._pipeline = Pipeline(
            self.settings, ImageWork(self.settings, self.fetcher, self.storage, self.store)
        )
        self._shared = Shared(
            self.settings, self.store, self._pipeline, self.owner, self._stopping, self.wake
        )
        dispatcher = Dispatcher(
            self.settings,
            self.store,
            self.owner,
            self.outbox,
            jobs=self._running_jobs,
            start_job=self._start_job,
            new_job=self._new_job,
            stopping=self._stopping,
            wake=self._wake,
        )
        self._dispatcher = threading.Thread(
            target=dispatcher.run, name="imgproc-dispatch", daemon=True
        )
        self._dispatcher.start()
        log.info(
            "worker %s started: %d downloads in flight (%d per host), %d codec slots, "
            "%d MiB download buffer",
            self.owner,
            self.settings.download_slots,
            self.settings.connections_per_host,
            self.settings.codec_slots,
            self.settings.buffer_bytes // 2**20,
        )

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; images in flight finish within ``grace`` and are recorded; leases
        are released; returns once every job thread has ended (or the grace is spent)."""
        if self._dispatcher is None or self._shared is None or self._stopping.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self._shared.stop_deadline[0] = deadline
        self._stopping.set()
        self._wake.set()
        self._dispatcher.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = [thread for _job, thread in self._jobs.values()]
        for thread in threads:
            # A job's last flush and release come after the grace; give them a moment.
            thread.join(timeout=max(0.0, deadline + 5.0 - time.monotonic()))
        assert self._pipeline is not None
        self._pipeline.close()
        self.outbox.shutdown()
        with self._lock:
            left = [job.id for job, _thread in self._jobs.values()]
        if left:
            log.warning("worker %s stopped with jobs still ending: %s", self.owner, left)
        log.info("worker %s stopped", self.owner)

    def _new_job(self, claim: Claim) -> Job:
        assert self._shared is not None
        return Job(claim, self._shared)

    def _running_jobs(self) -> list[Job]:
        with self._lock:
            return [job for job, _thread in self._jobs.values()]

    def _start_job(self, job: Job) -> bool:
        """Run ``job`` in a thread of its own; False when one already runs for the request."""
        with self._lock:
            running = self._jobs.get(job.id)
            if running is not None:
                # Our own lease ran out (say, during a database outage) and we took the
                # request again: the job still running keeps it; no second job.
                running[0].renewed_at = time.monotonic()
                return False
            thread = threading.Thread(
                target=self._run_job, args=(job,), name=f"imgproc-job-{job.id[:8]}", daemon=True
            )
            self._jobs[job.id] = (job, thread)
        thread.start()
        return True

    def _run_job(self, job: Job) -> None:
        try:
            job.run()
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
            self._wake.set()
