"""Probes, the problem+json contract for every failure, OpenAPI, docs, request ids, logs."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine

from service.app import create_app
from service.config import Config
from service.logging_setup import redact


def test_healthz_and_readyz(client: FlaskClient):
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_reports_the_unreachable_part(config: Config, engine: Engine):
    broken = create_app(replace(config, redis_url="redis://127.0.0.1:1/0"), engine=engine)
    resp = broken.test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.json["checks"]["database"] == "ok"
    assert resp.json["checks"]["redis"].startswith("error")


@pytest.mark.parametrize(
    ("method", "path", "status", "type_"),
    [
        ("GET", "/no/such/route", 404, "not-found"),
        ("DELETE", "/v1/stores", 405, "method-not-allowed"),
        ("PUT", "/healthz", 405, "method-not-allowed"),
    ],
)
def test_http_errors_are_problems(client: FlaskClient, method, path, status, type_):
    resp = client.open(path, method=method)
    assert resp.status_code == status
    assert resp.content_type == "application/problem+json"
    body = resp.json
    assert body["type"] == f"https://patron.dev/problems/{type_}"
    assert body["status"] == status and body["title"] and body["detail"]


def test_unhandled_exception_is_a_problem_without_internals(
    config: Config, engine: Engine, caplog: pytest.LogCaptureFixture
):
    app: Flask = create_app(config, engine=engine)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    with caplog.at_level(logging.ERROR):
        resp = app.test_client().get("/boom")
    assert resp.status_code == 500
    assert resp.content_type == "application/problem+json"
    assert resp.json["type"].endswith("/internal-error")
    assert "secret" not in resp.get_data(as_text=True)
    assert any("unhandled" in r.getMessage() for r in caplog.records)


def test_openapi_document_and_offline_docs(client: FlaskClient):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/members", "/v1/events/purchases", "/v1/events/refunds", "/v1/stores"):
        assert path in spec["paths"], path
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    # Offline: every asset comes from this server, none from a CDN.
    assert "http://" not in html and "https://" not in html
    asset = client.get("/docs/static/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.get_data()) > 100_000


def test_request_id_is_echoed_or_generated(client: FlaskClient):
    mine = client.get("/healthz", headers={"X-Request-ID": "till-7-abc"})
    assert mine.headers["X-Request-ID"] == "till-7-abc"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id; DROP"})
    assert generated.headers["X-Request-ID"] != "bad id; DROP"
    assert len(generated.headers["X-Request-ID"]) == 32
    problem = client.get("/nowhere", headers={"X-Request-ID": "trace-1"})
    assert problem.json["request_id"] == "trace-1"


def test_logs_never_show_email_or_phone():
    line = redact("sent to lilei@example.com and +86 138 1234 5678, order 2026-11-01")
    assert "lilei@example.com" not in line and "1234 5678" not in line
    assert "2026-11-01" in line  # dates are not phone numbers


def test_log_records_carry_request_id_and_are_redacted(
    client: FlaskClient, auth, store: str, capsys: pytest.CaptureFixture[str]
):
    from service.logging_setup import configure

    configure("INFO", json_logs=True)
    try:
        client.post(
            "/v1/members",
            json={"external_id": "M-LOG-1", "email": "secret.person@example.com"},
            headers={**auth("marketer"), "X-Request-ID": "req-log-1"},
        )
        logging.getLogger("test").info("member email is secret.person@example.com")
    finally:
        configure("WARNING", json_logs=False)
    err = capsys.readouterr().err
    assert '"request_id": "req-log-1"' in err
    assert "secret.person@example.com" not in err


def test_absurdly_nested_json_is_a_400_problem(client: FlaskClient, auth):
    body = "[" * 100_000 + "]" * 100_000
    resp = client.post(
        "/v1/members", data=body, content_type="application/json", headers=auth("marketer")
    )
    assert resp.status_code == 400
    assert resp.json["type"].endswith("/malformed-json")
