"""GET /openapi.json: a valid OpenAPI document of every route, matching real responses."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import validate
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, make_image, serve, upload, wait_terminal


def spec_of(client: FlaskClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()  # type: ignore[no-any-return]


def check(spec: dict[str, Any], name: str, body: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


def test_document_is_valid_openapi(client: FlaskClient) -> None:
    spec = spec_of(client)
    assert spec["openapi"].startswith("3.")
    validate(spec)


def test_every_route_is_documented(app: Flask, client: FlaskClient) -> None:
    spec = spec_of(client)
    routes = {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented
    assert ("/csv/upload", "post") in documented and (
        "/csv/status/{request_id}",
        "get",
    ) in documented


def test_real_responses_match_the_document(client: FlaskClient, image_host: HTTPServer) -> None:
    spec = spec_of(client)
    url = serve(image_host, "/a.jpg", make_image())
    image_host.expect_request("/b.jpg").respond_with_data("x", status=404)
    created = upload(client, csv_bytes([(1, "A", [url, image_host.url_for("/b.jpg")])]))
    check(spec, "Created", created.get_json())
    check(spec, "Status", client.get(f"/csv/status/{created.get_json()['request_id']}").get_json())
    check(spec, "Status", wait_terminal(client, created.get_json()["request_id"]))
    check(spec, "Error", client.get("/csv/status/nope").get_json())
    check(spec, "Error", upload(client, b"bad").get_json())
    check(spec, "Health", client.get("/healthz").get_json())
    check(spec, "RequestList", client.get("/csv/requests").get_json())
