"""Several instances, one database: two real gunicorn instances with GridFS storage share the
work; SIGKILL one mid-batch and the other finishes it, serves every image, and the webhook
fires one logical time. With S3 storage, the outputs outlive the instance that wrote them."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer

from tests.conftest import S3_BUCKET, csv_bytes, make_image, serve_slowly
from tests.processes import start_gunicorn, wait_terminal_http
from tests.s3server import S3Server
from tests.test_worker_recovery import service_env

pytestmark = pytest.mark.slow


def test_two_instances_share_the_work_and_survive_a_kill(
    image_host: HTTPServer,
    webhook_receiver: HTTPServer,
    mongo_uri: str,
    db_name: str,
    mongo: Any,
    tmp_path: Path,
) -> None:
    hits = serve_slowly(image_host, [f"/m{i}.jpg" for i in range(24)], 0.2)
    webhook_receiver.expect_request("/hook").respond_with_data("ok")
    env = {
        **service_env(mongo_uri, db_name, tmp_path / "data"),
        "IMGPROC_STORAGE": "gridfs",
        "IMGPROC_MAX_ACTIVE_REQUESTS": "1",
        "IMGPROC_WEBHOOK_RETRY_DELAYS": "0.5",
    }
    first = start_gunicorn({**env, "IMGPROC_DATA_DIR": str(tmp_path / "a")}, tmp_path / "a.log")
    second = start_gunicorn({**env, "IMGPROC_DATA_DIR": str(tmp_path / "b")}, tmp_path / "b.log")
    try:
        ids = []
        for batch in range(2):
            rows = [
                (n + 1, f"B{batch}P{n}", [image_host.url_for(f"/m{batch * 12 + n}.jpg")])
                for n in range(12)
            ]
            created = requests.post(
                f"{first.url}/csv/upload",
                files={"file": ("p.csv", csv_bytes(rows))},
                data={"webhook_url": webhook_receiver.url_for("/hook")},
                timeout=10,
            )
            assert created.status_code == 202
            ids.append(created.json()["request_id"])

        # Each instance takes one request (one at a time each): the work is shared.
        deadline = time.monotonic() + 20
        while True:
            owners = {
                r["lease_owner"]
                for r in mongo.processing_requests.find({"_id": {"$in": ids}}, {"lease_owner": 1})
            }
            if None not in owners and len(owners) == 2:
                break
            assert time.monotonic() < deadline, f"not shared: {owners}"
            time.sleep(0.05)
        first.kill()  # mid-batch: its request must move to the other instance
    finally:
        first.stop()

    try:
        bodies = [wait_terminal_http(second.url, request_id, timeout=60) for request_id in ids]
        for body in bodies:
            assert body["status"] == "completed"
            assert body["progress"]["images_done"] == 12
            for url in (u for p in body["products"] for u in p["output_image_urls"]):
                served = requests.get(url.replace(first.url, second.url), timeout=5)
                assert served.status_code == 200  # from GridFS, whoever compressed it
                assert served.headers["Content-Type"] == "image/jpeg"
        assert all(hits[f"/m{i}.jpg"] >= 1 for i in range(24))
        assert mongo["images.files"].count_documents({}) == 24  # redone images overwrote

        deadline = time.monotonic() + 20
        while True:
            calls = [r for r, _ in webhook_receiver.log if r.path == "/hook"]
            if len({c.headers["webhook-id"] for c in calls}) == 2:
                break
            assert time.monotonic() < deadline, calls
            time.sleep(0.1)
        time.sleep(1.0)
        calls = [r for r, _ in webhook_receiver.log if r.path == "/hook"]
        ids_seen = Counter(c.headers["webhook-id"] for c in calls)
        assert set(ids_seen) == {f"msg_{i}" for i in ids}  # one logical event per request
        assert all(n == 1 for n in ids_seen.values()), ids_seen
    finally:
        second.stop()


def test_s3_outputs_outlive_the_instance_that_wrote_them(
    image_host: HTTPServer,
    s3: S3Server,
    s3_prefix: str,
    mongo_uri: str,
    db_name: str,
    tmp_path: Path,
) -> None:
    serve_slowly(image_host, [f"/o{i}.jpg" for i in range(12)], 0.05, make_image(500, 400))
    rows = [(n + 1, f"O{n}", [image_host.url_for(f"/o{n}.jpg")]) for n in range(12)]
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), **s3.env(S3_BUCKET, s3_prefix)}
    writer = start_gunicorn({**env, "IMGPROC_DATA_DIR": str(tmp_path / "a")}, tmp_path / "a.log")
    try:
        created = requests.post(
            f"{writer.url}/csv/upload", files={"file": ("p.csv", csv_bytes(rows))}, timeout=10
        )
        body = wait_terminal_http(writer.url, created.json()["request_id"], timeout=60)
        assert body["status"] == "completed"
        # Another instance, which never saw these images; then the writer dies.
        survivor = start_gunicorn(
            {**env, "IMGPROC_DATA_DIR": str(tmp_path / "b")}, tmp_path / "b.log"
        )
        writer.kill()
    finally:
        writer.stop()
    try:
        urls = [u for p in body["products"] for u in p["output_image_urls"]]
        assert len(urls) == 12 and all(u.startswith(f"{writer.url}/images/") for u in urls)
        assert s3.keys(S3_BUCKET, s3_prefix) == sorted(
            s3_prefix + u.removeprefix(f"{writer.url}/images/") for u in urls
        )
        client = s3.client()
        for url in urls:
            served = requests.get(url.replace(writer.url, survivor.url), timeout=5)
            assert served.status_code == 200, served.text
            assert served.headers["Content-Type"] == "image/jpeg"
            key = s3_prefix + url.removeprefix(f"{writer.url}/images/")
            stored = client.get_object(Bucket=S3_BUCKET, Key=key)
            assert served.content == stored["Body"].read()
            assert served.headers["ETag"] == stored["ETag"]
    finally:
        survivor.stop()
