"""Typed errors and the one `application/problem+json` payload used for every failure."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, json
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_MIME = "application/problem+json"
TYPE_BASE = "https://patron.dev/problems/"


class PatronError(Exception):
    """Base of domain errors; each subclass maps to one problem type and status."""

    status = 400
    type = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, errors: dict[str, Any] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.extra = extra


class ValidationFailed(PatronError):
    status = 422
    type = "validation-error"
    title = "Validation failed"


class NotFound(PatronError):
    status = 404
    type = "not-found"
    title = "Not found"


class Conflict(PatronError):
    status = 409
    type = "conflict"
    title = "Conflict"


class Gone(PatronError):
    status = 410
    type = "gone"
    title = "Gone"


class Unauthorized(PatronError):
    status = 401
    type = "unauthorized"
    title = "Unauthorized"


class Forbidden(PatronError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


# Werkzeug / flask-smorest HTTP errors mapped to stable problem types.
HTTP_TYPES = {
    400: "malformed-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    428: "precondition-required",
    429: "too-many-requests",
    500: "internal-error",
    503: "unavailable",
}


def problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    errors: dict[str, Any] | None = None,
    **extra: Any,
) -> Response:
    """Build a problem+json response (RFC 9457)."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_,
        "title": title,
        "status": status,
        "detail": detail,
    }
    request_id = g.get("request_id") if g else None
    if request_id:
        body["request_id"] = request_id
    if errors:
        body["errors"] = errors
    body.update(extra)
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_MIME)


def _flatten_smorest_errors(errors: Any) -> dict[str, Any]:
    # flask-smorest nests marshmallow messages under the location ("json", "query",
    # "headers"); clients want the field names at the top level.
    if isinstance(errors, dict) and set(errors) <= {"json", "query", "headers", "path", "form"}:
        flat: dict[str, Any] = {}
        for location, messages in errors.items():
            if isinstance(messages, dict):
                flat.update(messages)
            else:
                flat[location] = messages
        return flat
    return errors if isinstance(errors, dict) else {"_schema": errors}


def handle_patron_error(err: PatronError) -> Response:
    return problem(err.status, err.type, err.title, err.detail, err.errors, **err.extra)


def handle_http_exception(err: HTTPException) -> Response:
    status = err.code or 500
    type_ = HTTP_TYPES.get(status, "http-error")
    errors = None
    data = getattr(err, "data", None)
    if isinstance(data, dict) and "messages" in data:
        errors = _flatten_smorest_errors(data["messages"])
    detail = err.description or err.name
    if status == 422 and errors:
        detail = "The request has invalid fields: " + ", ".join(sorted(errors)) + "."
    if status == 400 and errors and "json" in errors:
        type_ = "malformed-json"
        detail = "The request body is not valid JSON."
        errors = {"body": ["not valid JSON"]}
    resp = problem(status, type_, err.name, detail, errors)
    if status == 405 and err.get_response().headers.get("Allow"):
        resp.headers["Allow"] = err.get_response().headers["Allow"]
    return resp


def handle_recursion(err: RecursionError) -> Response:
    # json.loads gives up on absurdly nested documents; that is the client's input, not a bug.
    return problem(
        400,
        "malformed-json",
        "Bad Request",
        "The JSON body is nested too deeply.",
        {"body": ["nested too deeply"]},
    )


def handle_unexpected(err: Exception) -> Response:
    log.exception("unhandled error")
    return problem(500, "internal-error", "Internal server error", "An unexpected error occurred.")


def init_app(app: Flask) -> None:
    app.register_error_handler(PatronError, handle_patron_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(RecursionError, handle_recursion)
    app.register_error_handler(Exception, handle_unexpected)
