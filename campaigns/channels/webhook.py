"""Signed webhooks: HMAC-SHA256 over "<timestamp>.<body>", and the receiver's check.

Header `Patron-Signature: t=<unix seconds>,v1=<hex digest>`. A receiver verifies with
`verify(secret, body, header)`, which also rejects stale timestamps (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from campaigns.channels import Outgoing
from campaigns.channels.http import HttpProviderChannel

SIGNATURE_HEADER = "Patron-Signature"
DEFAULT_TOLERANCE = 300.0


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """True when `header` signs exactly `body` with `secret` within `tolerance` seconds."""
    if not header:
        return False
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    # Several v1 values are allowed so a receiver can accept old and new secrets.
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))


class WebhookChannel(HttpProviderChannel):
    """POSTs the message as JSON to the configured URL, signed with the shared secret."""

    def request_body(self, message: Outgoing) -> bytes:
        document = {
            "id": message.message_id,
            "idempotency_key": message.idempotency_key,
            "channel": "webhook",
            "member_id": message.member_external_id,
            "campaign_id": message.campaign_id,
            "template": message.template,
            "locale": message.locale,
            "kind": message.kind,
            "subject": message.subject,
            "body": message.body,
            "payload": message.payload,
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def headers_for(self, message: Outgoing, body: bytes) -> dict[str, str]:
        headers = super().headers_for(message, body)
        assert self.settings.secret is not None
        headers[SIGNATURE_HEADER] = sign(self.settings.secret, body, int(time.time()))
        return headers
