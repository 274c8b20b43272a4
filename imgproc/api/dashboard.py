"""The dashboard at ``/``: one static HTML page whose script drives the JSON API (upload,
recent requests, a request's products with before/after thumbnails). No build step: the
HTML, CSS and JavaScript in ``imgproc/static`` are served as they are."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flask import Blueprint, Response

from imgproc.api.openapi import doc

bp = Blueprint("dashboard", __name__)

# Scripts and styles only from here; thumbnails of input images come from anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' http: https: data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


@cache
def _page() -> bytes:
    """The page's bytes, read once per process (it is part of the package)."""
    return (Path(__file__).resolve().parent.parent / "static" / "dashboard.html").read_bytes()


@bp.get("/")
@doc(
    summary="The dashboard (HTML)",
    tags=["dashboard"],
    responses={
        "200": {
            "description": "The dashboard page",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    },
)
def index() -> Response:
    """The dashboard page; its script talks to the JSON API."""
    response = Response(_page(), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
