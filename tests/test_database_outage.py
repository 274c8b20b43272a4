"""Database outage: stop the database server mid-batch for several seconds and start it again.
Health and uploads answer a clean 503 meanwhile, the worker threads survive and resume, and
the batch completes with nothing lost or doubled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pytest_httpserver import HTTPServer

from imgproc import embedded_db
from imgproc.embedded_db import free_port
from tests.conftest import csv_bytes, serve_slowly
from tests.processes import start_gunicorn, wait_images_done, wait_terminal_http
from tests.test_worker_recovery import service_env

pytestmark = pytest.mark.slow


def test_batch_survives_a_database_outage(image_host: HTTPServer, tmp_path: Path) -> None:
    port = free_port()
    storage = str(tmp_path / "db")
    database = embedded_db.start(storage, port=port, log_path=str(tmp_path / "db.log"))
    hits = serve_slowly(image_host, [f"/o{i}.jpg" for i in range(30)], 0.3)
    env = {
        **service_env(database.uri, "outage", tmp_path / "data"),
        "IMGPROC_LEASE_SECONDS": "30",
        "IMGPROC_DB_TIMEOUT_MS": "1000",
    }
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        rows = [(n + 1, f"P{n}", [image_host.url_for(f"/o{n}.jpg")]) for n in range(30)]
        created = requests.post(
            f"{service.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        request_id = created.json()["request_id"]
        wait_images_done(service.url, request_id, 4)

        database.stop()  # the outage begins, mid-batch
        outage_started = time.monotonic()
        health = requests.get(f"{service.url}/healthz", timeout=10)
        assert health.status_code == 503
        assert health.json() == {"status": "error", "db": "down"}
        upload = requests.post(
            f"{service.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows[:1]))}, timeout=10
        )
        assert upload.status_code == 503
        assert upload.json()["error"]["code"] == "unavailable"
        status = requests.get(f"{service.url}/csv/status/{request_id}", timeout=10)
        assert status.status_code == 503 and status.json()["error"]["code"] == "unavailable"
        metrics = requests.get(f"{service.url}/metrics", timeout=10)
        assert metrics.status_code == 200  # the processes' own figures still get out
        assert "imgproc_database_up 0.0" in metrics.text
        assert (
            "imgproc_images_total" in metrics.text and "imgproc_images_waiting" not in metrics.text
        )
        time.sleep(max(0.0, 10 - (time.monotonic() - outage_started)))  # ~10 s down

        database = embedded_db.start(storage, port=port, log_path=str(tmp_path / "db2.log"))
        body = wait_terminal_http(service.url, request_id, timeout=60)
        assert body["status"] == "completed"
        assert body["progress"]["images_done"] == 30  # nothing lost...
        assert body["progress"]["images_failed"] == 0
        assert body["progress"]["products_done"] == 30  # ...and nothing counted twice
        assert all(1 <= hits[f"/o{n}.jpg"] <= 2 for n in range(30)), hits
        assert requests.get(f"{service.url}/healthz", timeout=5).status_code == 200
        assert "imgproc_database_up 1.0" in requests.get(f"{service.url}/metrics", timeout=5).text
        assert service.process.poll() is None  # the service itself never went down
    finally:
        service.stop()
        database.stop()
