"""Saved rules: named, immutable, content-hashed versions; an edit adds the next version.

Services take the session and never commit. Anything that uses a saved rule
(segments, campaigns, decisions) records the (name, version) or hash it used.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from rules import (
    Rule,
    RuleSyntaxError,
    RuleValidationError,
    Scope,
    Vocabulary,
    parse_rule,
    to_text,
    validate,
)
from service.audit import record as audit
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import RuleVersion

RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
# Paths under /v1/rules that are not rule names.
RESERVED_NAMES = frozenset({"vocabulary", "validate", "explain"})


def rule_or_422(source: Any, vocab: Vocabulary, scope: Scope, field: str = "rule") -> Rule:
    """Parse and validate either form, turning rule errors into a 422 problem.

    `errors` is keyed by JSON pointer into the rule (e.g. "/all/0"); syntax errors
    are keyed by the request field and carry the text position.
    """
    try:
        return parse_rule(source, vocab, scope)
    except RuleSyntaxError as exc:
        raise ValidationFailed(
            f"The rule text does not parse: {exc}",
            errors={field: [str(exc)]},
            problems=[exc.as_dict()],
        ) from None
    except RuleValidationError as exc:
        raise ValidationFailed(
            f"The rule is invalid: {exc}",
            errors=exc.by_pointer(),
            problems=[p.as_dict() for p in exc.problems],
        ) from None


def describe_rule(rule: Rule) -> dict[str, Any]:
    """The normalised rule as the API returns it."""
    return {
        "scope": rule.scope.value,
        "rule": rule.to_json(),
        "text": to_text(rule.root),
        "hash": rule.hash,
        "fields": rule.fields,
    }


def _row_dict(row: RuleVersion) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "scope": row.scope,
        "description": row.description,
        "rule": row.rule,
        "text": row.text,
        "hash": row.content_hash,
        "created_at": row.created_at,
        "created_by": row.created_by,
    }


def _check_name(name: str) -> None:
    if not RULE_NAME.match(name) or name in RESERVED_NAMES:
        raise ValidationFailed(
            f"invalid rule name {name[:100]!r}",
            errors={
                "name": [
                    "must be 1-100 characters: lowercase letters, digits and . _ - "
                    "(starting with a letter or digit), and not "
                    + ", ".join(sorted(RESERVED_NAMES))
                ]
            },
        )


def _insert(
    session: Session, name: str, version: int, rule: Rule, description: str, actor: str
) -> RuleVersion | None:
    stmt = (
        insert(RuleVersion)
        .values(
            name=name,
            version=version,
            scope=rule.scope.value,
            description=description,
            rule=rule.to_json(),
            text=to_text(rule.root),
            content_hash=rule.hash,
            created_by=actor,
        )
        .on_conflict_do_nothing(index_elements=[RuleVersion.name, RuleVersion.version])
        .returning(RuleVersion)
    )
    return session.scalars(stmt).first()


def _latest(session: Session, name: str, *, lock: bool = False) -> RuleVersion | None:
    stmt = (
        select(RuleVersion)
        .where(RuleVersion.name == name)
        .order_by(RuleVersion.version.desc())
        .limit(1)
    )
    if lock:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()


def create_rule(
    session: Session,
    vocab: Vocabulary,
    name: str,
    source: Any,
    *,
    scope: Scope,
    description: str = "",
    actor: str,
) -> dict[str, Any]:
    """Save version 1 of a new rule (409 if the name is taken)."""
    _check_name(name)
    rule = rule_or_422(source, vocab, scope)
    row = _insert(session, name, 1, rule, description, actor)
    if row is None:
        raise Conflict(
            f"rule {name!r} already exists; PUT /v1/rules/{name} saves a new version",
            errors={"name": ["already exists"]},
        )
    audit(session, actor, "rule.created", "rule", name, {"version": 1, "hash": rule.hash})
    return _row_dict(row)


def save_version(
    session: Session,
    vocab: Vocabulary,
    name: str,
    source: Any,
    *,
    description: str | None = None,
    base_version: int | None = None,
    actor: str,
) -> tuple[dict[str, Any], bool]:
    """Save an edit as the next version; returns (version, created).

    Saving the same content (and description) as the latest version changes
    nothing and returns it. `base_version`, when given, must be the latest version
    (optimistic concurrency for editors).
    """
    latest = _latest(session, name, lock=True)
    if latest is None:
        raise NotFound(f"rule {name!r} does not exist; POST /v1/rules creates it")
    if base_version is not None and base_version != latest.version:
        raise Conflict(
            f"rule {name!r} is at version {latest.version}, not {base_version}; "
            "reload it and apply the edit again",
            errors={"base_version": [f"latest is {latest.version}"]},
            latest_version=latest.version,
        )
    rule = rule_or_422(source, vocab, Scope(latest.scope))
    text = description if description is not None else latest.description
    if rule.hash == latest.content_hash and text == latest.description:
        return _row_dict(latest), False
    row = _insert(session, name, latest.version + 1, rule, text, actor)
    if row is None:
        raise Conflict(
            f"rule {name!r} was edited concurrently; reload it and apply the edit again",
            errors={"base_version": ["stale"]},
        )
    audit(
        session,
        actor,
        "rule.versioned",
        "rule",
        name,
        {"version": row.version, "hash": rule.hash, "previous_hash": latest.content_hash},
    )
    return _row_dict(row), True


def get_rule(session: Session, name: str, version: int | None = None) -> dict[str, Any]:
    """The latest version of a rule, or the given version."""
    if version is None:
        row = _latest(session, name)
    else:
        row = session.scalars(
            select(RuleVersion).where(RuleVersion.name == name, RuleVersion.version == version)
        ).first()
    if row is None:
        what = f"rule {name!r}" + (f" version {version}" if version is not None else "")
        raise NotFound(f"{what} does not exist")
    return _row_dict(row)


def list_versions(session: Session, name: str) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(RuleVersion).where(RuleVersion.name == name).order_by(RuleVersion.version)
    ).all()
    if not rows:
        raise NotFound(f"rule {name!r} does not exist")
    return [_row_dict(r) for r in rows]


def list_rules(
    session: Session, *, after: str | None = None, limit: int = 50
) -> tuple[list[dict[str, Any]], str | None]:
    """Latest version of each rule by name, keyset-paginated on the name."""
    latest = (
        select(RuleVersion.name, func.max(RuleVersion.version).label("version"))
        .group_by(RuleVersion.name)
        .subquery()
    )
    stmt = select(RuleVersion).join(
        latest, (latest.c.name == RuleVersion.name) & (latest.c.version == RuleVersion.version)
    )
    if after is not None:
        stmt = stmt.where(RuleVersion.name > after)
    rows = session.scalars(stmt.order_by(RuleVersion.name).limit(limit + 1)).all()
    items = [_row_dict(r) for r in rows[:limit]]
    return items, (rows[limit - 1].name if len(rows) > limit else None)


def load_rule(
    session: Session, vocab: Vocabulary, name: str, version: int | None = None
) -> tuple[Rule, dict[str, Any]]:
    """A saved rule ready to compile (checked against today's vocabulary) and its version row."""
    saved = get_rule(session, name, version)
    return validate(saved["rule"], vocab, Scope(saved["scope"])), saved
