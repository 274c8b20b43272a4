"""Fixtures: a real MongoDB wire-protocol server for the session (embedded SecantusDB unless
MONGODB_URI is set), a fresh database per test, the app with its real worker, a real HTTP
image host and a real webhook receiver on loopback. Nothing is mocked."""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import hypothesis
import pymongo
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageDraw
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from imgproc import create_app, embedded_db
from imgproc.documents import Doc, new_request
from tests.s3server import S3Server

# Hypothesis explores new examples on every local run (that is how it finds bugs), but CI
# replays a fixed set, so a red CI run is a regression, never a newly drawn example.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    hypothesis.settings.load_profile("ci")

TERMINAL = ("completed", "completed_with_errors", "failed")
S3_BUCKET = "imgproc"
S3_PUBLIC_BUCKET = "imgproc-public"  # anyone may read it: the stand-in for a CDN


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB server for the whole session; a failure to start fails the tests."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    base = tmp_path_factory.mktemp("mongo")
    db = embedded_db.start(str(base / "db"), log_path=str(base / "secantusd.log"))
    try:
        yield db.uri
    finally:
        db.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS) for the session, started by the first test
    that asks for it; a failure to start fails the tests."""
    server = S3Server.start(
        tmp_path_factory.mktemp("s3"), buckets=(S3_BUCKET,), public_buckets=(S3_PUBLIC_BUCKET,)
    )
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, its credentials in this process's standard AWS variables."""
    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_prefix() -> str:
    """A key prefix of one test's own in the shared buckets."""
    return f"test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def s3_settings(s3: S3Server, s3_prefix: str) -> dict[str, Any]:
    """Settings overrides for an app storing its outputs in the session's S3 bucket."""
    return {
        "storage": "s3",
        "s3_bucket": S3_BUCKET,
        "s3_endpoint_url": s3.endpoint,
        "s3_prefix": s3_prefix,
    }


@pytest.fixture
def db_name(mongo_uri: str) -> Iterator[str]:
    """A fresh database name for one test, dropped afterwards."""
    name = f"imgproc_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri)
    client.drop_database(name)
    client.close()


@pytest.fixture
def mongo(mongo_uri: str, db_name: str) -> Iterator[pymongo.database.Database[dict[str, Any]]]:
    """Direct access to the test database, to check what was (not) stored."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_uri, tz_aware=True)
    yield client[db_name]
    client.close()


@pytest.fixture
def settings(mongo_uri: str, db_name: str, tmp_path: Any) -> dict[str, Any]:
    """Settings for a test app: fast polling, short leases, private URLs allowed."""
    return {
        "mongodb_uri": mongo_uri,
        "db_name": db_name,
        "data_dir": str(tmp_path / "data"),
        "allow_private_urls": True,
        "poll_seconds": 0.1,
        "lease_seconds": 10.0,
        "fetch_backoff": 0.05,
        "downloads": 8,
        "shutdown_grace_seconds": 5.0,
    }


@pytest.fixture
def make_app(settings: dict[str, Any]) -> Iterator[Callable[..., Flask]]:
    """Build apps with overrides; their workers are stopped after the test."""
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app({**settings, **overrides})
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["imgproc"].close(grace=5)


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    """The app with its worker running."""
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of :func:`app`."""
    return app.test_client()


# ---- images and hosts --------------------------------------------------------------------


def make_image(
    width: int = 640, height: int = 480, fmt: str = "JPEG", mode: str = "RGB", **save: Any
) -> bytes:
    """A generated image with some structure (so compression has work to do)."""
    image = Image.new(mode, (width, height), "white" if mode != "RGBA" else (255, 255, 255, 0))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 16):
        fill: Any = (i % 256, (i * 3) % 256, 200) if mode in ("RGB", "RGBA") else i % 256
        if mode == "RGBA":
            fill = (*fill, 255)
        draw.rectangle((i, 0, i + 8, height), fill=fill)
    draw.ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=None, width=5)
    out = io.BytesIO()
    if fmt == "JPEG":
        save.setdefault("quality", 95)
    image.save(out, fmt, **save)
    return out.getvalue()


def _server() -> HTTPServer:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    return server


@pytest.fixture(scope="session")
def _image_server() -> Iterator[HTTPServer]:
    server = _server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _webhook_server() -> Iterator[HTTPServer]:
    server = _server()
    yield server
    server.stop()


@pytest.fixture
def image_host(_image_server: HTTPServer) -> Iterator[HTTPServer]:
    """A real threaded HTTP server on loopback; tests register the images it serves."""
    yield _image_server
    _image_server.clear()


@pytest.fixture
def webhook_receiver(_webhook_server: HTTPServer) -> Iterator[HTTPServer]:
    """A second real HTTP server that records the webhook calls it gets."""
    yield _webhook_server
    _webhook_server.clear()


def serve(host: HTTPServer, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
    """Serve ``data`` at ``path`` on ``host``; its absolute URL."""
    host.expect_request(path).respond_with_data(data, content_type=content_type)
    return host.url_for(path)


# ---- API helpers -------------------------------------------------------------------------


def csv_bytes(rows: list[tuple[int, str, list[str]]], header: str | None = None) -> bytes:
    """A CSV of (serial, name, urls) rows."""
    lines = [header or "S. No.,Product Name,Input Image Urls"]
    for serial, name, urls in rows:
        lines.append(f'{serial},{name},"{",".join(urls)}"')
    return ("\n".join(lines) + "\n").encode()


def upload(client: FlaskClient, data: bytes, path: str = "/csv/upload", **fields: Any) -> Any:
    """POST a CSV as multipart/form-data."""
    form = {"file": (io.BytesIO(data), "products.csv"), **fields}
    return client.post(path, data=form, content_type="multipart/form-data")


def wait_terminal(client: FlaskClient, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the status until the request is terminal; fail the test at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/csv/status/{request_id}").get_json()
        if body["status"] in TERMINAL:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"request {request_id} still {body['status']} after {timeout}s: {body}")
        time.sleep(0.05)


def get_closed(client: FlaskClient, url: str, **kwargs: Any) -> Any:
    """GET ``url`` (absolute or a path) and close the response (file bodies hold a handle)."""
    path = url.removeprefix("http://localhost")
    response = client.get(path, **kwargs)
    response.get_data()
    response.close()
    return response


def serve_slowly(
    host: HTTPServer, paths: list[str], delay: float, image: bytes | None = None
) -> Counter[str]:
    """Serve a JPEG at each path after ``delay`` seconds; the live count of hits per path."""
    data = image if image is not None else make_image(300, 200)
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    def slow(request: Request) -> Response:
        with lock:
            hits[request.path] += 1
        time.sleep(delay)
        return Response(data, content_type="image/jpeg")

    for path in paths:
        host.expect_request(path).respond_with_handler(slow)
    return hits


def stored_request(request_id: str, now: datetime, products: list[Doc], *, parts: int) -> Doc:
    """The request an upload of the standard columns stores for ``products`` (already
    split into ``parts`` upload parts)."""
    return new_request(
        request_id,
        now,
        products_total=len(products),
        images_total=sum(len(product["images"]) for product in products),
        quality=50,
        output_format="auto",
        webhook_url=None,
        header=["S. No.", "Product Name", "Input Image Urls"],
        roles={"serial_number": 0, "product_name": 1, "input_urls": 2},
        base_url="http://localhost",
        owner=None,
        parts=parts,
    )
