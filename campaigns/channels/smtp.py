"""Email over SMTP: one connection per sending thread, reused across messages."""

from __future__ import annotations

import contextlib
import smtplib
import threading
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from campaigns.channels import Channel, Outcome, Outgoing, Result
from campaigns.channels.config import ChannelSettings


class SmtpChannel(Channel):
    def __init__(self, settings: ChannelSettings) -> None:
        super().__init__(settings)
        self._local = threading.local()

    def _connection(self) -> smtplib.SMTP:
        conn: smtplib.SMTP | None = getattr(self._local, "conn", None)
        if conn is None:
            s = self.settings
            conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            if s.starttls:
                conn.starttls()
            if s.username:
                conn.login(s.username, s.password or "")
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()

    def build(self, message: Outgoing) -> EmailMessage:
        email = EmailMessage()
        email["From"] = self.settings.sender
        email["To"] = message.to
        email["Subject"] = message.subject
        email["Date"] = formatdate(localtime=False)
        # A stable Message-ID per outbox row lets receivers drop a resent duplicate.
        domain = self.settings.sender.rsplit("@", 1)[-1].strip("> ") or "patron"
        email["Message-ID"] = make_msgid(idstring=message.idempotency_key, domain=domain)
        email["X-Patron-Message-Id"] = str(message.message_id)
        email.set_content(message.body)
        return email

    def send_one(self, message: Outgoing) -> Outcome:
        email = self.build(message)
        for attempt in (1, 2):
            try:
                refused = self._connection().send_message(email)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [code for code, _ in exc.recipients.values()]
                result = (
                    Result.TRANSIENT if all(400 <= c < 500 for c in codes) else Result.PERMANENT
                )
                return Outcome(message.message_id, result, error=f"recipient refused {codes}")
            except smtplib.SMTPResponseException as exc:
                self._drop()
                result = Result.TRANSIENT if 400 <= exc.smtp_code < 500 else Result.PERMANENT
                return Outcome(message.message_id, result, error=f"SMTP {exc.smtp_code}")
            except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                # A pooled connection the server closed: reconnect once, then give up.
                self._drop()
                if attempt == 2:
                    return Outcome(message.message_id, Result.TRANSIENT, error=type(exc).__name__)
                continue
            except (OSError, smtplib.SMTPException) as exc:
                self._drop()
                return Outcome(message.message_id, Result.TRANSIENT, error=type(exc).__name__)
            if refused:
                return Outcome(message.message_id, Result.PERMANENT, error="recipient refused")
            return Outcome(message.message_id, Result.SENT, provider_id=email["Message-ID"])
        return Outcome(message.message_id, Result.TRANSIENT, error="unreachable")
