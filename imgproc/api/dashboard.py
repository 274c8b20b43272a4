"""The dashboard at ``/``: one static HTML page whose script drives the JSON API (upload,
recent requests, a request's products with before/after thumbnails). No build step: the
HTML, CSS and JavaScript in ``imgproc/static`` are served as they are."""

from __future__ import annotations

from flask import Blueprint, Response

from imgproc.api import html_page
from imgproc.api.openapi import doc

bp = Blueprint("dashboard", __name__)

# Scripts and styles only from here; thumbnails of input images come from anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' http: https: data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


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
    return html_page("dashboard.html", CONTENT_SECURITY_POLICY)
