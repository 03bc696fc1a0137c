"""API keys: created once, stored hashed, checked on every request with a short cache."""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flask import Flask, current_app, g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from service.models import ApiKey, Role, Store

KEY_PREFIX = "ptn_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, name, role and optional store scope."""

    key_id: int
    name: str
    role: Role
    store_id: int | None
    store_code: str | None

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


def hash_key(raw: str) -> bytes:
    return hashlib.sha256(raw.encode()).digest()


def create_key(session: Session, role: str, name: str, store_code: str | None = None) -> str:
    """Create an API key and return the raw key; only its hash is stored."""
    try:
        role_enum = Role(role)
    except ValueError:
        valid = ", ".join(r.value for r in Role)
        raise ValidationFailed(
            f"unknown role {role!r}", errors={"role": [f"must be one of: {valid}"]}
        ) from None
    store_id = None
    if store_code is not None:
        store_id = session.scalar(select(Store.id).where(Store.code == store_code))
        if store_id is None:
            raise NotFound(f"store {store_code!r} does not exist", errors={"store": ["unknown"]})
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            name=name,
            key_hash=hash_key(raw),
            prefix=raw[: len(KEY_PREFIX) + 6],
            role=role_enum.value,
            store_id=store_id,
        )
    )
    session.flush()
    return raw


class _KeyCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    def get(self, digest: bytes, ttl: float) -> tuple[bool, Principal | None]:
        with self._lock:
            hit = self._entries.get(digest)
        if hit and time.monotonic() - hit[0] < ttl:
            return True, hit[1]
        return False, None

    def put(self, digest: bytes, principal: Principal | None) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (time.monotonic(), principal)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _lookup(session: Session, digest: bytes) -> Principal | None:
    row = session.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.role, ApiKey.store_id, Store.code)
        .outerjoin(Store, Store.id == ApiKey.store_id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    return Principal(row[0], row[1], Role(row[2]), row[3], row[4])


def authenticate() -> Principal:
    """Resolve the bearer key of the current request (401 when missing or unknown)."""
    principal = g.get("principal")
    if principal is not None:
        return cast(Principal, principal)
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    digest = hash_key(raw.strip())
    cache: _KeyCache = current_app.extensions["patron.keycache"]
    ttl = current_app.config["PATRON"].api_key_cache_seconds
    found, principal = cache.get(digest, ttl)
    if not found:
        from service.db import get_db

        with get_db().unit_of_work() as session:
            principal = _lookup(session, digest)
        cache.put(digest, principal)
    if principal is None:
        raise Unauthorized("The API key is unknown or revoked.")
    g.principal = principal
    return principal


F = TypeVar("F", bound=Callable[..., Any])


def require(*roles: Role) -> Callable[[F], F]:
    """Allow only the given roles (admin is always allowed)."""
    allowed = set(roles) | {Role.ADMIN}

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate()
            if principal.role not in allowed:
                raise Forbidden(
                    f"Role {principal.role.value!r} may not call this endpoint.",
                    allowed_roles=sorted(r.value for r in allowed),
                )
            return fn(*args, **kwargs)

        return cast(F, wrapper)

    return decorator


def current_principal() -> Principal:
    return cast(Principal, g.principal)


def init_app(app: Flask) -> None:
    app.extensions["patron.keycache"] = _KeyCache()
