"""API keys (a key sees only its own requests) and Idempotency-Key replays, through the API."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import csv_bytes
from tests.test_api_upload import assert_error

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
ROWS = csv_bytes([(1, "A", ["https://a.example/1.jpg"])])
OTHER_ROWS = csv_bytes([(1, "B", ["https://a.example/2.jpg"])])


@pytest.fixture
def keyed(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(start_worker=False, api_keys=(ALICE, BOB)).test_client()


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def post(client: FlaskClient, data: bytes, headers: dict[str, str]) -> Any:
    import io

    return client.post(
        "/csv/upload",
        data={"file": (io.BytesIO(data), "p.csv")},
        content_type="multipart/form-data",
        headers=headers,
    )


def test_every_endpoint_but_health_and_images_needs_a_key(keyed: FlaskClient) -> None:
    for method, path in (
        ("post", "/csv/upload"),
        ("get", "/csv/status/x"),
        ("get", "/csv/output/x"),
        ("get", "/csv/requests"),
        ("get", "/openapi.json"),
        ("get", "/status/x"),
        ("post", "/upload/"),
    ):
        response = getattr(keyed, method)(path)
        error = assert_error(response, 401, "unauthorized")
        assert "API key" in error["message"]
    assert keyed.get("/healthz").status_code == 200
    assert_error(keyed.get("/images/nope.jpg"), 404, "not_found")  # open, just not there
    assert_error(keyed.get("/healthz/x"), 401, "unauthorized")
    wrong = keyed.get("/openapi.json", headers={"X-API-Key": ALICE[:-1] + "X"})
    assert_error(wrong, 401, "unauthorized")


def test_bearer_works_too(keyed: FlaskClient) -> None:
    response = post(keyed, ROWS, {"Authorization": f"Bearer {ALICE}"})
    assert response.status_code == 202


def test_a_key_sees_only_its_own_requests(keyed: FlaskClient, mongo: Any) -> None:
    request_id = post(keyed, ROWS, as_(ALICE)).get_json()["request_id"]
    assert keyed.get(f"/csv/status/{request_id}", headers=as_(ALICE)).status_code == 200
    assert_error(keyed.get(f"/csv/status/{request_id}", headers=as_(BOB)), 404, "not_found")
    assert_error(keyed.get(f"/csv/output/{request_id}", headers=as_(BOB)), 404, "not_found")
    stored = mongo.processing_requests.find_one({"_id": request_id})
    assert ALICE not in str(stored)  # a digest of the key, never the key
    listed = keyed.get("/csv/requests", headers=as_(ALICE)).get_json()["requests"]
    assert [r["request_id"] for r in listed] == [request_id]
    assert keyed.get("/csv/requests", headers=as_(BOB)).get_json() == {"requests": [], "next": None}


def test_same_key_same_file_returns_the_first_request(client: FlaskClient, mongo: Any) -> None:
    first = post(client, ROWS, {"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    again = post(client, ROWS, {"Idempotency-Key": "k-1"})
    assert again.status_code == 200
    assert again.get_json()["request_id"] == first.get_json()["request_id"]
    assert again.get_json()["products"] == 1 and again.get_json()["images"] == 1
    assert mongo.processing_requests.count_documents({}) == 1
    other_key = post(client, ROWS, {"Idempotency-Key": "k-2"})
    assert other_key.status_code == 202
    assert other_key.get_json()["request_id"] != first.get_json()["request_id"]


def test_same_key_different_file_is_a_conflict(client: FlaskClient, mongo: Any) -> None:
    assert post(client, ROWS, {"Idempotency-Key": "k-1"}).status_code == 202
    error = assert_error(
        post(client, OTHER_ROWS, {"Idempotency-Key": "k-1"}), 409, "idempotency_conflict"
    )
    assert "different file" in error["message"]
    assert mongo.processing_requests.count_documents({}) == 1


def test_keys_expire(make_app: Callable[..., Flask]) -> None:
    client = make_app(start_worker=False, idempotency_hours=1 / 3600 / 10).test_client()
    first = post(client, ROWS, {"Idempotency-Key": "k"}).get_json()["request_id"]
    import time

    time.sleep(0.2)
    second = post(client, ROWS, {"Idempotency-Key": "k"})
    assert second.status_code == 202 and second.get_json()["request_id"] != first


def test_idempotency_keys_are_per_api_key(keyed: FlaskClient) -> None:
    first = post(keyed, ROWS, {**as_(ALICE), "Idempotency-Key": "k"})
    other = post(keyed, ROWS, {**as_(BOB), "Idempotency-Key": "k"})
    assert first.status_code == other.status_code == 202
    assert first.get_json()["request_id"] != other.get_json()["request_id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_bad_idempotency_key(client: FlaskClient, key: str) -> None:
    error = assert_error(post(client, ROWS, {"Idempotency-Key": key}), 400, "invalid_field")
    assert error["details"] == [
        {"field": "Idempotency-Key", "message": "must be 1 to 255 printable characters"}
    ]


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(start_worker=False).test_client()


def test_a_key_whose_upload_failed_to_store_is_free_again(client: FlaskClient, mongo: Any) -> None:
    """What an upload that lost its database mid-way leaves: a reservation of the key with
    no request behind it. Retried past the storing grace, the key stores a new request;
    within it, the retry is told to wait (the first upload may still be storing)."""
    digest = hashlib.sha256(ROWS).hexdigest()
    now = datetime.now(UTC)
    abandoned = {"request_id": str(uuid.uuid4()), "digest": digest}
    mongo.idempotency_keys.insert_many(
        [
            {"_id": "-:stale", **abandoned, "created_at": now - timedelta(minutes=1)},
            {"_id": "-:fresh", **abandoned, "created_at": now},
        ]
    )
    retried = post(client, ROWS, {"Idempotency-Key": "stale"})
    assert retried.status_code == 202
    request_id = retried.get_json()["request_id"]
    assert request_id != abandoned["request_id"]
    assert post(client, ROWS, {"Idempotency-Key": "stale"}).get_json()["request_id"] == request_id
    assert mongo.processing_requests.count_documents({}) == 1

    waiting = assert_error(
        post(client, ROWS, {"Idempotency-Key": "fresh"}), 409, "idempotency_conflict"
    )
    assert "still being stored" in waiting["message"]
