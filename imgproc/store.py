"""The only module that speaks pymongo: collections, indexes and atomic state transitions.

Every state change is one conditional update named after what it does, so that two
processes racing for the same work can never both win.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import gridfs
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument, UpdateOne, monitoring
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from imgproc.documents import EPOCH, Counters, Doc, ProductWrite, product_id, upload_part_id
from imgproc.models import (
    TERMINAL_IMAGE,
    ImageStatus,
    ProductStatus,
    RequestStatus,
    WebhookStatus,
    utcnow,
)

# The database cannot be reached (down, restarting, no primary): callers answer 503 or retry.
DatabaseDown = ConnectionFailure
DatabaseError = PyMongoError

_ACTIVE = [RequestStatus.PENDING.value, RequestStatus.PROCESSING.value]
_OPEN_PRODUCT = [ProductStatus.PENDING.value, ProductStatus.PROCESSING.value]
_TERMINAL_IMAGE = [s.value for s in TERMINAL_IMAGE]

__all__ = ["Claim", "DatabaseDown", "DatabaseError", "Store", "connect"]

ID_CHUNK = 25  # ids per $in: 1,000 products in ~190 ms on the embedded server (100: ~380 ms)


@dataclass(frozen=True)
class Claim:
    """A request this process has just claimed, and how its previous holder left it.

    ``takeover``: the previous holder's lease ran out without a release (it died, or lost
    touch for a whole lease), so the products it had handed to its pool (rows below
    ``suspect_rows``) may include the one that killed it.
    """

    request: Doc
    takeover: bool
    suspect_rows: int


class DbTime(monitoring.CommandListener):
    """How long the current thread has waited on the database: the access log's ``db_ms``.

    A slow HTTP answer either waited on the database or for the CPU (its worker process,
    the GIL); the access line tells which. Listens to every command of the client
    :func:`connect` makes and adds each one's round trip to the thread that sent it
    (pymongo reports a command on the thread that runs it).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def start(self) -> None:
        """Count from zero on this thread (at the start of an HTTP request)."""
        self._local.micros = 0
        self._local.calls = 0

    def taken(self) -> tuple[float, int]:
        """Milliseconds waited and commands sent on this thread since :meth:`start`."""
        return getattr(self._local, "micros", 0) / 1000, getattr(self._local, "calls", 0)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        """Nothing: the round trip is known when it ends."""

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._add(event.duration_micros)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._add(event.duration_micros)

    def _add(self, micros: int) -> None:
        local = self._local
        local.micros = getattr(local, "micros", 0) + micros
        local.calls = getattr(local, "calls", 0) + 1


DB_TIME = DbTime()


def connect(uri: str, *, timeout_ms: int, pool_size: int) -> MongoClient[Doc]:
    """A lazily connecting, fork-safe client (nothing touches the network until first use).

    Every write is acknowledged only once it is in the journal of a majority of the replica
    set (of the one server, standalone), so a database killed right after answering loses
    nothing it answered for: acknowledged means durable.
    """
    return MongoClient(
        uri,
        connect=False,
        w="majority",
        journal=True,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=max(timeout_ms * 6, 30_000),
        maxPoolSize=pool_size,
        retryWrites=True,
        appname="imgproc",
        event_listeners=[DB_TIME],  # the access log's db_ms
    )


