"""The ApiError tree and the one JSON error body every failure turns into."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug import exceptions
from werkzeug.exceptions import HTTPException

from imgproc.storage import StorageUnavailable
from imgproc.store import DatabaseDown

log = logging.getLogger(__name__)

Detail = dict[str, Any]


class ApiError(Exception):
    """An error the client caused or may see; renders as the one JSON error shape."""

    status_code = 500
    code = "internal"
    message = "internal error"

    def __init__(self, message: str | None = None, details: list[Detail] | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class MissingFile(ApiError):
    status_code = 400
    code = "missing_file"
    message = "the multipart form has no 'file' field"


class InvalidCsv(ApiError):
    status_code = 400
    code = "invalid_csv"
    message = "the CSV file is not valid"


class InvalidField(ApiError):
    status_code = 400
    code = "invalid_field"
    message = "a form field is not valid"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"
    message = "a valid API key is required"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"
    message = "not found"


class RequestNotFound(NotFound):
    message = "no such request"


class MethodNotAllowed(ApiError):
    status_code = 405
    code = "method_not_allowed"
    message = "method not allowed"


class NotReady(ApiError):
    status_code = 409
    code = "not_ready"
    message = "the request has not finished yet"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"
    message = "the upload is too large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"
    message = "send the CSV as multipart/form-data with a 'file' field"


class IdempotencyConflict(ApiError):
    status_code = 409
    code = "idempotency_conflict"
    message = "this Idempotency-Key was used with a different file"


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "unavailable"
    message = "the database is unavailable; try again shortly"


_BY_STATUS: dict[int, type[ApiError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def error_response(error: ApiError) -> Response:
    """Render ``error`` in the one JSON shape with its status code."""
    response = jsonify(error.body())
    response.status_code = error.status_code
    return response


def register_error_handlers(app: Flask) -> None:
    """Turn every error, Werkzeug's and unexpected ones included, into the JSON shape."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        cls = _BY_STATUS.get(error.code or 500)
        if cls is None:
            api_error = ApiError(error.description or error.name)
            api_error.status_code = error.code or 500
            api_error.code = (error.name or "error").lower().replace(" ", "_")
        else:
            api_error = cls()
        response = error_response(api_error)
        if isinstance(error, exceptions.MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if isinstance(error, DatabaseDown):
            log.warning("database unavailable: %s", error)
            return error_response(ServiceUnavailable())
        if isinstance(error, StorageUnavailable):
            log.warning("image storage unavailable: %s", error)
            return error_response(
                ServiceUnavailable("the image storage is unavailable; try again shortly")
            )
        log.exception("unhandled error")
        return error_response(ApiError())
