"""Configuration read from the environment (twelve-factor); nothing here does I/O."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    """Where embedded PostgreSQL / Redis keep their files when no server is configured."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "patron"


@dataclass(frozen=True)
class Config:
    """Settings for one Patron process. Unset URLs mean "use the embedded servers"."""

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    # Largest accepted request body; POS payloads are small, imports go through the CLI.
    max_content_length: int = 1_000_000
    log_level: str = "INFO"
    log_json: bool = True
    # API keys are looked up on every request; a short cache keeps the hot path at
    # one round trip while a revoked key stops working within this many seconds.
    api_key_cache_seconds: float = 10.0
    db_pool_size: int = 5
    # A pooled connection idle for longer than this is pinged (SELECT 1) before use and
    # replaced if dead; one used more recently is not, saving a round trip per request
    # under load. 0 pings on every checkout.
    db_ping_idle_seconds: float = 2.0
    # Hot-path statements are PREPAREd once per connection; turn off behind a
    # transaction-pooling proxy such as PgBouncer in transaction mode.
    db_prepared_statements: bool = True
    queue_name: str = "default"
    # One currency per deployment: statistics and budgets add amounts together.
    currency: str = "CNY"
    # Coupon campaigns that could cost more than this (in `currency`) need four-eyes approval.
    approval_budget: str = "10000"
    attributes_max_keys: int = 50
    attributes_max_bytes: int = 4096
    tags_max: int = 50
    testing: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config from `PATRON_*` variables plus `DATABASE_URL` / `REDIS_URL`."""
        env = dict(os.environ if env is None else env)
        cfg = cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            data_dir=Path(env["PATRON_DATA_DIR"])
            if env.get("PATRON_DATA_DIR")
            else default_data_dir(),
            max_content_length=int(env.get("PATRON_MAX_BODY_BYTES", cls.max_content_length)),
            log_level=env.get("PATRON_LOG_LEVEL", cls.log_level).upper(),
            log_json=env.get("PATRON_LOG_JSON", "1") not in ("0", "false", "no"),
            api_key_cache_seconds=float(
                env.get("PATRON_API_KEY_CACHE_SECONDS", cls.api_key_cache_seconds)
            ),
            db_pool_size=int(env.get("PATRON_DB_POOL_SIZE", cls.db_pool_size)),
            db_ping_idle_seconds=float(
                env.get("PATRON_DB_PING_IDLE_SECONDS", cls.db_ping_idle_seconds)
            ),
            db_prepared_statements=env.get("PATRON_DB_PREPARED_STATEMENTS", "1")
            not in ("0", "false", "no"),
            queue_name=env.get("PATRON_QUEUE", cls.queue_name),
            currency=env.get("PATRON_CURRENCY", cls.currency).upper(),
            approval_budget=env.get("PATRON_APPROVAL_BUDGET", cls.approval_budget),
        )
        try:
            if Decimal(cfg.approval_budget) < 0:
                raise InvalidOperation
        except InvalidOperation:
            raise ValueError(
                f"PATRON_APPROVAL_BUDGET must be a non-negative amount, not {cfg.approval_budget!r}"
            ) from None
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown config keys: {sorted(unknown)}")
        return replace(cfg, **overrides)

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None
