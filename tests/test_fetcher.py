"""The downloader's SSRF guard and limits, on the real HTTP stack against a loopback host.

Every refused address here is refused before a packet leaves: either by the literal check
or by the guarded connection, which resolves and checks before it connects.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
import requests
from pytest_httpserver import HTTPServer

from imgproc.config import load_settings
from imgproc.fetcher import Fetcher, FetchError, retry_after_seconds
from imgproc.netguard import BlockedAddress, is_public, literal_address, make_session
from tests.conftest import make_image, serve


def guarded_fetcher() -> Fetcher:
    return Fetcher(load_settings({"allow_private_urls": False, "fetch_backoff": 0}))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/a.jpg", "blocked address (127.0.0.1)"),
        ("http://localhost/a.jpg", "blocked address (loopback)"),
        ("http://LOCALHOST./a.jpg", "blocked address (loopback)"),
        ("http://api.localhost/a.jpg", "blocked address (loopback)"),
        ("http://0.0.0.0/a.jpg", "blocked address (0.0.0.0)"),
        ("http://2130706433/a.jpg", "blocked address (127.0.0.1)"),
        ("http://0x7f.1/a.jpg", "blocked address (127.0.0.1)"),
        ("http://0177.0.0.1/a.jpg", "blocked address (127.0.0.1)"),
        ("http://127.1/a.jpg", "blocked address (127.0.0.1)"),
        ("http://[::1]/a.jpg", "blocked address (::1)"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "blocked address (::ffff:7f00:1)"),
        ("http://169.254.169.254/latest/meta-data/", "blocked address (169.254.169.254)"),
        ("http://10.1.2.3/a.jpg", "blocked address (10.1.2.3)"),
        ("http://172.16.0.1/a.jpg", "blocked address (172.16.0.1)"),
        ("http://192.168.1.1/a.jpg", "blocked address (192.168.1.1)"),
        ("http://100.64.0.1/a.jpg", "blocked address (100.64.0.1)"),
        ("http://224.0.0.1/a.jpg", "blocked address (224.0.0.1)"),
        ("http://user:pw@example.com/a.jpg", "credentials in URLs are not allowed"),
        ("ftp://example.com/a.jpg", "unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ],
)
def test_refused_before_connecting(url: str, reason: str) -> None:
    with pytest.raises(FetchError) as caught:
        guarded_fetcher().fetch(url)
    assert caught.value.reason == reason


def test_guarded_connection_checks_the_resolved_address(image_host: HTTPServer) -> None:
    """The connect-time check, without the literal pre-check: what DNS rebinding would meet."""
    url = serve(image_host, "/a.jpg", make_image())
    session = make_session(allow_private=False, pool_size=1)
    with pytest.raises(requests.ConnectionError) as caught:
        session.get(url, timeout=2)
    reason = caught.value.args[0].reason
    assert isinstance(reason, BlockedAddress)
    assert reason.reason == "blocked address (127.0.0.1)"
    assert not [r for r, _ in image_host.log if r.path == "/a.jpg"]  # nothing was sent


def test_redirect_to_another_scheme_is_refused(image_host: HTTPServer) -> None:
    image_host.expect_request("/start").respond_with_data(
        "", status=301, headers={"Location": "file:///etc/passwd"}
    )
    fetcher = Fetcher(load_settings({"allow_private_urls": True, "fetch_backoff": 0}))
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(image_host.url_for("/start"))
    assert caught.value.reason == "unsupported URL scheme 'file'"


def test_private_allowed_in_development(image_host: HTTPServer) -> None:
    data = make_image()
    url = serve(image_host, "/a.jpg", data)
    fetcher = Fetcher(load_settings({"allow_private_urls": True}))
    fetched = fetcher.fetch(url)
    assert fetched.data == data
    assert fetched.content_type == "image/jpeg"


def test_what_an_origin_sees_and_that_no_cookie_is_carried_to_the_next_download(
    image_host: HTTPServer,
) -> None:
    data = make_image()
    image_host.expect_request("/first.jpg").respond_with_data(
        data, content_type="image/jpeg", headers={"Set-Cookie": "tracker=1; Path=/"}
    )
    image_host.expect_request("/second.jpg").respond_with_data(data, content_type="image/jpeg")
    fetcher = Fetcher(load_settings({"allow_private_urls": True}))
    assert fetcher.fetch(image_host.url_for("/first.jpg")).data == data
    assert fetcher.fetch(image_host.url_for("/second.jpg")).data == data
    (first, _), (second, _) = image_host.log
    for request in (first, second):
        assert request.headers["User-Agent"] == "imgproc/1.0"
        assert request.headers["Accept"] == "image/*"
        assert request.headers["Accept-Encoding"] == "identity"
    assert "Cookie" not in second.headers


def test_lying_content_length_is_still_capped(image_host: HTTPServer) -> None:
    image_host.expect_request("/liar.jpg").respond_with_data(
        make_image(1500, 1500), headers={"Content-Length": "10"}
    )
    fetcher = Fetcher(load_settings({"allow_private_urls": True, "max_image_bytes": 2000}))
    with pytest.raises(FetchError):
        fetcher.fetch(image_host.url_for("/liar.jpg"))


def test_empty_body_is_an_error(image_host: HTTPServer) -> None:
    url = serve(image_host, "/empty.jpg", b"")
    fetcher = Fetcher(load_settings({"allow_private_urls": True}))
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(url)
    assert caught.value.reason == "empty response"


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("255.255.255.255", False),
        ("198.18.0.1", False),
    ],
)
def test_address_policy(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


def test_literal_forms() -> None:
    assert literal_address("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("[::1]") == ipaddress.ip_address("::1")
    assert literal_address("example.com") is None


def test_gzip_encoded_body_is_decoded_and_capped_after_decoding(image_host: HTTPServer) -> None:
    import gzip

    data = make_image()
    image_host.expect_request("/gz.jpg").respond_with_data(
        gzip.compress(data), headers={"Content-Encoding": "gzip"}, content_type="image/jpeg"
    )
    bomb = gzip.compress(b"\0" * (20 * 1024 * 1024))  # 20 MiB of zeros in ~20 KiB
    image_host.expect_request("/bomb.jpg").respond_with_data(
        bomb, headers={"Content-Encoding": "gzip"}, content_type="image/jpeg"
    )
    fetcher = Fetcher(load_settings({"allow_private_urls": True, "max_image_bytes": 1024 * 1024}))
    assert fetcher.fetch(image_host.url_for("/gz.jpg")).data == data
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(image_host.url_for("/bomb.jpg"))
    assert caught.value.reason == "too large (over 1 MiB)"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        ("0", 1.0),  # a floor: a host answering "0" in a loop is not hammered
        ("86400", 3600.0),  # a cap: longer than an hour is not waited for
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # a date in the past: at once (the floor)
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_values(header: str, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("Mon, 23 Nov 2026 12:00:30 GMT", now) == 30.0


@pytest.mark.parametrize("status", [429, 503])
def test_a_named_pause_is_reported_at_once_not_slept_on(
    httpserver: HTTPServer, status: int
) -> None:
    """The fetcher hands the pause to its caller (the pipeline pauses the host without
    holding a thread) instead of retrying after its own backoff."""
    httpserver.expect_request("/p.jpg").respond_with_data(
        "busy", status=status, headers={"Retry-After": "7"}
    )
    fetcher = Fetcher(load_settings({"allow_private_urls": True, "fetch_backoff": 5}))
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(httpserver.url_for("/p.jpg"))
    assert caught.value.reason == f"HTTP {status}" and caught.value.retry_after == 7.0
    assert len(httpserver.log) == 1
