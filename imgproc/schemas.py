"""marshmallow schemas: CSV rows and form fields in; status, webhook and error bodies out.

The output schemas are also the source of the OpenAPI document, so the two cannot drift.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    pre_load,
    validate,
    validates,
)

from imgproc.models import (
    ImageStatus,
    OutputFormat,
    ProductStatus,
    RequestStatus,
    WebhookStatus,
)
from imgproc.netguard import host_refusal

ROLE_COLUMNS = {
    "serial_number": "S. No.",
    "product_name": "Product Name",
    "input_urls": "Input Image Urls",
}
MAX_URL_LENGTH = 2048
MAX_NAME_LENGTH = 512
_SERIAL = re.compile(r"\+?\d{1,18}")
# URLs in a cell are separated by whitespace and line breaks anywhere, and by commas,
# semicolons and pipes where a new http(s) URL follows. A comma that does not start a new
# URL belongs to the URL (https://cdn.example/w_300,h_200/a.jpg); any piece that is not a
# URL of its own is an error, so a cell is never silently read as different URLs.
_URL_SPLIT = re.compile(r"\s+|[,;|]+\s*(?=https?://)", re.IGNORECASE)
_URL_SEPARATORS = ",;|"
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
# URLs that plainly pass every check of check_http_url: an http(s) scheme, a host of ASCII
# letters, digits, dots and hyphens (so the netloc holds no userinfo, brackets or non-ASCII
# text for urlsplit to object to), a port below 10000, then only printable ASCII. ASCII
# classes on purpose: no IGNORECASE (it lets the Kelvin sign match [a-z]) and no \d.
_PLAIN_HTTP_URL = re.compile(
    r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]{1,4})?(?:[/?#][!-~]*)?"
)


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def check_http_url(value: str) -> str:
    """An absolute http(s) URL, stripped; ValidationError with a clear message otherwise."""
    url = value.strip()
    if len(url) <= MAX_URL_LENGTH and _PLAIN_HTTP_URL.fullmatch(url):
        return url  # what the checks below would return, without parsing (20,000 in a file)
    return _checked_http_url(url)


def _checked_http_url(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise ValidationError(f"URL longer than {MAX_URL_LENGTH} characters: {_short(url)!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValidationError(f"not a valid URL: {_short(url)!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"not an http(s) URL: {_short(url)!r}")
    if _BAD_URL_CHARS.search(url):
        raise ValidationError(f"URL contains spaces or control characters: {_short(url)!r}")
    return url


def split_urls(cell: str) -> list[str]:
    """The URLs of one cell, split by the rule above; separators around them dropped."""
    pieces = (piece.strip(_URL_SEPARATORS) for piece in _URL_SPLIT.split(cell))
    return [piece for piece in pieces if piece]


# ---- the rules of a CSV row: plain functions, so a valid row can skip marshmallow's
# per-field machinery (CsvRowSchema.load_row) while the fields below apply the same rules.


def serial_number(text: str) -> int:
    """``S. No.``: a positive whole number written as digits."""
    if not text:
        raise ValidationError("missing")
    if not _SERIAL.fullmatch(text):
        raise ValidationError(f"not a whole number: {_short(text, 30)!r}")
    number = int(text)
    if number < 1:
        raise ValidationError("must be a positive whole number")
    return number


def product_name(text: str) -> str:
    """``Product Name``: not empty, at most 512 characters."""
    if not text:
        raise ValidationError("must not be empty")
    if len(text) > MAX_NAME_LENGTH:
        raise ValidationError(f"longer than {MAX_NAME_LENGTH} characters")
    return text


def image_urls(cell: str, max_urls: int) -> list[str]:
    """``Input Image Urls``: 1 to ``max_urls`` absolute http(s) URLs; every bad one named."""
    pieces = split_urls(cell)
    if not pieces:
        raise ValidationError("no image URL")
    if len(pieces) > max_urls:
        raise ValidationError(f"{len(pieces)} URLs; at most {max_urls} per row")
    urls: list[str] = []
    errors: list[str] = []
    for piece in pieces:
        try:
            urls.append(check_http_url(piece))
        except ValidationError as exc:
            errors.extend(exc.messages)
    if errors:
        raise ValidationError(errors)
    return urls


class UrlList(fields.Field[list[str]]):
    """A cell of http(s) URLs separated by commas, semicolons, pipes, whitespace or lines."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        return image_urls(str(value), getattr(self.parent, "max_urls", 50))


