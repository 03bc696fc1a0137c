"""The SQL and Python compilers agree, member by member, on random rules and random members."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import not_, select
from sqlalchemy.orm import Session

from rules import (
    Rule,
    Scope,
    Vocabulary,
    compile_py,
    compile_sql,
    explain,
    member_query,
    to_text,
    validate,
)
from rules.ast import Node, to_json
from service.models import Member
from service.vocabulary import load_member_facts
from tests.rules.conftest import STORES, add_members
from tests.rules.strategies import (
    calendar_leaves,
    calendar_members,
    instants,
    members,
    special_instants,
    trees,
)

STORE_CODES = tuple(STORES)
# Sized so the rules suite stays well under two minutes; raise it locally to dig deeper.
EXAMPLES = int(os.environ.get("PATRON_RULES_EXAMPLES", "150"))
REGIONS = tuple(sorted(set(STORES.values())))


def _check(
    session: Session,
    vocab: Vocabulary,
    stores: dict[str, int],
    specs: list[dict[str, Any]],
    nodes: list[Node],
    now: datetime,
) -> None:
    savepoint = session.begin_nested()
    try:
        ids = add_members(session, stores, specs)
        facts = load_member_facts(session, ids)
        for node in nodes:
            rule: Rule = validate(to_json(node), vocab, Scope.MEMBER)
            query = member_query(rule, vocab, now).where(Member.id.in_(ids))
            in_sql = set(session.scalars(query))
            check = compile_py(rule, vocab).at(now)
            in_python = {i for i in ids if check(facts[i])}
            if in_sql != in_python:
                detail = [
                    (i, facts[i], explain(rule, vocab, facts[i], now=now).lines())
                    for i in in_sql ^ in_python
                ]
                raise AssertionError(
                    f"SQL and Python disagree at {now.isoformat()} on {to_text(rule.root)}: "
                    f"sql-only={sorted(in_sql - in_python)} "
                    f"python-only={sorted(in_python - in_sql)}\n{detail}"
                )
            # Reported by --hypothesis-show-statistics: most rules should split the members.
            event(
                "matched none"
                if not in_sql
                else "matched all"
                if len(in_sql) == len(ids)
                else "split"
            )
            # The two-valued form stays exact under a NOT added by the caller.
            compiled = compile_sql(rule, vocab, now)
            source = vocab.source(Scope.MEMBER)
            assert source is not None
            outside = select(Member.id).select_from(
                compiled.select_from(source.from_clause(compiled.joins))
            )
            outside = outside.where(Member.id.in_(ids), not_(compiled.expr))
            assert set(session.scalars(outside)) == set(ids) - in_python
            for i in ids:
                assert explain(rule, vocab, facts[i], now=now).outcome == (i in in_python)
    finally:
        savepoint.rollback()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_sql_and_python_agree(
    session: Session, vocab: Vocabulary, stores: dict[str, int], data: st.DataObject
) -> None:
    specs = data.draw(st.lists(members(STORE_CODES), min_size=3, max_size=16), label="members")
    nodes = data.draw(
        st.lists(
            trees(vocab, Scope.MEMBER, 4, stores=STORE_CODES, regions=REGIONS),
            min_size=1,
            max_size=6,
        ),
        label="rules",
    )
    now = data.draw(instants(), label="now")
    _check(session, vocab, stores, specs, nodes, now)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_calendar_fields_agree(
    session: Session, vocab: Vocabulary, stores: dict[str, int], data: st.DataObject
) -> None:
    """Dense coverage of birthdays on 29 Feb / 31 Dec / 1 Jan across far-apart time zones."""
    specs = data.draw(st.lists(calendar_members(), min_size=8, max_size=24), label="members")
    nodes = data.draw(st.lists(calendar_leaves(vocab), min_size=4, max_size=10), label="rules")
    now = data.draw(special_instants(), label="now")
    _check(session, vocab, stores, specs, list(nodes), now)
