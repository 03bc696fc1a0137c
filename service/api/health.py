"""Liveness and readiness probes (no auth: load balancers call them)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import text

from service.db import get_db
from service.redis_client import get_redis

blp = Blueprint("health", __name__, description="Liveness and readiness")


@blp.route("/healthz")
class Health(MethodView):
    def get(self) -> dict[str, Any]:
        """The process is up."""
        return {"status": "ok"}


@blp.route("/readyz")
class Ready(MethodView):
    def get(self) -> tuple[dict[str, Any], int]:
        """PostgreSQL and Redis are reachable (503 otherwise, with the failing part)."""
        checks: dict[str, Any] = {}
        try:
            with get_db().engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            current_app.logger.warning("readiness: database unreachable: %s", type(exc).__name__)
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            get_redis().ping()
            checks["redis"] = "ok"
        except Exception as exc:
            current_app.logger.warning("readiness: redis unreachable: %s", type(exc).__name__)
            checks["redis"] = f"error: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if checks["redis"] == "ok":
            # Details, not checks: a backlog or failed jobs do not make the API unready.
            body["details"] = {"message_queue": _message_queue()}
        return body, 200 if ok else 503


def _message_queue() -> dict[str, Any]:
    """Depth, running and failed delivery jobs of the RQ message queue (cheap Redis reads)."""
    from campaigns.channels.config import MessagingConfig
    from campaigns.dispatch import queue_metrics

    try:
        return queue_metrics(get_redis(), MessagingConfig.from_env())
    except Exception as exc:
        return {"error": type(exc).__name__}
