"""POST /csv/upload and /upload/: accepted uploads, every error code, nothing half-stored."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from tests.conftest import csv_bytes, upload

GOOD = csv_bytes(
    [
        (1, "SKU1", ["https://a.example/1.jpg", "https://a.example/2.jpg"]),
        (2, "SKU2", ["https://b.example/3.png"]),
    ]
)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    # No worker: these tests look at what the upload stored, not at processing.
    return make_app(start_worker=False, allow_private_urls=False)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def stored_counts(mongo: Any) -> tuple[int, int]:
    """Requests, and products in any form (expanded, or still in their upload's parts: the
    worker may be expanding them while this counts)."""
    ids = {p["_id"] for p in mongo.products.find({}, {"_id": 1})}
    ids |= {p["_id"] for part in mongo.upload_parts.find() for p in part["products"]}
    return (mongo.processing_requests.count_documents({}), len(ids))


@pytest.mark.parametrize("path", ["/csv/upload", "/upload/"])
def test_accepted_upload(client: FlaskClient, mongo: Any, path: str) -> None:
    response = upload(client, GOOD, path=path)
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"request_id", "status", "status_url", "products", "images", "encoding"}
    assert body["encoding"] == "utf-8"
    assert uuid.UUID(body["request_id"]).version == 4
    assert body["status"] == "pending"
    assert body["products"] == 2 and body["images"] == 3
    assert body["status_url"] == f"http://localhost/csv/status/{body['request_id']}"
    assert response.headers["Location"] == body["status_url"]
    assert stored_counts(mongo) == (1, 2)
    request = mongo.processing_requests.find_one({"_id": body["request_id"]})
    assert request["quality"] == 50 and request["output_format"] == "auto"
    assert request["webhook"]["status"] == "none"


def test_form_fields_are_stored(client: FlaskClient, mongo: Any) -> None:
    response = upload(
        client,
        GOOD,
        quality="80",
        output_format="webp",
        webhook_url="https://hooks.example.com/imgproc",
    )
    assert response.status_code == 202
    request = mongo.processing_requests.find_one({"_id": response.get_json()["request_id"]})
    assert request["quality"] == 80 and request["output_format"] == "webp"
    assert request["webhook"]["url"] == "https://hooks.example.com/imgproc"
    assert request["webhook"]["status"] == "pending"


def test_public_url_setting_shapes_links(make_app: Callable[..., Flask]) -> None:
    client = make_app(start_worker=False, public_url="https://img.example.com/").test_client()
    body = upload(client, GOOD).get_json()
    assert body["status_url"].startswith("https://img.example.com/csv/status/")


def test_missing_file(client: FlaskClient, mongo: Any) -> None:
    response = client.post(
        "/csv/upload", data={"quality": "50"}, content_type="multipart/form-data"
    )
    assert_error(response, 400, "missing_file")
    assert stored_counts(mongo) == (0, 0)


def test_not_multipart(client: FlaskClient) -> None:
    response = client.post("/csv/upload", data=GOOD, content_type="text/csv")
    assert_error(response, 415, "unsupported_media_type")


def test_invalid_csv_stores_nothing(client: FlaskClient, mongo: Any) -> None:
    bad = GOOD + b"3,SKU3,ftp://nope\n"
    error = assert_error(upload(client, bad), 400, "invalid_csv")
    assert error["details"] == [
        {"row": 4, "column": "Input Image Urls", "message": "not an http(s) URL: 'ftp://nope'"}
    ]
    assert stored_counts(mongo) == (0, 0)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"quality": "0"}, "quality", "must be a whole number from 1 to 95"),
        ({"quality": "96"}, "quality", "must be a whole number from 1 to 95"),
        ({"quality": "high"}, "quality", "must be a whole number from 1 to 95"),
        ({"output_format": "gif"}, "output_format", "must be one of auto, jpeg, webp, png"),
        (
            {"webhook_url": "ftp://x.example"},
            "webhook_url",
            "not an http(s) URL: 'ftp://x.example'",
        ),
        (
            {"webhook_url": "http://127.0.0.1:9/hook"},
            "webhook_url",
            "blocked address (127.0.0.1): webhooks go to public addresses only",
        ),
        (
            {"webhook_url": "http://localhost/hook"},
            "webhook_url",
            "blocked address (loopback): webhooks go to public addresses only",
        ),
        (
            {"webhook_url": "https://u:p@hooks.example.com/"},
            "webhook_url",
            "credentials in the URL are not allowed",
        ),
        *[
            (
                {"webhook_url": url},
                "webhook_url",
                f"blocked address ({address}): webhooks go to public addresses only",
            )
            for url, address in [
                ("http://2130706433/hook", "127.0.0.1"),
                ("http://0x7f.1/hook", "127.0.0.1"),
                ("http://[::1]/hook", "::1"),
                ("http://[::ffff:10.0.0.1]/hook", "::ffff:a00:1"),
                ("http://169.254.169.254/latest", "169.254.169.254"),
                ("http://192.168.0.10/hook", "192.168.0.10"),
                ("http://0.0.0.0/hook", "0.0.0.0"),
            ]
        ],
    ],
)
def test_invalid_fields(
    client: FlaskClient, mongo: Any, fields: dict[str, str], field: str, message: str
) -> None:
    error = assert_error(upload(client, GOOD, **fields), 400, "invalid_field")
    assert error["details"] == [{"field": field, "message": message}]
    assert stored_counts(mongo) == (0, 0)


def test_file_over_the_size_cap(make_app: Callable[..., Flask], mongo: Any) -> None:
    client = make_app(start_worker=False, max_upload_bytes=1000).test_client()
    big = GOOD + b"".join(f"{i},P{i},https://a.example/{i}.jpg\n".encode() for i in range(3, 60))
    error = assert_error(upload(client, big), 413, "payload_too_large")
    assert error["message"] == "the CSV is larger than 1000 bytes"
    assert stored_counts(mongo) == (0, 0)


def test_body_over_the_request_cap_is_json_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(start_worker=False, max_upload_bytes=10).test_client()
    big = FileStorage(io.BytesIO(b"x" * (2 * 1024 * 1024)), filename="big.csv")
    boundary, body = encode_multipart({"file": big})
    response = client.post(
        "/csv/upload", data=body, content_type=f"multipart/form-data; boundary={boundary}"
    )
    error = assert_error(response, 413, "payload_too_large")
    assert error["message"] == "the upload is larger than 10 bytes"


def test_row_cap_from_settings(make_app: Callable[..., Flask], mongo: Any) -> None:
    client = make_app(start_worker=False, max_rows=1).test_client()
    error = assert_error(upload(client, GOOD), 400, "invalid_csv")
    assert error["message"] == "the file has more than 1 product rows"
    assert stored_counts(mongo) == (0, 0)
