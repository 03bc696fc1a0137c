"""Messaging settings from the environment: channels, contact policy, delivery pacing.

Every logical channel (email, sms, push, wechat, webhook, call_centre) is backed by
one transport chosen with `PATRON_<CHANNEL>_TRANSPORT`; see docs/operations.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from typing import Any

# Member-facing channels with a consent flag on the member (service.models.CONSENT_CHANNELS)
# plus the internal ones.
CHANNELS = ("email", "sms", "push", "wechat", "webhook", "call_centre")
TRANSPORTS = ("smtp", "http", "webhook", "tasks", "log", "noop")
DEFAULT_TRANSPORT = {
    # Nothing leaves the machine until a deployment names a real transport: the embedded
    # demo writes every message to the log.
    "email": "log",
    "sms": "log",
    "push": "log",
    "wechat": "log",
    "webhook": "log",
    "call_centre": "tasks",
}
ALLOWED_TRANSPORTS = {
    "email": ("smtp", "log", "noop"),
    "sms": ("http", "log", "noop"),
    "push": ("http", "log", "noop"),
    "wechat": ("http", "log", "noop"),
    "webhook": ("webhook", "log", "noop"),
    "call_centre": ("tasks", "log", "noop"),
}
# The request a provider receives; "$name" placeholders are replaced by the message's
# values (a string that is exactly one placeholder keeps the value's JSON type).
DEFAULT_BODY: dict[str, Any] = {
    "sms": {"to": "$to", "text": "$body", "message_id": "$message_id"},
    "push": {"alias": "$to", "title": "$subject", "body": "$body", "message_id": "$message_id"},
    # WeChat's customer-service message API (message/custom/send).
    "wechat": {"touser": "$to", "msgtype": "text", "text": {"content": "$body"}},
}
DEFAULT_ERROR_FIELD = {"wechat": "errcode"}
# WeChat answers HTTP 200 with errcode -1 (system busy) or 45009 (API quota): worth a retry.
DEFAULT_TRANSIENT_CODES = {"wechat": ("-1", "45009")}


class MessagingConfigError(ValueError):
    """A messaging setting in the environment is malformed (names the variable)."""


@dataclass(frozen=True)
class ChannelSettings:
    name: str
    transport: str
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    token: str | None = None
    secret: str | None = None
    idempotency_header: str = "Idempotency-Key"
    id_field: str = "id"
    error_field: str | None = None
    transient_codes: tuple[str, ...] = ()
    timeout: float = 5.0
    # Concurrent sends per worker process (HTTP requests / SMTP connections in flight).
    concurrency: int = 8
    # Messages per second for all workers together (shared through Redis); 0 = unlimited.
    rate: float = 0.0
    # SMTP
    host: str = "localhost"
    port: int = 25
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    sender: str = "Patron <no-reply@localhost>"
    # Frequency cap for marketing messages: `cap_count` per `cap_days` days (0 = none).
    cap_count: int = 2
    cap_days: float = 7.0
    quiet_hours: bool = True


@dataclass(frozen=True)
class MessagingConfig:
    channels: Mapping[str, ChannelSettings]
    # First consented channel with a contact point wins when a message names none, or
    # when its preferred channel has no consent or contact point.
    fallback: tuple[str, ...] = ("wechat", "push", "sms", "email")
    quiet_start: time | None = time(21, 0)
    quiet_end: time | None = time(9, 0)
    default_locale: str = "zh-CN"
    queue_name: str = "default"
    # Messages per RQ job (the dispatcher's batch) and per claim (one transaction) inside
    # a job: big jobs keep RQ's per-job cost (~10 ms) negligible, chunks of 1,000 keep
    # member locks short while amortising the claim's three statements.
    batch_size: int = 2000
    chunk_size: int = 1000
    dispatch_limit: int = 20_000
    dispatch_interval: float = 1.0
    # A `sending` row whose worker has not reported by then is handed out again.
    lease_seconds: float = 120.0
    # A row sitting in an RQ job this long without being claimed is dispatched again
    # (its job was lost with Redis, or no worker is running).
    redispatch_seconds: float = 600.0
    max_attempts: int = 8
    retry_base_seconds: float = 30.0
    retry_max_seconds: float = 6 * 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MessagingConfig:
        env = dict(os.environ if env is None else env)
        default_cap = _cap(env, "PATRON_FREQUENCY_CAP", (2, 7.0))
        quiet_channels = set(
            _list(env, "PATRON_QUIET_HOURS_CHANNELS", ("email", "sms", "push", "wechat"))
        )
        channels = {
            name: _channel(env, name, default_cap, name in quiet_channels) for name in CHANNELS
        }
        fallback = _list(env, "PATRON_CHANNEL_FALLBACK", cls.fallback)
        for name in fallback:
            if name not in CHANNELS:
                raise MessagingConfigError(
                    f"PATRON_CHANNEL_FALLBACK: unknown channel {name!r} (one of {CHANNELS})"
                )
        quiet = env.get("PATRON_QUIET_HOURS", "21:00-09:00").strip()
        start: time | None
        end: time | None
        if quiet in ("", "off", "none"):
            start = end = None
        else:
            match = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", quiet)
            if not match:
                raise MessagingConfigError("PATRON_QUIET_HOURS: expected HH:MM-HH:MM or 'off'")
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            try:
                start, end = time(h1, m1), time(h2, m2)
            except ValueError:
                raise MessagingConfigError("PATRON_QUIET_HOURS: not a time of day") from None
        return cls(
            channels=channels,
            fallback=fallback,
            quiet_start=start,
            quiet_end=end,
            default_locale=env.get("PATRON_DEFAULT_LOCALE", cls.default_locale),
            queue_name=env.get("PATRON_MESSAGE_QUEUE") or env.get("PATRON_QUEUE", "default"),
            batch_size=_int(env, "PATRON_MESSAGE_BATCH", cls.batch_size, 100),
            chunk_size=_int(env, "PATRON_MESSAGE_CHUNK", cls.chunk_size, 1),
            dispatch_limit=_int(env, "PATRON_DISPATCH_LIMIT", cls.dispatch_limit, 100),
            dispatch_interval=_float(env, "PATRON_DISPATCH_INTERVAL", cls.dispatch_interval),
            lease_seconds=_float(env, "PATRON_MESSAGE_LEASE_SECONDS", cls.lease_seconds),
            redispatch_seconds=_float(env, "PATRON_REDISPATCH_SECONDS", cls.redispatch_seconds),
            max_attempts=_int(env, "PATRON_MESSAGE_MAX_ATTEMPTS", cls.max_attempts, 1),
            retry_base_seconds=_float(env, "PATRON_RETRY_BASE_SECONDS", cls.retry_base_seconds),
            retry_max_seconds=_float(env, "PATRON_RETRY_MAX_SECONDS", cls.retry_max_seconds),
        )


def _int(env: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise MessagingConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise MessagingConfigError(f"{key}: must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise MessagingConfigError(f"{key}: expected a number, got {raw!r}") from None
    if value < 0:
        raise MessagingConfigError(f"{key}: must not be negative")
    return value


def _list(env: Mapping[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(key)
    if raw is None:
        return tuple(default)
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _cap(env: Mapping[str, str], key: str, default: tuple[int, float]) -> tuple[int, float]:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if raw.strip() in ("off", "none", "0"):
        return (0, default[1])
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*d\s*", raw)
    if not match:
        raise MessagingConfigError(f"{key}: expected COUNT/DAYSd such as 2/7d, or 'off'")
    return int(match.group(1)), float(match.group(2))


def _channel(
    env: Mapping[str, str], name: str, default_cap: tuple[int, float], quiet: bool
) -> ChannelSettings:
    prefix = f"PATRON_{name.upper()}_"
    transport = env.get(prefix + "TRANSPORT", DEFAULT_TRANSPORT[name])
    if transport not in ALLOWED_TRANSPORTS[name]:
        raise MessagingConfigError(
            f"{prefix}TRANSPORT: {transport!r} is not one of {ALLOWED_TRANSPORTS[name]}"
        )
    headers: dict[str, str] = {}
    if env.get(prefix + "HEADERS"):
        try:
            loaded = json.loads(env[prefix + "HEADERS"])
        except json.JSONDecodeError:
            raise MessagingConfigError(f"{prefix}HEADERS: not a JSON object") from None
        if not isinstance(loaded, dict):
            raise MessagingConfigError(f"{prefix}HEADERS: not a JSON object")
        headers = {str(k): str(v) for k, v in loaded.items()}
    body = DEFAULT_BODY.get(name)
    if env.get(prefix + "BODY"):
        try:
            body = json.loads(env[prefix + "BODY"])
        except json.JSONDecodeError:
            raise MessagingConfigError(f"{prefix}BODY: not JSON") from None
    if transport in ("http", "webhook") and not env.get(prefix + "URL"):
        raise MessagingConfigError(f"{prefix}URL is required for the {transport} transport")
    if transport == "webhook" and not env.get(prefix + "SECRET"):
        raise MessagingConfigError(f"{prefix}SECRET is required to sign webhooks")
    cap = _cap(env, prefix + "FREQUENCY_CAP", default_cap)
    return ChannelSettings(
        name=name,
        transport=transport,
        url=env.get(prefix + "URL") or None,
        headers=headers,
        body=body,
        token=env.get(prefix + "TOKEN") or None,
        secret=env.get(prefix + "SECRET") or None,
        idempotency_header=env.get(prefix + "IDEMPOTENCY_HEADER", "Idempotency-Key"),
        id_field=env.get(prefix + "ID_FIELD", "id"),
        error_field=env.get(prefix + "ERROR_FIELD", DEFAULT_ERROR_FIELD.get(name)) or None,
        transient_codes=_list(
            env, prefix + "TRANSIENT_CODES", DEFAULT_TRANSIENT_CODES.get(name, ())
        ),
        timeout=_float(env, prefix + "TIMEOUT", 5.0),
        concurrency=_int(env, prefix + "CONCURRENCY", 8, 1),
        rate=_float(env, prefix + "RATE", 0.0),
        host=env.get(prefix + "HOST", "localhost"),
        port=_int(env, prefix + "PORT", 25, 1),
        username=env.get(prefix + "USERNAME") or None,
        password=env.get(prefix + "PASSWORD") or None,
        starttls=env.get(prefix + "STARTTLS", "0") in ("1", "true", "yes"),
        sender=env.get(prefix + "FROM", "Patron <no-reply@localhost>"),
        cap_count=cap[0],
        cap_days=cap[1],
        quiet_hours=quiet,
    )
