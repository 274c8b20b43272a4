"""The webhook outbox: due deliveries are claimed from the database like requests, POSTed
from a small pool of their own (a slow receiver never holds an image thread), and the
outcome is written back: delivered, the next retry time, or failed once the delays are used
up. Delivery is at least once, under one ``webhook-id`` per request."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from imgproc import metrics
from imgproc.config import Settings
from imgproc.documents import Doc
from imgproc.logs import about
from imgproc.reports import base_url, webhook_payload
from imgproc.store import DatabaseError, Store
from imgproc.webhooks import WebhookSender, message_id

log = logging.getLogger(__name__)

SENDERS = 2  # deliveries POSTed at once per process


def next_attempt_at(
    attempts_before: int, ok: bool, delays: tuple[float, ...], now: datetime
) -> datetime | None:
    """When to try again after an attempt: None when delivered or when the delays are used up."""
    if ok or attempts_before >= len(delays):
        return None
    return now + timedelta(seconds=delays[attempts_before])


class Outbox:
    """Claims due webhooks and delivers them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sender: WebhookSender,
        owner: str,
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.wake = wake  # the dispatcher: a sender is free to take the next due delivery
        self.store = store
        self.sender = sender
        self.owner = owner
        self._executor = ThreadPoolExecutor(SENDERS, thread_name_prefix="imgproc-webhook")
        # Deliveries claimed and not yet attempted: no more than there are senders, so a
        # claim never expires while its delivery waits in line behind a slow receiver (it
        # would be claimed again and POSTed twice, each copy spending an attempt).
        self._free = threading.BoundedSemaphore(SENDERS)
        # A claimed delivery is due again after this, should its process die: longer than
        # an attempt can take (connect + response timeouts), plus a lease of slack.
        self.claim_seconds = (
            settings.connect_timeout + settings.webhook_timeout + settings.lease_seconds
        )

    def claim_due(self, stopping: Callable[[], bool]) -> None:
        """Claim due deliveries while a sender is free, and hand each to one (the claim
        pushes its due time ahead)."""
        while not stopping() and self._free.acquire(blocking=False):
            try:
                request = self.store.claim_webhook(self.owner, self.claim_seconds)
            except BaseException:
                self._free.release()
                raise
            if request is None:
                self._free.release()
                return
            try:
                self._executor.submit(self._send, request)
            except RuntimeError:  # shut down meanwhile: the claim expires, tried again
                self._free.release()
                return

    def _send(self, request: Doc) -> None:
        try:
            self.deliver(request)
        finally:
            self._free.release()
            self.wake()

    def deliver(self, request: Doc) -> None:
        """POST one request's completion event and record the attempt; never raises."""
        request_id = str(request["_id"])
        with about(request_id):
            try:
                self._deliver(request_id, request)
            except DatabaseError as exc:  # the claim expires and the delivery is tried again
                log.warning(
                    "request %s: webhook attempt not recorded, database unavailable (%s); "
                    "it will be tried again",
                    request_id,
                    exc,
                )
            except Exception:
                # A bug: the claim expires and the delivery is tried again; never kill the thread.
                log.exception("request %s: webhook delivery crashed", request_id)

    def _deliver(self, request_id: str, request: Doc) -> None:
        hook = request["webhook"]
        now = self.store.clock()
        root = base_url(request, self.settings.public_url)
        delivery = self.sender.deliver(
            hook["url"], message_id(request_id), webhook_payload(request, root), now
        )
        attempt = int(hook.get("attempts", 0))  # attempts before this one
        retry_at = next_attempt_at(attempt, delivery.ok, self.settings.webhook_retry_delays, now)
        self.store.record_webhook_attempt(
            request_id, self.owner, delivered=delivery.ok, error=delivery.error, retry_at=retry_at
        )
        outcome = "delivered" if delivery.ok else "retrying" if retry_at else "failed"
        metrics.WEBHOOKS.labels(outcome).inc()
        if delivery.ok:
            log.info("request %s: webhook delivered", request_id)
            return
        log.log(
            logging.WARNING if retry_at else logging.ERROR,
            "request %s: webhook attempt %d failed: %s%s",
            request_id,
            attempt + 1,
            delivery.error,
            "" if retry_at else " (giving up)",
        )

    def shutdown(self) -> None:
        """Drop queued deliveries (their claims expire and they are tried again)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
