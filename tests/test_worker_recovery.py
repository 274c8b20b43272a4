"""Recovery: SIGKILL a real gunicorn mid-batch, start it again, the batch finishes with
nothing lost and nothing that was done redone."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, make_image, serve, serve_slowly
from tests.processes import Service, start_gunicorn, wait_images_done, wait_terminal_http

pytestmark = pytest.mark.slow


def service_env(mongo_uri: str, db_name: str, data_dir: Path) -> dict[str, str]:
    return {
        "MONGODB_URI": mongo_uri,
        "IMGPROC_DB_NAME": db_name,
        "IMGPROC_DATA_DIR": str(data_dir),
        "IMGPROC_ALLOW_PRIVATE_URLS": "true",
        "IMGPROC_LEASE_SECONDS": "3",
        "IMGPROC_POLL_SECONDS": "0.2",
        "IMGPROC_DOWNLOADS": "4",
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
    # What a kill in the middle of a put leaves (tests/test_storage.py kills one so): its
    # temporary file, beside the outputs.
    outputs = tmp_path / "data" / "images" / request_id
    (outputs / ".tmp-00c0ffee00c0ffee").write_bytes(b"\xff\xd8 cut short")

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
        # Redone at most: what was in flight at the kill (4 downloads) and what finished in the
        # last flush interval without being recorded (0.5 s at ~16 images/s).
        assert sum(hits.values()) <= 24 + 4 + 8
        for product in body["products"]:
            for url in product["output_image_urls"]:
                served = requests.get(url.replace(first.url, second.url), timeout=5)
                assert served.status_code == 200
                assert served.headers["Content-Type"] == "image/jpeg"
        output = requests.get(f"{second.url}/csv/output/{request_id}", timeout=5)
        assert output.status_code == 200
        assert len(output.text.strip().splitlines()) == 9
        # The data directory holds the outputs and nothing else.
        expected = {f"{row}-{index}.jpg" for row in range(8) for index in range(3)}
        assert set(os.listdir(outputs)) == expected
        # The one placed above, and any put the kill did cut short.
        assert re.search(r"removed [1-9]\d* temporary files of puts", second.log.read_text())
    finally:
        second.stop()


def slow_to_decode() -> bytes:
    """A real 25-megapixel PNG of 85 KB that takes the codec most of a second."""
    image = Image.linear_gradient("L").resize((5000, 5000)).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=9)
    return out.getvalue()


def kill_while_decoding(service: Service, row: int, timeout: float = 30) -> None:
    """SIGKILL ``service`` the moment its log says it is decoding image 0 of ``row``: what an
    image that crashes its decoder (a segfault, the OOM killer) does to a process."""
    marker = f"row {row} image 0: decoding"
    deadline = time.monotonic() + timeout
    while marker not in service.log.read_text():
        assert time.monotonic() < deadline, f"row {row} never reached the codec"
        time.sleep(0.01)
    service.kill()


def test_an_image_that_kills_its_process_every_time_is_given_up(
    image_host: HTTPServer, mongo_uri: str, db_name: str, mongo: Any, tmp_path: Path
) -> None:
    """A poison image, here one the process is killed in the middle of decoding, every
    time, fails with a reason after IMGPROC_MAX_IMAGE_ATTEMPTS counted attempts; its
    neighbour does not, and the batch completes. The first run's death counts nothing (the
    pool had many images in flight: which one killed it is unknown); each take-over sends
    the dead owner's open products through the codec one at a time, counting each attempt
    just before and taking it back when the decode comes back, so the death is charged to
    the image being decoded and to no other (not to a neighbour decoded before it whose
    outcome the death kept from being written)."""
    # The poison arrives half a second after its neighbour, so the neighbour is decoded
    # first on every run and its outcome is still waiting to be written (results are
    # written a second at a time) when the poison kills the process.
    serve_slowly(image_host, ["/poison.png"], 0.5, slow_to_decode())
    poison = image_host.url_for("/poison.png")
    fine = serve(image_host, "/fine.jpg", make_image())
    env = {
        **service_env(mongo_uri, db_name, tmp_path / "data"),
        "IMGPROC_LEASE_SECONDS": "2",
        "IMGPROC_LOG_LEVEL": "DEBUG",
    }
    rows = [(1, "Poison", [poison]), (2, "Fine", [fine])]

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
            kill_while_decoding(service, row=0)
        finally:
            service.stop()
        attempts = mongo.products.find_one({"_id": f"{request_id}:0000000"})["images"][0]
        assert attempts.get("attempts", 0) == attempt  # run 0 is not a take-over

    last = start_gunicorn(env, tmp_path / "last.log")
    try:
        body = wait_terminal_http(last.url, request_id, timeout=30)
        poisoned, neighbour = body["products"]
        assert poisoned["images"][0]["status"] == "failed"
        assert poisoned["images"][0]["error"] == "gave up after 3 attempts"
        assert neighbour["images"][0]["status"] == "done"
        assert body["status"] == "completed_with_errors"
        assert "row 0 image 0: decoding" not in last.log.read_text()  # not tried a fifth time
    finally:
        last.stop()
