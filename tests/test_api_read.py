"""Status (with paging), output CSV, images, health and the one error shape."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Callable
from typing import Any

import pymongo.database
import pytest
from flask import Flask
from flask.testing import FlaskClient
from pytest_httpserver import HTTPServer

from imgproc import services as services_module
from imgproc.documents import product_id
from tests.conftest import csv_bytes, get_closed, make_image, serve, upload, wait_terminal
from tests.test_api_upload import assert_error


@pytest.fixture
def idle_client(make_app: Callable[..., Flask]) -> FlaskClient:
    """A client whose app runs no worker, so requests stay pending."""
    return make_app(start_worker=False).test_client()


def test_status_of_a_pending_request(idle_client: FlaskClient) -> None:
    rows = [
        (1, "SKU1", ["https://a.example/1.jpg", "https://a.example/2.jpg"]),
        (2, "SKU2", ["https://b.example/3.png"]),
    ]
    request_id = upload(idle_client, csv_bytes(rows)).get_json()["request_id"]
    for path in (f"/csv/status/{request_id}", f"/status/{request_id}"):
        body = idle_client.get(path).get_json()
        assert body["request_id"] == request_id
        assert body["status"] == "pending"
        assert body["created_at"].endswith("Z") and body["updated_at"].endswith("Z")
        assert body["completed_at"] is None
        assert body["progress"] == {
            "products_total": 2,
            "products_done": 0,
            "images_total": 3,
            "images_done": 0,
            "images_failed": 0,
            "percent": 0.0,
        }
        assert body["output_csv_url"] == f"http://localhost/csv/output/{request_id}"
        assert body["products_page"] == {"offset": 0, "limit": 1000, "total": 2}
        first = body["products"][0]
        assert first["serial_number"] == 1 and first["product_name"] == "SKU1"
        assert first["status"] == "pending"
        assert first["input_image_urls"] == ["https://a.example/1.jpg", "https://a.example/2.jpg"]
        assert first["output_image_urls"] == [None, None]
        assert first["images"][0] == {
            "input_url": "https://a.example/1.jpg",
            "output_url": None,
            "status": "pending",
            "error": None,
            "input_bytes": None,
            "output_bytes": None,
            "width": None,
            "height": None,
            "format": None,
            "kept_original": False,
        }


def test_status_paging(idle_client: FlaskClient) -> None:
    rows = [(i, f"P{i}", [f"https://a.example/{i}.jpg"]) for i in range(1, 8)]
    request_id = upload(idle_client, csv_bytes(rows)).get_json()["request_id"]
    body = idle_client.get(f"/csv/status/{request_id}?offset=2&limit=3").get_json()
    assert [p["serial_number"] for p in body["products"]] == [3, 4, 5]
    assert body["products_page"] == {"offset": 2, "limit": 3, "total": 7}
    body = idle_client.get(f"/csv/status/{request_id}?offset=6").get_json()
    assert [p["serial_number"] for p in body["products"]] == [7]
    for query, field in (
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
        ("limit=ten", "limit"),
    ):
        error = assert_error(
            idle_client.get(f"/csv/status/{request_id}?{query}"), 400, "invalid_field"
        )
        assert error["details"][0]["field"] == field


@pytest.mark.parametrize("request_id", [str(uuid.uuid4()), "not-a-uuid", "1' or '1'='1"])
def test_unknown_or_malformed_id_is_404(idle_client: FlaskClient, request_id: str) -> None:
    assert_error(idle_client.get(f"/csv/status/{request_id}"), 404, "not_found")
    assert_error(idle_client.get(f"/csv/output/{request_id}"), 404, "not_found")


def test_output_csv_not_ready_before_terminal(idle_client: FlaskClient) -> None:
    request_id = upload(idle_client, csv_bytes([(1, "A", ["https://a.example/1.jpg"])])).get_json()[
        "request_id"
    ]
    error = assert_error(idle_client.get(f"/csv/output/{request_id}"), 409, "not_ready")
    assert "pending" in error["message"]


def test_output_csv(client: FlaskClient, image_host: HTTPServer) -> None:
    good = serve(image_host, "/a.jpg", make_image())
    image_host.expect_request("/bad.jpg").respond_with_data("x", status=404)
    bad = image_host.url_for("/bad.jpg")
    text = (
        "Notes,Input Image Urls,S.No.,Product Name\r\n"
        f'"=HYPERLINK(""http://evil"")",{good},2,Plain\r\n'
        f'+cmd,"{good},{bad},{good}",1,@SUM(A1)\r\n'
    )
    request_id = upload(client, text.encode()).get_json()["request_id"]
    body = wait_terminal(client, request_id)
    response = client.get(f"/csv/output/{request_id}")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == ["Notes", "Input Image Urls", "S.No.", "Product Name", "Output Image Urls"]
    first, second = body["products"]
    assert rows[1] == [
        '\'=HYPERLINK("http://evil")',
        good,
        "2",
        "Plain",
        first["output_image_urls"][0],
    ]
    out = second["output_image_urls"]
    assert out[1] is None
    assert rows[2] == ["'+cmd", f"{good},{bad},{good}", "1", "'@SUM(A1)", f"{out[0]},,{out[2]}"]
    assert len(rows) == 3


@pytest.mark.parametrize("storage", ["local", "gridfs", "s3"])
def test_image_serving_headers(
    make_app: Callable[..., Flask],
    image_host: HTTPServer,
    storage: str,
    request: pytest.FixtureRequest,
) -> None:
    # SeaweedFS starts only for the s3 case.
    s3 = request.getfixturevalue("s3_settings") if storage == "s3" else {"storage": storage}
    client = make_app(**s3).test_client()
    url = serve(image_host, "/a.jpg", make_image())
    request_id = upload(client, csv_bytes([(1, "A", [url])])).get_json()["request_id"]
    image_url = wait_terminal(client, request_id)["products"][0]["output_image_urls"][0]
    response = get_closed(client, image_url)
    assert response.status_code == 200
    assert response.mimetype == "image/jpeg"
    assert response.headers["ETag"]
    assert "max-age=31536000" in response.headers["Cache-Control"]
    assert "public" in response.headers["Cache-Control"]
    again = get_closed(client, image_url, headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd",
        "/images/%2e%2e/secret.jpg",
        f"/images/{uuid.uuid4()}/2-0.jpg",
        "/images/x",
    ],
)
def test_unknown_images_are_404(idle_client: FlaskClient, path: str) -> None:
    assert_error(idle_client.get(path), 404, "not_found")


def test_json_errors_for_werkzeug_errors(idle_client: FlaskClient) -> None:
    assert_error(idle_client.get("/no/such/path"), 404, "not_found")
    response = idle_client.put("/csv/upload")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_exception_is_json_500_without_trace(make_app: Callable[..., Flask]) -> None:
    app = make_app(start_worker=False)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    error = assert_error(response, 500, "internal")
    assert "secret" not in response.get_data(as_text=True)
    assert error["message"] == "internal error"


def test_healthz(idle_client: FlaskClient) -> None:
    response = idle_client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "db": "ok"}


def test_healthz_and_upload_when_the_database_is_down(make_app: Callable[..., Flask]) -> None:
    from imgproc.embedded_db import free_port

    app = make_app(
        start_worker=False,
        db_timeout_ms=300,
        mongodb_uri=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
    )
    client = app.test_client()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "error", "db": "down"}
    rows = csv_bytes([(1, "A", ["https://a.example/1.jpg"])])
    error = assert_error(upload(client, rows), 503, "unavailable")
    assert "database" in error["message"]
    assert_error(client.get(f"/csv/status/{uuid.uuid4()}"), 503, "unavailable")


def test_recent_requests_newest_first_in_pages(idle_client: FlaskClient) -> None:
    ids = [
        upload(idle_client, csv_bytes([(1, f"SKU{n}", [f"https://a.example/{n}.jpg"])])).get_json()[
            "request_id"
        ]
        for n in range(5)
    ]
    first = idle_client.get("/csv/requests?limit=2").get_json()
    assert [r["request_id"] for r in first["requests"]] == ids[::-1][:2]
    line = first["requests"][0]
    assert line["status"] == "pending" and line["completed_at"] is None
    assert line["created_at"].endswith("Z")
    assert line["progress"]["images_total"] == 1
    assert line["status_url"] == f"http://localhost/csv/status/{ids[-1]}"
    seen = [r["request_id"] for r in first["requests"]]
    cursor = first["next"]
    while cursor:
        page = idle_client.get(f"/csv/requests?limit=2&before={cursor}").get_json()
        seen += [r["request_id"] for r in page["requests"]]
        cursor = page["next"]
    assert seen == ids[::-1]  # every request once, newest first, across pages
    assert idle_client.get("/csv/requests").get_json()["next"] is None  # default 50 > 5


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=201", "limit=x", "before=nonsense", "before=MTIzOmFiYw"]
)
def test_recent_requests_bad_query(idle_client: FlaskClient, query: str) -> None:
    error = assert_error(idle_client.get(f"/csv/requests?{query}"), 400, "invalid_field")
    assert error["details"][0]["field"] in ("limit", "before")


def claimed_and_fed(
    client: FlaskClient, mongo: pymongo.database.Database[dict[str, Any]], rows: list[Any]
) -> str:
    """Upload ``rows``, then do in the database what a worker does first: claim the
    request, expand its products from the upload and hand them all to the pipeline."""
    request_id: str = upload(client, csv_bytes(rows)).get_json()["request_id"]
    store = client.application.extensions["imgproc"].store
    store.insert_products(store.upload_part(request_id, 0)["products"])
    fed = len(rows)
    mongo.processing_requests.update_one(
        {"_id": request_id},
        {
            "$set": {"status": "processing", "parts": 0, "fed_rows": fed, "touched_rows": fed},
            "$inc": {"version": 1},
        },
    )
    return request_id


def test_a_status_page_shows_each_image_as_it_finishes_while_the_batch_runs(
    idle_client: FlaskClient,
    mongo: pymongo.database.Database[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a request is processed its page is rendered again as outcomes are written,
    and a render reads again only the products that may have changed: those whose images
    had not finished are asked for only once one of them has. Whichever way a product
    changes (its first image, its last, a failure), the page shows it."""
    monkeypatch.setattr(services_module, "RENDER_EVERY_SECONDS", 0.0)
    rows = [(n, f"SKU{n}", [f"https://a.example/{n}-{i}.jpg" for i in range(2)]) for n in (1, 2, 3)]
    request_id = claimed_and_fed(idle_client, mongo, rows)
    ids = [product_id(request_id, row) for row in range(3)]
    # Then outcomes one at a time, as a worker writes them.

    def write(product: str, sets: dict[str, Any]) -> None:
        mongo.products.update_one({"_id": product}, {"$set": sets})
        mongo.processing_requests.update_one({"_id": request_id}, {"$inc": {"version": 1}})

    def shown() -> list[tuple[str, list[str]]]:
        body = idle_client.get(f"/csv/status/{request_id}").get_json()
        return [(p["status"], [i["status"] for i in p["images"]]) for p in body["products"]]

    def eventually(expected: list[tuple[str, list[str]]]) -> None:
        deadline = time.monotonic() + 10
        while (seen := shown()) != expected:  # a poll may get the render before this one
            assert time.monotonic() < deadline, f"the page shows {seen}, not {expected}"
            time.sleep(0.02)

    working = ("processing", ["processing", "processing"])
    eventually([working, working, working])
    done = {"status": "done", "output_key": f"{request_id}/1-0.jpg", "output_bytes": 10}
    write(ids[1], {f"images.0.{k}": v for k, v in done.items()})
    eventually([working, ("processing", ["done", "processing"]), working])
    write(ids[2], {"images.1.status": "failed", "images.1.error": "HTTP 404"})
    eventually(
        [working, ("processing", ["done", "processing"]), ("processing", ["processing", "failed"])]
    )
    write(
        ids[1],
        {
            "images.1.status": "done",
            "images.1.output_key": f"{request_id}/1-1.jpg",
            "status": "processed",
        },
    )
    write(ids[0], {"images.0.status": "done", "images.0.output_key": f"{request_id}/0-0.jpg"})
    eventually(
        [
            ("processing", ["done", "processing"]),
            ("processed", ["done", "done"]),
            ("processing", ["processing", "failed"]),
        ]
    )
    body = idle_client.get(f"/csv/status/{request_id}").get_json()
    assert body["products"][1]["output_image_urls"] == [
        f"http://localhost/images/{request_id}/1-0.jpg",
        f"http://localhost/images/{request_id}/1-1.jpg",
    ]
    assert body["products"][2]["images"][1]["error"] == "HTTP 404"


