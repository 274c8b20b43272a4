"""Status values and the small value objects passed between the layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class RequestStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"


class ProductStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"


class ImageStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class WebhookStatus(StrEnum):
    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class OutputFormat(StrEnum):
    AUTO = "auto"
    JPEG = "jpeg"
    WEBP = "webp"
    PNG = "png"


TERMINAL_REQUEST = (
    RequestStatus.COMPLETED,
    RequestStatus.COMPLETED_WITH_ERRORS,
    RequestStatus.FAILED,
)
TERMINAL_IMAGE = (ImageStatus.DONE, ImageStatus.FAILED)
FINISHED_PRODUCT = (ProductStatus.PROCESSED, ProductStatus.FAILED)


def utcnow() -> datetime:
    """Now, timezone-aware UTC at millisecond precision (what MongoDB keeps)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds and a ``Z`` suffix, as API.md fixes it."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


@dataclass(frozen=True)
class ProductRow:
    """One validated CSV row."""

    row: int
    serial_number: int
    product_name: str
    input_urls: list[str]
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedCsv:
    """A validated CSV: its header (for the output CSV), its rows in input order and, for a
    text file, the encoding it was read with (None for a workbook)."""

    header: list[str]
    roles: dict[str, int]
    rows: list[ProductRow]
    encoding: str | None = None

    @property
    def image_count(self) -> int:
        """How many image URLs the file holds in all."""
        return sum(len(r.input_urls) for r in self.rows)


@dataclass(frozen=True)
class UploadOptions:
    """The validated form fields of an upload."""

    quality: int
    output_format: OutputFormat
    webhook_url: str | None


@dataclass(frozen=True)
class Created:
    """What an upload returns."""

    request_id: str
    status: str
    products: int
    images: int
    new: bool = True
