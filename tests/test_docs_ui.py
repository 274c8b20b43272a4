"""``/docs`` in a real headless Chromium (Debian's, driven by Playwright) against a real
gunicorn service: Swagger UI lists every operation of /openapi.json, "Try it out" works, the
API key goes with the calls when keys are on, and no request leaves the service's origin
(every asset is served locally; anything else would be aborted and fail the test)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from flask import Flask
from playwright.sync_api import Browser, Locator, Page, Route, expect

from tests.processes import Service, start_gunicorn
from tests.test_dashboard import browser, screenshot  # noqa: F401  (the module's browser)
from tests.test_worker_recovery import service_env

KEY = "docs-key-0123456789abcdef"


@dataclass
class Watched:
    """A page and what it asked for and complained about."""

    page: Page
    origin: str
    requests: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def watch(browser: Browser, origin: str) -> Iterator[Watched]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watched = Watched(page, origin)

    def route(target: Route) -> None:
        url = target.request.url
        watched.requests.append(url)
        if url == origin or url.startswith(origin + "/"):
            target.continue_()
        else:  # never sent: recorded and refused
            watched.outside.append(url)
            target.abort()

    context.route("**/*", route)
    page.on("pageerror", lambda error: watched.problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            watched.problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" or "Content Security Policy" in message.text
            else None
        ),
    )
    yield watched
    context.close()


@pytest.fixture
def service(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[Service]:
    running = start_gunicorn(service_env(mongo_uri, db_name, tmp_path / "data"), tmp_path / "s.log")
    yield running
    running.stop()


@pytest.fixture
def keyed_service(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[Service]:
    env = {**service_env(mongo_uri, db_name, tmp_path / "data"), "IMGPROC_API_KEYS": KEY}
    running = start_gunicorn(env, tmp_path / "keyed.log")
    yield running
    running.stop()


def listed_operations(page: Page) -> set[tuple[str, str]]:
    """(method, path) of every operation Swagger UI shows."""
    found = page.eval_on_selector_all(
        ".opblock",
        """blocks => blocks.map(b => [
            b.querySelector('.opblock-summary-method').textContent.trim().toLowerCase(),
            b.querySelector('.opblock-summary-path').getAttribute('data-path')])""",
    )
    return {(method, path) for method, path in found}


def execute(page: Page, method: str, path: str) -> Locator:
    """Open an operation, "Try it out", "Execute"; the table of the live response."""
    block = page.locator(f".opblock-{method.lower()}").filter(
        has=page.locator(f".opblock-summary-path[data-path='{path}']")
    )
    block.locator(".opblock-summary").first.click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    live = block.locator(".live-responses-table")
    expect(live.locator("tr.response .response-col_status")).to_be_visible()
    return live


def test_the_page_and_its_files_are_open_local_and_cached(make_app: Callable[..., Flask]) -> None:
    client = make_app(start_worker=False, api_keys=(KEY,)).test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "unsafe" not in policy
    html = page.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from elsewhere
    for name, mime in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        served = client.get(f"/docs/{name}")
        assert served.status_code == 200 and served.mimetype == mime
        assert len(served.data) > 100_000
        assert "max-age=86400" in served.headers["Cache-Control"]
        again = client.get(f"/docs/{name}", headers={"If-None-Match": served.headers["ETag"]})
        assert again.status_code == 304
    assert client.get("/openapi.json").status_code == 401  # the document itself needs the key


def test_docs_list_every_operation_and_try_it_out_works_offline(
    browser: Browser,  # noqa: F811
    service: Service,
) -> None:
    spec = requests.get(f"{service.url}/openapi.json", timeout=10).json()
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert ("get", "/docs") in documented
    for watched in watch(browser, service.url):
        page = watched.page
        page.goto(service.url + "/docs")
        expect(page.locator(".opblock").first).to_be_visible(timeout=20_000)
        assert listed_operations(page) == documented

        live = execute(page, "get", "/healthz")
        expect(live.locator("tr.response .response-col_status")).to_have_text("200")
        expect(live.locator("tr.response .response-col_description")).to_contain_text('"db": "ok"')
        screenshot(page, "docs")

        assert watched.outside == [], f"requests off the service: {watched.outside}"
        assert any(url.endswith("/docs/swagger-ui-bundle.js") for url in watched.requests)
        assert any(url.endswith("/openapi.json") for url in watched.requests)
        assert f"{service.url}/healthz" in watched.requests  # the "Execute" call itself
        assert watched.problems == []


def test_docs_send_the_api_key_when_the_service_needs_one(
    browser: Browser,  # noqa: F811
    keyed_service: Service,
) -> None:
    for watched in watch(browser, keyed_service.url):
        page = watched.page
        page.goto(keyed_service.url + "/docs")
        expect(page.locator("#key-form")).to_be_visible()  # /openapi.json answered 401
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        expect(page.locator(".opblock").first).to_be_visible(timeout=20_000)
        live = execute(page, "get", "/csv/requests")
        expect(live.locator("tr.response .response-col_status")).to_have_text("200")
        expect(live.locator("tr.response .response-col_description")).to_contain_text(
            '"requests": []'
        )
        assert watched.outside == []
        # The 401 of the first try is the only complaint the console may have.
        assert all(re.search(r"401|Unauthorized", p) for p in watched.problems), watched.problems


def test_the_dashboard_links_to_the_docs(
    browser: Browser,  # noqa: F811
    service: Service,
) -> None:
    for watched in watch(browser, service.url):
        page = watched.page
        page.goto(service.url + "/")
        link = page.get_by_role("link", name="API", exact=True)
        expect(link).to_have_attribute("href", "/docs")
        with page.context.expect_page() as opened:
            link.click()
        docs = opened.value
        expect(docs.locator(".opblock").first).to_be_visible(timeout=20_000)
        assert watched.outside == []
