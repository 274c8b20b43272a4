"""The webhook: Standard Webhooks headers and signature, retries, the retry budget."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pytest_httpserver import HTTPServer
from standardwebhooks.webhooks import Webhook
from werkzeug import Request, Response

from imgproc import embedded_db
from tests.conftest import csv_bytes, make_image, serve, upload, wait_terminal

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def calls(receiver: HTTPServer) -> list[Any]:
    return [request for request, _ in receiver.log if request.path == "/hook"]


def wait_webhook(
    client: FlaskClient, request_id: str, status: str, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/csv/status/{request_id}").get_json()
        if body["webhook"]["status"] == status:
            return body
        assert time.monotonic() < deadline, f"webhook never {status}: {body['webhook']}"
        time.sleep(0.05)


def start_batch(client: FlaskClient, image_host: HTTPServer, receiver: HTTPServer) -> str:
    url = serve(image_host, "/w.jpg", make_image())
    response = upload(client, csv_bytes([(1, "A", [url])]), webhook_url=receiver.url_for("/hook"))
    assert response.status_code == 202
    return str(response.get_json()["request_id"])


def test_signed_delivery(
    make_app: Callable[..., Flask], image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    client = make_app(webhook_secret=SECRET).test_client()
    webhook_receiver.expect_request("/hook", method="POST").respond_with_data("ok")
    request_id = start_batch(client, image_host, webhook_receiver)

    body = wait_webhook(client, request_id, "delivered")

    assert body["webhook"]["attempts"] == 1
    assert body["webhook"]["last_error"] is None
    assert body["webhook"]["last_attempt_at"].endswith("Z")
    (call,) = calls(webhook_receiver)
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers["webhook-id"] == f"msg_{request_id}"
    payload = Webhook(SECRET).verify(call.get_data(), dict(call.headers))
    assert payload == {
        "type": "request.completed",
        "request_id": request_id,
        "status": "completed",
        "completed_at": body["completed_at"],
        "progress": body["progress"],
        "status_url": f"http://localhost/csv/status/{request_id}",
        "output_csv_url": f"http://localhost/csv/output/{request_id}",
    }


def test_unsigned_without_a_secret(
    client: FlaskClient, image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    webhook_receiver.expect_request("/hook", method="POST").respond_with_data("ok")
    request_id = start_batch(client, image_host, webhook_receiver)
    wait_webhook(client, request_id, "delivered")
    (call,) = calls(webhook_receiver)
    assert "webhook-signature" not in call.headers
    assert json.loads(call.get_data())["request_id"] == request_id


def test_retried_until_delivered(
    make_app: Callable[..., Flask], image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    client = make_app(webhook_secret=SECRET, webhook_retry_delays=(0.2, 0.2, 0.2)).test_client()
    webhook_receiver.expect_oneshot_request("/hook").respond_with_data("no", status=500)
    webhook_receiver.expect_oneshot_request("/hook").respond_with_data("no", status=503)
    webhook_receiver.expect_request("/hook").respond_with_data("ok", status=204)
    request_id = start_batch(client, image_host, webhook_receiver)

    body = wait_webhook(client, request_id, "delivered")

    assert body["webhook"]["attempts"] == 3
    first, second, third = calls(webhook_receiver)
    ids = {c.headers["webhook-id"] for c in (first, second, third)}
    assert ids == {f"msg_{request_id}"}  # stable across retries, so receivers can dedupe
    for call in (first, second, third):
        Webhook(SECRET).verify(call.get_data(), dict(call.headers))


def test_budget_exhausted_is_failed(
    make_app: Callable[..., Flask], image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    client = make_app(webhook_retry_delays=(0.1, 0.1)).test_client()
    webhook_receiver.expect_request("/hook").respond_with_data("no", status=500)
    request_id = start_batch(client, image_host, webhook_receiver)

    body = wait_webhook(client, request_id, "failed")

    assert body["webhook"]["attempts"] == 3  # the first try and one per delay
    assert body["webhook"]["last_error"] == "HTTP 500"
    time.sleep(0.5)
    assert len(calls(webhook_receiver)) == 3


def test_unreachable_receiver_reason(
    make_app: Callable[..., Flask], image_host: HTTPServer
) -> None:
    client = make_app(webhook_retry_delays=()).test_client()
    url = serve(image_host, "/w.jpg", make_image())
    request_id = upload(
        client, csv_bytes([(1, "A", [url])]), webhook_url="http://127.0.0.1:9/hook"
    ).get_json()["request_id"]
    body = wait_webhook(client, request_id, "failed")
    assert body["webhook"]["last_error"] == "could not connect to the host"


def test_no_webhook_stays_none(client: FlaskClient, image_host: HTTPServer) -> None:
    url = serve(image_host, "/w.jpg", make_image())
    body = wait_terminal(
        client, upload(client, csv_bytes([(1, "A", [url])])).get_json()["request_id"]
    )
    assert body["webhook"] == {
        "url": None,
        "status": "none",
        "attempts": 0,
        "last_attempt_at": None,
        "last_error": None,
    }


def test_a_slow_receiver_gets_each_delivery_once(
    make_app: Callable[..., Flask], image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    """Deliveries are claimed only as senders free up: one waiting in line behind a slow
    receiver is never claimed again meanwhile, POSTed twice and charged two attempts."""

    def slowly(_request: Request) -> Response:
        time.sleep(1.5)
        return Response("ok")

    webhook_receiver.expect_request("/hook", method="POST").respond_with_handler(slowly)
    # A claim lasts connect + response timeouts + a lease: 3 s, far less than the last of
    # twelve deliveries would wait in line behind two senders taking 1.5 s each.
    app = make_app(lease_seconds=0.5, connect_timeout=0.5, webhook_timeout=2.0)
    client = app.test_client()
    url = serve(image_host, "/w.jpg", make_image())
    hook = webhook_receiver.url_for("/hook")
    created = [upload(client, csv_bytes([(1, "A", [url])]), webhook_url=hook) for _ in range(12)]
    ids = [response.get_json()["request_id"] for response in created]
    for request_id in ids:
        assert wait_webhook(client, request_id, "delivered", timeout=60)["webhook"]["attempts"] == 1
    time.sleep(3.5)  # a copy claimed again would be POSTed now, after the first was recorded
    posted = [call.headers["webhook-id"] for call in calls(webhook_receiver)]
    assert sorted(posted) == sorted(f"msg_{request_id}" for request_id in ids)


def test_delivery_resumes_in_a_new_process(
    make_app: Callable[..., Flask], image_host: HTTPServer, webhook_receiver: HTTPServer
) -> None:
    """A retry scheduled by one process is sent by the next one (it lives in MongoDB)."""
    first = make_app(webhook_retry_delays=(1.0,))
    client = first.test_client()
    webhook_receiver.expect_oneshot_request("/hook").respond_with_data("no", status=500)
    webhook_receiver.expect_request("/hook").respond_with_data("ok")
    request_id = start_batch(client, image_host, webhook_receiver)
    deadline = time.monotonic() + 20
    while len(calls(webhook_receiver)) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.extensions["imgproc"].close(grace=1)  # the process "dies" before the retry

    second = make_app(webhook_retry_delays=(1.0,)).test_client()
    body = wait_webhook(second, request_id, "delivered")
    assert body["webhook"]["attempts"] == 2


def test_a_database_lost_mid_delivery_is_retried_quietly(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    webhook_receiver: HTTPServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database dies between the POST and the write that records it: the delivery is
    not recorded, its claim runs out and it is sent again (same webhook-id) once the
    database is back. A database outage is not a bug: a warning, no traceback."""
    database = embedded_db.start(str(tmp_path / "db"), log_path=str(tmp_path / "db.log"))
    servers = [database]
    restarted = threading.Event()

    def kill_the_database_then_answer(_request: Request) -> Response:
        if not restarted.is_set():
            database.process.send_signal(signal.SIGKILL)
            database.process.wait()
            threading.Timer(1.0, restart).start()
        return Response("ok")

    def restart() -> None:
        servers.append(
            embedded_db.start(
                str(tmp_path / "db"), port=database.port, log_path=str(tmp_path / "db2.log")
            )
        )
        restarted.set()

    webhook_receiver.expect_request("/hook").respond_with_handler(kill_the_database_then_answer)
    app = make_app(
        mongodb_uri=database.uri,
        db_timeout_ms=500,
        lease_seconds=2.0,
        connect_timeout=1.0,
        webhook_timeout=1.0,
    )
    client = app.test_client()
    try:
        request_id = start_batch(client, image_host, webhook_receiver)
        assert restarted.wait(30)
        body = wait_webhook(client, request_id, "delivered", timeout=30)
        ids = {call.headers["webhook-id"] for call in calls(webhook_receiver)}
        assert len(calls(webhook_receiver)) == 2 and ids == {f"msg_{request_id}"}
        assert body["webhook"]["attempts"] == 1  # the attempt that could not be recorded
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert "it will be tried again" in caplog.text
    finally:
        app.extensions["imgproc"].close(grace=1)
        for server in servers:
            server.stop()
