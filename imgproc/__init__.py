"""imgproc: compress the product images listed in a CSV. ``create_app()`` only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

__all__ = ["create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app: settings, services, blueprints, error handlers.

    ``config`` overrides settings by field name (tests pass one). The background worker
    starts here when ``start_worker`` is true; importing this package starts nothing.
    """
    from imgproc import auth, logs
    from imgproc.api import csv, dashboard, docs, images, observe, ops
    from imgproc.config import load_settings
    from imgproc.errors import register_error_handlers
    from imgproc.services import Services

    settings = load_settings(config)
    logs.configure(settings.log_level, secrets=settings.secrets())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 1024 * 1024  # form overhead
    app.json.sort_keys = False  # type: ignore[attr-defined]
    services = Services(settings)
    app.extensions["imgproc"] = services
    register_error_handlers(app)
    observe.install(app)
    auth.install(app, settings.api_keys)
    for blueprint in (csv.bp, images.bp, ops.bp, dashboard.bp, docs.bp):
        app.register_blueprint(blueprint)
    if settings.start_worker:
        services.start()
    return app
