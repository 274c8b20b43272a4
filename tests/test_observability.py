"""Logs (one JSON object per line, request ids, no secrets) and Prometheus metrics (adding up
over several gunicorn worker processes), as an operator reads them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, make_image, serve, upload, wait_terminal
from tests.processes import start_gunicorn, wait_terminal_http
from tests.test_webhooks import wait_webhook
from tests.test_worker_recovery import service_env

API_KEY = "ops-key-0123456789abcdef"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` as JSON; fails on a line that is not."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON log line: {line!r}")
    return lines


def test_logs_are_json_lines_tagged_with_the_request_and_free_of_secrets(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    webhook_receiver: HTTPServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_app(
        api_keys=(API_KEY,), webhook_secret=WEBHOOK_SECRET, log_level="DEBUG"
    ).test_client()
    client.environ_base["HTTP_X_API_KEY"] = API_KEY
    signed = serve(image_host, "/logged.jpg", make_image()) + "?sig=s3cr3tsig"
    with_password = signed.replace("http://", "http://shopuser:hunter2pass@")
    image_host.expect_request("/gone.jpg").respond_with_data("no", status=404)
    webhook_receiver.expect_request("/hook").respond_with_data("ok")
    hook = webhook_receiver.url_for("/hook") + "?token=hooktoken123"
    rows = [(1, "A", [signed, with_password]), (2, "B", [image_host.url_for("/gone.jpg")])]
    created = upload(client, csv_bytes(rows), webhook_url=hook)
    assert created.status_code == 202
    request_id = created.get_json()["request_id"]
    assert wait_terminal(client, request_id)["status"] == "completed_with_errors"
    wait_webhook(client, request_id, "delivered")
    assert client.get("/no-such-page").status_code == 404

    out = capsys.readouterr()
    lines = json_lines(out.err)
    for secret in (API_KEY, WEBHOOK_SECRET, "hunter2pass", "s3cr3tsig", "hooktoken123"):
        assert secret not in out.err + out.out
    for line in lines:
        assert {"ts", "level", "logger", "pid", "message"} <= line.keys()
        assert line["ts"].endswith("Z")
    about = [line for line in lines if line.get("request_id") == request_id]
    messages = [line["message"] for line in about]
    assert any("accepted" in m for m in messages)  # the upload
    assert any(m.startswith("POST /csv/upload 202") for m in messages)  # its access line
    assert any(m.startswith(f"GET /csv/status/{request_id} 200") for m in messages)
    assert any("image 0 failed: HTTP 404" in m for m in messages)
    assert any("image 1 failed: credentials in URLs" in m for m in messages)
    assert any(m.startswith("claimed request") for m in messages)
    assert any("image 0 done" in m for m in messages)
    assert any("completed_with_errors" in m for m in messages)
    assert any("webhook delivered" in m for m in messages)
    # Each access line has the time its own request waited on the database, apart from the
    # rest (the same thread answered every request here: nothing carries over). A poll of
    # this two-row request reads it in 1-4 commands (whole pages, cached or not).
    polls = [line for line in about if line["message"].startswith("GET /csv/status/")]
    assert polls
    for line in polls:
        assert 1 <= line["db_calls"] <= 4
        assert 0 <= line["db_ms"] <= line["duration_ms"]
    missing = next(line for line in lines if line["message"] == "GET /no-such-page 404")
    assert (missing["db_calls"], missing["db_ms"]) == (0, 0)
    failed = next(line for line in about if "failed: HTTP 404" in line["message"])
    assert failed["level"] == "info"  # the user's broken link is not the operator's problem
    # Every line that names the request carries its id.
    assert all(line.get("request_id") == request_id for line in lines if request_id in str(line))


def metrics_of(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape, on a new connection: {(sample name, labels): value}."""
    reply = requests.get(f"{url}/metrics", timeout=10, headers={"Connection": "close"})
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_metrics_add_up_over_several_gunicorn_workers(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    good = [serve(image_host, f"/m{i}.jpg", make_image(320 + i, 240)) for i in range(5)]
    image_host.expect_request("/missing.jpg").respond_with_data("no", status=404)
    rows = [(i + 1, f"P{i}", [url]) for i, url in enumerate(good)]
    rows.append((6, "P5", [image_host.url_for("/missing.jpg")]))
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_HTTP_WORKERS": "3"}
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        created = requests.post(
            f"{service.url}/csv/upload",
            files={"file": ("p.csv", csv_bytes(rows))},
            timeout=10,
        )
        request_id = created.json()["request_id"]
        body = wait_terminal_http(service.url, request_id)
        assert body["status"] == "completed_with_errors"
        polls = 30
        for _ in range(polls):  # new connections: the three workers share them out
            reply = requests.get(
                f"{service.url}/csv/status/{request_id}",
                headers={"Connection": "close"},
                timeout=10,
            )
            assert reply.status_code == 200
        images = [i for p in body["products"] for i in p["images"] if i["status"] == "done"]
        scrapes = [metrics_of(service.url) for _ in range(6)]
    finally:
        service.terminate()
    status_route = (("method", "GET"), ("route", "/csv/status/<request_id>"), ("status", "200"))
    for scrape in scrapes:  # whichever worker answers, the same totals
        assert scrape[("imgproc_images_total", (("outcome", "done"), ("reason", "")))] == 5
        assert (
            scrape[("imgproc_images_total", (("outcome", "failed"), ("reason", "HTTP 404")))] == 1
        )
        assert scrape[("imgproc_input_bytes_total", ())] == sum(i["input_bytes"] for i in images)
        assert scrape[("imgproc_output_bytes_total", ())] == sum(i["output_bytes"] for i in images)
        assert scrape[("imgproc_download_seconds_count", ())] == 5
        assert scrape[("imgproc_compress_seconds_count", ())] == 5
        assert scrape[("imgproc_requests_finished_total", (("status", "completed_with_errors"),))]
        assert scrape[("imgproc_requests", (("status", "completed_with_errors"),))] == 1
        assert scrape[("imgproc_requests", (("status", "pending"),))] == 0
        assert scrape[("imgproc_images_waiting", ())] == 0
        assert scrape[("imgproc_images_in_flight", ())] == 0
        assert scrape[("imgproc_http_requests_total", status_route)] >= polls
    lines = json_lines((tmp_path / "service.log").read_text())
    assert any(line["logger"] == "gunicorn.error" for line in lines)  # gunicorn's own, as JSON
    booted = [line["pid"] for line in lines if line["message"].startswith("Booting worker")]
    assert len(booted) == len(set(booted)) == 3  # each worker's line once, no echo
    started = [line["pid"] for line in lines if "downloads in flight" in line["message"]]
    assert len(started) == 1  # one image pipeline in the instance (imgproc.worker.election)
