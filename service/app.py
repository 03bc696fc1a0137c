"""The app factory: config in, Flask app out; every subsystem wires itself in init_app."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request
from flask_smorest import Api
from flask_smorest import Blueprint as SmorestBlueprint
from sqlalchemy import Engine

from service import auth, db, errors, logging_setup, redis_client
from service.config import Config

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

API_DESCRIPTION = """Patron: members, purchases, segments, campaigns and messaging.

Authenticate with `Authorization: Bearer <api key>` (create keys with
`patron keys create --role ROLE`). Errors are `application/problem+json`.
"""


def create_app(config: Config | None = None, *, engine: Engine | None = None) -> Flask:
    """Build the API app. Embedded servers are started here if no URLs are configured."""
    from service import embedded

    config = embedded.resolve(config or Config.from_env())
    app = Flask("patron")
    app.config.update(
        PATRON=config,
        TESTING=config.testing,
        MAX_CONTENT_LENGTH=config.max_content_length,
        API_TITLE="Patron",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": {"description": API_DESCRIPTION},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    logging_setup.configure(config.log_level, config.log_json)

    db.init_app(app, engine or db.make_engine(config))
    if config.redis_url is None:
        raise RuntimeError("redis_url is not resolved")
    redis_client.init_app(app, config.redis_url)
    auth.init_app(app)

    api = Api(app)
    from service import api as api_package
    from service.api import docs

    # Every module of service/api with a flask-smorest `blp` is an API area; adding a
    # module is all it takes to serve (and document) it.
    for info in sorted(pkgutil.iter_modules(api_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"service.api.{info.name}")
        blp = getattr(module, "blp", None)
        if isinstance(blp, SmorestBlueprint):
            api.register_blueprint(blp)
    app.register_blueprint(docs.blp)
    # After flask-smorest so our problem+json handlers replace its JSON ones.
    errors.init_app(app)
    _request_ids(app)
    return app


def _request_ids(app: Flask) -> None:
    access = logging.getLogger("patron.access")

    @app.before_request
    def _assign() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _echo(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if access.isEnabledFor(logging.INFO):
            # Path and status only: bodies carry personal data and are never logged.
            access.info(
                "%s %s %s %.1fms",
                request.method,
                request.path,
                response.status_code,
                (time.perf_counter() - g.get("started", time.perf_counter())) * 1000,
            )
        return response


def wsgi_app(**_: Any) -> Flask:
    """Entry point for gunicorn (`service.app:wsgi_app()`)."""
    return create_app()
