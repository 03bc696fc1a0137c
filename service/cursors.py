"""Opaque page cursors: a kind tag and a row id, base64url without padding.

The kind keeps a cursor of one list from being replayed on another; a cursor that does
not decode (or is of another kind) is a 422 on the `cursor` field.
"""

from __future__ import annotations

import base64
import binascii

from service.errors import ValidationFailed


def encode_id(kind: str, value: int) -> str:
    """The cursor for the row `value` of a list tagged `kind`."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode_id(kind: str, cursor: str) -> int:
    """The row id in a cursor made by `encode_id(kind, ...)`; ValidationFailed otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, value = raw.partition(":")
        if tag != kind:
            raise ValueError(tag)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed(
            "the cursor is not one this API returned", errors={"cursor": ["invalid cursor"]}
        ) from None