class Store:
    """Collections of one database and the operations the service performs on them.

    Every write that changes what the status of a request shows increments the request's
    ``version``, so a rendered status page can be reused until it moves."""

    def __init__(self, db: Database[Doc], clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock
        self.requests: Collection[Doc] = db["processing_requests"]
        self.products: Collection[Doc] = db["products"]
        self.idempotency: Collection[Doc] = db["idempotency_keys"]
        self.upload_parts: Collection[Doc] = db["upload_parts"]
        self.images = gridfs.GridFSBucket(db, bucket_name="images")

    # ---- set-up and health -------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """Create the indexes every query here relies on (idempotent).

        Products need none beyond ``_id``: it is ``<request_id>:<row>`` (see
        :func:`product_id`), so it is unique per (request, row), sorts in input order and
        turns every per-request query into an ``_id`` range.
        """
        self.requests.create_index([("status", ASCENDING), ("lease_until", ASCENDING)])
        self.requests.create_index(
            [("webhook.status", ASCENDING), ("webhook.next_attempt_at", ASCENDING)]
        )
        self.requests.create_index([("created_at", DESCENDING)])
        self.requests.create_index(
            [("owner", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)]
        )
        self.requests.create_index([("idempotency_key", ASCENDING)], sparse=True)
        self._ensure_unique_image_names()
        # Expired keys are also ignored when met; the TTL index only keeps the collection small.
        self.idempotency.create_index([("created_at", ASCENDING)], expireAfterSeconds=7 * 86400)

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            self.db.client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    def request_counts(self) -> dict[str, int]:
        """How many requests are in each status (every status listed, zeros too)."""
        return {
            status.value: self.requests.count_documents({"status": status.value})
            for status in RequestStatus
        }

    def images_waiting(self) -> int:
        """Images of unfinished requests that no process has finished yet."""
        waiting = 0
        for request in self.requests.find(
            {"status": {"$in": _ACTIVE}},
            {"images_total": 1, "images_done": 1, "images_failed": 1},
        ):
            finished = request.get("images_done", 0) + request.get("images_failed", 0)
            waiting += max(0, request.get("images_total", 0) - finished)
        return waiting

    def stalled_requests(self, quiet_seconds: float) -> int:
        """Requests being processed that have recorded no progress for ``quiet_seconds``:
        work held while nothing moves (a storage outage, a stuck host, a bug)."""
        now = self.clock()
        return self.requests.count_documents(
            {
                "status": RequestStatus.PROCESSING.value,
                "progress_at": {"$lt": now - timedelta(seconds=quiet_seconds)},
            }
        )

    # ---- upload ------------------------------------------------------------------------

    def create_request(self, request: Doc, parts: list[Doc]) -> None:
        """Store a request and all its products (in upload parts), or nothing.

        The parts go in first and the request document last: work is found through the
        request, so until it exists the parts are invisible. On any failure the request is
        taken back if a worker has not claimed it, and the parts are deleted once it is
        gone. The worker expands them into products (:meth:`expand_upload`).
        """
        try:
            if parts:
                self.upload_parts.insert_many(parts, ordered=False)
            self.requests.insert_one(request)
        except BaseException:
            with contextlib.suppress(PyMongoError):  # the original error is the one to report
                # An insert the server applied but whose answer was lost: take the request
                # back first (unless a worker has it already), and the parts only once it is
                # surely gone, so that no request is ever left without its products.
                self.requests.delete_one(
                    {
                        "_id": request["_id"],
                        "status": RequestStatus.PENDING.value,
                        "lease_owner": None,
                    }
                )
                if self.requests.find_one({"_id": request["_id"]}, {"_id": 1}) is None:
                    self.upload_parts.delete_many({"_id": {"$in": [p["_id"] for p in parts]}})
            raise

    def upload_part(self, request_id: str, index: int) -> Doc | None:
        """One of a request's upload parts (None once it is expanded and removed)."""
        return self.upload_parts.find_one({"_id": upload_part_id(request_id, index)})

    def insert_products(self, products: list[Doc]) -> None:
        """Insert product documents from an upload part; those already in (an expansion
        cut short and done again, or two processes at once) are left alone."""
        if not products:
            return
        try:
            self.products.insert_many(products, ordered=False)
        except BulkWriteError as exc:
            details = exc.details
            duplicates_only = all(e.get("code") == 11000 for e in details["writeErrors"])
            if not duplicates_only or details.get("writeConcernErrors"):
                raise

    def drop_upload_parts(self, request_id: str, parts: int) -> None:
        """Remove a request's upload parts once every product of them is in."""
        ids = [upload_part_id(request_id, index) for index in range(parts)]
        self.upload_parts.delete_many({"_id": {"$in": ids}})
        self.requests.update_one({"_id": request_id}, {"$set": {"parts": 0}})

    def expand_upload(self, request_id: str, parts: int) -> None:
        """All of a request's upload parts into product documents at once (the job does it
        page by page as it feeds; this is the same, whole)."""
        for index in range(parts):
            part = self.upload_part(request_id, index)
            if part is not None:
                self.insert_products(part["products"])
        self.drop_upload_parts(request_id, parts)

    def products_from_parts(self, request_id: str, parts: int, ids: list[str]) -> list[Doc]:
        """Products among ``ids`` that are still only in the request's upload parts."""
        wanted = set(ids)
        found: list[Doc] = []
        part_ids = [upload_part_id(request_id, index) for index in range(parts)]
        for part in self.upload_parts.find({"_id": {"$in": part_ids}}):
            found.extend(p for p in part["products"] if p["_id"] in wanted)
        return found

    def reserve_idempotency_key(
        self, key: str, request_id: str, digest: str, ttl: timedelta
    ) -> Doc | None:
        """Reserve ``key`` for a new request: None when reserved, else the live reservation.

        The key is the document's ``_id``, so of two uploads racing with one key exactly
        one wins; a reservation older than ``ttl`` is taken over atomically.
        """
        now = self.clock()
        reservation = {"request_id": request_id, "digest": digest, "created_at": now}
        try:
            self.idempotency.insert_one({"_id": key, **reservation})
            return None
        except DuplicateKeyError:
            pass
        expired = self.idempotency.find_one_and_update(
            {"_id": key, "created_at": {"$lt": now - ttl}}, {"$set": reservation}
        )
        if expired is not None:
            return None
        return self.idempotency.find_one({"_id": key})

    def take_over_idempotency_key(
        self, key: str, abandoned: str, request_id: str, digest: str
    ) -> Doc | None:
        """Move a reservation whose upload never got stored to ``request_id``: None when
        moved, else the reservation as it is now (someone else moved it first)."""
        now = self.clock()
        moved = self.idempotency.find_one_and_update(
            {"_id": key, "request_id": abandoned},
            {"$set": {"request_id": request_id, "digest": digest, "created_at": now}},
        )
        if moved is not None:
            return None
        current = self.idempotency.find_one({"_id": key})
        if current is not None:
            return current
        try:  # removed meanwhile (expired): reserve afresh
            self.idempotency.insert_one(
                {"_id": key, "request_id": request_id, "digest": digest, "created_at": now}
            )
            return None
        except DuplicateKeyError:
            return self.idempotency.find_one({"_id": key})

    def release_idempotency_key(self, key: str, request_id: str) -> None:
        """Drop a reservation whose request could not be stored."""
        self.idempotency.delete_one({"_id": key, "request_id": request_id})

    # ---- GridFS images ------------------------------------------------------------------

    def _ensure_unique_image_names(self) -> None:
        """One files document per image name: what makes a repeated put harmless.

        Databases written before the index existed may hold older revisions of a name; the
        newest is kept (it is what readers were served) and the index is created again.
        """
        files = self.db["images.files"]
        for attempt in (1, 2):
            try:
                files.create_index([("filename", ASCENDING)], unique=True, name="filename_unique")
                return
            except (DuplicateKeyError, OperationFailure) as exc:
                if attempt == 2 or getattr(exc, "code", None) not in (11000, 11001):
                    raise
            duplicates = files.aggregate(
                [
                    {"$sort": {"uploadDate": DESCENDING}},
                    {"$group": {"_id": "$filename", "ids": {"$push": "$_id"}, "n": {"$sum": 1}}},
                    {"$match": {"n": {"$gt": 1}}},
                ]
            )
            for duplicate in duplicates:
                for old in duplicate["ids"][1:]:
                    with contextlib.suppress(gridfs.errors.NoFile):
                        self.images.delete(old)

    def put_image(self, key: str, data: bytes) -> None:
        """Store an output image under ``key`` unless a version of it is stored already.

        GridFS writes the chunks first and the files document last, and ``filename`` is
        unique: the first complete version wins, and it is never replaced or deleted, so a
        reader never meets a half-written or vanishing file. Chunks of a losing or interrupted
        attempt carry their own id and are never read.
        """
        files = self.db["images.files"]
        if files.find_one({"filename": key}, {"_id": 1}) is not None:
            return
        digest = hashlib.sha256(data).hexdigest()[:32]
        for _attempt in (1, 2):
            file_id = ObjectId()
            try:
                self.images.upload_from_stream_with_id(
                    file_id, key, data, metadata={"sha256": digest}
                )
                return
            except gridfs.errors.FileExists:
                # A write sent twice across a reconnect, or another writer first.
                winner = files.find_one({"filename": key}, {"_id": 1})
                if winner is not None and winner["_id"] == file_id:
                    return  # our files document went in; only its reply was lost
                self.db["images.chunks"].delete_many({"files_id": file_id})
                if winner is not None:
                    return  # another writer's complete version stays; ours is dropped
        raise PyMongoError(f"could not store {key}: GridFS kept reporting a duplicate")

    def get_image(self, key: str) -> tuple[bytes, str] | None:
        """The newest version of the image stored under ``key`` and its digest."""
        try:
            stream = self.images.open_download_stream_by_name(key)
        except gridfs.errors.NoFile:
            return None
        with stream:
            return stream.read(), str((stream.metadata or {}).get("sha256", ""))

    # ---- reads -------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Doc | None:
        """The request document, or None."""
        return self.requests.find_one({"_id": request_id})

    def recent_requests(
        self, owner: str | None, limit: int, before: tuple[datetime, str] | None = None
    ) -> list[Doc]:
        """One key's requests, newest first (ties by id), strictly older than ``before``."""
        query: Doc = {"owner": owner}
        if before is not None:
            created, request_id = before
            query["$or"] = [
                {"created_at": {"$lt": created}},
                {"created_at": created, "_id": {"$lt": request_id}},
            ]
        projection = {"header": 0, "roles": 0}
        cursor = self.requests.find(query, projection)
        return list(cursor.sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(limit))

    def products_in_rows(
        self,
        request_id: str,
        start: int,
        stop: int,
        query: Doc | None = None,
        projection: Doc | None = None,
    ) -> list[Doc]:
        """Products with rows in [start, stop) (matching ``query``), in input order."""
        ids = [product_id(request_id, row) for row in range(start, stop)]
        return self.products_by_ids(ids, query, projection)

    def products_by_ids(
        self, ids: list[str], query: Doc | None = None, projection: Doc | None = None
    ) -> list[Doc]:
        """Products by ``_id`` (matching ``query``), in input order.

        By exact ``_id`` (``$in``): an index lookup on any server. A range on ``_id`` is a
        collection scan on the embedded one, and long ``$in`` lists grow worse than linearly
        there, so the lists stay short.
        """
        found: list[Doc] = []
        for first in range(0, len(ids), ID_CHUNK):
            chunk = ids[first : first + ID_CHUNK]
            found.extend(self.products.find({"_id": {"$in": chunk}, **(query or {})}, projection))
        found.sort(key=lambda product: product["_id"])
        return found

    def iter_products(self, request_id: str, total: int, page: int = 500) -> Iterator[Doc]:
        """All ``total`` products of a request in input order, streamed page by page."""
        for start in range(0, total, page):
            yield from self.products_in_rows(request_id, start, min(total, start + page))

    # ---- claims and leases -------------------------------------------------------------

    def claim_request(self, owner: str, lease_seconds: float) -> Claim | None:
        """Atomically take one unfinished request whose lease is free or expired."""
        now = self.clock()
        lease_until = now + timedelta(seconds=lease_seconds)
        before = self.requests.find_one_and_update(
            {"status": {"$in": _ACTIVE}, "lease_until": {"$lt": now}},
            {
                "$set": {
                    "status": RequestStatus.PROCESSING.value,
                    "lease_owner": owner,
                    "lease_until": lease_until,
                    "updated_at": now,
                },
                "$inc": {"claims": 1, "version": 1},
            },
            sort=[("lease_until", ASCENDING)],
            return_document=ReturnDocument.BEFORE,
        )
        if before is None:
            return None
        previous = before.get("lease_owner")
        request = {
            **before,
            "status": RequestStatus.PROCESSING.value,
            "lease_owner": owner,
            "lease_until": lease_until,
            "updated_at": now,
            "claims": before.get("claims", 0) + 1,
            "version": before.get("version", 0) + 1,
        }
        takeover = previous is not None and previous != owner
        return Claim(request, takeover, int(before.get("fed_rows", 0)) if takeover else 0)

    def renew_lease(self, request_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend our lease; False when another process has taken the request over."""
        now = self.clock()
        result = self.requests.update_one(
            {"_id": request_id, "lease_owner": owner, "status": RequestStatus.PROCESSING.value},
            {"$set": {"lease_until": now + timedelta(seconds=lease_seconds)}},
        )
        return result.matched_count == 1

    def release_lease(
        self, request_id: str, owner: str, *, retry_at: datetime | None = None
    ) -> None:
        """Hand the request back cleanly: nothing of ours is in flight any more, so the next
        claim is not a take-over after a crash. Any process may claim it from ``retry_at``
        (now by default; later after a pass that could not make progress)."""
        sets: Doc = {"lease_until": retry_at or EPOCH, "lease_owner": None, "fed_rows": 0}
        update: Doc = {"$set": sets, "$inc": {"version": 1}}
        if retry_at is not None:
            update["$inc"]["stalls"] = 1
        self.requests.update_one({"_id": request_id, "lease_owner": owner}, update)

    # ---- per-image work ----------------------------------------------------------------

    def open_products(self, request_id: str, start: int, stop: int) -> list[Doc]:
        """Unfinished products with rows in [start, stop), in input order."""
        return self.products_in_rows(
            request_id,
            start,
            stop,
            {"status": {"$in": _OPEN_PRODUCT}},
            {"row": 1, "images": 1, "status": 1},
        )

    def mark_fed(self, request_id: str, fed_rows: int) -> None:
        """Record that rows below ``fed_rows`` are handed to a pool (before they are), so a
        take-over knows which products a dead process was working on. ``touched_rows`` is
        the same mark, never lowered: rows at or above it are still exactly as uploaded."""
        self.requests.update_one(
            {"_id": request_id},
            {"$max": {"fed_rows": fed_rows, "touched_rows": fed_rows}, "$inc": {"version": 1}},
        )

    def count_attempt(self, product: str, index: int, by: int = 1) -> None:
        """Count one more attempt at an image a dead process may have died of (written before
        the image is decoded, so a death while decoding it is counted against it); ``by=-1``
        takes it back once the decode has come back."""
        self.products.update_one({"_id": product}, {"$inc": {f"images.{index}.attempts": by}})

    def record_outcomes(self, writes: list[ProductWrite]) -> int:
        """Write image outcomes and finished products' status, each image once.

        One conditional update per product, all in one round trip: it matches only while
        every image it writes is unfinished and, when it finishes the product, only while
        the product is open and every one of its other images is finished in the database
        (not only in this job's memory). Returns how many products were written: fewer than
        ``len(writes)`` means someone else got there first, or the database disagrees with
        the job; then the counters are recomputed, and anything still open is redone by the
        next pass.
        """
        operations = []
        for write in writes:
            query: Doc = {"_id": write.product_id}
            sets: Doc = {}
            for index, outcome in write.outcomes.items():
                query[f"images.{index}.status"] = {"$nin": _TERMINAL_IMAGE}
                sets.update({f"images.{index}.{k}": v for k, v in outcome.items()})
            if write.finished is not None:
                query["status"] = {"$in": _OPEN_PRODUCT}
                for index in range(write.image_count):
                    if index not in write.outcomes:
                        query[f"images.{index}.status"] = {"$in": _TERMINAL_IMAGE}
                sets["status"] = write.finished.value
            operations.append(UpdateOne(query, {"$set": sets}))
        if not operations:
            return 0
        return self.products.bulk_write(operations, ordered=False).modified_count

    def add_progress(self, request_id: str, *, done: int, failed: int, products: int) -> None:
        """Bump the request's live counters."""
        now = self.clock()
        self.requests.update_one(
            {"_id": request_id},
            {
                "$inc": {
                    "images_done": done,
                    "images_failed": failed,
                    "products_done": products,
                    "version": 1,
                },
                "$set": {"updated_at": now, "progress_at": now, "stalls": 0},
            },
        )

    def count_outcomes(self, request_id: str, total: int) -> Counters:
        """Counters recomputed from the products (the truth, whatever the live counters say),
        and the products marked finished although one of their images is open."""
        done = failed = products_done = open_images = 0
        misfinished: list[str] = []
        projection = {"images.status": 1, "status": 1}
        for start in range(0, total, 1000):
            for product in self.products_in_rows(
                request_id, start, min(total, start + 1000), projection=projection
            ):
                still_open = 0
                for image in product["images"]:
                    status = image["status"]
                    if status == ImageStatus.DONE:
                        done += 1
                    elif status == ImageStatus.FAILED:
                        failed += 1
                    else:
                        still_open += 1
                open_images += still_open
                if product["status"] not in _OPEN_PRODUCT:
                    if still_open:
                        misfinished.append(product["_id"])
                    else:
                        products_done += 1
        return Counters(done, failed, products_done, open_images, tuple(misfinished))

    def reopen_products(self, ids: list[str]) -> int:
        """Mark products open again that are marked finished while an image is open (an
        outcome lost with a database that broke its word), so the next pass redoes it."""
        if not ids:
            return 0
        result = self.products.update_many(
            {"_id": {"$in": ids}, "images": {"$elemMatch": {"status": {"$nin": _TERMINAL_IMAGE}}}},
            {"$set": {"status": ProductStatus.PROCESSING.value}},
        )
        return result.modified_count

    def set_counters(self, request_id: str, counts: Counters) -> None:
        """Overwrite the live counters with recomputed ones."""
        self.requests.update_one(
            {"_id": request_id},
            {"$set": counts.fields(), "$inc": {"version": 1}},
        )

    def finish_request(self, request_id: str, counts: Counters, *, has_webhook: bool) -> bool:
        """The terminal transition, exactly once; queues the webhook in the same update."""
        now = self.clock()
        sets: Doc = {
            "status": counts.terminal_status().value,
            "completed_at": now,
            "updated_at": now,
            "lease_owner": None,
            "lease_until": EPOCH,
            **counts.fields(),
        }
        if has_webhook:
            sets["webhook.status"] = WebhookStatus.PENDING.value
            sets["webhook.next_attempt_at"] = now
        result = self.requests.update_one(
            {"_id": request_id, "status": RequestStatus.PROCESSING.value},
            {"$set": sets, "$inc": {"version": 1}},
        )
        return result.modified_count == 1

    # ---- webhook outbox ----------------------------------------------------------------

    def claim_webhook(self, owner: str, lease_seconds: float) -> Doc | None:
        """Take one due webhook delivery; the claim pushes its due time past the lease."""
        now = self.clock()
        return self.requests.find_one_and_update(
            {
                "webhook.status": WebhookStatus.PENDING.value,
                "webhook.next_attempt_at": {"$lte": now},
            },
            {
                "$set": {
                    "webhook.next_attempt_at": now + timedelta(seconds=lease_seconds),
                    "webhook.owner": owner,
                }
            },
            sort=[("webhook.next_attempt_at", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    def record_webhook_attempt(
        self,
        request_id: str,
        owner: str,
        *,
        delivered: bool,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """Write the outcome of one delivery attempt."""
        now = self.clock()
        if delivered:
            status = WebhookStatus.DELIVERED
        elif retry_at is None:
            status = WebhookStatus.FAILED
        else:
            status = WebhookStatus.PENDING
        self.requests.update_one(
            {
                "_id": request_id,
                "webhook.owner": owner,
                "webhook.status": WebhookStatus.PENDING.value,
            },
            {
                "$set": {
                    "webhook.status": status.value,
                    "webhook.last_attempt_at": now,
                    "webhook.last_error": error,
                    "webhook.next_attempt_at": retry_at,
                    "updated_at": now,
                },
                "$inc": {"webhook.attempts": 1, "version": 1},
            },
        )
