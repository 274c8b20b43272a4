"""Stored documents -> what users see: the status body, progress, the output CSV and the
webhook payload. Pure functions of the documents, shared by the API and the worker."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

from imgproc.csv_input import OUTPUT_COLUMN
from imgproc.models import ImageStatus, ProductStatus, iso

Doc = dict[str, Any]

# Cells starting with these are formulas to a spreadsheet; a leading quote makes them text.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def base_url(request: Doc, public_url: str | None) -> str:
    """The absolute root that output URLs of this request hang from."""
    return (public_url or request.get("base_url") or "").rstrip("/")


def image_url(root: str, key: str | None, public_base: str | None = None) -> str | None:
    """The absolute URL of a stored output image: under the storage's public base (a CDN or
    public bucket, see ``storage.public_base``) when there is one, else this service's."""
    if not key:
        return None
    return f"{public_base}{key}" if public_base else f"{root}/images/{key}"


def progress(request: Doc) -> Doc:
    """Counters and percent of a request."""
    total = request.get("images_total", 0)
    finished = request.get("images_done", 0) + request.get("images_failed", 0)
    return {
        "products_total": request.get("products_total", 0),
        "products_done": request.get("products_done", 0),
        "images_total": total,
        "images_done": request.get("images_done", 0),
        "images_failed": request.get("images_failed", 0),
        "percent": round(100.0 * finished / total, 1) if total else 100.0,
    }


def webhook_info(request: Doc) -> Doc:
    """The webhook sub-document as the status shows it."""
    hook = request.get("webhook") or {}
    return {
        "url": hook.get("url"),
        "status": hook.get("status", "none"),
        "attempts": hook.get("attempts", 0),
        "last_attempt_at": iso(hook.get("last_attempt_at")),
        "last_error": hook.get("last_error"),
    }


def product_view(product: Doc, root: str, fed_rows: int = 0, public_base: str | None = None) -> Doc:
    """One product with its images, outputs lined up with inputs.

    A pending product whose row a worker has already taken up (below ``fed_rows``) is shown
    as processing, with its unfinished images.
    """
    images = []
    status = product["status"]
    if status == ProductStatus.PENDING and product.get("row", fed_rows) < fed_rows:
        status = ProductStatus.PROCESSING.value
    working = status == ProductStatus.PROCESSING
    for image in product["images"]:
        done = image["status"] == ImageStatus.DONE
        image_status = image["status"]
        if working and image_status == ImageStatus.PENDING:
            image_status = ImageStatus.PROCESSING.value
        images.append(
            {
                "input_url": image["input_url"],
                "output_url": (
                    image_url(root, image.get("output_key"), public_base) if done else None
                ),
                "status": image_status,
                "error": image.get("error"),
                "input_bytes": image.get("input_bytes"),
                "output_bytes": image.get("output_bytes"),
                "width": image.get("width"),
                "height": image.get("height"),
                "format": image.get("format"),
                "kept_original": image.get("kept_original", False),
            }
        )
    return {
        "serial_number": product["serial_number"],
        "product_name": product["product_name"],
        "status": status,
        "input_image_urls": [i["input_url"] for i in images],
        "output_image_urls": [i["output_url"] for i in images],
        "images": images,
    }


def links(request: Doc, root: str) -> Doc:
    """The status and output CSV URLs of a request."""
    return {
        "status_url": f"{root}/csv/status/{request['_id']}",
        "output_csv_url": f"{root}/csv/output/{request['_id']}",
    }


def _head(request: Doc) -> Doc:
    """What the status body and a line of the request list both start with."""
    return {
        "request_id": request["_id"],
        "status": request["status"],
        "created_at": iso(request["created_at"]),
        "updated_at": iso(request["updated_at"]),
        "completed_at": iso(request.get("completed_at")),
        "progress": progress(request),
    }


def request_summary(request: Doc, root: str) -> Doc:
    """One line of GET /csv/requests."""
    return {**_head(request), **links(request, root)}


def status_head(request: Doc, root: str) -> Doc:
    """The body of GET /csv/status/<id> before its products (what changes with the request
    document alone)."""
    return {
        **_head(request),
        "webhook": webhook_info(request),
        "output_csv_url": links(request, root)["output_csv_url"],
    }


def products_view(
    request: Doc, products: list[Doc], root: str, public_base: str | None = None
) -> list[Doc]:
    """The ``products`` of the status body."""
    fed = int(request.get("fed_rows", 0)) if request["status"] == "processing" else 0
    return [product_view(p, root, fed, public_base) for p in products]


def products_page(request: Doc, offset: int, limit: int) -> Doc:
    """The ``products_page`` of the status body."""
    return {"offset": offset, "limit": limit, "total": request.get("products_total", 0)}


def webhook_payload(request: Doc, root: str) -> Doc:
    """The JSON body POSTed to the webhook URL."""
    return {
        "type": "request.completed",
        "request_id": request["_id"],
        "status": request["status"],
        "completed_at": iso(request.get("completed_at")),
        "progress": progress(request),
        **links(request, root),
    }


def neutralise(cell: str) -> str:
    """Make a cell that a spreadsheet would run as a formula plain text."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def output_csv(
    request: Doc, products: Iterable[Doc], root: str, public_base: str | None = None
) -> Iterator[str]:
    """The output CSV, streamed line by line: input columns in input order + output URLs."""
    header: list[str] = [h for h in request["header"] if h != OUTPUT_COLUMN]
    roles: dict[str, int] = request["roles"]
    by_index = {index: role for role, index in roles.items()}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def line(cells: list[str]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([neutralise(c) for c in cells])
        return buffer.getvalue()

    yield line([*header, OUTPUT_COLUMN])
    for product in products:
        view = product_view(product, root, public_base=public_base)
        values = {
            "serial_number": str(product["serial_number"]),
            "product_name": product["product_name"],
            "input_urls": ",".join(view["input_image_urls"]),
        }
        extra: dict[str, str] = product.get("extra") or {}
        cells = [
            values[by_index[i]] if i in by_index else extra.get(name, "")
            for i, name in enumerate(request["header"])
            if name != OUTPUT_COLUMN
        ]
        outputs = ",".join(u or "" for u in view["output_image_urls"])
        yield line([*cells, outputs])
