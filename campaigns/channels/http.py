"""HTTP provider adapters (SMS, app push, WeChat): endpoint, credentials and request shape
come from the environment; the message id travels as the idempotency key."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from campaigns.channels import Channel, Outcome, Outgoing, Result
from campaigns.channels.config import ChannelSettings

_PLACEHOLDER = re.compile(r"\$(\w+)")
# Statuses a provider uses for "try again later"; every other 4xx is the request's fault.
TRANSIENT_STATUSES = frozenset({408, 425, 429})


def message_values(message: Outgoing) -> dict[str, Any]:
    """What `$name` placeholders of a request template may use."""
    return {
        "to": message.to,
        "subject": message.subject,
        "body": message.body,
        "message_id": message.message_id,
        "idempotency_key": message.idempotency_key,
        "member_id": message.member_external_id,
        "campaign_id": message.campaign_id,
        "template": message.template,
        "locale": message.locale,
        "channel": message.channel,
        "kind": message.kind,
    }


def fill(shape: Any, values: dict[str, Any]) -> Any:
    """Replace `$name` placeholders in a JSON request shape, keeping JSON types."""
    if isinstance(shape, dict):
        return {k: fill(v, values) for k, v in shape.items()}
    if isinstance(shape, list):
        return [fill(v, values) for v in shape]
    if isinstance(shape, str):
        whole = _PLACEHOLDER.fullmatch(shape)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(
            lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), shape
        )
    return shape


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify(status: int, headers: Any, data: bytes, settings: ChannelSettings) -> Outcome:
    """Map a provider's answer to an outcome (message id filled in by the caller)."""
    text = data[:300].decode("utf-8", "replace")
    if 200 <= status < 300:
        provider_id = None
        body: Any = None
        if data:
            try:
                body = json.loads(data)
            except ValueError:
                body = None
        if isinstance(body, dict):
            if settings.error_field and body.get(settings.error_field) not in (None, 0, "0"):
                code = str(body.get(settings.error_field))
                result = Result.TRANSIENT if code in settings.transient_codes else Result.PERMANENT
                return Outcome(0, result, error=f"provider error {code}: {text}")
            if body.get(settings.id_field) is not None:
                provider_id = str(body[settings.id_field])
        return Outcome(0, Result.SENT, provider_id=provider_id)
    retry_after = retry_after_seconds(headers.get("Retry-After"))
    if status >= 500 or status in TRANSIENT_STATUSES:
        return Outcome(0, Result.TRANSIENT, error=f"HTTP {status}: {text}", retry_after=retry_after)
    return Outcome(0, Result.PERMANENT, error=f"HTTP {status}: {text}")


class HttpProviderChannel(Channel):
    """POSTs one JSON request per message to the provider's endpoint.

    Each sending thread keeps one persistent (keep-alive) connection, so requests from
    the `concurrency` threads overlap and none pays a TCP or TLS handshake. The standard
    library's `http.client` does the HTTP: on loopback the provider answers in well under
    a millisecond and the client's own Python is the limit — it spends about a third of
    what urllib3's pool manager spends per request (bench/bench_messaging.py --clients).
    """

    def __init__(self, settings: ChannelSettings) -> None:
        super().__init__(settings)
        assert settings.url is not None
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{settings.name}: not an http(s) URL: {settings.url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.base_headers = {"Content-Type": "application/json", **settings.headers}
        if settings.token:
            self.base_headers["Authorization"] = f"Bearer {settings.token}"
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request_body(self, message: Outgoing) -> bytes:
        shape = fill(self.settings.body, message_values(message))
        return json.dumps(shape, ensure_ascii=False).encode()

    def headers_for(self, message: Outgoing, body: bytes) -> dict[str, str]:
        headers = dict(self.base_headers)
        headers[self.settings.idempotency_header] = message.idempotency_key
        return headers

    def _connection(self) -> http.client.HTTPConnection:
        found: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if found is None:
            if self.https:
                found = http.client.HTTPSConnection(
                    self.host,
                    self.port,
                    timeout=self.settings.timeout,
                    context=ssl.create_default_context(),
                )
            else:
                found = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.settings.timeout
                )
            self._local.connection = found
            with self._lock:
                self._connections.append(found)
        return found

    def _drop(self) -> None:
        found = getattr(self._local, "connection", None)
        if found is not None:
            found.close()
            self._local.connection = None
            with self._lock:
                if found in self._connections:
                    self._connections.remove(found)

    def send_one(self, message: Outgoing) -> Outcome:
        body = self.request_body(message)
        headers = self.headers_for(message, body)
        for attempt in (1, 2):
            connection = self._connection()
            reused = connection.sock is not None
            try:
                connection.request("POST", self.target, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                # A kept-alive connection the provider closed while idle fails on first
                # use: send once more on a fresh one (the idempotency key makes a repeat
                # harmless). Otherwise a timeout or refused connection: retry later.
                if attempt == 1 and reused and not isinstance(exc, TimeoutError):
                    continue
                return Outcome(message.message_id, Result.TRANSIENT, error=type(exc).__name__)
            if response.will_close:
                self._drop()
            outcome = classify(response.status, response.headers, data, self.settings)
            return Outcome(
                message.message_id,
                outcome.result,
                provider_id=outcome.provider_id,
                error=outcome.error,
                retry_after=outcome.retry_after,
            )
        raise AssertionError("unreachable")

    def close(self) -> None:
        super().close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
