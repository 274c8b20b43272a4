"""Webhook delivery from the outbox: Standard Webhooks headers, HMAC signing, no redirects,
the SSRF guard; a failure is a reason string, never an exception into the worker."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import requests
from standardwebhooks.webhooks import Webhook

from imgproc.config import Settings
from imgproc.fetcher import describe_transport_error, url_refusal
from imgproc.netguard import make_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """The outcome of one attempt."""

    ok: bool
    error: str | None


def message_id(request_id: str) -> str:
    """The ``webhook-id`` of a request's completion event, stable across retries."""
    return f"msg_{request_id}"


class WebhookSender:
    """Signs and POSTs webhook payloads."""

    def __init__(self, settings: Settings, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        self.session = session or make_session(
            allow_private=settings.allow_private_urls, pool_size=4
        )

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    def headers(self, msg_id: str, sent_at: datetime, body: str) -> dict[str, str]:
        """Standard Webhooks headers for ``body``."""
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
        }
        if self.signer is not None:
            headers["webhook-signature"] = self.signer.sign(msg_id, sent_at, body)
        return headers

    def deliver(
        self, url: str, msg_id: str, payload: dict[str, Any], sent_at: datetime
    ) -> Delivery:
        """POST ``payload`` once; 2xx is success, anything else a short reason."""
        refusal = url_refusal(url, allow_private=self.settings.allow_private_urls)
        if refusal:
            return Delivery(False, refusal)
        body = json.dumps(payload, separators=(",", ":"))
        try:
            response = self.session.post(
                url,
                data=body.encode(),
                headers=self.headers(msg_id, sent_at, body),
                timeout=(self.settings.connect_timeout, self.settings.webhook_timeout),
                allow_redirects=False,
            )
            response.close()
        except requests.RequestException as exc:
            return Delivery(False, describe_transport_error(exc)[0])
        if 200 <= response.status_code < 300:
            return Delivery(True, None)
        return Delivery(False, f"HTTP {response.status_code}")
