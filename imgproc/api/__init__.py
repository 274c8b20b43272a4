"""HTTP blueprints; views are thin: parse, call one service method, dump."""

from __future__ import annotations

from flask import current_app

from imgproc.services import Services


def services() -> Services:
    """The per-process services object of the running app."""
    return current_app.extensions["imgproc"]  # type: ignore[no-any-return]
