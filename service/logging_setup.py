"""JSON logs with the request id; e-mail addresses and phone numbers never appear in clear."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from flask import g, has_app_context
from pythonjsonlogger.json import JsonFormatter

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
PHONE = re.compile(r"(?<![\w-])\+?\d[\d \-]{6,}\d(?![\w-])")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _mask_phone(match: re.Match[str]) -> str:
    candidate = match.group(0)
    digits = sum(c.isdigit() for c in candidate)
    # ISO dates and short numbers (amounts, counts) are not phone numbers.
    if DATE.match(candidate) or digits < 8:
        return candidate
    return "***" + candidate[-2:]


def redact(text: str) -> str:
    """Mask e-mail addresses and phone numbers, keeping a hint for support staff."""
    text = EMAIL.sub(lambda m: m.group(0)[0] + "***@***", text)
    return PHONE.sub(_mask_phone, text)


class RedactingFilter(logging.Filter):
    """Applied to every record: formats the message first so args are redacted too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        if has_app_context():
            record.request_id = g.get("request_id")
        elif not hasattr(record, "request_id"):
            record.request_id = None
        return True


def configure(level: str = "INFO", json_logs: bool = True) -> None:
    """Install one handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_patron", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._patron = True  # type: ignore[attr-defined]
    formatter: logging.Formatter
    if json_logs:
        formatter = JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "asctime": "time"},
        )
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)


def log_extra(**fields: Any) -> dict[str, Any]:
    return {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
