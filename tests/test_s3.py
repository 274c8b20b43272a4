"""IMGPROC_STORAGE=s3 through the service, against a real S3-compatible server (SeaweedFS):
outputs are objects in the bucket, served by the service at /images/<key> without a public
base URL and straight from the bucket with one; an S3 gateway killed mid-batch leaves no
image failed; a hung one stops the downloads at the memory budget."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from pytest_httpserver import HTTPServer

from tests.conftest import (
    S3_BUCKET,
    S3_PUBLIC_BUCKET,
    csv_bytes,
    get_closed,
    make_image,
    serve,
    serve_slowly,
    upload,
    wait_terminal,
)
from tests.origin import Origin
from tests.processes import start_gunicorn, wait_images_done, wait_terminal_http
from tests.s3server import S3Server
from tests.test_worker_recovery import service_env


def submit_and_finish(app: Flask, image_host: HTTPServer) -> tuple[dict[str, Any], list[str]]:
    """Upload two products (three images, one of them a 404) and wait for the outcome; the
    status body and the output CSV's URL cells."""
    client = app.test_client()
    a = serve(image_host, "/s3a.jpg", make_image(800, 600))
    b = serve(image_host, "/s3b.png", make_image(300, 200, fmt="PNG", mode="RGBA"), "image/png")
    image_host.expect_request("/s3gone.jpg").respond_with_data("gone", status=404)
    gone = image_host.url_for("/s3gone.jpg")
    created = upload(client, csv_bytes([(1, "Shirt", [a, gone]), (2, "Shoe", [b])]))
    assert created.status_code == 202
    body = wait_terminal(client, created.get_json()["request_id"])
    assert body["status"] == "completed_with_errors"
    output = client.get(f"/csv/output/{body['request_id']}").get_data(as_text=True)
    rows = list(csv.reader(io.StringIO(output)))
    return body, [row[-1] for row in rows[1:]]


