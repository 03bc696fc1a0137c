"""Real local servers and committed test data for the messaging tests.

`RecordingServer` is an HTTP provider on loopback that records every request and,
like real providers, honours the Idempotency-Key: a repeated key is answered as the
first time and not counted as a second delivery. `deliveries` counts distinct keys
delivered; `requests` counts everything that arrived.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import Engine, text

from campaigns.channels.config import MessagingConfig

Responder = Callable[[int, dict[str, Any]], tuple[int, dict[str, str], bytes]]


def ok(_: int, __: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b'{"id": "prov-1"}'


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RecordingServer:
    responder: Responder = ok
    requests: list[Recorded] = field(default_factory=list)
    deliveries: dict[str, bytes] = field(default_factory=dict)
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set to make requests hang until released (to kill a worker mid-send).
    gate: threading.Event | None = None

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items()}
                key = headers.get("Idempotency-Key", "")
                with server.lock:
                    index = len(server.requests)
                    server.requests.append(Recorded(self.path, headers, body))
                    replay = key in server.deliveries
                if server.gate is not None:
                    server.gate.wait(30)
                if replay:
                    with server.lock:
                        server.duplicates += 1
                    status, extra, answer = 200, {}, b'{"id": "replayed"}'
                else:
                    status, extra, answer = server.responder(index, headers)
                    if 200 <= status < 300:
                        with server.lock:
                            server.deliveries[key] = body
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client killed mid-request (the SIGKILL test): expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/send"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gate is not None:
            self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def delivered_ids(self) -> list[int]:
        with self.lock:
            return sorted(int(k.rsplit("-", 1)[1]) for k in self.deliveries if k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_for(env: dict[str, str] | None = None) -> MessagingConfig:
    """Messaging settings as a deployment would set them; quiet hours off unless asked."""
    base = {"PATRON_QUIET_HOURS": "off", "PATRON_MESSAGE_LEASE_SECONDS": "60"}
    base.update(env or {})
    return MessagingConfig.from_env(base)


class Data:
    """Committed members, templates and messages, removed again at the end of the test."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.member_ids: list[int] = []
        self.templates: list[str] = []
        self.prefix = f"MSG-{uuid.uuid4().hex[:8]}"

    def members(self, count: int, **columns: Any) -> list[int]:
        values = {
            "timezone": "Asia/Shanghai",
            "locale": "zh-CN",
            "consent_sms": True,
            "phone": "+8613800000000",
            **columns,
        }
        names = ", ".join(values)
        binds = ", ".join(f":{k}" for k in values)
        if "attributes" in values:
            values["attributes"] = json.dumps(values["attributes"])
            binds = binds.replace(":attributes", "CAST(:attributes AS jsonb)")
        with self.engine.begin() as conn:
            ids = list(
                conn.execute(
                    text(
                        f"INSERT INTO members (external_id, {names}) "
                        f"SELECT :prefix || '-' || n, {binds} FROM generate_series(1, :count) n "
                        "RETURNING id"
                    ),
                    {"prefix": f"{self.prefix}-{len(self.member_ids)}", "count": count, **values},
                ).scalars()
            )
        self.member_ids.extend(ids)
        return ids

    def template(self, name: str, variants: dict[tuple[str, str], tuple[str, str]]) -> str:
        with self.engine.begin() as conn:
            for (channel, locale), (subject, body) in variants.items():
                conn.execute(
                    text(
                        "INSERT INTO message_templates (name, channel, locale, subject, body, "
                        "updated_by) VALUES (:n, :c, :l, :s, :b, 'test') "
                        "ON CONFLICT (name, channel, locale) DO UPDATE SET subject = :s, "
                        "body = :b, version = message_templates.version + 1"
                    ),
                    {"n": name, "c": channel, "l": locale, "s": subject, "b": body},
                )
        self.templates.append(name)
        return name

    def messages(self, member_ids: list[int], template: str, **columns: Any) -> list[int]:
        """Insert messages the way a campaign batch does (INSERT … SELECT, defaults)."""
        names = "".join(f", {k}" for k in columns)
        binds = "".join(f", :{k}" for k in columns)
        with self.engine.begin() as conn:
            return list(
                conn.execute(
                    text(
                        f"INSERT INTO outbox_messages (member_id, template{names}) "
                        f"SELECT m, :template{binds} FROM unnest(CAST(:ids AS bigint[])) m "
                        "RETURNING id"
                    ),
                    {"ids": member_ids, "template": template, **columns},
                ).scalars()
            )

    def statuses(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT * FROM outbox_messages WHERE id = ANY(:ids)"), {"ids": ids}
            ).mappings()
            return {r["id"]: dict(r) for r in rows}

    def cleanup(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text("DELETE FROM call_tasks WHERE member_id = ANY(:ids)"),
                {"ids": self.member_ids},
            )
            conn.execute(
                text("DELETE FROM outbox_messages WHERE member_id = ANY(:ids)"),
                {"ids": self.member_ids},
            )
            conn.execute(
                text("DELETE FROM message_templates WHERE name = ANY(:n)"),
                {"n": self.templates},
            )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    text("DELETE FROM members WHERE id = ANY(:ids)"), {"ids": self.member_ids}
                )
        except Exception:  # noqa: S110 - purchases or decisions refer to them; harmless
            pass


@contextmanager
def committed_data(engine: Engine) -> Iterator[Data]:
    data = Data(engine)
    try:
        yield data
    finally:
        data.cleanup()