class SerialNumber(fields.Field[int]):
    """A positive whole number written as digits."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        return serial_number(str(value).strip())


class ProductName(fields.String):
    """A product's name: not empty, at most 512 characters."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return product_name(super()._deserialize(value, attr, data, **kwargs))


class CsvRowSchema(Schema):
    """One product row, keyed by role (not by the header's spelling)."""

    serial_number = SerialNumber(required=True)
    product_name = ProductName(required=True)
    input_urls = UrlList(required=True)

    def __init__(self, *, max_urls: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_urls = max_urls

    @pre_load
    def _strip(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {k: v.strip() if isinstance(v, str) else v for k, v in data.items()}

    def load_row(self, cells: dict[str, str]) -> dict[str, Any]:
        """What ``load`` returns for a row's cells, fast: the rules above are called directly
        (marshmallow's machinery around them is most of the time of a 10,000-row file); a
        row they refuse goes through ``load``, whose ValidationError is the report."""
        if cells.keys() == ROLE_COLUMNS.keys():
            try:
                return {
                    "serial_number": serial_number(cells["serial_number"].strip()),
                    "product_name": product_name(cells["product_name"].strip()),
                    "input_urls": image_urls(cells["input_urls"].strip(), self.max_urls),
                }
            except ValidationError:
                pass
        loaded: dict[str, Any] = self.load(cells)
        return loaded


class UploadFormSchema(Schema):
    """The multipart form fields next to the file."""

    class Meta:
        unknown = EXCLUDE

    webhook_url = fields.String(load_default=None)
    quality = fields.Integer(
        load_default=None,
        strict=False,
        validate=validate.Range(min=1, max=95, error="must be a whole number from 1 to 95"),
        error_messages={"invalid": "must be a whole number from 1 to 95"},
    )
    output_format = fields.Enum(
        OutputFormat,
        by_value=True,
        load_default=OutputFormat.AUTO,
        error_messages={"unknown": "must be one of auto, jpeg, webp, png"},
    )

    def __init__(self, *, allow_private_urls: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_private_urls = allow_private_urls

    @pre_load
    def _blank_is_absent(self, data: Any, **_: Any) -> dict[str, Any]:
        stripped = {k: v.strip() if isinstance(v, str) else v for k, v in dict(data).items()}
        return {k: v for k, v in stripped.items() if v != ""}

    @validates("webhook_url")
    def _webhook(self, url: str | None, **_: Any) -> None:
        if url is None:
            return
        check_http_url(url)
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValidationError("credentials in the URL are not allowed")
        refusal = host_refusal(parts.hostname or "")
        if refusal and not self.allow_private_urls:
            raise ValidationError(f"{refusal}: webhooks go to public addresses only")


# ---- responses (also the OpenAPI components) ------------------------------------------


def _enum(values: type[Any]) -> dict[str, Any]:
    return {"metadata": {"enum": [v.value for v in values]}}


class ErrorDetailSchema(Schema):
    row = fields.Integer(allow_none=True)
    column = fields.String(allow_none=True)
    field = fields.String()
    message = fields.String(required=True)


class ErrorBodySchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.List(fields.Nested(ErrorDetailSchema), required=True)


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


class CreatedSchema(Schema):
    request_id = fields.String(required=True)
    status = fields.String(required=True, **_enum(RequestStatus))
    status_url = fields.String(required=True)
    products = fields.Integer(required=True)
    images = fields.Integer(required=True)
    encoding = fields.String(
        metadata={
            "description": "the encoding a CSV was read with (utf-8, utf-16-le, utf-16-be, "
            "or a detected code page such as cp1252 or mac-roman); absent for an .xlsx "
            "workbook"
        }
    )


class ProgressSchema(Schema):
    products_total = fields.Integer(required=True)
    products_done = fields.Integer(required=True)
    images_total = fields.Integer(required=True)
    images_done = fields.Integer(required=True)
    images_failed = fields.Integer(required=True)
    percent = fields.Float(required=True)


class WebhookInfoSchema(Schema):
    url = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, **_enum(WebhookStatus))
    attempts = fields.Integer(required=True)
    last_attempt_at = fields.String(allow_none=True, required=True)
    last_error = fields.String(allow_none=True, required=True)


class ImageSchema(Schema):
    input_url = fields.String(required=True)
    output_url = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, **_enum(ImageStatus))
    error = fields.String(allow_none=True, required=True)
    input_bytes = fields.Integer(allow_none=True, required=True)
    output_bytes = fields.Integer(allow_none=True, required=True)
    width = fields.Integer(allow_none=True, required=True)
    height = fields.Integer(allow_none=True, required=True)
    format = fields.String(allow_none=True, required=True)
    kept_original = fields.Boolean(
        required=True,
        metadata={
            "description": "true when re-encoding would not have made the image "
            "smaller, so the input was kept (metadata stripped losslessly)"
        },
    )


class ProductSchema(Schema):
    serial_number = fields.Integer(required=True)
    product_name = fields.String(required=True)
    status = fields.String(required=True, **_enum(ProductStatus))
    input_image_urls = fields.List(fields.String(), required=True)
    output_image_urls = fields.List(fields.String(allow_none=True), required=True)
    images = fields.List(fields.Nested(ImageSchema), required=True)


class PageSchema(Schema):
    offset = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    total = fields.Integer(required=True)


class _RequestHeadSchema(Schema):
    """The fields a status body and a line of the request list both start with."""

    request_id = fields.String(required=True)
    status = fields.String(required=True, **_enum(RequestStatus))
    created_at = fields.String(required=True)
    updated_at = fields.String(required=True)
    completed_at = fields.String(allow_none=True, required=True)
    progress = fields.Nested(ProgressSchema, required=True)


class StatusSchema(_RequestHeadSchema):
    webhook = fields.Nested(WebhookInfoSchema, required=True)
    output_csv_url = fields.String(required=True)
    products = fields.List(fields.Nested(ProductSchema), required=True)
    products_page = fields.Nested(PageSchema, required=True)


class StatusQuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))
    limit = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=1000))


class RequestsQuerySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    before = fields.String(load_default=None, validate=validate.Length(min=1, max=200))


class RequestSummarySchema(_RequestHeadSchema):
    status_url = fields.String(required=True)
    output_csv_url = fields.String(required=True)


class RequestListSchema(Schema):
    requests = fields.List(fields.Nested(RequestSummarySchema), required=True)
    next = fields.String(allow_none=True, required=True)


class WebhookPayloadSchema(Schema):
    type = fields.String(required=True, metadata={"enum": ["request.completed"]})
    request_id = fields.String(required=True)
    status = fields.String(required=True, **_enum(RequestStatus))
    completed_at = fields.String(required=True)
    progress = fields.Nested(ProgressSchema, required=True)
    status_url = fields.String(required=True)
    output_csv_url = fields.String(required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "error"]})
    db = fields.String(required=True, metadata={"enum": ["ok", "down"]})


class UploadFormDocSchema(Schema):
    """The multipart body as OpenAPI shows it."""

    file = fields.Raw(required=True, metadata={"type": "string", "format": "binary"})
    webhook_url = fields.String(metadata={"format": "uri"})
    quality = fields.Integer(validate=validate.Range(min=1, max=95))
    output_format = fields.String(**_enum(OutputFormat))


created_schema = CreatedSchema()
status_query_schema = StatusQuerySchema()
requests_query_schema = RequestsQuerySchema()
health_schema = HealthSchema()
