"""Liveness: trouble on our side never fails an image, a request never sits held while
nothing moves, and a graceful stop hands work over cleanly (not as a crash)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from pytest_httpserver import HTTPServer

from imgproc.config import load_settings
from imgproc.documents import ImageOutcome
from imgproc.fetcher import Fetcher
from imgproc.models import ImageStatus
from imgproc.storage import image_key
from imgproc.storage.local import LocalStorage
from imgproc.store import Store
from imgproc.worker.image_task import ImageWork
from imgproc.worker.plan import Result
from tests.conftest import (
    csv_bytes,
    get_closed,
    make_image,
    serve,
    serve_slowly,
    upload,
    wait_terminal,
)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_storage_outage_leaves_images_unfinished_until_it_is_over(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    mongo: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = tmp_path / "data" / "images"
    images.parent.mkdir(parents=True)
    images.write_text("a file where the image directory should be: every put fails")
    urls = [serve(image_host, f"/s{i}.jpg", make_image(300 + i, 200)) for i in range(3)]
    app = make_app(stall_seconds=0.5)
    client = app.test_client()
    request_id = upload(client, csv_bytes([(1, "A", urls[:2]), (2, "B", urls[2:])])).get_json()[
        "request_id"
    ]

    deadline = time.monotonic() + 20
    while mongo.processing_requests.find_one({"_id": request_id}).get("stalls", 0) < 2:
        assert time.monotonic() < deadline, "never handed back after a pass without progress"
        time.sleep(0.05)
    body = client.get(f"/csv/status/{request_id}").get_json()
    assert body["status"] == "processing"
    assert body["progress"]["images_done"] == body["progress"]["images_failed"] == 0
    assert all(i["status"] != "failed" for p in body["products"] for i in p["images"])
    assert "imgproc_requests_stalled 1.0" in client.get("/metrics").get_data(as_text=True)

    images.unlink()  # the storage is back
    body = wait_terminal(client, request_id, timeout=60)
    assert body["status"] == "completed"
    assert body["progress"]["images_done"] == 3
    for product in body["products"]:
        for url in product["output_image_urls"]:
            assert get_closed(client, url).status_code == 200
    assert "imgproc_requests_stalled 0.0" in client.get("/metrics").get_data(as_text=True)
    assert errors_logged(caplog) == []
    assert "left for another pass" in caplog.text


def test_an_output_gone_before_its_outcome_is_written_is_redone_not_recorded_done(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job makes a flush's outputs durable just before it writes their outcomes. An
    output removed under the service in between (a volume swapped, a clean-up) cannot be:
    its image is left open and redone, never recorded done without its file."""
    fast = serve(image_host, "/fast.jpg", make_image(320, 200))
    # Two slow images hold the first flush back for its interval (~1 s): fewer images wait
    # than are still coming.
    serve_slowly(image_host, ["/slow.jpg", "/slow2.jpg"], 1.5)
    client = make_app().test_client()
    slow = [image_host.url_for("/slow.jpg"), image_host.url_for("/slow2.jpg")]
    csv = csv_bytes([(1, "A", [fast, *slow])])
    request_id = upload(client, csv).get_json()["request_id"]
    output = tmp_path / "data" / "images" / request_id / "0-0.jpg"
    deadline = time.monotonic() + 20
    while not output.exists():
        assert time.monotonic() < deadline, "the fast image was never stored"
        time.sleep(0.002)
    output.unlink()

    body = wait_terminal(client, request_id, timeout=60)
    assert body["status"] == "completed"
    assert body["progress"]["images_done"] == 3
    for url in body["products"][0]["output_image_urls"]:
        assert get_closed(client, url).status_code == 200
    assert "1 images left for another pass: could not sync outputs" in caplog.text
    assert errors_logged(caplog) == []


def test_an_output_that_cannot_be_made_durable_is_not_recorded_done(
    settings: dict[str, Any], mongo: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job syncs a flush's outputs before it writes their outcomes; when that fails
    (here one output was removed under the service), the images those outcomes finish are
    left open for another pass, and failures and product checks go through as they are."""
    config = load_settings(settings)
    storage = LocalStorage(str(tmp_path / "images"))
    work = ImageWork(config, Fetcher(config), storage, Store(mongo))
    request_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    kept, removed = (image_key(request_id, row, 0, "jpg") for row in (1, 2))
    storage.put(kept, b"kept")
    storage.put(removed, b"removed")
    (tmp_path / "images" / removed).unlink()
    results = [
        Result("p1", 0, ImageOutcome(ImageStatus.DONE, output_key=kept)),
        Result("p2", 0, ImageOutcome(ImageStatus.DONE, output_key=removed)),
        Result("p3", 0, ImageOutcome.failed("HTTP 404 from the image host")),
        Result("p4", None, None),
    ]
    with caplog.at_level(logging.WARNING):
        settled = work.settle(results)
    assert settled == [Result("p1", 0, None), Result("p2", 0, None), *results[2:]]
    assert "2 images left for another pass: could not sync outputs" in caplog.text

    storage.put(removed, b"removed")  # the next pass puts it again
    assert work.settle(results) == results


def test_a_graceful_stop_mid_batch_records_what_ran_and_hands_over_cleanly(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    mongo: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = [f"/g{i}.jpg" for i in range(16)]
    hits = serve_slowly(image_host, paths, 0.4)
    rows = [(i + 1, f"P{i}", [image_host.url_for(p)]) for i, p in enumerate(paths)]
    first = make_app(downloads=4)
    request_id = upload(first.test_client(), csv_bytes(rows)).get_json()["request_id"]
    deadline = time.monotonic() + 20
    while mongo.processing_requests.find_one({"_id": request_id})["images_done"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    first.extensions["imgproc"].close(grace=5)  # returns once its job threads are done

    request = mongo.processing_requests.find_one({"_id": request_id})
    assert request["lease_owner"] is None and request["fed_rows"] == 0  # a clean hand-over
    products = list(mongo.products.find({"request_id": request_id}))
    statuses = [p["images"][0]["status"] for p in products]
    assert "failed" not in statuses
    assert request["images_done"] == statuses.count("done") >= 2  # in flight: finished, counted
    assert errors_logged(caplog) == []

    second = make_app(downloads=4)
    body = wait_terminal(second.test_client(), request_id, timeout=60)
    assert body["status"] == "completed" and body["progress"]["images_done"] == 16
    assert "taken over" not in caplog.text  # not treated as a crash...
    assert all("attempts" not in i for p in mongo.products.find() for i in p["images"])
    done_before = [
        urlsplit(p["images"][0]["input_url"]).path
        for p in products
        if p["images"][0]["status"] == "done"
    ]
    assert all(hits[path] == 1 for path in done_before)  # ...and nothing done was fetched again
    assert all(hits[path] >= 1 for path in paths)
