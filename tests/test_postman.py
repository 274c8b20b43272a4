"""The Postman collection, run by newman against a real gunicorn service: every request's
``pm.test`` assertions must pass. newman comes from ``tests/tools`` (``make test`` installs it
with npm)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pytest_httpserver import HTTPServer

from tests.conftest import make_image, serve_slowly
from tests.processes import ROOT, start_gunicorn
from tests.test_worker_recovery import service_env

POSTMAN = ROOT / "postman"
NEWMAN = ROOT / "tests" / "tools" / "node_modules" / ".bin" / "newman"
SAMPLE_HOST = "https://picsum.photos"


def newman() -> str:
    if not NEWMAN.exists():
        pytest.fail("newman is not installed: run `make test-tools` (make test does)")
    return str(NEWMAN)


def collection_requests(items: list[dict[str, object]]) -> list[str]:
    names: list[str] = []
    for item in items:
        children = item.get("item")
        names += (
            collection_requests(children) if isinstance(children, list) else [str(item["name"])]
        )
    return names


def test_the_collection_covers_every_endpoint_of_the_contract() -> None:
    collection = json.loads((POSTMAN / "imgproc.postman_collection.json").read_text())
    assert collection["info"]["schema"].endswith("/v2.1.0/collection.json")
    covered = set()

    def walk(items: list[dict[str, object]]) -> None:
        for item in items:
            if "item" in item:
                walk(item["item"])  # type: ignore[arg-type]
            else:
                request = item["request"]
                url = request["url"]  # type: ignore[index]
                raw = url if isinstance(url, str) else url["raw"]
                covered.add((request["method"], raw.split("?")[0]))  # type: ignore[index]

    walk(collection["item"])
    for endpoint in [
        ("POST", "{{baseUrl}}/csv/upload"),
        ("POST", "{{baseUrl}}/upload/"),
        ("GET", "{{baseUrl}}/csv/status/{{requestId}}"),
        ("GET", "{{baseUrl}}/status/{{requestId}}"),
        ("GET", "{{baseUrl}}/csv/requests"),
        ("GET", "{{baseUrl}}/csv/output/{{requestId}}"),
        ("GET", "{{outputImageUrl}}"),
        ("GET", "{{baseUrl}}/healthz"),
        ("GET", "{{baseUrl}}/metrics"),
        ("GET", "{{baseUrl}}/openapi.json"),
    ]:
        assert endpoint in covered


def test_newman_runs_the_collection_green(
    image_host: HTTPServer, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    # The sample CSV as shipped, its image host swapped for the local one.
    sample = (POSTMAN / "sample_products.csv").read_text()
    cells = set(sample.replace('"', "").replace("\n", ",").split(","))
    paths = sorted(urlsplit(url).path for url in cells if url.startswith(SAMPLE_HOST))
    serve_slowly(image_host, paths, 0.5, make_image(1200, 900))  # slow enough to poll a while
    work = tmp_path / "postman"
    work.mkdir()
    (work / "sample_products.csv").write_text(
        sample.replace(SAMPLE_HOST, image_host.url_for("").rstrip("/"))
    )
    shutil.copy(POSTMAN / "bad_products.csv", work / "bad_products.csv")
    service = start_gunicorn(service_env(mongo_uri, db_name, tmp_path / "data"), tmp_path / "log")
    report = tmp_path / "newman.json"
    try:
        run = subprocess.run(
            [
                newman(),
                "run",
                str(POSTMAN / "imgproc.postman_collection.json"),
                "--environment",
                str(POSTMAN / "imgproc.postman_environment.json"),
                "--env-var",
                f"baseUrl={service.url}",
                "--working-dir",
                str(work),
                "--reporters",
                "cli,json",
                "--reporter-json-export",
                str(report),
                "--color",
                "off",
                "--disable-unicode",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        service.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())["run"]
    assert summary["failures"] == []
    stats = summary["stats"]
    assert stats["assertions"]["failed"] == 0
    assert stats["assertions"]["total"] >= 20
    executed = [execution["item"]["name"] for execution in summary["executions"]]
    collection = json.loads((POSTMAN / "imgproc.postman_collection.json").read_text())
    assert set(executed) == set(collection_requests(collection["item"]))
    assert executed.count("Poll the status until it has ended") > 1  # it polled
