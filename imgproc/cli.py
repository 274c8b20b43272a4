"""Client commands: ``python -m imgproc submit products.csv [--webhook URL] [--wait]`` and
``python -m imgproc status ID``, against a running service over its HTTP API.

The service is ``--url`` (or ``IMGPROC_URL``, default ``http://127.0.0.1:$PORT``); the API
key, when the service wants one, comes from ``IMGPROC_API_KEY`` (kept out of shell history).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import requests

from imgproc.config import human_bytes

TERMINAL = ("completed", "completed_with_errors", "failed")
PAGE = 1000  # products per status page (the API's maximum)
BAR_WIDTH = 30

# Exit codes: 0 every image done, 1 the command could not do its job, 2 the batch ended with
# failed images (or failed as a whole), 3 still running when the status was shown.
EXIT_OK, EXIT_ERROR, EXIT_FAILED_IMAGES, EXIT_RUNNING = 0, 1, 2, 3


class CliError(Exception):
    """Something the user must fix or know about; printed without a traceback."""


class Client:
    """The HTTP API of one service."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "imgproc-cli"
        if api_key:
            self.session.headers["X-API-Key"] = api_key
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            reply = self.session.request(
                method, f"{self.url}{path}", timeout=self.timeout, **kwargs
            )
        except requests.RequestException as exc:
            raise CliError(f"cannot reach the service at {self.url}: {exc}") from None
        if reply.status_code >= 400:
            raise CliError(describe_error(reply))
        return reply

    def submit(self, csv_path: Path, fields: dict[str, str]) -> dict[str, Any]:
        """POST the CSV; the 202 body."""
        with csv_path.open("rb") as handle:
            files = {"file": (csv_path.name, handle, "text/csv")}
            body: dict[str, Any] = self._call(
                "POST", "/csv/upload", files=files, data=fields
            ).json()
        return body

    def status(self, request_id: str, offset: int = 0, limit: int = 1) -> dict[str, Any]:
        """One status page."""
        params = {"offset": offset, "limit": limit}
        body: dict[str, Any] = self._call("GET", f"/csv/status/{request_id}", params=params).json()
        return body

    def products(self, request_id: str) -> list[dict[str, Any]]:
        """Every product of a request, page by page."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.status(request_id, offset=len(found), limit=PAGE)
            found += page["products"]
            if not page["products"] or len(found) >= page["products_page"]["total"]:
                return found

    def download(self, url: str, target: Path) -> None:
        """Save ``url`` (the output CSV) to ``target``."""
        reply = self._call("GET", url.removeprefix(self.url))
        target.write_bytes(reply.content)


def describe_error(reply: requests.Response) -> str:
    """The API's error (message and per-row details), or the bare HTTP status."""
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {reply.status_code} from the service"
    lines = [f"{error['message']} (HTTP {reply.status_code}, {error['code']})"]
    for detail in error.get("details") or []:
        where = []
        if detail.get("row") is not None:
            where.append(f"row {detail['row']}")
        if detail.get("column"):
            where.append(f"column {detail['column']!r}")
        if detail.get("field"):
            where.append(f"field {detail['field']!r}")
        prefix = ", ".join(where)
        lines.append(f"  {prefix}: {detail['message']}" if prefix else f"  {detail['message']}")
    return "\n".join(lines)


def progress_line(body: dict[str, Any]) -> str:
    """``[#####.....]  45.0%  9/20 images, 1 failed  processing``."""
    progress = body["progress"]
    filled = int(BAR_WIDTH * progress["percent"] / 100)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    finished = progress["images_done"] + progress["images_failed"]
    failed = f", {progress['images_failed']} failed" if progress["images_failed"] else ""
    return (
        f"[{bar}] {progress['percent']:5.1f}%  {finished}/{progress['images_total']} images"
        f"{failed}  {body['status']}"
    )


def wait(client: Client, request_id: str, out: TextIO, interval: float = 0.5) -> dict[str, Any]:
    """Poll until the request is terminal, drawing the progress bar; the last status."""
    live = out.isatty()
    last = ""
    while True:
        body = client.status(request_id)
        line = progress_line(body)
        if line != last:
            # On a terminal the bar redraws in place; in a log, one line per change.
            out.write(f"\r{line}" if live else f"{line}\n")
            out.flush()
            last = line
        if body["status"] in TERMINAL:
            if live:
                out.write("\n")
            return body
        time.sleep(interval)


