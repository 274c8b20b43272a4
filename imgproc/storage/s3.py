"""Output images in an S3-compatible bucket (AWS S3, or any service that speaks its API at
``IMGPROC_S3_ENDPOINT_URL``), so every instance serves every image and a CDN can serve them
without the service. The only module that imports boto3 and botocore, lazily (importing
imgproc stays cheap); every error they raise becomes :class:`StorageUnavailable` here.

A PUT replaces an object atomically: readers see the old complete object or the new one,
never a part or a gap, so repeated and racing puts keep the contract. Credentials and the
region come from the standard AWS chain (environment, profiles, instance roles)."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from imgproc.storage import StorageUnavailable, StoredFile, content_type, valid_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

T = TypeVar("T")

CACHE_CONTROL = "public, max-age=31536000, immutable"  # keys are never reused for other bytes
CONNECT_TIMEOUT = 5.0  # seconds; a dead endpoint is found out quickly
READ_TIMEOUT = 30.0  # seconds between bytes of one call
ATTEMPTS = 3  # per call, botocore's "standard" retries (backoff with jitter, 5xx and throttling)
MISCONFIGURED_LOG_EVERY = 60.0  # seconds between two error lines about one misconfiguration

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
# What a person has to fix: the bucket, the credentials, the region or the permissions. Still
# transient to the images (they wait, and finish once it is fixed), but an error in the log.
_MISCONFIGURED = {
    "NoSuchBucket": "the bucket does not exist: create it or fix IMGPROC_S3_BUCKET",
    "AccessDenied": "access denied: the credentials may not read and write this bucket",
    "AllAccessDisabled": "access to the bucket is disabled",
    "InvalidAccessKeyId": "the access key is not known to the endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "InvalidToken": "the session token is not valid",
    "ExpiredToken": "the session token has expired",
    "AuthorizationHeaderMalformed": "wrong region: set AWS_DEFAULT_REGION to the bucket's",
    "PermanentRedirect": "wrong region or endpoint for this bucket",
    "InvalidBucketName": "IMGPROC_S3_BUCKET is not a valid bucket name here",
}


class S3Storage:
    """One object per key under ``prefix`` in ``bucket``, with its Content-Type and a year of
    Cache-Control; Content-MD5 makes the endpoint refuse a body damaged on the way."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        pool_size: int = 10,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
            max_pool_connections=pool_size,
            signature_version="s3v4",
            # Path-style URLs work on every S3-compatible service without wildcard DNS.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Content-MD5 (below) protects the body and every S3-compatible service knows it;
            # the newer default CRC trailers are not understood everywhere.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default one is shared and not thread-safe to create.
        self.client: S3Client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config
        )
        self._logged: dict[str, float] = {}
        self._log_lock = threading.Lock()

    def location(self, key: str = "") -> str:
        """``s3://bucket/prefix+key``, for messages."""
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any earlier version in one step."""
        if not valid_key(key):
            raise ValueError(f"bad storage key {key!r}")
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call(
            "store",
            key,
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=data,
                ContentType=content_type(key),
                CacheControl=CACHE_CONTROL,
                ContentMD5=md5,
            ),
        )

    def sync(self, keys: Iterable[str]) -> None:
        """Nothing to do: S3 acknowledges a put once the object is stored durably."""

    def sweep(self, request_id: str) -> int:
        """Nothing to do: a put is one PUT of the whole object (never a multipart upload),
        and an interrupted one leaves nothing in the bucket."""
        return 0

    def get(self, key: str) -> StoredFile | None:
        """The image for ``key`` with the object's ETag, or None when there is none."""
        if not valid_key(key):
            return None

        def fetch() -> tuple[bytes, str]:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            with reply["Body"] as body:
                data = body.read()  # botocore checks the length against Content-Length
            return data, reply["ETag"].strip('"')

        try:
            data, etag = self._call("read", key, fetch, missing_ok=True)
        except _Missing:
            return None
        return StoredFile(content_type(key), data=data, etag=etag)

    def _call(self, action: str, key: str, call: Callable[[], T], missing_ok: bool = False) -> T:
        """Run one S3 call; a missing object is :class:`_Missing` (when ``missing_ok``), any
        other failure :class:`StorageUnavailable`, a misconfiguration also an error line."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ParamValidationError,
            PartialCredentialsError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            return call()
        except ParamValidationError:
            raise  # a bug in this module, not an outage
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if missing_ok and code in _MISSING:
                raise _Missing from None
            if code in _MISCONFIGURED:
                self._misconfigured(code, _MISCONFIGURED[code])
            failure: Exception = exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            self._misconfigured(
                "credentials",
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile "
                "(AWS_PROFILE) or an instance role",
            )
            failure = exc
        except (BotoCoreError, Urllib3Error, OSError) as exc:
            failure = exc  # refused, reset, timed out, cut short: the endpoint is unreachable
        raise StorageUnavailable(f"could not {action} {self.location(key)}: {failure}") from failure

    def _misconfigured(self, code: str, hint: str) -> None:
        """An error line naming what to fix, at most once a minute for each kind."""
        now = time.monotonic()
        with self._log_lock:
            last = self._logged.get(code)
            if last is not None and now - last < MISCONFIGURED_LOG_EVERY:
                return
            self._logged[code] = now
        log.error(
            "S3 storage %s at %s: %s (%s); images wait and are retried",
            self.location(),
            self.endpoint_url or "AWS",
            hint,
            code,
        )


class _Missing(Exception):
    """The object does not exist (inside this module only)."""
