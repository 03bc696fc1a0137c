"""Channels: one small interface in front of every way Patron reaches a member.

A channel gets rendered messages and answers one `Outcome` per message: sent (with
the provider's id), transient failure (worth a retry, maybe after `retry_after`
seconds) or permanent failure. Channels never touch message state; the worker
records outcomes by conditional update (campaigns.dispatch).

`in_transaction` channels (log, no-op, call-centre tasks) complete inside the
worker's database transaction, so their effect and the recorded outcome commit
together; the others (SMTP, HTTP providers, webhooks) are called after the claim
committed, with the message id as the idempotency key.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from campaigns.channels.config import ChannelSettings, MessagingConfig

log = logging.getLogger("patron.messages")


class Result(enum.StrEnum):
    SENT = "sent"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Outgoing:
    """A rendered message ready for a channel."""

    message_id: int
    channel: str
    to: str
    subject: str
    body: str
    member_id: int
    member_external_id: str
    campaign_id: int | None = None
    template: str = ""
    locale: str = ""
    kind: str = "marketing"
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        return f"patron-msg-{self.message_id}"


@dataclass(frozen=True)
class Outcome:
    message_id: int
    result: Result
    provider_id: str | None = None
    error: str | None = None
    # Seconds the provider asked us to wait (429 / 503 Retry-After).
    retry_after: float | None = None


_TIMEOUT: Any = object()


class Channel:
    """Base class: subclasses implement `send_one`; `send_many` adds concurrency."""

    in_transaction = False

    def __init__(self, settings: ChannelSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self._pool: ThreadPoolExecutor | None = None

    def send_one(self, message: Outgoing) -> Outcome:
        raise NotImplementedError

    def send_many(
        self, messages: Sequence[Outgoing], session: Session | None = None
    ) -> list[Outcome]:
        if len(messages) <= 1 or self.settings.concurrency <= 1:
            return [self._safe(m) for m in messages]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.concurrency, thread_name_prefix=f"send-{self.name}"
            )
        return list(self._pool.map(self._safe, messages))

    def send_groups(
        self, messages: Sequence[Outgoing], *, group: int = 0, max_wait: float = 0.05
    ) -> Iterator[list[Outcome]]:
        """Outcomes in groups as they arrive, so the caller can record each group in one
        statement: a group closes at `group` outcomes (default: the concurrency), after
        `max_wait` seconds since its first outcome, or when nothing is left in flight.

        `concurrency` threads each take the next message and send it until none is left
        (no future per message: on loopback that bookkeeping costs as much as the send).
        At most 2 × concurrency outcomes are ever unrecorded (in flight, or answered but
        not yet handed back recorded): a sender waits for the caller to catch up, which
        bounds what a killed worker can leave sent but unrecorded.
        """
        if len(messages) <= 1 or self.settings.concurrency <= 1:
            for m in messages:
                yield [self._safe(m)]
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.settings.concurrency, thread_name_prefix=f"send-{self.name}"
            )
        source = iter(messages)
        arrived: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        window = 2 * self.settings.concurrency
        permits = threading.Semaphore(window)
        stop = threading.Event()

        def drain() -> None:
            try:
                for message in source:  # one iterator shared by the threads
                    permits.acquire()
                    if stop.is_set():
                        break
                    arrived.put(self._safe(message))
            finally:
                arrived.put(None)  # this thread is done

        senders = min(self.settings.concurrency, len(messages))
        for _ in range(senders):
            self._pool.submit(drain)
        size = group or self.settings.concurrency
        ready: list[Outcome] = []
        opened = 0.0
        try:
            while senders:
                try:
                    timeout = None if not ready else max(0.0, opened + max_wait - time.monotonic())
                    item = arrived.get(timeout=timeout)
                except queue.Empty:
                    item = _TIMEOUT
                if item is None:
                    senders -= 1
                elif item is not _TIMEOUT:
                    if not ready:
                        opened = time.monotonic()
                    ready.append(item)
                if ready and (
                    len(ready) >= size or not senders or time.monotonic() - opened >= max_wait
                ):
                    yield ready  # back here once the caller recorded them
                    for _ in ready:
                        permits.release()
                    ready = []
            if ready:
                yield ready
        finally:
            # The caller stopped early (an error): let the senders finish without sending.
            stop.set()
            for _ in range(window):
                permits.release()

    def _safe(self, message: Outgoing) -> Outcome:
        try:
            return self.send_one(message)
        except Exception as exc:  # a bug in an adapter must not lose the batch's outcomes
            log.exception("channel %s failed on message %s", self.name, message.message_id)
            return Outcome(message.message_id, Result.TRANSIENT, error=f"{type(exc).__name__}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class LogChannel(Channel):
    """Writes each message to the `patron.messages` log (the embedded demo's channel)."""

    in_transaction = True

    def send_one(self, message: Outgoing) -> Outcome:
        log.info(
            "message %s via %s to %s [%s]: %s | %s",
            message.message_id,
            message.channel,
            message.member_external_id,
            message.template,
            message.subject,
            message.body.replace("\n", " "),
        )
        return Outcome(message.message_id, Result.SENT, provider_id=f"log-{message.message_id}")

    def send_many(
        self, messages: Sequence[Outgoing], session: Session | None = None
    ) -> list[Outcome]:
        return [self.send_one(m) for m in messages]


class NoopChannel(Channel):
    """Accepts everything and does nothing (benchmarks measure Patron, not a provider)."""

    in_transaction = True

    def send_one(self, message: Outgoing) -> Outcome:
        return Outcome(message.message_id, Result.SENT)

    def send_many(
        self, messages: Sequence[Outgoing], session: Session | None = None
    ) -> list[Outcome]:
        return [Outcome(m.message_id, Result.SENT) for m in messages]


def build_channel(settings: ChannelSettings) -> Channel:
    """The channel object for one logical channel's configured transport."""
    transport = settings.transport
    if transport == "log":
        return LogChannel(settings)
    if transport == "noop":
        return NoopChannel(settings)
    if transport == "smtp":
        from campaigns.channels.smtp import SmtpChannel

        return SmtpChannel(settings)
    if transport == "http":
        from campaigns.channels.http import HttpProviderChannel

        return HttpProviderChannel(settings)
    if transport == "webhook":
        from campaigns.channels.webhook import WebhookChannel

        return WebhookChannel(settings)
    if transport == "tasks":
        from campaigns.channels.tasks import CallCentreChannel

        return CallCentreChannel(settings)
    raise ValueError(f"unknown transport {transport!r}")


def build_channels(config: MessagingConfig) -> dict[str, Channel]:
    return {name: build_channel(s) for name, s in config.channels.items()}
