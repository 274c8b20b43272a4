"""Per HTTP request: one log line (with the time it waited on the database, so a slow
answer shows what it waited for) and the HTTP metrics, with the ``request_id`` of the batch
the call is about (from the path) on every line logged while it is answered."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from imgproc import metrics
from imgproc.logs import bind, unbind
from imgproc.store import DB_TIME

log = logging.getLogger("imgproc.http")

# Polled by machines all day: their lines only at debug level.
_QUIET = ("/healthz", "/metrics", "/static/", "/docs/")


def install(app: Flask) -> None:
    """Register the hooks on ``app``."""

    @app.before_request
    def _start() -> None:
        g.imgproc_started = time.perf_counter()
        DB_TIME.start()
        g.imgproc_log_token = bind((request.view_args or {}).get("request_id"))

    @app.after_request
    def _finish(response: Response) -> Response:
        elapsed = time.perf_counter() - g.get("imgproc_started", time.perf_counter())
        db_ms, db_calls = DB_TIME.taken()
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        metrics.HTTP_SECONDS.labels(route).observe(elapsed)
        quiet = request.path.startswith(_QUIET) and response.status_code < 400
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %d",
            request.method,
            request.path,
            response.status_code,
            extra={
                "duration_ms": round(elapsed * 1000, 1),
                "db_ms": round(db_ms, 1),
                "db_calls": db_calls,
                "route": route,
            },
        )
        return response

    @app.teardown_request
    def _unbind(_: BaseException | None) -> None:
        token = g.pop("imgproc_log_token", None)
        if token is not None:
            unbind(token)