def test_a_page_whose_render_is_slow_is_rendered_less_often_while_its_head_stays_fresh(
    idle_client: FlaskClient,
    mongo: pymongo.database.Database[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Renders take a bounded share of the time: after a render that took long against
    that share, polls get its list (and the head of the moment) until the time is up,
    then the newer state."""
    monkeypatch.setattr(services_module, "RENDER_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(services_module, "RENDER_SHARE", 1e-9)  # every render is slow
    rows = [(n, f"SKU{n}", [f"https://a.example/{n}.jpg"]) for n in (1, 2)]
    request_id = claimed_and_fed(idle_client, mongo, rows)

    def shown() -> tuple[int, list[str]]:
        body = idle_client.get(f"/csv/status/{request_id}").get_json()
        return body["progress"]["images_done"], [p["images"][0]["status"] for p in body["products"]]

    assert shown() == (0, ["processing", "processing"])
    mongo.products.update_one(
        {"_id": product_id(request_id, 0)},
        {"$set": {"images.0.status": "done", "images.0.output_key": f"{request_id}/0-0.jpg"}},
    )
    mongo.processing_requests.update_one(
        {"_id": request_id}, {"$inc": {"version": 1, "images_done": 1}}
    )
    for _ in range(20):
        assert shown() == (1, ["processing", "processing"])
        time.sleep(0.01)
    monkeypatch.setattr(services_module, "RENDER_SHARE", 0.1)  # the time is up
    deadline = time.monotonic() + 10
    while (seen := shown()) != (1, ["done", "processing"]):
        assert time.monotonic() < deadline, f"the page shows {seen}"
        time.sleep(0.02)
