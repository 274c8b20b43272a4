"""Recovery: SIGKILL a real gunicorn mid-batch, start it again, the batch finishes with
nothing lost and nothing that was done redone."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import csv_bytes, make_image, serve_slowly
from tests.processes import start_gunicorn, wait_images_done, wait_terminal_http

pytestmark = pytest.mark.slow


def service_env(mongo_uri: str, db_name: str, data_dir: Path) -> dict[str, str]:
    return {
        "MONGODB_URI": mongo_uri,
        "IMGPROC_DB_NAME": db_name,
        "IMGPROC_DATA_DIR": str(data_dir),
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_LEASE_SECONDS": "3",
        "IMGPROC_POLL_SECONDS": "0.2",
        "IMGPROC_WORKERS": "2",
        "IMGPROC_HTTP_WORKERS": "1",
    }


def test_sigkill_mid_batch_then_restart(
    image_host: HTTPServer, mongo_uri: str, db_name: str, mongo: Any, tmp_path: Path
) -> None:
    paths = [f"/r{i}.jpg" for i in range(24)]
    hits = serve_slowly(image_host, paths, 0.25, make_image(400, 300))
    rows = [
        (n + 1, f"P{n}", [image_host.url_for(p) for p in paths[n * 3 : n * 3 + 3]])
        for n in range(8)
    ]
    env = service_env(mongo_uri, db_name, tmp_path / "data")

    first = start_gunicorn(env, tmp_path / "first.log")
    try:
        response = requests.post(
            f"{first.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        assert response.status_code == 202
        request_id = response.json()["request_id"]
        wait_images_done(first.url, request_id, 6)
        first.kill()
    finally:
        first.stop()

    done_before = {
        image["input_url"].rsplit("/", 1)[1]
        for product in mongo.products.find({"request_id": request_id})
        for image in product["images"]
        if image["status"] == "done"
    }
    assert 6 <= len(done_before) < 24
    assert mongo.processing_requests.find_one({"_id": request_id})["status"] == "processing"

    second = start_gunicorn(env, tmp_path / "second.log")
    try:
        body = wait_terminal_http(second.url, request_id, timeout=60)

        assert body["status"] == "completed"
        assert body["progress"]["images_done"] == 24
        assert body["progress"]["images_failed"] == 0
        assert body["progress"]["products_done"] == 8
        for name in done_before:  # finished before the kill: never fetched again
            assert hits[f"/{name}"] == 1, (name, hits)
        assert all(hits[p] >= 1 for p in paths)
        assert sum(hits.values()) <= 24 + 4  # at most the images in flight at the kill redone
        for product in body["products"]:
            for url in product["output_image_urls"]:
                served = requests.get(url.replace(first.url, second.url), timeout=5)
                assert served.status_code == 200
                assert served.headers["Content-Type"] == "image/jpeg"
        output = requests.get(f"{second.url}/csv/output/{request_id}", timeout=5)
        assert output.status_code == 200
        assert len(output.text.strip().splitlines()) == 9
    finally:
        second.stop()


def test_an_image_that_kills_its_process_every_time_is_given_up(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    """A poison image (here: a host that hangs while the process is killed) fails with a
    reason after IMGPROC_MAX_IMAGE_ATTEMPTS counted attempts, its neighbour does not, and the
    batch completes. The first run's crash counts nothing (the batch ran at full speed, with
    nothing written per product before it started); each take-over then works on the dead
    owner's products one at a time, counting each attempt."""
    poison_hits = threading.Semaphore(0)

    def hang(_request: Request) -> Response:
        poison_hits.release()
        time.sleep(30)
        return Response(b"", content_type="image/jpeg")

    image_host.expect_request("/poison.jpg").respond_with_handler(hang)
    good = image_host.url_for("/good.jpg")
    image_host.expect_request("/good.jpg").respond_with_data(
        make_image(), content_type="image/jpeg"
    )
    env = {
        **service_env(mongo_uri, db_name, tmp_path / "data"),
        "IMGPROC_LEASE_SECONDS": "2",
        "IMGPROC_FETCH_ATTEMPTS": "1",
        "IMGPROC_READ_TIMEOUT": "60",
    }
    rows = [(1, "Poison", [image_host.url_for("/poison.jpg")]), (2, "Fine", [good])]

    request_id = None
    for attempt in range(4):
        service = start_gunicorn(env, tmp_path / f"run{attempt}.log")
        try:
            if request_id is None:
                created = requests.post(
                    f"{service.url}/csv/upload",
                    files={"file": ("p.csv", csv_bytes(rows))},
                    timeout=10,
                )
                request_id = created.json()["request_id"]
            assert poison_hits.acquire(timeout=30), f"attempt {attempt}: poison never fetched"
            service.kill()
        finally:
            service.stop()

    last = start_gunicorn(env, tmp_path / "last.log")
    try:
        body = wait_terminal_http(last.url, request_id, timeout=30)
        poison, fine = body["products"]
        assert poison["images"][0]["status"] == "failed"
        assert poison["images"][0]["error"] == "gave up after 3 attempts"
        assert fine["images"][0]["status"] == "done"
        assert body["status"] == "completed_with_errors"
        assert not poison_hits.acquire(timeout=0.5)  # not fetched a fourth time
    finally:
        last.stop()