def summary(body: dict[str, Any], products: list[dict[str, Any]]) -> list[str]:
    """The summary table and the failed images with their reasons."""
    images = [image for product in products for image in product["images"]]
    done = [image for image in images if image["status"] == "done"]
    failed = [(p, image) for p in products for image in p["images"] if image["status"] == "failed"]
    bytes_in = sum(image["input_bytes"] or 0 for image in done)
    bytes_out = sum(image["output_bytes"] or 0 for image in done)
    saved = bytes_in - bytes_out
    share = f" ({100 * saved / bytes_in:.1f}%)" if bytes_in else ""
    rows = [
        ("request", body["request_id"]),
        ("status", body["status"]),
        ("products", str(body["progress"]["products_total"])),
        ("images done", str(len(done))),
        ("images failed", str(len(failed))),
        ("bytes in", human_bytes(bytes_in)),
        ("bytes out", human_bytes(bytes_out)),
        ("bytes saved", human_bytes(max(saved, 0)) + share),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    if failed:
        lines.append("")
        lines.append("failed images:")
        for product, image in failed[:20]:
            lines.append(
                f"  S. No. {product['serial_number']} {product['product_name']}: "
                f"{image['input_url']}: {image['error']}"
            )
        if len(failed) > 20:
            lines.append(f"  … and {len(failed) - 20} more (see the status)")
    return lines


def _finish(client: Client, body: dict[str, Any], output: Path | None, out: TextIO) -> int:
    products = client.products(body["request_id"])
    lines = summary(body, products)
    if output is not None:
        client.download(body["output_csv_url"], output)
        lines.append("")
        lines.append(f"output CSV saved to {output}")
    out.write("\n".join(lines) + "\n")
    return EXIT_OK if body["status"] == "completed" else EXIT_FAILED_IMAGES


def submit(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    """Upload a CSV; with --wait, follow it to the end and save the output CSV."""
    fields = {"output_format": args.format}
    if args.webhook:
        fields["webhook_url"] = args.webhook
    if args.quality is not None:
        fields["quality"] = str(args.quality)
    created = client.submit(Path(args.csv), fields)
    request_id = created["request_id"]
    out.write(
        f"request {request_id} accepted: {created['products']} products, "
        f"{created['images']} images\nstatus: {created['status_url']}\n"
    )
    if not args.wait:
        return EXIT_OK
    body = wait(client, request_id, out)
    output = Path(args.output) if args.output else Path(f"imgproc-{request_id}.csv")
    return _finish(client, body, output, out)


def status(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    """Show where a request is; once it has ended, the summary too."""
    body = client.status(args.request_id)
    out.write(progress_line(body) + "\n")
    if body["status"] not in TERMINAL:
        return EXIT_RUNNING
    out.write("\n")
    return _finish(client, body, Path(args.output) if args.output else None, out)


def add_commands(commands: Any) -> None:
    """The ``submit`` and ``status`` sub-commands of ``python -m imgproc``."""
    default_url = os.environ.get(
        "IMGPROC_URL", f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=default_url, help=f"the service (IMGPROC_URL; now {default_url})"
    )
    common.add_argument("--output", "-o", help="where to save the output CSV")

    sub = commands.add_parser(
        "submit", parents=[common], help="upload a CSV of products and image URLs"
    )
    sub.add_argument("csv", help="the CSV: S. No., Product Name, Input Image Urls")
    sub.add_argument("--webhook", metavar="URL", help="called once the batch has ended")
    sub.add_argument("--quality", type=int, metavar="1-95", help="JPEG/WebP quality")
    sub.add_argument(
        "--format", default="auto", choices=("auto", "jpeg", "webp", "png"), help="output format"
    )
    sub.add_argument(
        "--wait",
        action="store_true",
        help="show a progress bar until the batch ends, then a summary; save the output CSV",
    )
    sub.set_defaults(run=submit)

    show = commands.add_parser("status", parents=[common], help="where a request is")
    show.add_argument("request_id")
    show.set_defaults(run=status)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run a client command; errors are printed, not raised."""
    client = Client(args.url, os.environ.get("IMGPROC_API_KEY"))
    try:
        code: int = args.run(args, client, out)
        return code
    except CliError as exc:
        print(f"imgproc: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"imgproc: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
