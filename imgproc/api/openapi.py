"""The OpenAPI 3 document, built from the marshmallow schemas and the operations each view
declares with :func:`doc`, over the app's real URL map, so it cannot drift from the code."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from imgproc.auth import OPEN_PATHS, OPEN_PREFIXES
from imgproc.schemas import (
    CreatedSchema,
    ErrorSchema,
    HealthSchema,
    RequestListSchema,
    StatusSchema,
    UploadFormDocSchema,
    WebhookPayloadSchema,
)

F = TypeVar("F", bound=Callable[..., Any])
_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

ERRORS = {
    "400": "Bad input",
    "401": "Missing or wrong API key",
    "404": "Unknown request or path",
    "409": "Not ready yet",
    "413": "Upload too large",
    "415": "Not multipart/form-data",
    "500": "Internal error",
    "503": "Database unavailable",
}


def doc(**operation: Any) -> Callable[[F], F]:
    """Attach the OpenAPI operation object of a view (merged over per-method defaults)."""

    def decorate(view: F) -> F:
        view.openapi = operation  # type: ignore[attr-defined]
        return view

    return decorate


def error_responses(*codes: str) -> dict[str, Any]:
    """Response objects for error status codes, all in the one error shape."""
    return {
        code: {"description": ERRORS[code], "content": {"application/json": {"schema": "Error"}}}
        for code in codes
    }


def json_response(description: str, schema: str) -> dict[str, Any]:
    """A JSON response object referring to a component schema."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of every documented route of ``app``."""
    spec = APISpec(
        title="imgproc",
        version="1.0.0",
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        info={"description": "Compress product images listed in a CSV."},
    )
    spec.components.security_scheme(
        "ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    )
    spec.components.security_scheme("Bearer", {"type": "http", "scheme": "bearer"})
    for name, schema in (
        ("Error", ErrorSchema),
        ("Created", CreatedSchema),
        ("Status", StatusSchema),
        ("RequestList", RequestListSchema),
        ("Health", HealthSchema),
        ("UploadForm", UploadFormDocSchema),
        ("WebhookPayload", WebhookPayloadSchema),
    ):
        spec.components.schema(name, schema=schema)
    used_ids: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        operation = getattr(view, "openapi", None)
        if operation is None:
            continue
        path = _PARAM.sub(r"{\1}", rule.rule)
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in rule.arguments
        ]
        operations = {}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op = dict(operation)
            op_id = rule.endpoint.replace(".", "_")
            if op_id in used_ids:  # an alias path of the same view
                op_id += "_alias_" + re.sub(r"\W+", "_", path).strip("_")
            used_ids.add(op_id)
            op["operationId"] = op_id
            if rule.rule not in OPEN_PATHS and not rule.rule.startswith(OPEN_PREFIXES):
                # Only when IMGPROC_API_KEYS is set; the empty requirement means "or none".
                op["security"] = [{"ApiKey": []}, {"Bearer": []}, {}]
            op["parameters"] = parameters + list(op.get("parameters", []))
            operations[method.lower()] = op
        spec.path(path=path, operations=operations)
    return spec.to_dict()
