"""Prometheus metrics: what this process did (counters, histograms) and, at scrape time,
what the database says is waiting.

Under gunicorn every worker process counts on its own; ``PROMETHEUS_MULTIPROC_DIR`` (set up
by ``imgproc.gunicorn_conf``) makes prometheus_client keep the values in files there, and a
scrape served by any worker adds up all of them. Without it (tests, one process) the default
registry is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "image_finished", "render", "reason_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

IMAGES = Counter(
    "imgproc_images",
    "Images finished by this service: outcome done or failed, with the failure's reason",
    ["outcome", "reason"],
)
DOWNLOAD_SECONDS = Histogram(
    "imgproc_download_seconds", "Time to download one input image (successful)", buckets=_SECONDS
)
COMPRESS_SECONDS = Histogram(
    "imgproc_compress_seconds",
    "Time to decode and re-encode one image (successful)",
    buckets=_SECONDS,
)
BYTES_IN = Counter("imgproc_input_bytes", "Bytes of input images downloaded and compressed")
BYTES_OUT = Counter("imgproc_output_bytes", "Bytes of output images stored")
REQUESTS_FINISHED = Counter(
    "imgproc_requests_finished", "Requests that reached a terminal status", ["status"]
)
WEBHOOKS = Counter(
    "imgproc_webhook_deliveries",
    "Webhook delivery attempts: delivered, retrying (will be tried again) or failed (gave up)",
    ["outcome"],
)
IN_FLIGHT = Gauge(
    "imgproc_images_in_flight",
    "Images being downloaded, compressed or stored right now",
    multiprocess_mode="livesum",
)
BUFFERED_BYTES = Gauge(
    "imgproc_download_buffer_bytes",
    "Bytes of downloaded images held until their output is stored (bounded by "
    "IMGPROC_DOWNLOAD_BUFFER_BYTES)",
    multiprocess_mode="livesum",
)
HTTP_REQUESTS = Counter(
    "imgproc_http_requests", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "imgproc_http_request_seconds", "Time to answer an HTTP request", ["route"], buckets=_SECONDS
)

_VOLATILE = re.compile(r"\s*[(:].*$")  # "(10.0.0.1)", ": 3 frames of 10x10" vary per image


def reason_label(reason: str | None) -> str:
    """A failure reason with the per-image parts (addresses, sizes) cut off, so that the
    ``reason`` label has a small, fixed set of values."""
    return _VOLATILE.sub("", reason or "unknown")[:60] or "unknown"


def image_finished(outcome: dict[str, Any]) -> None:
    """Count one image's outcome, and its bytes when it is done."""
    if outcome["status"] == "done":
        IMAGES.labels("done", "").inc()
        BYTES_IN.inc(outcome["input_bytes"])
        BYTES_OUT.inc(outcome["output_bytes"])
    else:
        IMAGES.labels("failed", reason_label(outcome.get("error"))).inc()


class WaitingSource(Protocol):
    """Where the scrape-time figures come from (the store)."""

    def request_counts(self) -> dict[str, int]: ...

    def images_waiting(self) -> int: ...

    def stalled_requests(self, quiet_seconds: float) -> int: ...


_UP_HELP = "1 when the database answered this scrape's queries, 0 when it did not"


class _DatabaseCollector(Collector):
    """Figures every process agrees on because they are read from the database."""

    def __init__(self, source: WaitingSource, stall_seconds: float) -> None:
        self.source = source
        self.stall_seconds = stall_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Requests by status and images not yet finished, at this moment; with the database
        down, only ``imgproc_database_up 0``, so the processes' own figures still get out."""
        try:
            counts = self.source.request_counts()
            waiting = self.source.images_waiting()
            stalled = self.source.stalled_requests(self.stall_seconds)
        except Exception:  # the store's errors (database down): report it, don't fail the scrape
            yield GaugeMetricFamily("imgproc_database_up", _UP_HELP, value=0)
            return
        yield GaugeMetricFamily("imgproc_database_up", _UP_HELP, value=1)
        by_status = GaugeMetricFamily(
            "imgproc_requests", "Requests stored, by current status", labels=["status"]
        )
        for status, count in sorted(counts.items()):
            by_status.add_metric([status], count)
        yield by_status
        yield GaugeMetricFamily(
            "imgproc_images_waiting",
            "Images of pending and processing requests not finished yet (work waiting)",
            value=waiting,
        )
        yield GaugeMetricFamily(
            "imgproc_requests_stalled",
            "Requests processing with no image recorded for IMGPROC_STALL_SECONDS "
            "(work held while nothing moves)",
            value=stalled,
        )


def render(source: WaitingSource, stall_seconds: float) -> bytes:
    """The text exposition of every metric: all processes' counters plus the database's."""
    registry: Any = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    scrape = CollectorRegistry()
    scrape.register(_DatabaseCollector(source, stall_seconds))
    return bytes(generate_latest(registry) + generate_latest(scrape))
