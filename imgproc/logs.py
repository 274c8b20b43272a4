"""One JSON object per log line, with the ``request_id`` of the request it is about and
nothing secret in it: API keys, the webhook secret and URL credentials are masked.

Code that works on one request runs inside ``about(request_id)``; every line logged there,
on that thread, carries the id. ``log.info(..., extra={"request_id": ...})`` does the same
for a single line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "about", "bind", "configure", "scrub", "unbind"]

_request_id: ContextVar[str | None] = ContextVar("imgproc_request_id", default=None)

# user:password@ in a URL, and query strings (signed URLs carry their signature there).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]*@")
_QUERY = re.compile(r"(?i)(\bhttps?://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
_REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without URL credentials, URL query strings or any of ``secrets``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    text = _USERINFO.sub(rf"\1{_REDACTED}@", text)
    return _QUERY.sub(rf"\1?{_REDACTED}", text)


def bind(request_id: str | None) -> Token[str | None]:
    """Tag the lines logged from now on (in this context) with ``request_id``."""
    return _request_id.set(request_id)


def unbind(token: Token[str | None]) -> None:
    """Back to the ``request_id`` before the :func:`bind` that returned ``token``."""
    _request_id.reset(token)


@contextmanager
def about(request_id: str | None) -> Iterator[None]:
    """Tag every line logged inside (on this thread) with ``request_id``."""
    token = bind(request_id)
    try:
        yield
    finally:
        unbind(token)


def current_request_id() -> str | None:
    """The request the current thread is working on, if any."""
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "message", "request_id"?, ...extra, "exception"?}``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[
                :-6
            ]
            + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": self._clean(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id:
            line["request_id"] = request_id
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in line and not name.startswith("_"):
                line[name] = self._clean(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            formatted = "".join(traceback.format_exception(*record.exc_info))
            line["exception"] = self._clean(formatted.rstrip())
        return json.dumps(line, default=str, ensure_ascii=False)

    def _clean(self, text: str) -> str:
        return scrub(text, self.secrets)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        """Write one line to the current stderr."""
        self.stream = sys.stderr
        super().emit(record)


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """Send every logger's lines (gunicorn's too) to stderr as JSON, at ``level``."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    # Ours from an earlier call, or the one gunicorn's logconfig_dict installed: one only.
    for stale in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(stale)
    root.addHandler(handler)
    # Debug means this service's debug lines; the libraries' (pymongo logs every command)
    # stay at info.
    numeric = logging.getLevelName(level.upper())
    root.setLevel(max(numeric, logging.INFO))
    logging.getLogger("imgproc").setLevel(numeric)
    for name in ("gunicorn.error", "gunicorn.access"):
        gunicorn_logger = logging.getLogger(name)
        for theirs in list(gunicorn_logger.handlers):
            gunicorn_logger.removeHandler(theirs)
        gunicorn_logger.propagate = True
    # One line per HTTP request comes from imgproc.http; werkzeug's own would repeat it.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # urllib3 logs full URLs at debug; its warnings (pool full, retries) are what matters.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
