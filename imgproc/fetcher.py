"""Image downloads: a pooled session, timeouts and a total deadline, a byte cap enforced
while streaming, redirects followed by hand (each hop re-checked), retries with backoff
on 5xx and connection errors, and the SSRF guard of :mod:`imgproc.netguard`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from urllib3.exceptions import MaxRetryError

from imgproc.config import Settings, human_bytes
from imgproc.netguard import BlockedAddress, host_refusal, make_session

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 256 * 1024


MIN_RETRY_AFTER = 1.0  # seconds: "Retry-After: 0" in a loop must not hammer the host
MAX_RETRY_AFTER = 3600.0  # seconds: a longer pause is not waited for


class FetchError(Exception):
    """A download failed; ``reason`` is short and shown to the user per image.

    ``retry_after``: the host answered 429 or 503 with a ``Retry-After`` of that many
    seconds; whoever runs the download decides whether to wait that long.
    """

    def __init__(
        self, reason: str, *, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class Budget(Protocol):
    """A memory budget for downloaded bytes (the pipeline's): ``reserve`` may wait, ``grow``
    never does."""

    def reserve(self, size: int) -> None: ...

    def grow(self, size: int) -> None: ...

    def release(self, size: int) -> None: ...


@dataclass(frozen=True)
class Fetched:
    """The bytes of one download, and how much of the budget they hold."""

    data: bytes
    content_type: str | None
    final_url: str
    reserved: int = 0


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


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
            allow_private=settings.allow_private_urls,
            pool_size=settings.connections_per_host,
        )
        self._headers = {
            **self.session.headers,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    def fetch(self, url: str, budget: Budget | None = None) -> Fetched:
        """The body of ``url``; FetchError with a short reason otherwise. With a ``budget``,
        the body's size is reserved from it before the body is read (the returned
        ``reserved`` is the caller's to release); a failure releases it."""
        s = self.settings
        for attempt in range(1, s.fetch_attempts + 1):
            try:
                return self._follow(url, budget)
            except FetchError as exc:
                if exc.retry_after is not None:
                    raise  # the host named its pause: the caller waits, not this thread
                if not exc.retryable or attempt == s.fetch_attempts:
                    raise
            self.sleep(s.fetch_backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _follow(self, url: str, budget: Budget | None) -> Fetched:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            refusal = url_refusal(current, allow_private=self.settings.allow_private_urls)
            if refusal:
                raise FetchError(refusal)
            try:
                response = self._get(current)
            except requests.RequestException as exc:
                reason, retryable = describe_transport_error(exc)
                raise FetchError(reason, retryable=retryable) from exc
            with response:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = urljoin(current, response.headers["location"])
                    continue
                status = response.status_code
                if status != 200:
                    retry_after = None
                    if status in (429, 503):
                        retry_after = retry_after_seconds(response.headers.get("retry-after"))
                    raise FetchError(
                        f"HTTP {status}",
                        retryable=status >= 500 or status == 429,
                        retry_after=retry_after,
                    )
                data, reserved = self._read_body(response, budget)
                return Fetched(data, response.headers.get("content-type"), current, reserved)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str) -> requests.Response:
        """GET ``url`` (streamed, no redirects followed) through the session's adapter.

        Not through ``Session.get``: its per-request work (merging settings and the
        environment, cookies, hooks) was a third of what a download spent holding the GIL,
        the GIL the codec threads need. Nothing of it applies: no proxies or cookies are
        wanted (a cookie one host sets is not for the next), redirects are followed by hand.
        The adapter, and with it the address guard and the keep-alive pool, is the session's.
        """
        request = requests.PreparedRequest()
        request.prepare_method("GET")
        request.prepare_url(url, None)
        request.prepare_headers(self._headers)
        request.prepare_body(None, None)
        return self.session.get_adapter(url).send(
            request,
            stream=True,
            timeout=(self.settings.connect_timeout, self.settings.read_timeout),
        )

    def _read_body(self, response: requests.Response, budget: Budget | None) -> tuple[bytes, int]:
        cap = self.settings.max_image_bytes
        too_large = f"too large (over {human_bytes(cap)})"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise FetchError(too_large)
        # Hold the budget for what the body will take before reading it: the declared size,
        # or the cap when none is declared (what a chunked body may grow to).
        reserved = min(int(declared), cap) if declared.isdigit() else cap
        if budget is not None:
            budget.reserve(reserved)
        try:
            data = self._read_chunks(response, cap, too_large)
        except BaseException:
            if budget is not None:
                budget.release(reserved)
            raise
        if budget is None:
            return data, 0
        if len(data) < reserved:
            budget.release(reserved - len(data))
        elif len(data) > reserved:  # a declared length the body exceeded (within the cap)
            budget.grow(len(data) - reserved)  # never waits: we hold bytes already
        return data, len(data)

    def _read_chunks(self, response: requests.Response, cap: int, too_large: str) -> bytes:
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
