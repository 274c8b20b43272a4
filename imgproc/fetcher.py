"""Image downloads: a pooled session, timeouts and a total deadline, a byte cap enforced
while streaming, redirects followed by hand (each hop re-checked), retries with backoff
on 5xx and connection errors, and the SSRF guard of :mod:`imgproc.netguard`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from urllib3.exceptions import MaxRetryError

from imgproc.config import Settings, human_bytes
from imgproc.netguard import BlockedAddress, host_refusal, make_session

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 256 * 1024


class FetchError(Exception):
    """A download failed; ``reason`` is short and shown to the user per image."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Fetched:
    """The bytes of one download."""

    data: bytes
    content_type: str | None
    final_url: str


def url_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` may not be fetched before any connection is made, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        return f"unsupported URL scheme {parts.scheme or '(none)'!r}"
    if parts.username is not None or parts.password is not None:
        return "credentials in URLs are not allowed"
    if not parts.hostname:
        return "URL has no host"
    if not allow_private:
        return host_refusal(parts.hostname)
    return None


def describe_transport_error(exc: requests.RequestException) -> tuple[str, bool]:
    """A short reason for a transport error and whether another attempt may help."""
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, MaxRetryError) and isinstance(inner.reason, BlockedAddress):
        return inner.reason.reason, False
    if isinstance(exc, requests.ConnectTimeout):
        return "timeout connecting to the host", True
    if isinstance(exc, requests.ReadTimeout):
        return "timeout reading from the host", False
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        if "resolve" in text or "Name or service not known" in text:
            return "host name could not be resolved", True
        return "could not connect to the host", True
    return f"download error: {type(exc).__name__}", False


class Fetcher:
    """Downloads one URL at a time per calling thread; safe to share between threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
    ) -> None:
        self.settings = settings
        self.sleep = sleep
        self.session = session or make_session(
            allow_private=settings.allow_private_urls, pool_size=settings.workers * 2
        )

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    def fetch(self, url: str) -> Fetched:
        """The body of ``url``; FetchError with a short reason otherwise."""
        s = self.settings
        for attempt in range(1, s.fetch_attempts + 1):
            try:
                return self._follow(url)
            except FetchError as exc:
                if not exc.retryable or attempt == s.fetch_attempts:
                    raise
            self.sleep(s.fetch_backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _follow(self, url: str) -> Fetched:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            refusal = url_refusal(current, allow_private=self.settings.allow_private_urls)
            if refusal:
                raise FetchError(refusal)
            try:
                response = self.session.get(
                    current,
                    stream=True,
                    allow_redirects=False,
                    timeout=(self.settings.connect_timeout, self.settings.read_timeout),
                    headers={"Accept": "image/*", "Accept-Encoding": "identity"},
                )
            except requests.RequestException as exc:
                reason, retryable = describe_transport_error(exc)
                raise FetchError(reason, retryable=retryable) from exc
            with response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                if response.status_code != 200:
                    retryable = response.status_code >= 500 or response.status_code == 429
                    raise FetchError(f"HTTP {response.status_code}", retryable=retryable)
                data = self._read_body(response)
                return Fetched(data, response.headers.get("content-type"), current)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def _read_body(self, response: requests.Response) -> bytes:
        cap = self.settings.max_image_bytes
        too_large = f"too large (over {human_bytes(cap)})"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise FetchError(too_large)
        deadline = time.monotonic() + self.settings.download_deadline
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = response.raw.read1(_CHUNK, decode_content=True)  # capped after decoding
                if not chunk:
                    break
                size += len(chunk)
                if size > cap:
                    raise FetchError(too_large)
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"download took longer than {self.settings.download_deadline:g} s"
                    )
        except requests.RequestException as exc:
            raise FetchError(describe_transport_error(exc)[0]) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts, resets, cut bodies
            if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
                raise FetchError("timeout reading from the host") from exc
            raise FetchError("connection broke off during the download", retryable=True) from exc
        if not size:
            raise FetchError("empty response")
        return b"".join(chunks)
