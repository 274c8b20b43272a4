"""The only module that speaks pymongo: collections, indexes and atomic state transitions.

Every state change is one conditional update named after what it does, so that two
processes racing for the same work can never both win.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, PyMongoError

from imgproc.models import (
    TERMINAL_IMAGE,
    ImageStatus,
    ProductStatus,
    RequestStatus,
    WebhookStatus,
    utcnow,
)

Doc = dict[str, Any]

# The database cannot be reached (down, restarting, no primary): callers answer 503 or retry.
DatabaseDown = ConnectionFailure
DatabaseError = PyMongoError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ACTIVE = [RequestStatus.PENDING.value, RequestStatus.PROCESSING.value]
_OPEN_PRODUCT = [ProductStatus.PENDING.value, ProductStatus.PROCESSING.value]
_TERMINAL_IMAGE = [s.value for s in TERMINAL_IMAGE]

__all__ = ["DatabaseDown", "DatabaseError", "Store", "connect"]


def connect(uri: str, *, timeout_ms: int, pool_size: int) -> MongoClient[Doc]:
    """A lazily connecting, fork-safe client (nothing touches the network until first use)."""
    return MongoClient(
        uri,
        connect=False,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=max(timeout_ms * 6, 30_000),
        maxPoolSize=pool_size,
        retryWrites=True,
        appname="imgproc",
    )


class Store:
    """Collections of one database and the operations the service performs on them."""

    def __init__(self, db: Database[Doc], clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.clock = clock
        self.requests: Collection[Doc] = db["processing_requests"]
        self.products: Collection[Doc] = db["products"]

    # ---- set-up and health -------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """Create the indexes every query here relies on (idempotent)."""
        self.products.create_index([("request_id", ASCENDING), ("row", ASCENDING)], unique=True)
        self.requests.create_index([("status", ASCENDING), ("lease_until", ASCENDING)])
        self.requests.create_index(
            [("webhook.status", ASCENDING), ("webhook.next_attempt_at", ASCENDING)]
        )
        self.requests.create_index([("created_at", DESCENDING)])

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            self.db.client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    # ---- upload ------------------------------------------------------------------------

    def create_request(self, request: Doc, products: list[Doc]) -> None:
        """Store a request and all its products, or nothing.

        Products go in first and the request document last: work is found through the
        request, so until it exists the products are invisible, and on any failure they
        are deleted again.
        """
        try:
            for start in range(0, len(products), 1000):
                self.products.insert_many(products[start : start + 1000], ordered=False)
            self.requests.insert_one(request)
        except BaseException:
            with contextlib.suppress(PyMongoError):  # the original error is the one to report
                self.products.delete_many({"request_id": request["_id"]})
            raise

    # ---- reads -------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Doc | None:
        """The request document, or None."""
        return self.requests.find_one({"_id": request_id})

    def page_products(self, request_id: str, offset: int, limit: int) -> list[Doc]:
        """Products of a request in input order, one page."""
        cursor = (
            self.products.find({"request_id": request_id})
            .sort("row", ASCENDING)
            .skip(offset)
            .limit(limit)
        )
        return list(cursor)

    def iter_products(self, request_id: str, batch_size: int = 500) -> Iterator[Doc]:
        """All products of a request in input order, streamed."""
        return iter(
            self.products.find({"request_id": request_id})
            .sort("row", ASCENDING)
            .batch_size(batch_size)
        )

    # ---- claims and leases -------------------------------------------------------------

    def claim_request(self, owner: str, lease_seconds: float) -> Doc | None:
        """Atomically take one unfinished request whose lease is free or expired."""
        now = self.clock()
        return self.requests.find_one_and_update(
            {"status": {"$in": _ACTIVE}, "lease_until": {"$lt": now}},
            {
                "$set": {
                    "status": RequestStatus.PROCESSING.value,
                    "lease_owner": owner,
                    "lease_until": now + timedelta(seconds=lease_seconds),
                    "updated_at": now,
                },
                "$inc": {"claims": 1},
            },
            sort=[("lease_until", ASCENDING)],
            return_document=ReturnDocument.AFTER,
        )

    def renew_lease(self, request_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend our lease; False when another process has taken the request over."""
        now = self.clock()
        result = self.requests.update_one(
            {"_id": request_id, "lease_owner": owner, "status": RequestStatus.PROCESSING.value},
            {"$set": {"lease_until": now + timedelta(seconds=lease_seconds)}},
        )
        return result.matched_count == 1

    def release_lease(self, request_id: str, owner: str) -> None:
        """Give the request back so any process can claim it at once."""
        self.requests.update_one(
            {"_id": request_id, "lease_owner": owner},
            {"$set": {"lease_until": EPOCH, "lease_owner": None}},
        )

    # ---- per-image work ----------------------------------------------------------------

    def open_products(self, request_id: str) -> Iterator[Doc]:
        """Products of a request that are not finished yet, in input order."""
        return iter(
            self.products.find(
                {"request_id": request_id, "status": {"$in": _OPEN_PRODUCT}},
                {"row": 1, "images": 1, "status": 1},
            )
            .sort("row", ASCENDING)
            .batch_size(200)
        )

    def start_images(self, product_id: Any, indexes: Iterable[int]) -> None:
        """Mark a product's unfinished images as processing and count the attempt."""
        sets: Doc = {"status": ProductStatus.PROCESSING.value}
        incs: Doc = {}
        for i in indexes:
            sets[f"images.{i}.status"] = ImageStatus.PROCESSING.value
            incs[f"images.{i}.attempts"] = 1
        update: Doc = {"$set": sets}
        if incs:
            update["$inc"] = incs
        self.products.update_one({"_id": product_id}, update)

    def record_image(self, product_id: Any, index: int, outcome: Doc) -> Doc | None:
        """Write one image's outcome once; the product after it, or None if already written."""
        prefix = f"images.{index}."
        return self.products.find_one_and_update(
            {"_id": product_id, prefix + "status": {"$nin": _TERMINAL_IMAGE}},
            {"$set": {prefix + key: value for key, value in outcome.items()}},
            projection={"images.status": 1, "status": 1},
            return_document=ReturnDocument.AFTER,
        )

    def finish_product(self, product_id: Any, status: ProductStatus) -> bool:
        """Move a product to its terminal status once; True for the caller that did it."""
        result = self.products.update_one(
            {"_id": product_id, "status": {"$in": _OPEN_PRODUCT}},
            {"$set": {"status": status.value}},
        )
        return result.modified_count == 1

    def add_progress(self, request_id: str, *, done: int, failed: int, products: int) -> None:
        """Bump the request's live counters."""
        now = self.clock()
        self.requests.update_one(
            {"_id": request_id},
            {
                "$inc": {"images_done": done, "images_failed": failed, "products_done": products},
                "$set": {"updated_at": now},
            },
        )

    def count_outcomes(self, request_id: str) -> Doc:
        """Counters recomputed from the products (the truth, whatever the live counters say)."""
        counts = {"images_done": 0, "images_failed": 0, "products_done": 0, "open_images": 0}
        for product in self.products.find(
            {"request_id": request_id}, {"images.status": 1, "status": 1}
        ).batch_size(1000):
            for image in product["images"]:
                status = image["status"]
                if status == ImageStatus.DONE:
                    counts["images_done"] += 1
                elif status == ImageStatus.FAILED:
                    counts["images_failed"] += 1
                else:
                    counts["open_images"] += 1
            if product["status"] not in _OPEN_PRODUCT:
                counts["products_done"] += 1
        return counts

    def set_counters(self, request_id: str, counts: Doc) -> None:
        """Overwrite the live counters with recomputed ones (after a take-over)."""
        self.requests.update_one(
            {"_id": request_id},
            {"$set": {k: counts[k] for k in ("images_done", "images_failed", "products_done")}},
        )

    def finish_request(
        self, request_id: str, status: RequestStatus, counts: Doc, *, has_webhook: bool
    ) -> bool:
        """The terminal transition, exactly once; queues the webhook in the same update."""
        now = self.clock()
        sets: Doc = {
            "status": status.value,
            "completed_at": now,
            "updated_at": now,
            "lease_owner": None,
            "lease_until": EPOCH,
            "images_done": counts["images_done"],
            "images_failed": counts["images_failed"],
            "products_done": counts["products_done"],
        }
        if has_webhook:
            sets["webhook.status"] = WebhookStatus.PENDING.value
            sets["webhook.next_attempt_at"] = now
        result = self.requests.update_one(
            {"_id": request_id, "status": RequestStatus.PROCESSING.value}, {"$set": sets}
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
                "$inc": {"webhook.attempts": 1},
            },
        )
