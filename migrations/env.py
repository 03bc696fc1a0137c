"""Alembic environment: runs against the connection or URL handed over by service.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

import campaigns.models
import campaigns.models_coupons
import campaigns.models_messaging
import campaigns.models_tiers  # noqa: F401
import segments.models
import segments.models_custom  # noqa: F401
from service.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
