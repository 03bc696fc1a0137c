"""The vocabulary: declaring fields, the export for UIs, and extension from outside the core."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import ARRAY, Text, func, literal
from sqlalchemy.orm import Session

from rules import (
    Field,
    FieldType,
    Operator,
    Scope,
    SqlContext,
    Vocabulary,
    VocabularyError,
    compile_py,
    member_query,
    parse_rule,
)
from service.models import Member
from service.vocabulary import load_member_facts, member_fields, register
from tests.rules.conftest import AddMembers

NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "Bad Name", "type": FieldType.STRING}, "lowercase"),
        ({"name": "and", "type": FieldType.STRING}, "keyword"),
        ({"name": "x", "type": FieldType.INTEGER, "ops": {Operator.CONTAINS}}, "cannot use"),
        ({"name": "x", "type": FieldType.ENUM}, "needs its values"),
        ({"name": "x", "type": FieldType.STRING, "values": ("a",)}, "only enum"),
    ],
)
def test_bad_declarations_are_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(VocabularyError, match=fragment):
        Field(**kwargs)


def test_names_are_unique_unless_replaced() -> None:
    vocab = Vocabulary([Field("x", FieldType.STRING)])
    with pytest.raises(VocabularyError, match="already registered"):
        vocab.register(Field("x", FieldType.INTEGER))
    vocab.register(Field("x", FieldType.INTEGER), replace=True)
    assert vocab.get("x") is not None and vocab.get("x").type is FieldType.INTEGER  # type: ignore[union-attr]


def test_operators_can_be_narrowed() -> None:
    f = Field("score", FieldType.INTEGER, ops=frozenset({Operator.GE, Operator.LE}))
    assert f.allowed == {Operator.GE, Operator.LE}


def test_export_is_enough_to_build_a_rule(vocab: Vocabulary) -> None:
    data = vocab.export()
    by_name = {f["name"]: f for f in data["fields"]}
    gender = by_name["gender"]
    assert gender["type"] == "enum" and gender["values"] == ["female", "male", "other"]
    assert {o["op"] for o in gender["operators"]} == {
        "eq",
        "ne",
        "in",
        "not_in",
        "is_set",
        "is_not_set",
    }
    assert by_name["event.amount"]["scope"] == "event"
    assert by_name["birth_date"]["operators"][-1]["op"] == "anniversary_within_next_days"
    assert {o["op"] for o in data["operators"]} == {o.value for o in Operator}
    assert all(f["description"] for f in data["fields"])


def test_the_member_vocabulary_covers_the_foundation() -> None:
    names = {f.name for f in member_fields()}
    assert {
        "gender", "age", "birth_date", "timezone", "locale", "home_store", "region", "tags",
        "tier", "consent.email", "consent.sms", "consent.push", "consent.wechat", "created_at",
        "purchase_count", "refund_count", "net_spend", "purchase_amount", "first_purchase_at",
        "last_purchase_at", "days_since_last_purchase",
    } <= names  # fmt: skip


def test_fields_are_registered_from_outside_the_core(
    session: Session, member_factory: AddMembers
) -> None:
    """What segments will do: add a segment-membership field without touching rules/."""
    vocab = Vocabulary()
    register(vocab)
    tags = Member.__table__.c.tags

    def membership(ctx: SqlContext, keys: list[str]) -> Any:
        # Stands in for EXISTS (SELECT 1 FROM segment_memberships ...).
        return tags.op("&&")(literal(keys, ARRAY(Text())))

    vocab.register(
        Field(
            "segment",
            FieldType.SEGMENTS,
            sql=lambda ctx: tags,
            sql_membership=membership,
            py=lambda facts, now: set(facts.get("tags") or ()),
            description="Segments the member belongs to.",
        ),
        Field(
            "tag_count",
            FieldType.INTEGER,
            sql=lambda ctx: func.cardinality(tags),
            py=lambda facts, now: len(facts.get("tags") or ()),
            nullable=False,
        ),
    )
    inside = member_factory(tags=["vip", "lapsed"])
    outside = member_factory(tags=[])
    facts = load_member_facts(session, [inside, outside])
    for text, expected in [
        ('segment in ("vip", "x")', {inside}),
        ('segment not in ("vip")', {outside}),
        ('not segment in ("vip")', {outside}),
        ("tag_count >= 2", {inside}),
    ]:
        rule = parse_rule(text, vocab)
        query = member_query(rule, vocab, NOW).where(Member.id.in_([inside, outside]))
        assert set(session.scalars(query)) == expected, text
        check = compile_py(rule, vocab).at(NOW)
        assert {i for i in (inside, outside) if check(facts[i])} == expected, text


def test_event_fields_have_their_own_scope(vocab: Vocabulary) -> None:
    assert {f.scope for f in vocab.fields(Scope.EVENT)} == {Scope.EVENT}
    assert "event.amount" not in vocab.names(Scope.MEMBER)
