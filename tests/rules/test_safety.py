"""Hostile input in every string position is rejected or treated as plain data."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from rules import (
    ProblemCode,
    RuleSyntaxError,
    RuleValidationError,
    Vocabulary,
    compile_py,
    member_query,
    parse_rule,
    validate,
)
from service.models import Member
from service.vocabulary import load_member_facts
from tests.conftest import KeyFactory
from tests.rules.conftest import AddMembers

NOW = datetime(2026, 3, 1, tzinfo=UTC)
INJECTIONS = [
    "'; DROP TABLE members; --",
    '"; DROP TABLE members; --',
    "x' OR '1'='1",
    "1); DELETE FROM members --",
    "%",
    "_",
    "\\",
    "$1",
    "%(now_1)s",
    "__import__('os').system('true')",
    "{0.__class__}",
    "🙂 ünïcödé 金",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_values_are_data_in_sql_and_python(
    session: Session, vocab: Vocabulary, member_factory: AddMembers, payload: str
) -> None:
    target = member_factory(tier=payload, tags=[payload], locale="zh-CN")
    bystander = member_factory(tier="gold", tags=["vip"], locale="zh-CN")
    ids = [target, bystander]
    facts = load_member_facts(session, ids)
    for rule_text in (
        f"tier = {json.dumps(payload)}",
        f'tier in ({json.dumps(payload)}, "silver")',
        f"tags contains {json.dumps(payload)}",
        f"tier contains {json.dumps(payload)}",
        f"tier starts with {json.dumps(payload)}",
    ):
        rule = parse_rule(rule_text, vocab)
        query = member_query(rule, vocab, NOW).where(Member.id.in_(ids))
        assert set(session.scalars(query)) == {target}, rule_text
        predicate = compile_py(rule, vocab)
        assert {i for i in ids if predicate(facts[i], now=NOW)} == {target}, rule_text
        if len(payload) > 3:  # "_" and "%" occur in any source; longer payloads must not
            assert payload not in predicate.source
    assert session.scalar(text("SELECT count(*) FROM members WHERE id = :i"), {"i": bystander}) == 1


@pytest.mark.parametrize("payload", INJECTIONS)
def test_field_and_operator_positions_reject_anything_unknown(
    vocab: Vocabulary, payload: str
) -> None:
    for raw, code in (
        ({"field": payload, "op": "eq", "value": 1}, ProblemCode.UNKNOWN_FIELD),
        ({"field": "tier", "op": payload, "value": 1}, ProblemCode.UNKNOWN_OPERATOR),
        ({payload: [], "all": []}, ProblemCode.MALFORMED),
    ):
        with pytest.raises(RuleValidationError) as info:
            validate(raw, vocab)
        assert info.value.problems[0].code is code


def test_injection_in_text_form_field_names_is_a_syntax_error(vocab: Vocabulary) -> None:
    for text_form in (
        "tier = 1; DROP TABLE members",
        "tier = 'x'",
        'tier = "a" -- x',
        "`tier` = 1",
    ):
        with pytest.raises(RuleSyntaxError):
            parse_rule(text_form, vocab)


def test_nul_bytes_are_rejected_clearly(vocab: Vocabulary) -> None:
    with pytest.raises(RuleValidationError) as info:
        validate({"field": "tier", "op": "eq", "value": "a\x00b"}, vocab)
    assert "NUL" in info.value.problems[0].message
    with pytest.raises(RuleSyntaxError, match="NUL"):
        parse_rule("tier = 1\x00", vocab)
    with pytest.raises(RuleValidationError):
        parse_rule('tier = "a\\u0000b"', vocab)  # escaped NUL inside a string


def test_lone_surrogates_are_rejected(vocab: Vocabulary) -> None:
    with pytest.raises(RuleValidationError, match="Unicode"):
        validate({"field": "tier", "op": "eq", "value": "\ud800"}, vocab)


def test_huge_strings_and_lists_are_rejected(vocab: Vocabulary) -> None:
    with pytest.raises(RuleValidationError, match="at most 500"):
        validate({"field": "tier", "op": "eq", "value": "x" * 1_000_000}, vocab)
    with pytest.raises(RuleValidationError, match="at most 500"):
        validate({"field": "tier", "op": "in", "value": ["x"] * 100_000}, vocab)
    with pytest.raises(RuleValidationError, match="out of range"):
        validate({"field": "age", "op": "eq", "value": 10**5000}, vocab)


def test_huge_numbers_in_text_are_rejected(vocab: Vocabulary) -> None:
    with pytest.raises(RuleSyntaxError, match="number"):
        parse_rule("age > " + "9" * 5000, vocab)


def test_no_pattern_operator_exists() -> None:
    # Regular expressions are deliberately not offered: no catastrophic backtracking to guard.
    from rules import Operator

    assert not {op for op in Operator if "match" in op.value or "regex" in op.value}


def test_api_rejects_deeply_nested_json_with_422(client: FlaskClient, auth: KeyFactory) -> None:
    body = (
        '{"rule": '
        + '{"not": ' * 10_000
        + '{"field": "age", "op": "gt", "value": 1}'
        + "}" * 10_001
    )
    resp = client.post(
        "/v1/rules/validate",
        data=body,
        content_type="application/json",
        headers=auth("marketer"),
    )
    assert resp.status_code == 422
    assert resp.mimetype == "application/problem+json"
    shallow = '{"rule": ' + '{"not": ' * 11 + '{"field": "age", "op": "gt", "value": 1}' + "}" * 12
    resp = client.post(
        "/v1/rules/validate",
        data=shallow,
        content_type="application/json",
        headers=auth("marketer"),
    )
    assert resp.status_code == 422
    assert resp.get_json()["problems"][0]["code"] == "too_deep"
    assert resp.get_json()["problems"][0]["pointer"] == "/not" * 10


def test_api_rejects_huge_strings(client: FlaskClient, auth: KeyFactory) -> None:
    headers = auth("marketer")
    big = {"rule": {"field": "tier", "op": "eq", "value": "x" * 600_000}}
    resp = client.post("/v1/rules/validate", json=big, headers=headers)
    assert resp.status_code == 422
    assert "600000 characters" in resp.get_json()["errors"][""][0]
    huge = {"rule": {"field": "tier", "op": "eq", "value": "x" * 1_100_000}}
    assert client.post("/v1/rules/validate", json=huge, headers=headers).status_code == 413
    text_form = {"rule": "tier = " + json.dumps("y" * 30_000)}
    resp = client.post("/v1/rules/validate", json=text_form, headers=headers)
    assert resp.status_code == 422 and "longer than" in resp.get_json()["errors"]["rule"][0]


def test_api_rejects_nul_bytes(client: FlaskClient, auth: KeyFactory) -> None:
    resp = client.post(
        "/v1/rules/validate",
        json={"rule": {"field": "tier", "op": "eq", "value": "a\u0000"}},
        headers=auth("marketer"),
    )
    assert resp.status_code == 422
    assert "NUL" in resp.get_json()["errors"][""][0]


def test_saved_rules_store_injection_payloads_verbatim(
    client: FlaskClient, auth: KeyFactory, session: Session
) -> None:
    payload = INJECTIONS[0]
    resp = client.post(
        "/v1/rules",
        json={"name": "inj", "rule": {"field": "tier", "op": "eq", "value": payload}},
        headers=auth("marketer"),
    )
    assert resp.status_code == 201
    assert resp.get_json()["rule"]["value"] == payload
    assert session.scalar(text("SELECT to_regclass('members') IS NOT NULL")) is True
