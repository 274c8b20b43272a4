"""The worker end to end through the API: real images from a real host, real failures."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from imgproc import codec
from imgproc.documents import new_product, upload_part_id, upload_parts
from imgproc.models import ProductRow
from imgproc.worker import job
from tests.conftest import (
    csv_bytes,
    get_closed,
    make_image,
    serve,
    stored_request,
    upload,
    wait_terminal,
)


def submit(client: FlaskClient, rows: list[tuple[int, str, list[str]]], **fields: Any) -> str:
    response = upload(client, csv_bytes(rows), **fields)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["request_id"])


def images_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [image for product in body["products"] for image in product["images"]]


def test_happy_path_compresses_every_image(
    client: FlaskClient, image_host: HTTPServer, mongo: Any
) -> None:
    originals = {f"/p{i}.jpg": make_image(900 + i * 10, 600) for i in range(5)}
    urls = [serve(image_host, path, data) for path, data in originals.items()]
    request_id = submit(
        client, [(1, "Shirt", urls[:2]), (2, "Shoe", urls[2:4]), (3, "Hat", urls[4:])]
    )

    body = wait_terminal(client, request_id)

    assert body["status"] == "completed"
    assert body["completed_at"] is not None
    assert body["progress"] == {
        "products_total": 3,
        "products_done": 3,
        "images_total": 5,
        "images_done": 5,
        "images_failed": 0,
        "percent": 100.0,
    }
    assert [p["status"] for p in body["products"]] == ["processed"] * 3
    for product in body["products"]:
        assert product["output_image_urls"] == [i["output_url"] for i in product["images"]]
        assert product["input_image_urls"] == [i["input_url"] for i in product["images"]]
    for image, (path, original) in zip(images_of(body), originals.items(), strict=True):
        assert image["input_url"].endswith(path)
        assert image["status"] == "done" and image["error"] is None
        served = get_closed(client, image["output_url"])
        assert served.status_code == 200
        assert served.mimetype == "image/jpeg"
        decoded = Image.open(io.BytesIO(served.data))
        assert decoded.format == "JPEG"
        assert decoded.size == Image.open(io.BytesIO(original)).size
        assert (image["width"], image["height"]) == decoded.size
        assert image["input_bytes"] == len(original)
        assert image["output_bytes"] == len(served.data) < len(original)
        assert image["format"] == "JPEG"
    request = mongo.processing_requests.find_one({"_id": request_id})
    assert request["lease_owner"] is None  # released at the end


def test_one_failure_never_fails_its_neighbours(
    client: FlaskClient, image_host: HTTPServer
) -> None:
    good = serve(image_host, "/good.jpg", make_image())
    missing = image_host.url_for("/missing.jpg")  # no handler: the host answers 500
    image_host.expect_request("/gone.jpg").respond_with_data("gone", status=404)
    gone = image_host.url_for("/gone.jpg")
    text = serve(image_host, "/page.jpg", b"<html>not an image</html>", "image/jpeg")
    truncated = serve(image_host, "/cut.jpg", make_image()[:2000])
    request_id = submit(
        client,
        [
            (1, "Mixed", [good, gone, text, truncated]),
            (2, "Fine", [good]),
            (3, "Broken", [missing]),
        ],
    )

    body = wait_terminal(client, request_id)

    assert body["status"] == "completed_with_errors"
    mixed, fine, broken = body["products"]
    assert [i["status"] for i in mixed["images"]] == ["done", "failed", "failed", "failed"]
    errors = [i["error"] for i in mixed["images"]]
    assert errors[0] is None
    assert errors[1] == "HTTP 404"
    assert errors[2] == "not an image, or an unsupported image format"
    assert errors[3].startswith("truncated or corrupt image")
    assert mixed["status"] == "failed"
    assert mixed["output_image_urls"][0] is not None
    assert mixed["output_image_urls"][1:] == [None, None, None]
    assert fine["status"] == "processed"
    assert broken["images"][0]["error"] == "HTTP 500"
    assert body["progress"]["images_done"] == 2 and body["progress"]["images_failed"] == 4


def test_all_failed_is_failed(client: FlaskClient, image_host: HTTPServer) -> None:
    image_host.expect_request("/x.jpg").respond_with_data("no", status=404)
    request_id = submit(client, [(1, "A", [image_host.url_for("/x.jpg")])])
    body = wait_terminal(client, request_id)
    assert body["status"] == "failed"
    assert body["products"][0]["status"] == "failed"


def test_5xx_then_ok_is_retried(client: FlaskClient, image_host: HTTPServer) -> None:
    image_host.expect_oneshot_request("/flaky.jpg").respond_with_data("busy", status=503)
    image_host.expect_oneshot_request("/flaky.jpg").respond_with_data("busy", status=502)
    url = serve(image_host, "/flaky.jpg", make_image())
    body = wait_terminal(client, submit(client, [(1, "A", [url])]))
    assert body["status"] == "completed"
    hits = [r for r, _ in image_host.log if r.path == "/flaky.jpg"]
    assert len(hits) == 3


def test_4xx_is_not_retried(client: FlaskClient, image_host: HTTPServer) -> None:
    image_host.expect_request("/forbidden.jpg").respond_with_data("no", status=403)
    body = wait_terminal(client, submit(client, [(1, "A", [image_host.url_for("/forbidden.jpg")])]))
    assert body["products"][0]["images"][0]["error"] == "HTTP 403"
    assert len([r for r, _ in image_host.log if r.path == "/forbidden.jpg"]) == 1


def test_5xx_gives_up_after_three_attempts(client: FlaskClient, image_host: HTTPServer) -> None:
    image_host.expect_request("/down.jpg").respond_with_data("down", status=503)
    body = wait_terminal(client, submit(client, [(1, "A", [image_host.url_for("/down.jpg")])]))
    assert body["products"][0]["images"][0]["error"] == "HTTP 503"
    assert len([r for r, _ in image_host.log if r.path == "/down.jpg"]) == 3


def test_a_worker_whose_plugins_fail_to_load_ahead_still_compresses(
    make_app: Callable[..., Flask], image_host: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the image plugins before the first claim is a head start, not a condition:
    when it fails the worker starts anyway and the images are loaded as they come."""

    def broken() -> None:
        raise OSError("no such plugin")

    monkeypatch.setattr(codec, "warm_up", broken)
    client = make_app().test_client()
    url = serve(image_host, "/plain.jpg", make_image(300, 200))
    body = wait_terminal(client, submit(client, [(1, "A", [url])]))
    assert body["status"] == "completed"


