"""Operations endpoints: health and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from imgproc.api import services
from imgproc.api.openapi import build_spec, doc, json_response
from imgproc.metrics import CONTENT_TYPE
from imgproc.schemas import health_schema

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
@doc(
    summary="Liveness and database health",
    tags=["operations"],
    responses={
        "200": json_response("Healthy", "Health"),
        "503": json_response("Database down", "Health"),
    },
)
def healthz() -> tuple[dict[str, Any], int]:
    """200 when the database answers, 503 when it does not."""
    if services().healthy():
        return health_schema.dump({"status": "ok", "db": "ok"}), 200
    return health_schema.dump({"status": "error", "db": "down"}), 503


@bp.get("/metrics")
@doc(
    summary="Prometheus metrics of all worker processes",
    tags=["operations"],
    responses={
        "200": {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics() -> Response:
    """Counters and histograms of every worker process, plus what is waiting."""
    return Response(services().metrics(), content_type=CONTENT_TYPE)


@bp.get("/openapi.json")
@doc(
    summary="This API's OpenAPI 3 document",
    tags=["operations"],
    responses={
        "200": {
            "description": "OpenAPI document",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
def openapi() -> dict[str, Any]:
    """The OpenAPI document, generated from the routes and schemas."""
    return build_spec(current_app)
