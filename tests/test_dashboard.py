"""The dashboard at ``/`` in a real headless Chromium (Debian's, driven by Playwright) against
a real gunicorn service: upload, live progress, thumbnails, errors. Screenshots are saved
in ``test-artifacts/`` (or ``$IMGPROC_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pytest_httpserver import HTTPServer

from tests.conftest import csv_bytes, make_image, serve, serve_slowly
from tests.processes import ROOT, Service, start_gunicorn
from tests.test_worker_recovery import service_env

ARTIFACTS = Path(os.environ.get("IMGPROC_TEST_ARTIFACTS", ROOT / "test-artifacts"))
# Chromium's own calls home are refused on a closed network; they only slow it down.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail(
            "Chromium is not installed: run tests/tools/install-browser.sh (make test does)"
        )
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def service(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[Service]:
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_LEASE_SECONDS": "30"}
    running = start_gunicorn(env, tmp_path / "service.log")
    yield running
    running.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(str(error)))
    yield opened
    context.close()
    assert not problems, f"JavaScript errors on the page: {problems}"


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def choose_csv(page: Page, tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    page.set_input_files("#file", str(path))


def test_upload_progress_thumbnails_and_output_csv(
    page: Page, service: Service, image_host: HTTPServer, tmp_path: Path
) -> None:
    slow = [f"/slow{i}.jpg" for i in range(4)]
    serve_slowly(image_host, slow, 0.4, make_image(900, 600))
    quick = serve(image_host, "/quick.png", make_image(640, 480, fmt="PNG"), "image/png")
    image_host.expect_request("/missing.jpg").respond_with_data("gone", status=404)
    urls = [image_host.url_for(p) for p in slow]
    rows = [
        (1, "Linen shirt", urls[:2]),
        (2, "Canvas shoe", [urls[2], image_host.url_for("/missing.jpg")]),
        (3, "Wool scarf", [urls[3], quick]),
    ]
    page.goto(service.url + "/")
    expect(page.locator("#recent-empty")).to_be_visible()  # nothing uploaded yet
    choose_csv(page, tmp_path, "catalogue.csv", csv_bytes(rows))
    expect(page.locator("#file-label")).to_contain_text("catalogue.csv")
    page.fill("#quality", "60")
    page.select_option("#output_format", "jpeg")
    page.click("#upload-button")

    # The request page opens at once and follows the batch live.
    expect(page.locator("#request-view")).to_be_visible()
    status = page.locator("#req-status")
    expect(status).to_have_attribute("data-status", re.compile("^(pending|processing)$"))
    expect(status).to_have_attribute("data-status", "completed_with_errors", timeout=30_000)
    expect(page.locator("#req-bar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#products > li")).to_have_count(3)

    # Before and after side by side, both actually loaded, with sizes and savings.
    done = page.locator(".image.done")
    expect(done).to_have_count(5)
    page.wait_for_function(
        "[...document.querySelectorAll('.image.done img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    first = done.first
    expect(first.locator(".after figcaption")).to_contain_text("900×600 JPEG")
    expect(first.locator(".after .saving")).to_have_text(re.compile(r"^−\d+%$"))
    failed = page.locator(".image.failed")
    expect(failed).to_have_count(1)
    expect(failed.locator(".reason")).to_have_text("HTTP 404")
    expect(page.locator("[data-serial='2'] .badge")).to_have_text("failed")
    expect(page.locator("#req-facts")).to_contain_text("Saved")
    csv_link = page.locator("#req-csv")
    expect(csv_link).not_to_have_class("disabled")
    screenshot(page, "dashboard-request")

    with page.expect_download() as download:
        csv_link.click()
    saved = tmp_path / "out.csv"
    download.value.save_as(saved)
    assert "Output Image Urls" in saved.read_text().splitlines()[0]

    # The list of recent requests shows it, finished, with a full bar.
    page.click("text=← All requests")
    item = page.locator("#recent li").first
    expect(item.locator(".badge")).to_have_attribute("data-status", "completed_with_errors")
    expect(item.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "100")
    expect(item).to_contain_text("6 of 6 images, 1 failed")
    screenshot(page, "dashboard-home")


def test_a_bad_csv_shows_every_problem_by_row(page: Page, service: Service, tmp_path: Path) -> None:
    page.goto(service.url + "/")
    bad = (
        b"S. No.,Product Name,Input Image Urls\n1,,https://a.example/1.jpg\n"
        b"2,B,ftp://x/y.jpg\n2,C,https://a.example/3.jpg\n"
    )
    choose_csv(page, tmp_path, "broken.csv", bad)
    page.click("#upload-button")
    box = page.locator("#upload-error")
    expect(box).to_be_visible()
    expect(box.locator("strong")).to_contain_text("CSV")
    rows = box.locator("tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("2Product Namemust not be empty")
    expect(rows.nth(1)).to_contain_text("ftp://x/y.jpg")
    expect(rows.nth(2)).to_contain_text("4")
    expect(page.locator("#home-view")).to_be_visible()  # nothing was created: still here
    expect(page.locator("#recent-empty")).to_be_visible()
    screenshot(page, "dashboard-error")


def test_asks_for_the_api_key_when_the_service_needs_one(
    page: Page, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    key = "dashboard-key-0123456789"
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_API_KEYS": key}
    keyed = start_gunicorn(env, tmp_path / "keyed.log")
    try:
        page.goto(keyed.url + "/")
        expect(page.locator("#key-form")).to_be_visible()  # the list answered 401
        page.fill("#api-key", key)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#recent-empty")).to_be_visible()
        choose_csv(page, tmp_path, "one.csv", csv_bytes([(1, "A", ["https://a.example/1.jpg"])]))
        page.click("#upload-button")
        expect(page.locator("#request-view")).to_be_visible()
        expect(page.locator("#req-id")).not_to_be_empty()
    finally:
        keyed.stop()
