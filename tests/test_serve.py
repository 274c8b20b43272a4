"""What ``make run`` runs: ``python -m imgproc serve`` with its own embedded database, and
gunicorn stopping gracefully on SIGTERM."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from imgproc.embedded_db import free_port
from tests.conftest import csv_bytes, make_image, serve
from tests.processes import start_gunicorn, start_process, wait_terminal_http
from tests.test_worker_recovery import service_env

pytestmark = pytest.mark.slow


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_serve_starts_the_embedded_database_and_stops_everything(
    image_host: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MONGODB_URI", raising=False)
    env = {
        "IMGPROC_DATA_DIR": str(tmp_path / "data"),
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_HTTP_WORKERS": "1",
    }
    log = tmp_path / "serve.log"
    service = start_process([sys.executable, "-m", "imgproc", "serve"], env, log, free_port())
    try:
        db_port = int(re.search(r"mongodb://127\.0\.0\.1:(\d+)", log.read_text())[1])  # type: ignore[index]
        assert port_open(db_port)
        url = serve(image_host, "/a.jpg", make_image())
        created = requests.post(
            f"{service.url}/csv/upload",
            files={"file": ("p.csv", csv_bytes([(1, "A", [url])]))},
            timeout=10,
        )
        assert created.status_code == 202
        body = wait_terminal_http(service.url, created.json()["request_id"])
        assert body["status"] == "completed"
        assert (tmp_path / "data" / "db").is_dir()
        assert list((tmp_path / "data" / "images").rglob("*.jpg"))

        assert service.terminate() == 0
        assert not port_open(db_port)  # the database it started is stopped too
    finally:
        service.stop()


def test_serve_refuses_a_bad_setting(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "imgproc", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "MONGODB_URI": "mongodb://127.0.0.1:1",
            "IMGPROC_DOWNLOADS": "none",
            "IMGPROC_DATA_DIR": str(tmp_path),
        },
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert "configuration error: IMGPROC_DOWNLOADS='none' is not valid" in result.stderr


def test_sigterm_finishes_images_in_flight_and_releases_the_lease(
    image_host: HTTPServer, mongo_uri: str, db_name: str, mongo: Any, tmp_path: Path
) -> None:
    started = threading.Event()
    image = make_image(300, 200)

    def slow(_request: Request) -> Response:
        started.set()
        time.sleep(1.0)
        return Response(image, content_type="image/jpeg")

    paths = [f"/s{i}.jpg" for i in range(12)]
    for path in paths:
        image_host.expect_request(path).respond_with_handler(slow)
    rows = [(i + 1, f"P{i}", [image_host.url_for(p)]) for i, p in enumerate(paths)]
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_LEASE_SECONDS": "60"}

    first = start_gunicorn(env, tmp_path / "first.log")
    try:
        created = requests.post(
            f"{first.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        request_id = created.json()["request_id"]
        assert started.wait(20)
        time.sleep(0.2)
        stopped_at = time.monotonic()
        assert first.terminate() == 0
        assert time.monotonic() - stopped_at < 15
    finally:
        first.stop()

    request = mongo.processing_requests.find_one({"_id": request_id})
    assert request["lease_owner"] is None  # released: no waiting for a 60 s lease to expire
    statuses = [p["images"][0]["status"] for p in mongo.products.find({"request_id": request_id})]
    assert "done" in statuses  # the images in flight were finished, not dropped
    assert "failed" not in statuses

    second = start_gunicorn(env, tmp_path / "second.log")
    try:
        body = wait_terminal_http(second.url, request_id, timeout=40)
        assert body["status"] == "completed"
        assert body["progress"]["images_done"] == 12
        # A graceful stop is a clean hand-over, not a crash: no suspects, no attempts counted.
        assert "taken over" not in second.log.read_text()
        assert all("attempts" not in i for p in mongo.products.find() for i in p["images"])
    finally:
        second.stop()
