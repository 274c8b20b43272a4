"""The MongoDB documents, defined once: a request, its products, their images, the webhook
outbox entry, an image's outcome and the counters. Services, store and worker build them
here instead of writing dict literals of their own.

``processing_requests``: one per upload (``new_request``), with the lease, the counters and
the webhook outbox entry. ``products``: one per CSV row (``new_product``), ``_id`` =
``<request_id>:<row, 7 digits>``, holding one entry per input URL (``new_image``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imgproc.models import (
    ImageStatus,
    ProductRow,
    ProductStatus,
    RequestStatus,
    WebhookStatus,
)

Doc = dict[str, Any]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # "free to claim" as a lease expiry
MAX_ROWS = 10_000_000  # product ids carry the row in 7 digits
# Enum values read once: a 10,000-row upload builds 30,000 of these fields.
_PENDING_IMAGE = ImageStatus.PENDING.value
_PENDING_PRODUCT = ProductStatus.PENDING.value


def product_id(request_id: str, row: int) -> str:
    """A product's ``_id``: unique per (request, row) and sorting in input order."""
    return f"{request_id}:{row:07d}"


PART_BYTES = 4 * 2**20  # an upload part holds products up to about this size (BSON: 16 MiB)


def upload_part_id(request_id: str, index: int) -> str:
    """An upload part's ``_id``."""
    return f"{request_id}:part{index:04d}"


def upload_parts(request_id: str, products: list[Doc]) -> list[Doc]:
    """The products of an upload, in order, in as few documents as their size allows.

    Storing ten thousand small documents costs a database per document (the embedded one
    about 90 µs each, nearly a second for a big upload); a few parts cost a few. The parts
    hold the product documents as they will be stored, so expanding them is a plain insert.
    """
    parts: list[Doc] = []
    batch: list[Doc] = []
    size = 0
    for product in products:
        weight = (
            200
            + len(product["product_name"])
            + sum(64 + len(image["input_url"]) for image in product["images"])
        )
        weight += sum(len(k) + len(v) + 16 for k, v in product["extra"].items())
        if batch and size + weight > PART_BYTES:
            parts.append(_part(request_id, len(parts), batch))
            batch, size = [], 0
        batch.append(product)
        size += weight
    if batch:
        parts.append(_part(request_id, len(parts), batch))
    return parts


def _part(request_id: str, index: int, products: list[Doc]) -> Doc:
    return {
        "_id": upload_part_id(request_id, index),
        "request_id": request_id,
        "first_row": products[0]["row"],
        "count": len(products),
        "products": products,
    }


def new_image(url: str) -> Doc:
    """An input image not processed yet."""
    return {"input_url": url, "status": _PENDING_IMAGE}


def new_product(request_id: str, index: int, row: ProductRow) -> Doc:
    """A CSV row as stored: ``row`` is the dense input position, ``row.row`` the CSV line."""
    return {
        "_id": product_id(request_id, index),
        "request_id": request_id,
        "row": index,
        "serial_number": row.serial_number,
        "product_name": row.product_name,
        "extra": row.extra,
        "status": _PENDING_PRODUCT,
        "images": [new_image(url) for url in row.input_urls],
    }


def new_webhook(url: str | None) -> Doc:
    """The outbox entry of a request: ``none`` without a URL, else due once it is terminal."""
    return {
        "url": url,
        "status": (WebhookStatus.PENDING if url else WebhookStatus.NONE).value,
        "attempts": 0,
        "next_attempt_at": None,
        "last_attempt_at": None,
        "last_error": None,
    }


def new_request(
    request_id: str,
    now: datetime,
    *,
    products_total: int,
    images_total: int,
    quality: int,
    output_format: str,
    webhook_url: str | None,
    header: list[str],
    roles: dict[str, int],
    base_url: str,
    owner: str | None,
    parts: int = 0,
    idempotency_key: str | None = None,
    file_digest: str = "",
) -> Doc:
    """A request as stored at upload: pending, free to claim, counters at zero; ``parts``
    upload parts still to be expanded into its products."""
    request: Doc = {
        "_id": request_id,
        "status": RequestStatus.PENDING.value,
        "created_at": now,
        "updated_at": now,
        "completed_at": None,
        "products_total": products_total,
        "products_done": 0,
        "images_total": images_total,
        "images_done": 0,
        "images_failed": 0,
        "quality": quality,
        "output_format": output_format,
        "webhook": new_webhook(webhook_url),
        "header": header,
        "roles": roles,
        "base_url": base_url,
        "lease_owner": None,
        "lease_until": EPOCH,
        "claims": 0,
        "parts": parts,
        "fed_rows": 0,
        "touched_rows": 0,
        "stalls": 0,
        "progress_at": now,
        "owner": owner,
    }
    if idempotency_key:
        request["idempotency_key"] = idempotency_key
        request["file_digest"] = file_digest
    return request


@dataclass(frozen=True)
class ImageOutcome:
    """How one image ended: done with its output's facts, or failed with a short reason."""

    status: ImageStatus
    error: str | None = None
    output_key: str | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    kept_original: bool = False

    @classmethod
    def failed(cls, reason: str) -> ImageOutcome:
        """A failure that belongs to the image (its host, its bytes, its size, ...)."""
        return cls(ImageStatus.FAILED, error=reason)

    @property
    def ok(self) -> bool:
        """True when the image is done."""
        return self.status is ImageStatus.DONE

    def fields(self) -> Doc:
        """The image entry's fields this outcome sets."""
        if not self.ok:
            return {"status": self.status.value, "error": self.error}
        return {
            "status": self.status.value,
            "error": None,
            "output_key": self.output_key,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "kept_original": self.kept_original,
        }


@dataclass(frozen=True)
class Counters:
    """A request's progress recomputed from its products (the truth, whatever the live
    counters say): finished images and products, images still open, and products marked
    finished although an image of theirs is open (to be reopened)."""

    images_done: int = 0
    images_failed: int = 0
    products_done: int = 0
    open_images: int = 0
    misfinished: tuple[str, ...] = ()

    def fields(self) -> Doc:
        """The request's live counter fields."""
        return {
            "images_done": self.images_done,
            "images_failed": self.images_failed,
            "products_done": self.products_done,
        }

    def terminal_status(self) -> RequestStatus:
        """The terminal status API.md defines for these counters."""
        if self.images_failed == 0:
            return RequestStatus.COMPLETED
        if self.images_done == 0:
            return RequestStatus.FAILED
        return RequestStatus.COMPLETED_WITH_ERRORS


@dataclass
class ProductWrite:
    """Outcomes to write into one product, and its final status when they finish it."""

    product_id: str
    image_count: int
    outcomes: dict[int, Doc] = field(default_factory=dict)
    finished: ProductStatus | None = None

    @property
    def useful(self) -> bool:
        """Whether it writes anything."""
        return bool(self.outcomes) or self.finished is not None