def test_outputs_are_objects_in_the_bucket_served_by_the_service(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    s3: S3Server,
    s3_settings: dict[str, Any],
    s3_prefix: str,
) -> None:
    app = make_app(**s3_settings)
    body, csv_cells = submit_and_finish(app, image_host)
    request_id = body["request_id"]
    expected = [f"{request_id}/0-0.jpg", f"{request_id}/1-0.webp"]
    # The outputs are objects in the bucket, under the prefix, with their type and caching.
    assert s3.keys(S3_BUCKET, s3_prefix) == [s3_prefix + key for key in expected]
    client = s3.client()
    for key, mime in zip(expected, ("image/jpeg", "image/webp"), strict=True):
        head = client.head_object(Bucket=S3_BUCKET, Key=s3_prefix + key)
        assert head["ContentType"] == mime
        assert head["CacheControl"] == "public, max-age=31536000, immutable"

    # Without a public base URL the service serves them at /images/<key>.
    urls = body["products"][0]["output_image_urls"] + body["products"][1]["output_image_urls"]
    assert urls == [
        f"http://localhost/images/{expected[0]}",
        None,
        f"http://localhost/images/{expected[1]}",
    ]
    assert csv_cells == [f"{urls[0]},", urls[2]]
    test_client = app.test_client()
    for url, key in ((urls[0], expected[0]), (urls[2], expected[1])):
        served = get_closed(test_client, url)
        stored = client.get_object(Bucket=S3_BUCKET, Key=s3_prefix + key)
        data = stored["Body"].read()
        assert served.status_code == 200
        assert served.get_data() == data
        assert served.headers["ETag"] == stored["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
        assert "max-age=31536000" in served.headers["Cache-Control"]
        again = get_closed(test_client, url, headers={"If-None-Match": served.headers["ETag"]})
        assert again.status_code == 304
    assert get_closed(test_client, f"/images/{request_id}/0-1.jpg").status_code == 404


def test_with_a_public_url_outputs_point_at_the_bucket(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    s3: S3Server,
    s3_settings: dict[str, Any],
    s3_prefix: str,
) -> None:
    public = s3.public_url(S3_PUBLIC_BUCKET)  # anonymous reads: what a CDN in front would do
    app = make_app(**{**s3_settings, "s3_bucket": S3_PUBLIC_BUCKET, "s3_public_url": public})
    body, csv_cells = submit_and_finish(app, image_host)
    request_id = body["request_id"]
    urls = body["products"][0]["output_image_urls"] + body["products"][1]["output_image_urls"]
    assert urls == [
        f"{public}/{s3_prefix}{request_id}/0-0.jpg",
        None,
        f"{public}/{s3_prefix}{request_id}/1-0.webp",
    ]
    assert body["products"][0]["images"][0]["output_url"] == urls[0]
    assert csv_cells == [f"{urls[0]},", urls[2]]
    # The URL a user gets answers from the bucket itself, with no credentials, no service.
    for url, mime in ((urls[0], "image/jpeg"), (urls[2], "image/webp")):
        assert url is not None
        served = requests.get(url, timeout=10)
        assert served.status_code == 200
        assert served.headers["Content-Type"] == mime
        assert served.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert served.content[:4] in (b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"RIFF")
    private = requests.get(f"{s3.endpoint}/{S3_BUCKET}/anything.jpg", timeout=10)
    assert private.status_code == 403  # the other bucket is not public: the check means it


@pytest.mark.slow
def test_an_s3_gateway_killed_mid_batch_leaves_no_image_failed(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    """Durability rule 7 with S3: while the gateway is down, images cannot be stored and stay
    unfinished; once it is back, every image ends done and none failed. (Needs the worker
    that treats StorageUnavailable as transient.)"""
    server = S3Server.start(tmp_path / "s3", buckets=("outage",))
    paths = [f"/k{i}.jpg" for i in range(24)]
    serve_slowly(image_host, paths, 0.3, make_image(400, 300))
    rows = [(n + 1, f"K{n}", [image_host.url_for(p)]) for n, p in enumerate(paths)]
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), **server.env("outage")}
    service = start_gunicorn(env, tmp_path / "service.log")
    try:
        created = requests.post(
            f"{service.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        request_id = created.json()["request_id"]
        wait_images_done(service.url, request_id, 3)
        server.kill_gateway()
        progress = requests.get(f"{service.url}/csv/status/{request_id}", timeout=5).json()
        assert progress["progress"]["images_done"] < len(paths)  # killed mid-batch
        time.sleep(3.0)  # images finishing now find the bucket unreachable
        server.start_gateway()
        body = wait_terminal_http(service.url, request_id, timeout=120)
        assert body["progress"]["images_failed"] == 0, [
            image["error"] for p in body["products"] for image in p["images"] if image["error"]
        ]
        assert body["status"] == "completed"
        assert len(server.keys("outage")) == len(paths)
        for product in body["products"]:
            (url,) = product["output_image_urls"]
            assert requests.get(url, timeout=5).status_code == 200
    finally:
        service.stop()
        server.stop()


def test_boto3_is_loaded_only_for_s3_storage(mongo_uri: str, tmp_path: Path) -> None:
    """Importing imgproc, or running it with other storage, never loads boto3 (it costs
    ~0.3 s and memory in every process); S3 storage loads it when the app is built."""
    probe = (
        "import sys\n"
        "import imgproc, imgproc.services, imgproc.storage\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
        "from imgproc import create_app\n"
        "create_app({'start_worker': False, 'storage': sys.argv[1], 's3_bucket': 'b',\n"
        "            'mongodb_uri': sys.argv[2], 'data_dir': sys.argv[3]})\n"
        "print('boto3' in sys.modules)\n"
    )
    for storage, loaded in (("local", "False"), ("gridfs", "False"), ("s3", "True")):
        result = subprocess.run(
            [sys.executable, "-c", probe, storage, mongo_uri, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, **S3Server.credentials_env()},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == loaded, storage


def test_a_hung_bucket_stops_the_downloads_at_the_memory_budget(
    make_app: Callable[..., Flask], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs waiting for a store that does not answer hold the download budget: the
    downloads stop instead of piling encoded images up in memory, and once the store
    answers again every image ends done."""
    server = S3Server.start(tmp_path / "s3", buckets=("hung",))
    for name, value in server.credentials_env().items():
        monkeypatch.setenv(name, value)
    origin = Origin()
    image = make_image(600, 400)  # ~60 KB: the budget holds three
    limit = 3 * len(image) + 1000
    app = make_app(
        storage="s3",
        s3_bucket="hung",
        s3_endpoint_url=server.endpoint,
        downloads=4,
        max_image_bytes=limit,
        download_buffer_bytes=limit,
    )
    client = app.test_client()
    assert server.gateway is not None
    gateway = server.gateway.pid
    urls = [origin.route(f"/h{i}.jpg", image) for i in range(30)]
    try:
        os.kill(gateway, signal.SIGSTOP)  # connections are accepted, nothing is answered
        rows = [(n + 1, f"H{n}", [url]) for n, url in enumerate(urls)]
        created = upload(client, csv_bytes(rows))
        assert created.status_code == 202, created.get_json()
        request_id = created.get_json()["request_id"]
        time.sleep(3.0)  # long enough for every image to be downloaded, were nothing to stop it
        # Three images hold the budget (in storage), four downloads wait for room.
        assert 3 <= len(origin.seen) <= 3 + 4
        assert client.get(f"/csv/status/{request_id}").get_json()["status"] == "processing"
        os.kill(gateway, signal.SIGCONT)
        body = wait_terminal(client, request_id, timeout=120)
        assert body["status"] == "completed"
        assert body["progress"]["images_done"] == len(urls)
        assert len(server.keys("hung")) == len(urls)
        assert len(origin.seen) == len(urls)  # each downloaded once
    finally:
        os.kill(gateway, signal.SIGCONT)  # whatever failed above, the gateway is not left stopped
        server.stop()
        origin.stop()
