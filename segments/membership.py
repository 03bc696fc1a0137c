"""The segment-membership rule field: `segment in ("vip", "lapsed")`.

Imported by `service.vocabulary` (which lists `register` in its contributors), so
it depends only on the rules package and the tables, never on the services.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.sql.elements import ColumnElement

from rules import Field, FieldType, SqlContext, Vocabulary
from segments.models_custom import CustomSegment, SegmentMembership
from service.models import Member

FIELD = "segment"
# The facts key `load_member_facts` fills with the names of the member's current segments.
FACTS_KEY = "segments"

_members = Member.__table__
_segments = CustomSegment.__table__
_memberships = SegmentMembership.__table__


def segment_names(member_id: ColumnElement[Any]) -> ColumnElement[Any]:
    """ARRAY(names of the segments `member_id` is in now), correlated to the outer query."""
    names = (
        select(_segments.c.name)
        .select_from(_memberships.join(_segments, _segments.c.id == _memberships.c.segment_id))
        .where(_memberships.c.member_id == member_id)
        .scalar_subquery()
    )
    return func.array(names)


def _membership_sql(ctx: SqlContext, names: list[str]) -> ColumnElement[bool]:
    # EXISTS lets PostgreSQL run a semi-join on (segment_id, member_id) instead of building
    # an array per member; archived segments have no memberships left, so no status test.
    wanted = select(_segments.c.id).where(_segments.c.name.in_(names))
    return exists().where(
        _memberships.c.member_id == _members.c.id,
        _memberships.c.segment_id.in_(wanted),
    )


def _names_py(facts: Any, now: Any) -> Any:
    return facts.get(FACTS_KEY) or ()


def register(vocab: Vocabulary) -> None:
    """Add the `segment` field (membership of custom segments, by name)."""
    vocab.register(
        Field(
            FIELD,
            FieldType.SEGMENTS,
            sql=lambda ctx: segment_names(_members.c.id),
            sql_membership=_membership_sql,
            py=_names_py,
            group="segments",
            example='segment in ("vip-shoppers")',
            description="Custom segments the member is in now, by name; `in` is true when the "
            "member is in any of them, `not in` when in none.",
        )
    )
