"""The dispatcher thread of a process: renews the leases of its jobs, claims requests while
it has room for more, and claims due webhooks for the outbox. Claims are atomic conditional
updates with a lease, so several processes and hosts share the work without coordinating."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from imgproc.config import Settings
from imgproc.store import DatabaseError, Store
from imgproc.worker.job import Job
from imgproc.worker.outbox import Outbox

log = logging.getLogger(__name__)


class Dispatcher:
    """Claims work for this process and keeps its leases."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        owner: str,
        outbox: Outbox,
        jobs: Callable[[], list[Job]],
        start_job: Callable[[Job], bool],
        new_job: Callable[..., Job],
        stopping: threading.Event,
        wake: threading.Event,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.outbox = outbox
        self.jobs = jobs
        self.start_job = start_job
        self.new_job = new_job
        self.stopping = stopping
        self.wake = wake

    def run(self) -> None:
        """Loop until the process stops: renew, claim, then sleep until woken or polled."""
        failures = 0
        while not self.stopping.is_set():
            try:
                self.renew_leases()
                self.claim_requests()
                self.outbox.claim_due(self.stopping.is_set)
                failures = 0
            except DatabaseError as exc:
                failures += 1
                log.warning("database unavailable, dispatcher retrying: %s", exc)
            except Exception:
                failures += 1
                log.exception("dispatcher error")
            self.wake.wait(self.settings.poll_seconds * min(2**failures, 10))
            self.wake.clear()

    def renew_leases(self) -> None:
        """Extend the lease of every job every third of a lease; mark the lost ones."""
        every = self.settings.lease_seconds / 3
        for job in self.jobs():
            if time.monotonic() - job.renewed_at < every:
                continue
            if self.store.renew_lease(job.id, self.owner, self.settings.lease_seconds):
                job.renewed_at = time.monotonic()
            else:
                log.warning("lost the lease on request %s; another process has it", job.id)
                job.lost = True

    def claim_requests(self) -> None:
        """Claim requests while this process works on fewer than it may."""
        while not self.stopping.is_set():
            if len(self.jobs()) >= self.settings.max_active_requests:
                return
            claim = self.store.claim_request(self.owner, self.settings.lease_seconds)
            if claim is None:
                return
            job = self.new_job(claim)
            if not self.start_job(job):
                continue  # our own lease ran out and we took it again: the running job keeps it
            log.info(
                "claimed request %s (%d images)",
                job.id,
                job.request.get("images_total", 0),
                extra={"request_id": job.id},
            )
