"""Upload a CSV, poll its status, fetch the output CSV."""

from __future__ import annotations

import hashlib
from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from marshmallow import ValidationError
from werkzeug.datastructures import FileStorage

from imgproc import auth, logs
from imgproc.api import services
from imgproc.api.openapi import doc, error_responses, json_response
from imgproc.config import human_bytes
from imgproc.csv_input import parse_upload
from imgproc.errors import (
    InvalidCsv,
    InvalidField,
    MissingFile,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from imgproc.models import UploadOptions
from imgproc.schemas import (
    UploadFormSchema,
    created_schema,
    requests_query_schema,
    status_query_schema,
)

bp = Blueprint("csv", __name__)

UPLOAD_RULES = """\
The `file` is a CSV with the columns `S. No.`, `Product Name` and `Input Image Urls`
(names matched case-insensitively, any order, extra columns kept for the output CSV), or an
Excel `.xlsx` workbook whose first sheet holds that table (known by its content, whatever
the file name; row numbers in errors are the sheet's).

- Delimiter: comma, semicolon or tab, detected from the header line.
- Encoding: UTF-8 with or without BOM, UTF-16 with BOM, or another 8-bit code page
  (Windows-125x, Mac Roman, ...) detected from the text; the answer's `encoding` says
  which was used. A file whose encoding cannot be told apart is refused: save it as
  "CSV UTF-8".
- URLs in a cell: separated by whitespace or line breaks, or by commas, semicolons or
  pipes before the next `http(s)://`; a comma inside a URL stays in it. At most 50.
- Workbooks: formulas are read as their saved values (never evaluated), external links
  are ignored, ZIP and XML bombs are refused; `.xls`, `.xlsb`, `.ods` and
  password-protected files are refused with what to do.
- Limits: 10 MiB, 10,000 product rows, 100 columns (configurable). All or nothing: every
  problem is listed with its row and column, and nothing is stored.
"""


def _field_errors(exc: ValidationError) -> InvalidField:
    messages = exc.normalized_messages()  # type: ignore[no-untyped-call]
    details = [
        {"field": name, "message": message}
        for name, value in sorted(messages.items())
        for message in (value if isinstance(value, list) else [str(value)])
    ]
    names = ", ".join(sorted(messages))
    return InvalidField(f"invalid form field: {names}", details)


def _read_upload(files: Any, max_bytes: int) -> bytes:
    upload: FileStorage | None = files.get("file")
    if upload is None:
        raise MissingFile()
    data = upload.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the CSV is larger than {human_bytes(max_bytes)}")
    if not data:
        raise InvalidCsv("the file is empty")
    return data


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidField(
            "invalid Idempotency-Key header",
            [{"field": "Idempotency-Key", "message": "must be 1 to 255 printable characters"}],
        )
    return key


@bp.post("/csv/upload")
@bp.post("/upload/")
@doc(
    summary="Upload a CSV of products and image URLs",
    description=UPLOAD_RULES,
    tags=["requests"],
    parameters=[
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ],
    requestBody={"required": True, "content": {"multipart/form-data": {"schema": "UploadForm"}}},
    responses={
        "202": json_response("Accepted and queued", "Created"),
        "200": json_response("Same Idempotency-Key and file: the first request", "Created"),
        **error_responses("400", "401", "409", "413", "415", "500", "503"),
    },
)
def upload() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Accept a CSV of products and queue its images."""
    svc = services()
    settings = svc.settings
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType()
    if (request.content_length or 0) > (request.max_content_length or 0):
        raise PayloadTooLarge(f"the upload is larger than {human_bytes(settings.max_upload_bytes)}")
    try:
        form = UploadFormSchema(allow_private_urls=settings.allow_private_urls).load(request.form)
    except ValidationError as exc:
        raise _field_errors(exc) from None
    data = _read_upload(request.files, settings.max_upload_bytes)
    parsed = parse_upload(
        data, max_rows=settings.max_rows, max_urls_per_row=settings.max_urls_per_row
    )
    options = UploadOptions(form["quality"], form["output_format"], form["webhook_url"])
    root = (settings.public_url or request.host_url).rstrip("/")
    created = svc.submit(
        parsed,
        options,
        root,
        owner=auth.owner(),
        idempotency_key=_idempotency_key(),
        digest=hashlib.sha256(data).hexdigest(),
    )
    logs.bind(created.request_id)  # the access line is about this request from here on
    status_url = f"{root}/csv/status/{created.request_id}"
    answer = {**created.__dict__, "status_url": status_url}
    if parsed.encoding is not None:  # a text file (a workbook has no encoding to report)
        answer["encoding"] = parsed.encoding
    body = created_schema.dump(answer)
    return body, 202 if created.new else 200, {"Location": status_url}


@bp.get("/csv/status/<request_id>")
@bp.get("/status/<request_id>")
@doc(
    summary="Status of a request, one page of products",
    tags=["requests"],
    parameters=[
        {
            "name": "offset",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "default": 0},
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000},
        },
    ],
    responses={
        "200": json_response("The request's status", "Status"),
        **error_responses("400", "401", "404", "500", "503"),
    },
)
def status(request_id: str) -> Response:
    """Request, product and image statuses with progress."""
    try:
        query = status_query_schema.load(request.args)
    except ValidationError as exc:
        raise _field_errors(exc) from None
    # Built by reports (status_head, products_view) in StatusSchema's shape (tests check
    # every response against the OpenAPI document); the products are encoded once per change
    # of the request.
    body = services().status(request_id, query["offset"], query["limit"], auth.owner())
    return Response(body, mimetype="application/json")


@bp.get("/csv/requests")
@doc(
    summary="Recent requests, newest first",
    tags=["requests"],
    parameters=[
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
        },
        {
            "name": "before",
            "in": "query",
            "description": "the `next` cursor of the previous page",
            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
        },
    ],
    responses={
        "200": json_response("One page of requests", "RequestList"),
        **error_responses("400", "401", "500", "503"),
    },
)
def recent() -> dict[str, Any]:
    """The caller's requests, newest first, with a cursor to the next page."""
    try:
        query = requests_query_schema.load(request.args)
    except ValidationError as exc:
        raise _field_errors(exc) from None
    return services().recent(auth.owner(), query["limit"], query["before"])


@bp.get("/csv/output/<request_id>")
@doc(
    summary="The output CSV of a finished request",
    tags=["requests"],
    responses={
        "200": {
            "description": "Input columns plus Output Image Urls",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **error_responses("401", "404", "409", "500", "503"),
    },
)
def output(request_id: str) -> Response:
    """The input's columns in order plus ``Output Image Urls``."""
    lines = services().output_csv(request_id, auth.owner())
    return Response(
        stream_with_context(lines),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="imgproc-{request_id}.csv"'},
    )
