"""HTTP blueprints; views are thin: parse, call one service method, dump."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flask import Response, current_app

from imgproc.services import Services

STATIC = Path(__file__).resolve().parent.parent / "static"


def services() -> Services:
    """The per-process services object of the running app."""
    return current_app.extensions["imgproc"]  # type: ignore[no-any-return]


@cache
def _static_bytes(name: str) -> bytes:
    """A packaged file's bytes, read once per process."""
    return (STATIC / name).read_bytes()


def html_page(name: str, content_security_policy: str) -> Response:
    """A packaged HTML page (never cached stale, under its CSP, not sniffed, no referrer)."""
    response = Response(_static_bytes(name), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = content_security_policy
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