def test_the_finished_images_are_written_while_the_last_one_is_still_coming(
    client: FlaskClient, image_host: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near its end a request's finished images are written once as many wait as are still
    coming, not after the flush interval, so the last write (which the finish waits for)
    stays small. With the interval out of reach, three images of four show done while the
    fourth is held at its origin."""
    monkeypatch.setattr(job, "FLUSH_SECONDS", 3600.0)
    release = threading.Event()

    def held(request: Request) -> Response:
        release.wait(10)
        return Response(make_image(300, 200), content_type="image/jpeg")

    image_host.expect_request("/held.jpg").respond_with_handler(held)
    fast = [serve(image_host, f"/f{i}.jpg", make_image(320 + i, 200)) for i in range(3)]
    rows = [(1, "A", fast[:2]), (2, "B", [fast[2], image_host.url_for("/held.jpg")])]
    try:
        request_id = submit(client, rows)
        deadline = time.monotonic() + 8
        while True:
            body = client.get(f"/csv/status/{request_id}").get_json()
            if body["progress"]["images_done"] == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert body["status"] == "processing"
        assert (body["progress"]["images_done"], body["progress"]["products_done"]) == (3, 1)
    finally:
        release.set()
    body = wait_terminal(client, request_id)
    assert body["status"] == "completed" and body["progress"]["images_done"] == 4


def test_slow_host_times_out(make_app: Callable[..., Flask], image_host: HTTPServer) -> None:
    client = make_app(read_timeout=0.3).test_client()

    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response(make_image(), content_type="image/jpeg")

    image_host.expect_request("/slow.jpg").respond_with_handler(slow)
    fast = serve(image_host, "/fast.jpg", make_image())
    body = wait_terminal(
        client, submit(client, [(1, "A", [image_host.url_for("/slow.jpg"), fast])])
    )
    slow_image, fast_image = body["products"][0]["images"]
    assert slow_image["error"] == "timeout reading from the host"
    assert fast_image["status"] == "done"


def test_slow_drip_hits_the_total_deadline(
    make_app: Callable[..., Flask], image_host: HTTPServer
) -> None:
    client = make_app(read_timeout=2.0, download_deadline=1.0).test_client()
    data = make_image()

    def drip(_request: Request) -> Response:
        def body() -> Any:
            for start in range(0, len(data), 100):
                time.sleep(0.1)  # each read is quick; the whole download is not
                yield data[start : start + 100]

        return Response(body(), content_type="image/jpeg")

    image_host.expect_request("/drip.jpg").respond_with_handler(drip)
    started = time.monotonic()
    body = wait_terminal(client, submit(client, [(1, "A", [image_host.url_for("/drip.jpg")])]))
    assert body["products"][0]["images"][0]["error"] == "download took longer than 1 s"
    assert time.monotonic() - started < 10


def test_byte_cap_while_streaming(make_app: Callable[..., Flask], image_host: HTTPServer) -> None:
    client = make_app(max_image_bytes=10_000).test_client()
    big = make_image(2000, 2000)
    declared = serve(image_host, "/big.jpg", big)

    def undeclared(_request: Request) -> Response:
        return Response(
            iter([big[i : i + 4096] for i in range(0, len(big), 4096)]), content_type="image/jpeg"
        )  # chunked: no Content-Length

    image_host.expect_request("/stream.jpg").respond_with_handler(undeclared)
    body = wait_terminal(
        client, submit(client, [(1, "A", [declared, image_host.url_for("/stream.jpg")])])
    )
    errors = [i["error"] for i in body["products"][0]["images"]]
    assert errors == ["too large (over 9.77 KiB)", "too large (over 9.77 KiB)"]


def test_decompression_bomb_is_refused(
    make_app: Callable[..., Flask], image_host: HTTPServer
) -> None:
    client = make_app(max_pixels=1_000_000).test_client()
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, "PNG", optimize=True)  # 16 Mpx in a few KiB
    url = serve(image_host, "/bomb.png", bomb.getvalue(), "image/png")
    body = wait_terminal(client, submit(client, [(1, "A", [url])]))
    assert body["products"][0]["images"][0]["error"] == (
        "too many pixels: 4000x4000 is over the limit of 1,000,000 pixels"
    )


def test_redirects_are_followed_up_to_five(client: FlaskClient, image_host: HTTPServer) -> None:
    serve(image_host, "/final.jpg", make_image())
    for i in range(6):
        target = "/final.jpg" if i == 0 else f"/hop{i - 1}"
        image_host.expect_request(f"/hop{i}").respond_with_data(
            "", status=302, headers={"Location": target}
        )
    body = wait_terminal(
        client,
        submit(
            client,
            [(1, "Five", [image_host.url_for("/hop4")]), (2, "Six", [image_host.url_for("/hop5")])],
        ),
    )
    five, six = body["products"]
    assert five["images"][0]["status"] == "done"
    assert six["images"][0]["error"] == "more than 5 redirects"


def test_quality_and_format_options(client: FlaskClient, image_host: HTTPServer) -> None:
    url = serve(image_host, "/q.jpg", make_image(800, 600))
    low = wait_terminal(client, submit(client, [(1, "A", [url])], quality="10"))
    high = wait_terminal(client, submit(client, [(1, "A", [url])], quality="90"))
    webp = wait_terminal(client, submit(client, [(1, "A", [url])], output_format="webp"))
    assert images_of(low)[0]["output_bytes"] < images_of(high)[0]["output_bytes"]
    assert images_of(webp)[0]["format"] == "WEBP"
    served = get_closed(client, images_of(webp)[0]["output_url"])
    assert served.mimetype == "image/webp"


def test_an_upload_in_several_parts_is_expanded_as_it_is_processed(
    make_app: Callable[..., Flask], image_host: HTTPServer, mongo: Any
) -> None:
    """A big upload's products arrive in several parts (about 4 MB each); the worker
    expands them as it feeds, the status shows every product meanwhile, and the parts are
    gone once every product is in. Here six products in two parts, as upload_parts makes
    them for thousands."""
    app = make_app()
    client = app.test_client()
    store = app.extensions["imgproc"].store
    request_id = str(uuid.uuid4())
    urls = [serve(image_host, f"/part{n}.jpg", make_image(200 + n, 100)) for n in range(6)]
    rows = [ProductRow(n + 2, n + 1, f"P{n}", [urls[n]]) for n in range(6)]
    products = [new_product(request_id, n, row) for n, row in enumerate(rows)]
    first, second = upload_parts(request_id, products[:3]), upload_parts(request_id, products[3:])
    second[0]["_id"] = upload_part_id(request_id, 1)
    request = stored_request(request_id, store.clock(), products, parts=2)
    store.create_request(request, first + second)
    app.extensions["imgproc"].worker.wake()

    body = wait_terminal(client, request_id)
    assert body["status"] == "completed"
    assert [p["product_name"] for p in body["products"]] == [f"P{n}" for n in range(6)]
    assert [(i["width"], i["height"]) for i in images_of(body)] == [
        (200 + n, 100) for n in range(6)
    ]
    assert mongo.products.count_documents({"request_id": request_id}) == 6
    assert mongo.upload_parts.count_documents({}) == 0
    assert mongo.processing_requests.find_one({"_id": request_id})["parts"] == 0
