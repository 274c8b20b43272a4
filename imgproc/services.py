"""Builds and holds the per-process objects: Mongo client, store, storage, fetcher, webhook
sender and worker; the views call its methods, the worker threads get its parts."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from imgproc.config import Settings
from imgproc.documents import EPOCH, Doc, new_product, new_request, product_id, upload_parts
from imgproc.errors import (
    IdempotencyConflict,
    InvalidField,
    NotFound,
    NotReady,
    RequestNotFound,
)
from imgproc.fetcher import Fetcher
from imgproc.instance import INSTANCE_DIR_ENV
from imgproc.metrics import render as render_metrics
from imgproc.models import (
    FINISHED_PRODUCT,
    TERMINAL_IMAGE,
    TERMINAL_REQUEST,
    Created,
    ParsedCsv,
    RequestStatus,
    UploadOptions,
)
from imgproc.reports import (
    base_url,
    output_csv,
    products_page,
    products_view,
    request_summary,
    status_head,
)
from imgproc.storage import Storage, StoredFile, open_storage, public_base
from imgproc.store import DatabaseError, Store, connect
from imgproc.webhooks import WebhookSender
from imgproc.worker import Worker
from imgproc.worker.election import Election

log = logging.getLogger(__name__)

# An Idempotency-Key reservation with no request after this long belongs to an upload whose
# storing failed (the database went away mid-way): a retry with the key takes it over.
STORING_GRACE = timedelta(seconds=30)
STATUS_PAGES_CACHED = 64  # rendered status pages kept per process (by request, offset, limit)
# While a request is processed, a page's products are rendered again at most this often
# (its head, with status and progress, is fresh on every poll)...
RENDER_EVERY_SECONDS = 1.0
# ...and renders take at most this share of the time: one that took 0.25 s (a 1,000-product
# page while the database is busy with the batch) is followed by the next 2.5 s later, not
# 1 s. A render's time is mostly the database's, reading the products that may have
# changed, and the batch waits for that CPU: in `make bench` at 1 s of origin latency (a
# 1,000-product page polled while 2,000 images ran) renders went from 22 to 12 a batch and
# the database's CPU from 2.2 s to 1.5-2.1 s.
RENDER_SHARE = 0.1
_ENDED = [status.value for status in TERMINAL_IMAGE]


def _unchanged(product: Doc, untouched_from: int) -> bool:
    """Whether a product as read is still as it is now: finished (it never changes again)
    or untouched since the upload (at or above the request's ``touched_rows``)."""
    return product["status"] in FINISHED_PRODUCT or product["row"] >= untouched_from


def _lasting(product: Doc, untouched_from: int) -> bool:
    """Whether a product as read is worth keeping for status pages: unchanged, or with no
    image finished (then read again only once one has)."""
    return _unchanged(product, untouched_from) or not any(
        image["status"] in TERMINAL_IMAGE for image in product["images"]
    )


def _json(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _valid_id(request_id: str) -> bool:
    try:
        return str(uuid.UUID(request_id, version=4)) == request_id
    except ValueError:
        return False


def _encode_cursor(request: Doc) -> str:
    millis = int(request["created_at"].timestamp() * 1000)
    raw = f"{millis}:{request['_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """The (created_at, id) a ``before`` cursor points below; a bad one is a 400."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        millis, request_id = raw.split(":", 1)
        created = datetime.fromtimestamp(int(millis) / 1000, UTC)
    except (ValueError, UnicodeDecodeError, OverflowError, OSError):
        created, request_id = EPOCH, ""
    if not _valid_id(request_id):
        raise InvalidField(
            "invalid query parameter: before",
            [{"field": "before", "message": "not a cursor from this API's `next`"}],
        )
    return created, request_id


class Services:
    """Everything one process needs, built once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = connect(
            settings.mongodb_uri,
            timeout_ms=settings.db_timeout_ms,
            pool_size=settings.max_active_requests + 48,
        )
        # A database named in MONGODB_URI wins; IMGPROC_DB_NAME is the fallback.
        self.store = Store(self.client.get_default_database(default=settings.db_name))
        self.storage: Storage = open_storage(settings, self.store)
        self.public_base = public_base(settings)  # output URLs off the service, or None
        self.fetcher = Fetcher(settings)
        self.webhooks = WebhookSender(settings)
        self.worker = Worker(settings, self.store, self.storage, self.fetcher, self.webhooks)
        self.election = Election(
            os.environ.get(INSTANCE_DIR_ENV), start=self.worker.start, wake=self.worker.wake
        )
        self._ready = False
        self._ready_lock = threading.Lock()
        # Products as last read, while they cannot have changed since (see _products).
        self._known: OrderedDict[str, Doc] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._pages: OrderedDict[tuple[str, int, int], tuple[int, bytes]] = OrderedDict()
        self._rendering: set[tuple[str, int, int]] = set()  # pages being rendered now
        # When each page was last rendered, and how long that took.
        self._rendered_at: dict[tuple[str, int, int], tuple[float, float]] = {}
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="imgproc-status")

    def ensure_ready(self) -> None:
        """Create indexes once per process (at first use, not at import or start-up)."""
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                self.store.ensure_indexes()
                self._ready = True

    def start(self) -> None:
        """Run the image worker in this process, or in the one of the instance that holds
        its lock (see :mod:`imgproc.worker.election`)."""
        self.election.begin()

    def close(self, grace: float | None = None) -> None:
        """Stop the worker gracefully and close connections."""
        self.election.end()
        self.worker.stop(grace)
        self.election.resign()
        self._renderer.shutdown(wait=False, cancel_futures=True)
        self.fetcher.close()
        self.webhooks.close()
        self.client.close()

    # ---- upload ------------------------------------------------------------------------

    def submit(
        self,
        parsed: ParsedCsv,
        options: UploadOptions,
        root: str,
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        digest: str = "",
    ) -> Created:
        """Store a validated upload in full and wake the worker; with an Idempotency-Key
        seen before (same owner, same file, within the window), the first request."""
        self.ensure_ready()
        now = self.store.clock()
        request_id = str(uuid.uuid4())
        scoped_key = f"{owner or '-'}:{idempotency_key}" if idempotency_key else None
        if scoped_key:
            earlier = self.store.reserve_idempotency_key(
                scoped_key, request_id, digest, timedelta(hours=self.settings.idempotency_hours)
            )
            while earlier is not None:
                replay = self._replay(earlier, digest, now)
                if replay is not None:
                    return replay
                earlier = self.store.take_over_idempotency_key(
                    scoped_key, earlier["request_id"], request_id, digest
                )
        products = [new_product(request_id, index, row) for index, row in enumerate(parsed.rows)]
        parts = upload_parts(request_id, products)
        request = new_request(
            request_id,
            now,
            products_total=len(products),
            images_total=parsed.image_count,
            quality=options.quality or self.settings.default_quality,
            output_format=options.output_format.value,
            webhook_url=options.webhook_url,
            header=parsed.header,
            roles=parsed.roles,
            base_url=root,
            owner=owner,
            parts=len(parts),
            idempotency_key=scoped_key,
            file_digest=digest,
        )
        try:
            self.store.create_request(request, parts)
        except BaseException:
            if scoped_key:
                with contextlib.suppress(DatabaseError):  # the original error is the one to report
                    self.store.release_idempotency_key(scoped_key, request_id)
            raise
        self._remember(products[: self.settings.status_cache_products // 2])
        log.info(
            "request %s accepted: %d products, %d images",
            request_id,
            len(products),
            parsed.image_count,
            extra={"request_id": request_id},
        )
        self.election.notify()
        return Created(request_id, RequestStatus.PENDING.value, len(products), parsed.image_count)

    def _replay(self, earlier: Doc, digest: str, now: datetime) -> Created | None:
        """The first request of a reused key, or None when the reservation belongs to an
        upload that failed to store (the caller takes the key over)."""
        if earlier.get("digest") != digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different file; use a new key"
            )
        request = self.store.get_request(earlier["request_id"])
        if request is None:
            if now - earlier["created_at"] > STORING_GRACE:
                return None
            raise IdempotencyConflict(
                "the first upload with this key is still being stored; retry in a moment"
            )
        return Created(
            request["_id"],
            request["status"],
            request["products_total"],
            request["images_total"],
            new=False,
        )

    # ---- reads -------------------------------------------------------------------------

    def _request(self, request_id: str, owner: str | None) -> Doc:
        request = self.store.get_request(request_id) if _valid_id(request_id) else None
        if request is None or request.get("owner") != owner:  # another key's: not found
            raise RequestNotFound(f"no request with id {request_id!r}")
        return request

    def root(self, request: Doc) -> str:
        """The absolute URL root of a request's links."""
        return base_url(request, self.settings.public_url)

    def status(self, request_id: str, offset: int, limit: int, owner: str | None = None) -> bytes:
        """The status body of a request, one page of products, as JSON bytes.

        The head (status, progress, webhook) is always the request document's of this very
        call. The products are rendered once per change of the request; while it is being
        processed, a poll gets the latest rendered list at once and a render of the newer
        state starts in the background (at most once a second, less often when a render
        is slow: see RENDER_SHARE), so no poll waits for one (but the first) and the list
        is about a second behind, a few seconds for a large page while the instance is
        busy. Once the request is terminal its products are rendered in line: a finished
        request never comes with a list from before it finished.
        """
        request = self._request(request_id, owner)
        root = self.root(request)
        terminal = request["status"] in TERMINAL_REQUEST
        products = self._rendered_products(request, root, offset, limit, wait=terminal)
        head = _json(status_head(request, root))
        page = _json(products_page(request, offset, limit))
        return head[:-1] + b',"products":' + products + b',"products_page":' + page + b"}"

    def _rendered_products(
        self, request: Doc, root: str, offset: int, limit: int, *, wait: bool
    ) -> bytes:
        """A page's products as JSON bytes: of this version of the request, or (unless
        ``wait``) of an earlier one while this one is rendered in the background."""
        key = (str(request["_id"]), offset, limit)
        version = int(request.get("version", 0))
        with self._cache_lock:
            cached = self._pages.get(key)
            if cached is not None:
                self._pages.move_to_end(key)
                if cached[0] == version:
                    return cached[1]  # nothing it shows has changed since it was rendered
                if not wait:
                    rendered_at, took = self._rendered_at.get(key, (0.0, 0.0))
                    due = rendered_at + max(RENDER_EVERY_SECONDS, took / RENDER_SHARE)
                    if key not in self._rendering and time.monotonic() >= due:
                        self._rendering.add(key)
                        self._renderer.submit(self._render, request, root, key, version)
                    return cached[1]
        return self._render(request, root, key, version)

    def _render(self, request: Doc, root: str, key: tuple[str, int, int], version: int) -> bytes:
        """Render a page's products for ``version`` of the request and keep the bytes."""
        started = time.monotonic()
        try:
            _request_id, offset, limit = key
            stop = min(offset + limit, int(request.get("products_total", 0)))
            products = self._products(request, offset, stop)
            body = _json(products_view(request, products, root, self.public_base))
            with self._cache_lock:
                cached = self._pages.get(key)
                if cached is None or cached[0] < version:
                    self._pages[key] = (version, body)
                    self._pages.move_to_end(key)
                    now = time.monotonic()
                    self._rendered_at[key] = (now, now - started)
                while len(self._pages) > STATUS_PAGES_CACHED:
                    old, _ = self._pages.popitem(last=False)
                    self._rendered_at.pop(old, None)
            return body
        finally:
            with self._cache_lock:
                self._rendering.discard(key)

    def metrics(self) -> bytes:
        """The Prometheus exposition: every process's counters plus the database's figures."""
        self.ensure_ready()
        return render_metrics(self.store, self.settings.stall_seconds)

    def recent(self, owner: str | None, limit: int, before: str | None = None) -> dict[str, Any]:
        """One page of the owner's requests, newest first, and the cursor of the next page."""
        self.ensure_ready()
        found = self.store.recent_requests(owner, limit + 1, _decode_cursor(before))
        page = found[:limit]
        more = len(found) > limit
        return {
            "requests": [request_summary(r, self.root(r)) for r in page],
            "next": _encode_cursor(page[-1]) if more else None,
        }

    def _products(self, request: Doc, start: int, stop: int) -> list[Doc]:
        """Products of rows [start, stop), read from the database only when they may have
        changed since this process last read them: a finished product never changes again,
        one at or above the request's ``touched_rows`` is still exactly as uploaded, and one
        none of whose images had finished is read again only once one of them has (the
        query asks for those alone). While a batch runs, most of a page's unfinished
        products are in the pipeline with no image finished yet: at 1 s of origin latency,
        500 of a 1,000-product page, which every render read again in full."""
        request_id = str(request["_id"])
        untouched_from = int(request.get("touched_rows", 0))
        ids = [product_id(request_id, row) for row in range(start, stop)]
        with self._cache_lock:
            known = {pid: self._known[pid] for pid in ids if pid in self._known}
        kept: dict[str, Doc] = {}
        changed: set[str] = set()
        unstarted: list[str] = []  # known with no image finished: read again if one has
        for pid, product in known.items():
            if _unchanged(product, untouched_from):
                kept[pid] = product
            else:  # remembered with no image finished
                unstarted.append(pid)
        started: list[Doc] = []
        if unstarted:
            started = self.store.products_by_ids(unstarted, {"images.status": {"$in": _ENDED}})
            changed = {p["_id"] for p in started}
            kept.update({pid: known[pid] for pid in unstarted if pid not in changed})
        missing = [pid for pid in ids if pid not in kept and pid not in changed]
        fetched = self.store.products_by_ids(missing) if missing else []
        parts = int(request.get("parts", 0))
        if parts and len(fetched) < len(missing):  # some not expanded from the upload yet
            found = {p["_id"] for p in fetched}
            unexpanded = [pid for pid in missing if pid not in found]
            fetched += self.store.products_from_parts(request_id, parts, unexpanded)
            if len(fetched) < len(missing):  # expanded, and the part dropped, meanwhile
                found = {p["_id"] for p in fetched}
                fetched += self.store.products_by_ids([p for p in missing if p not in found])
        fetched += started
        self._remember([p for p in fetched if _lasting(p, untouched_from)])
        products = list(kept.values()) + fetched
        products.sort(key=lambda product: product["_id"])
        return products

    def _remember(self, products: list[Doc]) -> None:
        """Keep products as they are now, for status pages (see :meth:`_products`)."""
        if not products:
            return
        with self._cache_lock:
            for product in products:
                self._known[product["_id"]] = product
                self._known.move_to_end(product["_id"])
            while len(self._known) > self.settings.status_cache_products:
                self._known.popitem(last=False)

    def output_csv(self, request_id: str, owner: str | None = None) -> Iterator[str]:
        """The output CSV of a finished request, streamed."""
        request = self._request(request_id, owner)
        if request["status"] not in TERMINAL_REQUEST:
            raise NotReady(
                f"request {request_id} is {request['status']}; the output CSV is "
                "ready once it is completed, completed_with_errors or failed"
            )
        products = self.store.iter_products(request_id, int(request["products_total"]))
        return output_csv(request, products, self.root(request), self.public_base)

    def image(self, key: str) -> StoredFile:
        """A stored output image."""
        stored = self.storage.get(key)
        if stored is None:
            raise NotFound("no such image")
        return stored

    def healthy(self) -> bool:
        """True when the database answers."""
        return self.store.ping()
