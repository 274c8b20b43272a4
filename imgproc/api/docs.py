"""Interactive API docs at ``/docs``: Swagger UI over ``/openapi.json``, every asset served by
the service itself (no CDN: it works on a machine with no internet). Swagger UI's files come
from the pinned ``flask-swagger-ui`` package (its ``dist/`` is Swagger UI's own build; its
blueprint, whose page has an inline script, is not used); the page and the script that
starts it are ``static/docs.html`` and ``static/docs.js``, under a CSP with no inline code."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, request

from imgproc.api import html_page
from imgproc.api.openapi import doc

bp = Blueprint("docs", __name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
ONE_DAY = 24 * 3600


@cache
def swagger_ui_dist() -> Path:
    """Swagger UI's build as the flask-swagger-ui package ships it (found, not imported)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("flask-swagger-ui is not installed: install requirements.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "dist"


@bp.get("/docs")
@doc(
    summary="Interactive API docs (HTML)",
    tags=["operations"],
    responses={
        "200": {
            "description": "Swagger UI over /openapi.json",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    },
)
def docs() -> Response:
    """The Swagger UI page; its script loads /openapi.json."""
    return html_page("docs.html", CONTENT_SECURITY_POLICY)


@bp.get("/docs/swagger-ui-bundle.js")
@bp.get("/docs/swagger-ui.css")
@doc(
    summary="Swagger UI's script and style sheet, served locally",
    tags=["operations"],
    responses={
        "200": {
            "description": "The file",
            "content": {
                "text/javascript": {"schema": {"type": "string"}},
                "text/css": {"schema": {"type": "string"}},
            },
        },
        "304": {"description": "Not modified (ETag matched)"},
    },
)
def asset() -> Response:
    """One of Swagger UI's files, with an ETag and a day of caching."""
    name = request.path.rsplit("/", 1)[1]
    data, etag = _asset(name)
    response = Response(data, mimetype=ASSETS[name])
    response.set_etag(etag)
    response.cache_control.public = True
    response.cache_control.max_age = ONE_DAY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.make_conditional(request)
    return response


@cache
def _asset(name: str) -> tuple[bytes, str]:
    """A file's bytes and ETag, read once per process on first use (about 1.9 MB in all)."""
    data = (swagger_ui_dist() / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:32]
