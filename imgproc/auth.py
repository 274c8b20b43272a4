"""Optional API keys: when IMGPROC_API_KEYS is set, every endpoint needs ``X-API-Key`` (or
``Authorization: Bearer``) except /healthz, /metrics, /images/ and the pages of the dashboard
and the API docs with their files (which hold no data), and a request belongs to the key
that created it. Keys are compared in constant time and never stored or logged: what is kept
with a request is a short digest of its key."""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, g, request

from imgproc.errors import Unauthorized

OPEN_PATHS = ("/healthz", "/metrics", "/", "/docs")
OPEN_PREFIXES = ("/images/", "/static/", "/docs/")


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (what requests record as their owner)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def presented_key() -> str | None:
    """The key the client sent, from X-API-Key or a Bearer token."""
    key = request.headers.get("X-API-Key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def identify(presented: str | None, keys: tuple[str, ...]) -> str | None:
    """The owner id of ``presented`` if it is one of ``keys`` (every key compared)."""
    if presented is None:
        return None
    matched = None
    for key in keys:
        if hmac.compare_digest(presented.encode(), key.encode()):
            matched = key
    return key_id(matched) if matched is not None else None


def owner() -> str | None:
    """The owner id of the current API request (None when API keys are off)."""
    who: str | None = g.get("imgproc_owner")
    return who


def install(app: Flask, keys: tuple[str, ...]) -> None:
    """Require a key on every request but the open ones, when keys are configured."""
    if not keys:
        return

    @app.before_request
    def _require_key() -> None:
        if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return
        who = identify(presented_key(), keys)
        if who is None:
            raise Unauthorized("send a valid API key in X-API-Key or Authorization: Bearer")
        g.imgproc_owner = who
