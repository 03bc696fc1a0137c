"""Validation at save time: every error class, located by JSON pointer, with what is valid."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from rules import (
    Problem,
    ProblemCode,
    RuleSyntaxError,
    RuleValidationError,
    Scope,
    Vocabulary,
    parse_rule,
    to_text,
    validate,
)
from rules.ast import All, AnyOf, Leaf
from rules.vocabulary import Operator


def problems(raw: Any, vocab: Vocabulary, scope: Scope = Scope.MEMBER) -> list[Problem]:
    with pytest.raises(RuleValidationError) as info:
        validate(raw, vocab, scope) if not isinstance(raw, str) else parse_rule(raw, vocab, scope)
    return info.value.problems


def only(raw: Any, vocab: Vocabulary, scope: Scope = Scope.MEMBER) -> Problem:
    found = problems(raw, vocab, scope)
    assert len(found) == 1, found
    return found[0]


def leaf(field: str, op: str, value: Any = None, **extra: Any) -> dict[str, Any]:
    node = {"field": field, "op": op, **extra}
    if value is not None:
        node["value"] = value
    return node


GOOD = leaf("purchase_count", "ge", 1)


def test_unknown_field_names_the_node_and_lists_the_fields(vocab: Vocabulary) -> None:
    p = only({"all": [leaf("favourite_colour", "eq", "red"), GOOD]}, vocab)
    assert p.pointer == "/all/0"
    assert p.code is ProblemCode.UNKNOWN_FIELD
    assert "favourite_colour" in p.message
    assert p.expected is not None and "purchase_count" in p.expected
    assert "event.amount" not in p.expected  # member rules are offered member fields only


def test_event_field_in_a_member_rule_is_a_scope_error(vocab: Vocabulary) -> None:
    raw = {"any": [GOOD, leaf("event.amount", "ge", 200)]}
    p = only(raw, vocab)
    assert (p.pointer, p.code) == ("/any/1", ProblemCode.WRONG_SCOPE)
    assert validate(raw, vocab, Scope.EVENT).scope is Scope.EVENT


def test_unknown_operator(vocab: Vocabulary) -> None:
    p = only({"not": leaf("age", "approximately", 3)}, vocab)
    assert (p.pointer, p.code) == ("/not", ProblemCode.UNKNOWN_OPERATOR)
    assert p.expected is not None and "between" in p.expected


def test_operator_not_allowed_for_the_type(vocab: Vocabulary) -> None:
    p = only(leaf("age", "contains", "3"), vocab)
    assert (p.pointer, p.code) == ("", ProblemCode.OPERATOR_NOT_ALLOWED)
    assert p.expected is not None and "ge" in p.expected and "contains" not in p.expected
    # String ordering is not offered: collations and Python would disagree.
    assert only(leaf("tier", "lt", "b"), vocab).code is ProblemCode.OPERATOR_NOT_ALLOWED
    assert only(leaf("created_at", "eq", "2026-01-01T00:00:00Z"), vocab).code is (
        ProblemCode.OPERATOR_NOT_ALLOWED
    )


@pytest.mark.parametrize(
    ("node", "fragment"),
    [
        (leaf("age", "ge", "3"), "a whole number"),
        (leaf("age", "ge", True), "a whole number"),
        (leaf("age", "ge", 3.5), "a whole number"),
        (leaf("age", "ge", 2**70), "out of range"),
        (leaf("net_spend", "gt", "12.345"), "2 decimal places"),
        (leaf("net_spend", "gt", "1e3"), "not a decimal number"),
        (leaf("net_spend", "gt", "NaN"), "not a decimal number"),
        (leaf("net_spend", "gt", float("inf")), "finite"),
        (leaf("consent.sms", "eq", "yes"), "true or false"),
        (leaf("birth_date", "lt", "2025-02-29"), "not a calendar date"),
        (leaf("birth_date", "lt", "29/02/2024"), "a date such as"),
        (leaf("created_at", "lt", "2026-01-01T00:00:00"), "no time-zone offset"),
        (leaf("created_at", "lt", 12), "a timestamp"),
        (leaf("tier", "eq", 3), "a string"),
        (leaf("tier", "in", []), "non-empty list"),
        (leaf("tier", "in", "gold"), "non-empty list"),
        (leaf("tier", "in", ["a", 1]), "item 1"),
        (leaf("age", "between", [1]), "two bounds"),
        (leaf("age", "between", [9, 1]), "low bound is above"),
        (leaf("created_at", "within_last_days", -1), "0 to 36500"),
        (leaf("birth_date", "anniversary_within_next_days", 400), "0 to 366"),
        (leaf("tier", "is_set", "x"), "takes no value"),
        (leaf("tier", "eq"), "value is missing"),
        (leaf("tags", "contains", ["a"]), "a string"),
    ],
)
def test_wrong_values_say_what_would_be_valid(
    vocab: Vocabulary, node: dict[str, Any], fragment: str
) -> None:
    p = only({"all": [GOOD, node]}, vocab)
    assert p.pointer == "/all/1"
    assert p.code is ProblemCode.WRONG_VALUE
    assert fragment in f"{p.message}; {p.expected}"


def test_enum_values_are_checked(vocab: Vocabulary) -> None:
    p = only(leaf("gender", "in", ["female", "unknown"]), vocab)
    assert p.code is ProblemCode.NOT_IN_ENUM
    assert p.expected == "one of 'female', 'male', 'other'"


def test_empty_groups(vocab: Vocabulary) -> None:
    p = only({"any": [GOOD, {"all": []}]}, vocab)
    assert (p.pointer, p.code) == ("/any/1", ProblemCode.EMPTY_GROUP)


def test_too_deep(vocab: Vocabulary) -> None:
    raw: dict[str, Any] = GOOD
    for _ in range(10):
        raw = {"not": raw}
    p = only(raw, vocab)
    assert p.code is ProblemCode.TOO_DEEP
    assert p.pointer == "/not" * 10
    # Ten levels are fine.
    validate(raw["not"], vocab)


def test_deeply_nested_json_is_rejected_without_recursion(vocab: Vocabulary) -> None:
    raw: Any = GOOD
    for _ in range(100_000):
        raw = {"all": [raw]}
    assert only(raw, vocab).code is ProblemCode.TOO_DEEP


def test_too_large(vocab: Vocabulary) -> None:
    p = only({"all": [GOOD] * 201}, vocab)
    assert (p.pointer, p.code) == ("", ProblemCode.TOO_LARGE)
    nested = {"all": [{"any": [GOOD] * 100}, {"any": [GOOD] * 100}]}
    assert only(nested, vocab).code is ProblemCode.TOO_LARGE
    validate({"all": [GOOD] * 199}, vocab)


@pytest.mark.parametrize(
    "raw",
    [
        "not a rule at all but a sentence",
        ["a", "list"],
        {"all": [GOOD], "any": [GOOD]},
        {"all": GOOD},
        {"field": "age", "op": "gt", "value": 1, "sql": "1=1"},
        {"op": "gt", "value": 1},
        {"field": 7, "op": "gt", "value": 1},
        42,
        None,
    ],
)
def test_malformed_nodes(vocab: Vocabulary, raw: Any) -> None:
    with pytest.raises(Exception) as info:
        validate(raw, vocab) if not isinstance(raw, str) else parse_rule(raw, vocab)
    assert isinstance(info.value, RuleValidationError | RuleSyntaxError)


def test_all_problems_are_reported_at_once(vocab: Vocabulary) -> None:
    found = problems(
        {"all": [leaf("nope", "eq", 1), GOOD, leaf("age", "eq", "x"), {"any": []}]}, vocab
    )
    assert [(p.pointer, p.code) for p in found] == [
        ("/all/0", ProblemCode.UNKNOWN_FIELD),
        ("/all/2", ProblemCode.WRONG_VALUE),
        ("/all/3", ProblemCode.EMPTY_GROUP),
    ]


def test_errors_in_text_carry_the_text_position(vocab: Vocabulary) -> None:
    text = 'purchase_count >= 1 and (tier = "x" or colour = "red")'
    p = only(text, vocab)
    assert (p.pointer, p.position) == ("/all/1/any/1", 39)
    assert text[p.position :].startswith("colour")


def test_errors_group_by_pointer_for_the_api(vocab: Vocabulary) -> None:
    with pytest.raises(RuleValidationError) as info:
        validate({"all": [leaf("age", "ge", "x")]}, vocab)
    assert info.value.by_pointer() == {"/all/0": ["age ge: got a string; expected a whole number"]}


def test_values_are_normalised(vocab: Vocabulary) -> None:
    rule = validate(
        {
            "all": [
                leaf("net_spend", ">=", "500.00"),
                leaf("tier", "not in", ["a", "b", "a"]),
                leaf("created_at", "gt", "2026-01-01T08:00:00+08:00"),
                leaf("birth_date", "le", "2000-02-29"),
                leaf("purchase_amount", "lt", 0.1),
                leaf("age", "eq", 30.0),
            ]
        },
        vocab,
    )
    assert isinstance(rule.root, All)
    assert [c for c in rule.root.children] == [
        Leaf("net_spend", Operator.GE, Decimal("500")),
        Leaf("tier", Operator.NOT_IN, ("a", "b")),
        Leaf("created_at", Operator.GT, datetime(2026, 1, 1, tzinfo=UTC)),
        Leaf("birth_date", Operator.LE, date(2000, 2, 29)),
        Leaf("purchase_amount", Operator.LT, Decimal("0.1")),
        Leaf("age", Operator.EQ, 30),
    ]


def test_equal_content_has_equal_hash(vocab: Vocabulary) -> None:
    a = validate(leaf("net_spend", "gt", "500.00"), vocab)
    b = validate(leaf("net_spend", ">", 500), vocab)
    c = parse_rule("net_spend > 500.0", vocab)
    assert a.hash == b.hash == c.hash
    assert a.hash != validate(leaf("net_spend", "gt", "500.01"), vocab).hash


def test_groups_are_normalised(vocab: Vocabulary) -> None:
    tier = leaf("tier", "is_set")
    rule = validate({"all": [{"all": [GOOD, {"all": [tier]}]}, {"any": [tier]}]}, vocab)
    assert to_text(rule.root) == "purchase_count >= 1 and tier is set and tier is set"
    assert isinstance(validate({"any": [{"any": [GOOD, tier]}]}, vocab).root, AnyOf)
    assert validate({"all": [GOOD]}, vocab).root == Leaf("purchase_count", Operator.GE, 1)


def test_operator_spellings_are_accepted(vocab: Vocabulary) -> None:
    for spelling in ("ge", ">=", "GE", " >= "):
        assert validate(leaf("age", spelling, 1), vocab).root == Leaf("age", Operator.GE, 1)
    root = validate(leaf("tags", "contains any", ["x"]), vocab).root
    assert isinstance(root, Leaf) and root.op is Operator.CONTAINS_ANY


def test_integer_fields_can_bound_their_values(vocab: Vocabulary) -> None:
    p = only(leaf("age", "between", [18, 200]), vocab)
    assert p.code is ProblemCode.WRONG_VALUE
    assert p.expected == "from 0 to 150"
    validate(leaf("age", "between", [0, 150]), vocab)
