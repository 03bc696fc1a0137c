"""The text form: parsing, printing, precedence, positions, and the round trip with the tree."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings

from rules import (
    RuleSyntaxError,
    Scope,
    Vocabulary,
    canonical_json,
    parse,
    parse_rule,
    to_text,
    validate,
)
from rules.ast import All, AnyOf, Leaf, Node, Not, to_json
from rules.vocabulary import Operator
from service.vocabulary import default_vocabulary
from tests.rules.strategies import trees

VOCAB = default_vocabulary()

ISSUE_EXAMPLE = (
    'region in ("East") and days_since_last_purchase >= 90 and net_spend > 500 '
    "and consent.sms = true"
)


def test_the_issue_example_parses_to_a_tree(vocab: Vocabulary) -> None:
    rule = parse_rule(ISSUE_EXAMPLE, vocab)
    assert rule.to_json() == {
        "all": [
            {"field": "region", "op": "in", "value": ["East"]},
            {"field": "days_since_last_purchase", "op": "ge", "value": 90},
            {"field": "net_spend", "op": "gt", "value": "500"},
            {"field": "consent.sms", "op": "eq", "value": True},
        ]
    }
    assert to_text(rule.root) == ISSUE_EXAMPLE


def test_event_rule_from_the_issue(vocab: Vocabulary) -> None:
    text = (
        'event.amount >= 200 and event.channel = "ecom" and event.item_categories contains "shoes"'
    )
    rule = parse_rule(text, vocab, Scope.EVENT)
    assert to_text(rule.root) == text


def test_precedence_is_not_then_and_then_or() -> None:
    tree, _ = parse("a = 1 or b = 2 and not c = 3")
    assert tree == {
        "any": [
            {"field": "a", "op": "eq", "value": 1},
            {
                "all": [
                    {"field": "b", "op": "eq", "value": 2},
                    {"not": {"field": "c", "op": "eq", "value": 3}},
                ]
            },
        ]
    }


def test_between_binds_its_own_and() -> None:
    tree, _ = parse("age between 20 and 30 and tier is set")
    assert tree == {
        "all": [
            {"field": "age", "op": "between", "value": [20, 30]},
            {"field": "tier", "op": "is_set"},
        ]
    }


@pytest.mark.parametrize(
    ("text", "op", "value"),
    [
        ('tier = "gold"', "eq", "gold"),
        ('tier == "gold"', "eq", "gold"),
        ('tier != "gold"', "ne", "gold"),
        ('tier <> "gold"', "ne", "gold"),
        ("age < 3", "lt", 3),
        ("age <= 3", "le", 3),
        ("age > -3", "gt", -3),
        ("net_spend >= 12.50", "ge", Decimal("12.50")),
        ('tier in ("a", "b",)', "in", ["a", "b"]),
        ('tier not in ("a")', "not_in", ["a"]),
        ('tags contains "vip"', "contains", "vip"),
        ('tags contains any ("a", "b")', "contains_any", ["a", "b"]),
        ('tags contains all ("a", "b")', "contains_all", ["a", "b"]),
        ('locale starts with "zh"', "starts_with", "zh"),
        ("tier is set", "is_set", None),
        ("tier is not set", "is_not_set", None),
        ("created_at within last 30 days", "within_last_days", 30),
        ("last_purchase_at before 90 days ago", "before_days_ago", 90),
        ("birth_date anniversary within next 7 days", "anniversary_within_next_days", 7),
        ("birth_date < 2000-02-29", "lt", date(2000, 2, 29)),
        (
            "created_at >= 2026-01-01T08:00:00+08:00",
            "ge",
            datetime.fromisoformat("2026-01-01T08:00:00+08:00"),
        ),
        ("consent.sms = TRUE", "eq", True),
    ],
)
def test_every_operator_has_a_text_form(text: str, op: str, value: object) -> None:
    tree, _ = parse(text)
    assert tree["op"] == op
    assert tree.get("value") == value


def test_keywords_are_case_insensitive() -> None:
    assert parse("a = 1 AND NOT b IS SET")[0] == parse("a = 1 and not b is set")[0]


def test_strings_use_json_escapes() -> None:
    tree, _ = parse(r'tier = "a \"quoted\" \\ \u00e9 \n 金"')
    assert tree["value"] == 'a "quoted" \\ é \n 金'


def test_printing_escapes_what_needs_escaping(vocab: Vocabulary) -> None:
    rule = validate({"field": "tier", "op": "eq", "value": 'say "hi"\n\\'}, vocab)
    assert to_text(rule.root) == r'tier = "say \"hi\"\n\\"'
    assert parse_rule(to_text(rule.root), vocab) == rule


def test_positions_of_nodes_are_recorded() -> None:
    _, spans = parse('purchase_count >= 1 and (tier = "x" or not age > 3)')
    assert spans == {
        "": 0,
        "/all/0": 0,
        "/all/1": 25,
        "/all/1/any/0": 25,
        "/all/1/any/1": 39,
        "/all/1/any/1/not": 43,
    }


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("", 0, "empty"),
        ("purchase_count >=", 17, "expected a value"),
        ("purchase_count 3", 15, "expected an operator"),
        ('tier = "open', 7, "unexpected character"),
        ("tier = 'single'", 7, "unexpected character"),
        ("age > 3 age < 4", 8, "unexpected text after"),
        ("(age > 3", 8, "expected ')'"),
        ("age > 3 and", 11, "expected a condition"),
        ("tier in ()", 9, "expected a value"),
        ('tier in "a"', 8, "parenthesised list"),
        ("birth_date = 2025-02-29", 13, "not a calendar date"),
        ("age > 3 ; drop table members", 8, "unexpected character ';'"),
        ('tier = "a\x00"', 7, "unexpected character"),
        ("age > 1" + "0" * 40, 6, "number"),
        ("created_at within last 3", 24, "expected 'days'"),
    ],
)
def test_syntax_errors_carry_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert fragment in str(info.value)
    assert info.value.as_dict()["position"] == position


def test_line_and_column_are_reported() -> None:
    with pytest.raises(RuleSyntaxError) as info:
        parse("age > 3\nand tier ~ 1")
    assert (info.value.line, info.value.column) == (2, 10)


def test_deep_parentheses_are_a_syntax_error_not_a_crash() -> None:
    with pytest.raises(RuleSyntaxError, match="nested more than"):
        parse("(" * 5_000 + "age > 1" + ")" * 5_000)
    with pytest.raises(RuleSyntaxError, match="nested more than"):
        parse("not " * 4_000 + "age > 1")


def test_overlong_text_is_rejected() -> None:
    with pytest.raises(RuleSyntaxError, match="longer than"):
        parse("age > 1 and " * 5_000 + "age > 1")


def test_nested_groups_print_with_parentheses(vocab: Vocabulary) -> None:
    leaf = Leaf("age", Operator.GT, 3)
    other = Leaf("tier", Operator.IS_SET)
    node: Node = AnyOf((All((leaf, other)), Not(AnyOf((leaf, other)))))
    text = to_text(node)
    assert text == "(age > 3 and tier is set) or not (age > 3 or tier is set)"
    assert parse_rule(text, vocab).root == node


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node=trees(VOCAB, Scope.EVENT, 5))
def test_tree_to_text_to_tree_round_trip(node: Node) -> None:
    vocab = VOCAB
    rule = validate(to_json(node), vocab, Scope.EVENT)
    text = to_text(rule.root)
    again = parse_rule(text, vocab, Scope.EVENT)
    assert again.root == rule.root
    assert canonical_json(again.root) == canonical_json(rule.root)
    assert to_text(again.root) == text
    # And the JSON form round-trips too.
    assert validate(rule.to_json(), vocab, Scope.EVENT).hash == rule.hash


def test_datetimes_print_in_utc(vocab: Vocabulary) -> None:
    rule = parse_rule("created_at >= 2026-01-01T08:00:00+08:00", vocab)
    assert rule.root == Leaf("created_at", Operator.GE, datetime(2026, 1, 1, tzinfo=UTC))
    assert to_text(rule.root) == "created_at >= 2026-01-01T00:00:00+00:00"
