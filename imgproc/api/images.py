"""Serving the processed images."""

from __future__ import annotations

from flask import Blueprint, Response, request, send_file

from imgproc.api import services
from imgproc.api.openapi import doc, error_responses

bp = Blueprint("images", __name__)

ONE_YEAR = 365 * 24 * 3600


@bp.get("/images/<path:key>")
@doc(
    summary="A processed image",
    tags=["images"],
    responses={
        "200": {
            "description": "The image bytes",
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "304": {"description": "Not modified (ETag matched)"},
        **error_responses("404"),
    },
)
def image(key: str) -> Response:
    """The image bytes with Content-Type, ETag and a long Cache-Control."""
    stored = services().image(key)
    if stored.path is not None:
        response = send_file(
            stored.path, mimetype=stored.content_type, conditional=True, etag=True, max_age=ONE_YEAR
        )
    else:
        response = Response(stored.data, mimetype=stored.content_type)
        response.set_etag(stored.etag or "")
        response.cache_control.max_age = ONE_YEAR
        response.make_conditional(request)
    response.cache_control.public = True
    return response
