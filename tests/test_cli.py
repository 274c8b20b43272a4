"""``python -m imgproc submit`` and ``status`` against a real running service."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, make_image, serve
from tests.processes import ROOT, Service, start_gunicorn
from tests.test_worker_recovery import service_env


@pytest.fixture
def service(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[Service]:
    running = start_gunicorn(service_env(mongo_uri, db_name, tmp_path / "data"), tmp_path / "log")
    yield running
    running.stop()


def imgproc(*args: str, cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgproc", *args, "--url", url],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_submit_wait_shows_progress_and_a_summary_and_saves_the_output_csv(
    service: Service, image_host: HTTPServer, tmp_path: Path
) -> None:
    urls = [serve(image_host, f"/c{i}.jpg", make_image(800, 600)) for i in range(3)]
    image_host.expect_request("/gone.jpg").respond_with_data("no", status=404)
    products = tmp_path / "products.csv"
    products.write_bytes(
        csv_bytes([(1, "Shirt", urls[:2]), (2, "Shoe", [urls[2], image_host.url_for("/gone.jpg")])])
    )
    result = imgproc("submit", str(products), "--wait", cwd=tmp_path, url=service.url)
    assert result.returncode == 2, result.stderr  # finished, with a failed image
    out = result.stdout
    request_id = out.split()[1]
    assert f"request {request_id} accepted: 2 products, 4 images" in out
    assert "100.0%  4/4 images, 1 failed  completed_with_errors" in out  # the bar's last state
    assert "images done    3" in out and "images failed  1" in out
    assert "bytes saved" in out and "%)" in out
    assert f"Shoe: {image_host.url_for('/gone.jpg')}: HTTP 404" in out
    saved = tmp_path / f"imgproc-{request_id}.csv"
    assert f"output CSV saved to {saved.name}" in out
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [row["Product Name"] for row in rows] == ["Shirt", "Shoe"]
    assert rows[0]["Output Image Urls"].count(f"{service.url}/images/") == 2

    shown = imgproc("status", request_id, cwd=tmp_path, url=service.url)
    assert shown.returncode == 2
    assert "completed_with_errors" in shown.stdout and "images done    3" in shown.stdout


def test_submit_without_wait_and_errors(service: Service, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_bytes(csv_bytes([(1, "A", ["https://a.example/1.jpg"])]))
    started = imgproc("submit", str(good), cwd=tmp_path, url=service.url)
    assert started.returncode == 0
    assert "accepted: 1 products, 1 images" in started.stdout
    assert "/csv/status/" in started.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("S. No.,Product Name,Input Image Urls\n1,,ftp://x/1.jpg\n")
    rejected = imgproc("submit", str(bad), cwd=tmp_path, url=service.url)
    assert rejected.returncode == 1
    assert "row 2, column 'Product Name'" in rejected.stderr
    assert "row 2, column 'Input Image Urls'" in rejected.stderr

    unknown = imgproc("status", "0" * 8, cwd=tmp_path, url=service.url)
    assert unknown.returncode == 1 and "not_found" in unknown.stderr
    missing = imgproc("submit", str(tmp_path / "nope.csv"), cwd=tmp_path, url=service.url)
    assert missing.returncode == 1 and "nope.csv" in missing.stderr
    down = imgproc("status", "x", cwd=tmp_path, url="http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the service" in down.stderr
