"""Settings: built-in defaults, then ``IMGPROC_*`` environment variables (or a mapping a test
passes), validated once at start-up into a frozen :class:`Settings`."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MIB = 1024 * 1024


def human_bytes(size: int) -> str:
    """``10485760`` -> ``'10 MiB'``, ``1000`` -> ``'1000 bytes'``."""
    for unit, scale in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


# Catalogue images (600-2,000 px JPEGs) a core decodes and re-encodes a second, about: 90
# to 130 on the 2-core VMs this was measured on. Small images go several times faster.
CODEC_RATE = 128


def cores() -> int:
    """CPUs this process may run on (a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    """Physical memory of the machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4096 * MIB


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; the env var is ``IMGPROC_<NAME>`` unless noted."""

    mongodb_uri: str = "mongodb://127.0.0.1:27017"  # env: MONGODB_URI
    db_name: str = "imgproc"
    data_dir: str = "./data"
    public_url: str | None = None
    storage: str = "local"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = ""
    s3_public_url: str | None = None
    start_worker: bool = True
    downloads: int = 0  # 0: 256 per core (at most 1024)
    cpu_slots: int = 0  # 0: cores + 2
    download_buffer_bytes: int = 0  # 0: a sixteenth of the memory, at most 96 MiB
    max_connections_per_host: int = 0  # 0: as many as downloads
    worker_nice: int = 10
    max_active_requests: int = 16
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    shutdown_grace_seconds: float = 20.0
    max_upload_bytes: int = 10 * MIB
    max_rows: int = 10_000
    max_urls_per_row: int = 50
    default_quality: int = 50
    max_image_bytes: int = 25 * MIB
    max_pixels: int = 50_000_000
    keep_metadata: bool = False
    jpeg_optimize: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    download_deadline: float = 60.0
    fetch_attempts: int = 3
    fetch_backoff: float = 0.5
    max_image_attempts: int = 3
    allow_private_urls: bool = False
    webhook_secret: str | None = None
    api_keys: tuple[str, ...] = ()
    idempotency_hours: float = 24.0
    webhook_retry_delays: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400)
    webhook_timeout: float = 10.0
    db_timeout_ms: int = 5000
    status_cache_products: int = 20_000
    stall_seconds: float = 300.0
    log_level: str = "INFO"

    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line."""
        found = list(self.api_keys)
        if self.webhook_secret:
            found += [self.webhook_secret, self.webhook_secret.removeprefix("whsec_")]
        return tuple(found)

    @property
    def download_slots(self) -> int:
        """Downloads in flight per instance, at most: enough to cover a second of origin
        latency at twice the rate the cores compress catalogue images (:data:`CODEC_RATE`
        a core). With 128 a core, a VM whose cores compress 115-128 images a second each
        had too few downloads in flight at 1 s to keep the codec fed (A/B at 1 s: ratio to
        the ceiling 0.84 with 256 slots on 2 cores, 0.91 with 384, 0.92 with 512). How many
        are used follows the origins (see ``DownloadDepth``)."""
        return self.downloads or min(1024, 2 * CODEC_RATE * cores())

    @property
    def codec_rate_floor(self) -> int:
        """Images a second the pipeline sizes its downloads for before it has measured the
        codec, and at least after: the cores' rate on catalogue images, never more than the
        slots (so a small ``IMGPROC_DOWNLOADS`` is used whole on slow origins)."""
        return min(self.download_slots, CODEC_RATE * cores())

    @property
    def codec_slots(self) -> int:
        """Images decoded and encoded at once: one per core, plus two so that a core never
        waits while another image is in the Python parts of the codec (with hundreds of
        download threads about, a thread's wait for the GIL is not short)."""
        return self.cpu_slots or cores() + 2

    @property
    def buffer_bytes(self) -> int:
        """Bytes of downloaded images waiting for the codec, at most (the memory budget)."""
        if self.download_buffer_bytes:
            return self.download_buffer_bytes
        # Enough to keep the codec fed for about a second at full speed (catalogue images
        # are 0.1-1 MB); more only adds to the process's memory, not to its speed.
        return max(2 * self.max_image_bytes, min(96 * MIB, memory_bytes() // 16))

    @property
    def connections_per_host(self) -> int:
        """Connections open to one image host at once, at most."""
        return self.max_connections_per_host or self.download_slots

    @property
    def images_dir(self) -> str:
        """Where LocalStorage keeps output images."""
        return os.path.join(self.data_dir, "images")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _parse_delays(raw: str) -> tuple[float, ...]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    delays = tuple(float(p) for p in parts)
    if any(d < 0 for d in delays):
        raise ValueError("delays must not be negative")
    return delays


def _parse_keys(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


_PARSERS: dict[type[Any] | str, Callable[[str], Any]] = {
    "bool": _parse_bool,
    "int": int,
    "float": float,
    "str": str,
    "str | None": _parse_optional_str,
    "tuple[float, ...]": _parse_delays,
    "tuple[str, ...]": _parse_keys,
}

_ENV_NAMES = {"mongodb_uri": "MONGODB_URI"}


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return _ENV_NAMES.get(field, "IMGPROC_" + field.upper())


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the environment, then ``overrides`` (field names); validated."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        name = env_name(field.name)
        raw = os.environ.get(name)
        if raw is None:
            continue
        parser = _PARSERS[str(field.type)]
        try:
            values[field.name] = parser(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from None
    unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    values.update(overrides or {})
    settings = Settings(**values)
    validate(settings)
    return settings


def _check(ok: bool, field: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{env_name(field)}={value!r} is not valid: {message}")


def _absolute(url: str) -> bool:
    """True for an absolute http(s) URL without a query or fragment."""
    parts = urlsplit(url)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.netloc)
        and not parts.query
        and not parts.fragment
    )


def _validate_s3(s: Settings) -> None:
    """The S3 settings: a bucket with ``s3``; URLs absolute; a prefix that makes plain keys."""
    if s.storage == "s3":
        _check(bool(s.s3_bucket), "s3_bucket", "is required with IMGPROC_STORAGE=s3", s.s3_bucket)
    if s.s3_bucket is not None:
        _check(
            not set(s.s3_bucket) & set("/\\ ?#") and s.s3_bucket.isprintable(),
            "s3_bucket",
            "must be a bucket name (no slashes, spaces, ? or #)",
            s.s3_bucket,
        )
    for field in ("s3_endpoint_url", "s3_public_url"):
        url = getattr(s, field)
        if url is not None:
            _check(_absolute(url), field, "must be an absolute http(s) URL", url)
    _check(
        s.s3_public_url is None or s.storage == "s3",
        "s3_public_url",
        "is only used with IMGPROC_STORAGE=s3 (output URLs would point at an empty base)",
        s.s3_public_url,
    )
    _check(
        not s.s3_prefix.startswith("/")
        and ".." not in s.s3_prefix.split("/")
        and s.s3_prefix.isprintable()
        and not set(s.s3_prefix) & set(" ?#\\"),
        "s3_prefix",
        "must be a key prefix like 'outputs/': no leading slash, '..', spaces, ? or #",
        s.s3_prefix,
    )


def validate(s: Settings) -> None:
    """Raise :class:`ConfigError` with a clear message for the first bad value."""
    for field in (
        "max_active_requests",
        "max_rows",
        "max_urls_per_row",
        "fetch_attempts",
        "max_image_attempts",
        "max_upload_bytes",
        "max_image_bytes",
        "max_pixels",
        "db_timeout_ms",
    ):
        _check(getattr(s, field) >= 1, field, "must be at least 1", getattr(s, field))
    for field in (
        "lease_seconds",
        "poll_seconds",
        "connect_timeout",
        "read_timeout",
        "download_deadline",
        "webhook_timeout",
        "stall_seconds",
    ):
        _check(getattr(s, field) > 0, field, "must be greater than 0", getattr(s, field))
    for field in ("shutdown_grace_seconds", "fetch_backoff"):
        _check(getattr(s, field) >= 0, field, "must not be negative", getattr(s, field))
    _check(
        s.status_cache_products >= 0,
        "status_cache_products",
        "must not be negative",
        s.status_cache_products,
    )
    _check(s.cpu_slots >= 0, "cpu_slots", "must be 0 (cores + 2) or more", s.cpu_slots)
    _check(s.downloads >= 0, "downloads", "must be 0 (256 per core) or more", s.downloads)
    _check(
        s.max_connections_per_host >= 0,
        "max_connections_per_host",
        "must be 0 (as many as downloads) or more",
        s.max_connections_per_host,
    )
    _check(
        s.download_buffer_bytes == 0 or s.download_buffer_bytes >= s.max_image_bytes,
        "download_buffer_bytes",
        f"must be 0 (automatic) or at least IMGPROC_MAX_IMAGE_BYTES ({s.max_image_bytes})",
        s.download_buffer_bytes,
    )
    _check(0 <= s.worker_nice <= 19, "worker_nice", "must be 0-19", s.worker_nice)
    _check(s.max_rows < 10_000_000, "max_rows", "must be below 10,000,000", s.max_rows)
    _check(1 <= s.default_quality <= 95, "default_quality", "must be 1-95", s.default_quality)
    _check(
        s.storage in ("local", "gridfs", "s3"),
        "storage",
        "must be 'local', 'gridfs' or 's3'",
        s.storage,
    )
    _validate_s3(s)
    _check(
        s.mongodb_uri.startswith(("mongodb://", "mongodb+srv://")),
        "mongodb_uri",
        "must start with mongodb:// or mongodb+srv://",
        s.mongodb_uri,
    )
    _check(
        bool(s.db_name) and not set(s.db_name) & set('/\\. "$'),
        "db_name",
        "must be a plain database name",
        s.db_name,
    )
    _check(
        s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_level",
        "must be DEBUG, INFO, WARNING or ERROR",
        s.log_level,
    )
    if s.public_url is not None:
        _check(
            _absolute(s.public_url), "public_url", "must be an absolute http(s) URL", s.public_url
        )
    _check(
        s.idempotency_hours > 0, "idempotency_hours", "must be greater than 0", s.idempotency_hours
    )
    short = [k for k in s.api_keys if len(k) < 16 or not k.isprintable() or " " in k]
    _check(not short, "api_keys", "every key needs 16+ printable characters, no spaces", "***")
    if s.webhook_secret is not None:
        secret = s.webhook_secret.removeprefix("whsec_")
        try:
            ok = len(base64.b64decode(secret + "==", validate=True)) >= 16
        except (binascii.Error, ValueError):
            ok = False
        _check(
            ok,
            "webhook_secret",
            "must be a Standard Webhooks secret: 'whsec_' + base64 of 16+ bytes",
            "***",
        )
