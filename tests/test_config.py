"""Settings: defaults, IMGPROC_* variables, and a clear message for every bad value."""

from __future__ import annotations

import pytest

from imgproc import config, create_app
from imgproc.config import ConfigError, Settings, load_settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.default_quality == 50
    assert settings.lease_seconds == 60
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_rows == 10_000 and settings.max_urls_per_row == 50
    assert settings.webhook_retry_delays == (5, 30, 120, 600, 1800, 3600, 7200, 14400)
    assert settings.allow_private_urls is False
    assert settings.images_dir.endswith("images")


def test_pipeline_bounds_follow_the_machine_unless_set() -> None:
    """Downloads cover a second of latency at the cores' rate; the codec stays on the cores;
    the memory budget and the per-host limit have sensible automatic values."""
    cores = config.cores()
    automatic = Settings()
    assert automatic.download_slots == min(1024, 256 * cores)
    assert automatic.codec_slots == cores + 2
    assert automatic.connections_per_host == automatic.download_slots
    assert (
        2 * automatic.max_image_bytes
        <= automatic.buffer_bytes
        <= max(512 * 2**20, 2 * automatic.max_image_bytes)
    )
    chosen = Settings(
        downloads=40, cpu_slots=2, max_connections_per_host=6, download_buffer_bytes=64 * 2**20
    )
    assert chosen.download_slots == 40 and chosen.codec_slots == 2
    assert chosen.connections_per_host == 6 and chosen.buffer_bytes == 64 * 2**20


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPROC_LEASE_SECONDS", "5.5")
    monkeypatch.setenv("IMGPROC_ALLOW_PRIVATE_URLS", "TRUE")
    monkeypatch.setenv("IMGPROC_WEBHOOK_RETRY_DELAYS", "1, 2,3")
    monkeypatch.setenv("IMGPROC_PUBLIC_URL", "https://img.example.com")
    monkeypatch.setenv("MONGODB_URI", "mongodb://db.example:27017")
    settings = load_settings()
    assert settings.lease_seconds == 5.5
    assert settings.allow_private_urls is True
    assert settings.webhook_retry_delays == (1.0, 2.0, 3.0)
    assert settings.public_url == "https://img.example.com"
    assert settings.mongodb_uri == "mongodb://db.example:27017"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMGPROC_DOWNLOADS", "many", "IMGPROC_DOWNLOADS='many' is not valid"),
        ("IMGPROC_DOWNLOADS", "-1", "IMGPROC_DOWNLOADS=-1 is not valid: must be 0 (256 per core)"),
        ("IMGPROC_MAX_CONNECTIONS_PER_HOST", "-2", "must be 0 (as many as downloads) or more"),
        ("IMGPROC_DOWNLOAD_BUFFER_BYTES", "1000", "at least IMGPROC_MAX_IMAGE_BYTES"),
        ("IMGPROC_DEFAULT_QUALITY", "99", "must be 1-95"),
        ("IMGPROC_LEASE_SECONDS", "-1", "must be greater than 0"),
        ("IMGPROC_ALLOW_PRIVATE_URLS", "maybe", "expected true or false"),
        ("IMGPROC_WEBHOOK_RETRY_DELAYS", "5,-1", "delays must not be negative"),
        ("IMGPROC_STORAGE", "ftp", "must be 'local', 'gridfs' or 's3'"),
        ("IMGPROC_STORAGE", "s3", "IMGPROC_S3_BUCKET=None is not valid: is required"),
        ("IMGPROC_S3_BUCKET", "a/b", "must be a bucket name"),
        ("IMGPROC_S3_ENDPOINT_URL", "minio:9000", "must be an absolute http(s) URL"),
        ("IMGPROC_S3_PUBLIC_URL", "https://cdn.example", "only used with IMGPROC_STORAGE=s3"),
        ("IMGPROC_S3_PREFIX", "/outputs/", "no leading slash"),
        ("IMGPROC_S3_PREFIX", "a/../b/", "must be a key prefix"),
        ("IMGPROC_PUBLIC_URL", "img.example.com", "must be an absolute http(s) URL"),
        ("MONGODB_URI", "postgres://x", "must start with mongodb://"),
        ("IMGPROC_WEBHOOK_SECRET", "short", "IMGPROC_WEBHOOK_SECRET='***' is not valid"),
        ("IMGPROC_LOG_LEVEL", "LOUD", "must be DEBUG, INFO, WARNING or ERROR"),
    ],
)
def test_bad_values_stop_start_up_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        create_app()
    assert message in str(caught.value)


def test_secret_never_appears_in_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPROC_WEBHOOK_SECRET", "hunter2-not-base64!")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown settings: colour"):
        load_settings({"colour": "blue"})


def test_the_operations_page_documents_every_setting() -> None:
    import dataclasses
    from pathlib import Path

    from imgproc.config import env_name

    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    missing = [
        env_name(f.name)
        for f in dataclasses.fields(Settings)
        if f"`{env_name(f.name)}`" not in page
    ]
    assert missing == []
