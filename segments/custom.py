"""Custom segments: versioned definitions, set-based refresh with entered/left history.

A dynamic segment is a member rule; a refresh computes its member set with the
compiled SQL rule and, in the same statement, records who entered and who left
and updates the current membership. A static segment is an uploaded list of
external ids. Services take the session and never commit.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from typing import cast as typed

from rq import Queue, get_current_job
from sqlalchemy import (
    BigInteger,
    CompoundSelect,
    DateTime,
    Integer,
    Select,
    String,
    Table,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    literal,
    select,
    text,
    tuple_,
    union,
    union_all,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, array, insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from rules import (
    PythonPredicate,
    Rule,
    Scope,
    SqlContext,
    Vocabulary,
    compile_py,
    compile_sql,
    count_query,
    explain,
    member_query,
    to_text,
    validate,
)
from rules.calendar import utc_instant
from segments.membership import FIELD as MEMBERSHIP_FIELD
from segments.models_custom import (
    ChangeKind,
    CustomSegment,
    SegmentKind,
    SegmentMembership,
    SegmentMembershipChange,
    SegmentRefresh,
    SegmentStatus,
    SegmentVersion,
)
from service.audit import record as audit
from service.db import unit_of_work
from service.errors import Conflict, NotFound, ValidationFailed
from service.jobs import job, job_app
from service.models import Member, MemberStatus
from service.redis_client import get_redis
from service.rule_versions import rule_or_422
from service.vocabulary import default_vocabulary, load_member_facts

log = logging.getLogger(__name__)

SEGMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
EXTERNAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,63}$")
MAX_UPLOAD = 1_000_000
# Vocabulary groups whose values a purchase changes (member_stats); see refresh_member.
PURCHASE_GROUPS = frozenset({"statistics"})
# How long a process trusts its list of purchase-sensitive segments (refresh_member).
CATALOGUE_TTL_SECONDS = 5.0
JOB_TIMEOUT_SECONDS = 3600
JOB_RESULT_TTL_SECONDS = 7 * 24 * 3600

_members = typed(Table, Member.__table__)
_segments = typed(Table, CustomSegment.__table__)
_versions = typed(Table, SegmentVersion.__table__)
_memberships = typed(Table, SegmentMembership.__table__)
_changes = typed(Table, SegmentMembershipChange.__table__)
_refreshes = typed(Table, SegmentRefresh.__table__)


# --- results ----------------------------------------------------------------------------


@dataclass
class RefreshResult:
    """What one refresh of one segment did (`replayed`: this as_of was already refreshed)."""

    segment_id: int
    as_of: datetime
    version: int
    members: int
    entered: int
    left: int
    refresh_id: int | None
    seconds: float
    replayed: bool = False
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["as_of"] = self.as_of.isoformat()
        return data


@dataclass
class MemberSegmentChanges:
    """Segments one member entered and left on a purchase, and the names it is in now.

    `segments` is None when no segment needed evaluating (the facts were not read).
    """

    entered: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    segments: list[str] | None = field(default_factory=list)


# --- definitions and versions -----------------------------------------------------------


def _check_name(name: str) -> None:
    if not SEGMENT_NAME.match(name):
        raise ValidationFailed(
            f"invalid segment name {name[:100]!r}",
            errors={
                "name": [
                    "must be 1-100 characters: lowercase letters, digits and . _ - "
                    "(starting with a letter or digit)"
                ]
            },
        )


def _segment_row(session: Session, segment_id: int, *, lock: bool = False) -> CustomSegment:
    stmt = select(CustomSegment).where(CustomSegment.id == segment_id)
    if lock:
        # Serialises refreshes, uploads, edits and archiving of one segment.
        stmt = stmt.with_for_update()
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"segment {segment_id} does not exist")
    return row


def _version_row(session: Session, segment_id: int, version: int) -> SegmentVersion:
    row = session.scalars(
        select(SegmentVersion).where(
            SegmentVersion.segment_id == segment_id, SegmentVersion.version == version
        )
    ).first()
    if row is None:
        raise NotFound(f"segment {segment_id} version {version} does not exist")
    return row


def _version_dict(v: SegmentVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "description": v.description,
        "rule": v.rule,
        "text": v.text,
        "hash": v.content_hash,
        "fields": list(v.fields or ()),
        "created_at": v.created_at,
        "created_by": v.created_by,
    }


def _segment_dict(
    s: CustomSegment, v: SegmentVersion, members: int | None = None
) -> dict[str, Any]:
    data = {
        "id": s.id,
        "name": s.name,
        "kind": s.kind,
        "status": s.status,
        "created_at": s.created_at,
        "created_by": s.created_by,
        "archived_at": s.archived_at,
        **_version_dict(v),
    }
    if members is not None:
        data["members"] = members
    return data


def _add_version(
    session: Session,
    segment_id: int,
    version: int,
    rule: Rule | None,
    description: str,
    actor: str,
) -> SegmentVersion:
    row = SegmentVersion(
        segment_id=segment_id,
        version=version,
        description=description,
        rule=rule.to_json() if rule is not None else None,
        text=to_text(rule.root) if rule is not None else None,
        content_hash=rule.hash if rule is not None else None,
        fields=rule.fields if rule is not None else [],
        created_by=actor,
    )
    session.add(row)
    session.flush()
    return row


def create_segment(
    session: Session,
    vocab: Vocabulary,
    name: str,
    *,
    kind: SegmentKind,
    rule: Any = None,
    description: str = "",
    actor: str,
) -> dict[str, Any]:
    """Create a segment at version 1 (409 if the name is taken; dynamic needs a rule)."""
    _check_name(name)
    parsed = _parse_for(kind, rule, vocab)
    seg_id = session.scalar(
        insert(CustomSegment)
        .values(name=name, kind=kind.value, current_version=1, created_by=actor)
        .on_conflict_do_nothing(index_elements=[CustomSegment.name])
        .returning(CustomSegment.id)
    )
    if seg_id is None:
        raise Conflict(f"segment {name!r} already exists", errors={"name": ["already exists"]})
    version = _add_version(session, seg_id, 1, parsed, description, actor)
    audit(
        session,
        actor,
        "segment.created",
        "segment",
        str(seg_id),
        {"name": name, "kind": kind.value, "version": 1, "hash": version.content_hash},
    )
    forget_catalogue()
    return get_segment(session, seg_id)


def _parse_for(kind: SegmentKind, rule: Any, vocab: Vocabulary) -> Rule | None:
    if kind is SegmentKind.STATIC:
        if rule is not None:
            raise ValidationFailed(
                "a static segment has no rule; upload its members instead",
                errors={"rule": ["not allowed for a static segment"]},
            )
        return None
    if rule is None:
        raise ValidationFailed(
            "a dynamic segment needs a rule", errors={"rule": ["required for a dynamic segment"]}
        )
    return rule_or_422(rule, vocab, Scope.MEMBER)


def update_segment(
    session: Session,
    vocab: Vocabulary,
    segment_id: int,
    *,
    rule: Any = None,
    description: str | None = None,
    base_version: int | None = None,
    actor: str,
) -> tuple[dict[str, Any], bool]:
    """Save an edit as the next version; returns (segment, created). Same content: no-op."""
    seg = _segment_row(session, segment_id, lock=True)
    if seg.status != SegmentStatus.ACTIVE:
        raise Conflict(f"segment {segment_id} is archived")
    if base_version is not None and base_version != seg.current_version:
        raise Conflict(
            f"segment {segment_id} is at version {seg.current_version}, not {base_version}; "
            "reload it and apply the edit again",
            errors={"base_version": [f"latest is {seg.current_version}"]},
            latest_version=seg.current_version,
        )
    latest = _version_row(session, segment_id, seg.current_version)
    kind = SegmentKind(seg.kind)
    if kind is SegmentKind.DYNAMIC and rule is None:
        parsed: Rule | None = validate(latest.rule, vocab, Scope.MEMBER)
    else:
        parsed = _parse_for(kind, rule, vocab)
    new_hash = parsed.hash if parsed is not None else None
    new_text = description if description is not None else latest.description
    if new_hash == latest.content_hash and new_text == latest.description:
        return get_segment(session, segment_id), False
    version = _add_version(session, segment_id, seg.current_version + 1, parsed, new_text, actor)
    seg.current_version = version.version
    audit(
        session,
        actor,
        "segment.versioned",
        "segment",
        str(segment_id),
        {"version": version.version, "hash": new_hash, "previous_hash": latest.content_hash},
    )
    session.flush()
    forget_catalogue()
    return get_segment(session, segment_id), True


def get_segment(session: Session, segment_id: int) -> dict[str, Any]:
    """A segment with its current definition and member count."""
    seg = _segment_row(session, segment_id)
    version = _version_row(session, segment_id, seg.current_version)
    count = session.scalar(
        select(func.count()).select_from(_memberships).where(_memberships.c.segment_id == seg.id)
    )
    return _segment_dict(seg, version, int(count or 0))


def list_segments(
    session: Session,
    *,
    cursor: str | None = None,
    limit: int = 50,
    include_archived: bool = False,
) -> tuple[list[dict[str, Any]], str | None]:
    """Segments in id order (current version of each), keyset-paginated."""
    stmt = select(CustomSegment, SegmentVersion).join(
        SegmentVersion,
        (SegmentVersion.segment_id == CustomSegment.id)
        & (SegmentVersion.version == CustomSegment.current_version),
    )
    if not include_archived:
        stmt = stmt.where(CustomSegment.status == SegmentStatus.ACTIVE.value)
    if cursor is not None:
        stmt = stmt.where(CustomSegment.id > _decode(cursor, "s")[0])
    rows = session.execute(stmt.order_by(CustomSegment.id).limit(limit + 1)).all()
    items = [_segment_dict(s, v) for s, v in rows[:limit]]
    nxt = _encode("s", rows[limit - 1][0].id) if len(rows) > limit else None
    return items, nxt


def list_versions(session: Session, segment_id: int) -> list[dict[str, Any]]:
    """Every version of a segment, oldest first."""
    _segment_row(session, segment_id)
    rows = session.scalars(
        select(SegmentVersion)
        .where(SegmentVersion.segment_id == segment_id)
        .order_by(SegmentVersion.version)
    ).all()
    return [_version_dict(v) for v in rows]


def archive_segment(
    session: Session, segment_id: int, *, at: datetime, actor: str
) -> dict[str, Any]:
    """Archive a segment and close its memberships (each recorded as 'left' at `at`)."""
    seg = _segment_row(session, segment_id, lock=True)
    if seg.status == SegmentStatus.ARCHIVED:
        return get_segment(session, segment_id)
    version_id = _version_row(session, segment_id, seg.current_version).id
    closed = _apply(session, segment_id, version_id, None, at, None)
    seg.status = SegmentStatus.ARCHIVED.value
    seg.archived_at = at
    audit(session, actor, "segment.archived", "segment", str(segment_id), {"left": closed[1]})
    session.flush()
    forget_catalogue()
    return get_segment(session, segment_id)


# --- the set-based membership update ------------------------------------------------------


def _apply(
    session: Session,
    segment_id: int,
    version_id: int,
    new_members: Select[Any] | CompoundSelect[Any] | None,
    at: datetime,
    refresh_id: int | None,
) -> tuple[int, int, int]:
    """Make the segment's members exactly `new_members` (ids); (entered, left, members).

    One statement: the data-modifying CTEs all see the memberships as they were
    before it, so "gone" is old minus new and "came" is new minus old, and each history
    row is written from what the DELETE / INSERT really changed (RETURNING).
    `new_members` None means nobody (archiving).
    """
    # Typed casts: in a UNION an untyped NULL parameter would be read as text.
    sid = cast(literal(segment_id), Integer)
    vid = cast(literal(version_id), BigInteger)
    at_ = cast(literal(at), DateTime(timezone=True))
    rid = cast(literal(refresh_id), BigInteger)
    source = new_members if new_members is not None else select(_members.c.id).where(false())
    new = source.cte("new_members")
    new_id = next(iter(new.c))
    gone = (
        delete(_memberships)
        .where(
            _memberships.c.segment_id == segment_id,
            ~exists().where(new_id == _memberships.c.member_id),
        )
        .returning(_memberships.c.member_id)
        .cte("gone")
    )
    current = _memberships.alias("current")
    came = (
        insert(_memberships)
        .from_select(
            ["segment_id", "member_id", "entered_at", "version_id"],
            select(sid, new_id, at_, vid).where(
                ~exists().where(current.c.segment_id == segment_id, current.c.member_id == new_id)
            ),
        )
        # A purchase (refresh_member) may have added the row after this statement's snapshot.
        .on_conflict_do_nothing()
        .returning(_memberships.c.member_id)
        .cte("came")
    )
    history = (
        insert(_changes)
        .from_select(
            ["segment_id", "member_id", "kind", "at", "version_id", "refresh_id"],
            union_all(
                select(sid, gone.c.member_id, literal(ChangeKind.LEFT.value), at_, vid, rid),
                select(sid, came.c.member_id, literal(ChangeKind.ENTERED.value), at_, vid, rid),
            ),
        )
        .cte("history")
    )
    counts = select(
        select(func.count()).select_from(came).scalar_subquery(),
        select(func.count()).select_from(gone).scalar_subquery(),
        select(func.count()).select_from(new).scalar_subquery(),
    ).add_cte(history)
    # The planner's estimate for one segment's rows is poor (a new segment id is not in the
    # column statistics, a refresh changes them wholesale), and a nested-loop anti-join
    # on that estimate rescans a CTE per member: minutes instead of seconds. Hash and
    # merge joins are right at any size here, so nested loops are off for this statement.
    previous = session.scalar(text("SHOW enable_nestloop"))
    session.execute(text("SELECT set_config('enable_nestloop', 'off', true)"))
    entered, left, total = session.execute(counts).one()
    session.execute(text("SELECT set_config('enable_nestloop', :v, true)"), {"v": previous})
    return int(entered), int(left), int(total)


# --- refresh --------------------------------------------------------------------------


def _dynamic_rule(
    session: Session, seg: CustomSegment, vocab: Vocabulary
) -> tuple[Rule, SegmentVersion]:
    version = _version_row(session, seg.id, seg.current_version)
    # Checked against today's vocabulary: a removed field fails loudly, not silently.
    return validate(version.rule, vocab, Scope.MEMBER), version


def _tune_for_bulk(session: Session) -> None:
    # What docs/benchmarks.md measured for rule scans: JIT compilation costs more than it
    # saves on these plans, and hashing a million ids wants more than the 4 MB default.
    session.execute(text("SET LOCAL jit = off"))
    session.execute(text("SET LOCAL work_mem = '64MB'"))


def _prior_refresh(session: Session, segment_id: int, as_of: datetime) -> RefreshResult | None:
    """The figures of this as_of's refresh (replayed) or of a later one (skipped), if any."""
    done = session.execute(
        select(SegmentRefresh, SegmentVersion.version)
        .join(SegmentVersion, SegmentVersion.id == SegmentRefresh.version_id)
        .where(SegmentRefresh.segment_id == segment_id, SegmentRefresh.as_of >= as_of)
        .order_by(SegmentRefresh.as_of.desc())
        .limit(1)
    ).first()
    if done is None:
        return None
    run, number = done
    return RefreshResult(
        segment_id=segment_id,
        as_of=run.as_of,
        version=number,
        members=run.members,
        entered=run.entered,
        left=run.left,
        refresh_id=run.id,
        seconds=run.seconds or 0.0,
        replayed=run.as_of == as_of,
        skipped=None if run.as_of == as_of else "a later refresh exists",
    )


def refresh_segment(
    session: Session, segment_id: int, as_of: datetime, vocab: Vocabulary | None = None
) -> RefreshResult:
    """Recompute a dynamic segment as of `as_of` and record who entered and left.

    Idempotent: a second refresh for the same `as_of` changes nothing and returns the
    first one's figures (`replayed`). A refresh older than the latest one is skipped, so a
    late job can never roll membership back.
    """
    started = time.perf_counter()
    vocab = vocab or default_vocabulary()
    seg = _segment_row(session, segment_id, lock=True)
    if seg.kind != SegmentKind.DYNAMIC or seg.status != SegmentStatus.ACTIVE:
        raise Conflict(
            f"segment {segment_id} is {seg.status} and {seg.kind}; only active dynamic "
            "segments are refreshed"
        )
    prior = _prior_refresh(session, segment_id, as_of)
    if prior is not None:
        return prior
    rule, version = _dynamic_rule(session, seg, vocab)
    refresh_id = session.scalar(
        insert(SegmentRefresh)
        .values(segment_id=segment_id, as_of=as_of, version_id=version.id)
        .returning(SegmentRefresh.id)
    )
    _tune_for_bulk(session)
    entered, left, members = _apply(
        session, segment_id, version.id, member_query(rule, vocab, as_of), as_of, refresh_id
    )
    seconds = time.perf_counter() - started
    session.execute(
        _refreshes.update()
        .where(_refreshes.c.id == refresh_id)
        .values(members=members, entered=entered, left=left, seconds=seconds)
    )
    log.info(
        "segment %s refreshed as of %s: %d members, %d entered, %d left in %.2fs",
        segment_id,
        as_of.isoformat(),
        members,
        entered,
        left,
        seconds,
    )
    return RefreshResult(
        segment_id, as_of, version.version, members, entered, left, refresh_id, seconds
    )


def dynamic_segment_ids(session: Session) -> list[int]:
    """Ids of the active dynamic segments (what a full refresh fans out over)."""
    return list(
        session.scalars(
            select(CustomSegment.id)
            .where(
                CustomSegment.status == SegmentStatus.ACTIVE.value,
                CustomSegment.kind == SegmentKind.DYNAMIC.value,
            )
            .order_by(CustomSegment.id)
        )
    )


def refresh_all(
    session: Session,
    as_of: datetime,
    vocab: Vocabulary | None = None,
    *,
    include: Callable[[Rule], bool] | None = None,
) -> list[RefreshResult]:
    """Refresh every active dynamic segment in this session, sharing one scan of the members.

    The segments are evaluated together (`refresh_many`); those whose rule reads segment
    memberships follow one by one, so they see what the shared pass wrote. If the shared
    pass fails, every segment is refreshed on its own, and one failure skips only its
    segment. With `include`, only the segments whose current rule it accepts (the daily
    refresh refreshes the segments on statistics alone before the scores are ready).
    """
    vocab = vocab or default_vocabulary()
    ids = dynamic_segment_ids(session)
    if include is not None:
        ids = [i for i in ids if _included(session, i, vocab, include)]
    try:
        with session.begin_nested():
            results, later = refresh_many(session, ids, as_of, vocab)
    except Exception:
        log.exception("shared refresh as of %s failed; refreshing one by one", as_of)
        results, later = [], ids
    for segment_id in later:
        try:
            with session.begin_nested():
                results.append(refresh_segment(session, segment_id, as_of, vocab))
        except Exception:
            log.exception("refresh of segment %s as of %s failed", segment_id, as_of)
    return results


def _included(
    session: Session, segment_id: int, vocab: Vocabulary, include: Callable[[Rule], bool]
) -> bool:
    try:
        rule, _ = _dynamic_rule(session, _segment_row(session, segment_id), vocab)
    except Exception:
        return True  # refresh_many logs and skips a rule that does not compile
    return include(rule)


# --- the shared refresh ------------------------------------------------------------------

# Per-transaction scratch tables of the shared refresh (ON COMMIT DROP; not in the models).
_SCAN = "patron_segment_scan"

# The comparison of the pass's results (per member, the ids of the segments it belongs to
# now) with the stored memberships of the same segments.
_DIFF = text(
    """
    CREATE TEMPORARY TABLE patron_segment_diff ON COMMIT DROP AS
    SELECT COALESCE(n.segment_id, c.segment_id) AS segment_id,
           COALESCE(n.member_id, c.member_id) AS member_id,
           n.member_id IS NULL AS gone
    FROM (SELECT s AS segment_id, x.member_id
          FROM patron_segment_scan x, unnest(x.ids) s) n
    FULL JOIN (SELECT segment_id, member_id FROM segment_memberships
               WHERE segment_id = ANY(CAST(:ids AS integer[]))) c
           ON c.segment_id = n.segment_id AND c.member_id = n.member_id
    WHERE n.member_id IS NULL OR c.member_id IS NULL
    """
)

# As in _apply: every CTE sees the memberships as they were before the statement, and the
# history is written from what the DELETE / INSERT really changed (a purchase may have
# moved a member in between).
_WRITE_DIFF = text(
    """
    WITH meta AS (
        SELECT * FROM unnest(CAST(:ids AS integer[]), CAST(:version_ids AS bigint[]),
                             CAST(:refresh_ids AS bigint[])) AS m(segment_id, version_id,
                                                                  refresh_id)
    ), gone AS (
        DELETE FROM segment_memberships sm USING patron_segment_diff d
        WHERE d.gone AND sm.segment_id = d.segment_id AND sm.member_id = d.member_id
        RETURNING sm.segment_id, sm.member_id
    ), came AS (
        INSERT INTO segment_memberships (segment_id, member_id, entered_at, version_id)
        SELECT d.segment_id, d.member_id, :at, m.version_id
        FROM patron_segment_diff d JOIN meta m USING (segment_id)
        WHERE NOT d.gone
        ON CONFLICT DO NOTHING
        RETURNING segment_id, member_id
    ), history AS (
        INSERT INTO segment_membership_changes (segment_id, member_id, kind, at, version_id,
                                                refresh_id)
        SELECT g.segment_id, g.member_id, 'left', :at, m.version_id, m.refresh_id
        FROM gone g JOIN meta m USING (segment_id)
        UNION ALL
        SELECT c.segment_id, c.member_id, 'entered', :at, m.version_id, m.refresh_id
        FROM came c JOIN meta m USING (segment_id)
        RETURNING segment_id, kind
    )
    SELECT segment_id, count(*) FILTER (WHERE kind = 'entered') AS entered,
           count(*) FILTER (WHERE kind = 'left') AS left
    FROM history GROUP BY segment_id
    """
)


@dataclass
class _Todo:
    seg: CustomSegment
    version: SegmentVersion
    rule: Rule
    expr: ColumnElement[bool]


def _scan(todo: list[_Todo], ctx: SqlContext, source: Any) -> Select[Any]:
    """Per member with at least one segment: (member_id, ids of its segments)."""
    joined = source.from_clause(ctx.joins)
    for table, onclause in ctx.outer_joins:
        joined = joined.outerjoin(table, onclause)
    cases = [case((t.expr, literal(t.seg.id)), else_=None) for t in todo]
    inner = (
        select(
            source.id_column().label("member_id"),
            func.array_remove(array(cases), None, type_=ARRAY(Integer)).label("ids"),
        )
        .select_from(joined)
        # A fence: without it the planner would copy the arrays into the WHERE below.
        .offset(0)
    )
    active = source.where()
    if active is not None:
        inner = inner.where(active)
    per_member = inner.subquery("per_member")
    # Members in no segment (most of them for most rules) are not written at all.
    return select(per_member.c.member_id, per_member.c.ids).where(
        func.cardinality(per_member.c.ids) > 0
    )


def refresh_many(
    session: Session, segment_ids: Sequence[int], as_of: datetime, vocab: Vocabulary
) -> tuple[list[RefreshResult], list[int]]:
    """Refresh several dynamic segments as of one instant with one pass over the members.

    One SELECT evaluates every segment's compiled rule over the member source and keeps,
    per member in any segment, the array of their segment ids; a full join of those
    (segment, member) pairs with the stored memberships of the same segments gives who
    entered and who left, and one statement applies both with history. The cost is one
    scan plus the size of the memberships, instead of one scan per segment. Same
    guarantees as `refresh_segment`: the segment rows are locked, an as_of already
    refreshed is replayed, an older one skipped.

    Returns the results and the segments left to refresh one by one (their rules read
    segment memberships, so they must see this pass's result).
    """
    started = time.perf_counter()
    rows = session.scalars(
        select(CustomSegment)
        .where(CustomSegment.id.in_(list(segment_ids)))
        .order_by(CustomSegment.id)
        .with_for_update()
    ).all()
    results: list[RefreshResult] = []
    later: list[int] = []
    ctx = SqlContext(utc_instant(as_of))
    todo: list[_Todo] = []
    for seg in rows:
        if seg.kind != SegmentKind.DYNAMIC or seg.status != SegmentStatus.ACTIVE:
            continue
        prior = _prior_refresh(session, seg.id, as_of)
        if prior is not None:
            results.append(prior)
            continue
        try:
            rule, version = _dynamic_rule(session, seg, vocab)
            if MEMBERSHIP_FIELD in rule.fields:
                later.append(seg.id)
                continue
            todo.append(_Todo(seg, version, rule, compile_sql(rule, vocab, as_of, ctx).expr))
        except Exception:
            log.exception("segment %s does not compile; not refreshed as of %s", seg.id, as_of)
    if not todo:
        return results, later
    source = vocab.source(Scope.MEMBER)
    if source is None:
        raise RuntimeError("the vocabulary has no SQL source for members")
    ids = [t.seg.id for t in todo]
    refresh_ids = dict(
        session.execute(
            insert(SegmentRefresh)
            .values(
                [
                    {
                        "segment_id": t.seg.id,
                        "as_of": as_of,
                        "version_id": t.version.id,
                    }
                    for t in todo
                ]
            )
            .returning(SegmentRefresh.segment_id, SegmentRefresh.id)
        ).all()
    )
    session.execute(text("SET LOCAL jit = off"))
    # The full join of the results with the stored memberships hashes millions of rows.
    session.execute(text("SET LOCAL work_mem = '256MB'"))
    for name in (_SCAN, "patron_segment_diff"):
        session.execute(text(f"DROP TABLE IF EXISTS pg_temp.{name}"))
    scan = _scan(todo, ctx, source).compile(
        dialect=postgresql.dialect(), compile_kwargs={"render_postcompile": True}
    )
    # No CREATE TABLE AS construct in SQLAlchemy Core: the compiled SELECT, in the driver's
    # own parameter style, behind the DDL.
    # The joins of "today" per time zone (a few hundred rows) are estimated badly enough for
    # the planner to sort a million members for merge joins; hash joins are right here.
    session.execute(text("SET LOCAL enable_mergejoin = off"))
    session.connection().exec_driver_sql(
        f"CREATE TEMPORARY TABLE {_SCAN} ON COMMIT DROP AS {scan}", scan.params
    )
    session.execute(text("SET LOCAL enable_mergejoin = on"))
    session.execute(text(f"ANALYZE {_SCAN}"))
    session.execute(_DIFF, {"ids": ids})
    session.execute(text("ANALYZE patron_segment_diff"))
    changed = {
        r.segment_id: (int(r.entered), int(r.left))
        for r in session.execute(
            _WRITE_DIFF,
            {
                "ids": ids,
                "version_ids": [t.version.id for t in todo],
                "refresh_ids": [refresh_ids[i] for i in ids],
                "at": as_of,
            },
        )
    }
    sizes: dict[int, int] = dict(
        session.execute(
            text(
                "SELECT segment_id, count(*) FROM segment_memberships"
                " WHERE segment_id = ANY(:ids) GROUP BY segment_id"
            ),
            {"ids": ids},
        ).all()
    )
    session.execute(text(f"DROP TABLE {_SCAN}"))
    session.execute(text("DROP TABLE patron_segment_diff"))
    # One pass served them all: each refresh records the pass's duration.
    seconds = time.perf_counter() - started
    for t in todo:
        entered, left = changed.get(t.seg.id, (0, 0))
        members = int(sizes.get(t.seg.id, 0))
        session.execute(
            _refreshes.update()
            .where(_refreshes.c.id == refresh_ids[t.seg.id])
            .values(members=members, entered=entered, left=left, seconds=seconds)
        )
        results.append(
            RefreshResult(
                t.seg.id,
                as_of,
                t.version.version,
                members,
                entered,
                left,
                refresh_ids[t.seg.id],
                seconds,
            )
        )
    log.info(
        "%d segments refreshed together as of %s in %.2fs", len(todo), as_of.isoformat(), seconds
    )
    return results, later


# --- static segments -----------------------------------------------------------------------


def check_external_ids(ids: Iterable[Any]) -> list[str]:
    """The ids as strings, or a 422 naming every malformed one (by position)."""
    found: list[str] = []
    bad: dict[str, list[str]] = {}
    for i, raw in enumerate(ids):
        if not isinstance(raw, str) or not EXTERNAL_ID.match(raw):
            if len(bad) < 100:
                bad[str(i)] = [
                    "must be 1-64 letters, digits or . _ : @ - (starting with a letter or digit)"
                ]
            continue
        found.append(raw)
    if bad:
        raise ValidationFailed(
            "Some external ids are malformed; nothing was written.",
            errors={"external_ids": bad},
        )
    if len(found) > MAX_UPLOAD:
        raise ValidationFailed(
            f"at most {MAX_UPLOAD:,} ids per upload",
            errors={"external_ids": [f"{len(found):,} ids; at most {MAX_UPLOAD:,}"]},
        )
    return found


def upload_members(
    session: Session,
    segment_id: int,
    external_ids: Sequence[str],
    *,
    replace: bool,
    at: datetime,
    actor: str,
    report_limit: int = 1000,
) -> dict[str, Any]:
    """Set (replace) or extend (add) a static segment's members from external ids.

    Ids that match no active member are reported, not fatal; malformed input is
    rejected before anything is written.
    """
    ids = check_external_ids(external_ids)
    seg = _segment_row(session, segment_id, lock=True)
    if seg.kind != SegmentKind.STATIC or seg.status != SegmentStatus.ACTIVE:
        raise Conflict(
            f"segment {segment_id} is {seg.status} and {seg.kind}; members are uploaded to "
            "active static segments only"
        )
    version_id = _version_row(session, segment_id, seg.current_version).id
    unique_ids = list(dict.fromkeys(ids))
    uploaded = select(
        func.unnest(bindparam("ids", unique_ids, type_=ARRAY(String()))).label("ext")
    ).subquery("uploaded")
    missing = list(
        session.scalars(
            select(uploaded.c.ext).where(
                ~exists().where(
                    _members.c.external_id == uploaded.c.ext,
                    _members.c.status == MemberStatus.ACTIVE.value,
                )
            )
        )
    )
    found = select(_members.c.id).where(
        _members.c.external_id.in_(select(uploaded.c.ext)),
        _members.c.status == MemberStatus.ACTIVE.value,
    )
    kept = select(_memberships.c.member_id).where(_memberships.c.segment_id == segment_id)
    matched = found if replace else union(found, kept)
    entered, left, members = _apply(session, segment_id, version_id, matched, at, None)
    audit(
        session,
        actor,
        "segment.members_uploaded",
        "segment",
        str(segment_id),
        {
            "mode": "replace" if replace else "add",
            "received": len(ids),
            "not_found": len(missing),
            "entered": entered,
            "left": left,
        },
    )
    return {
        "received": len(ids),
        "unique": len(unique_ids),
        "matched": len(unique_ids) - len(missing),
        "not_found_count": len(missing),
        "not_found": missing[:report_limit],
        "entered": entered,
        "left": left,
        "members": members,
    }


# --- reading members and history ------------------------------------------------------------


def _encode(kind: str, *parts: Any) -> str:
    raw = kind + ":" + "|".join(str(p) for p in parts)
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str, kind: str) -> list[str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        found, _, rest = raw.partition(":")
        if found != kind or not rest:
            raise ValueError(found)
        return rest.split("|")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed(
            "the cursor is not one this API returned", errors={"cursor": ["invalid cursor"]}
        ) from None


def list_members(
    session: Session, segment_id: int, *, cursor: str | None = None, limit: int = 100
) -> tuple[list[dict[str, Any]], str | None]:
    """Current members of a segment in member id order, keyset-paginated."""
    _segment_row(session, segment_id)
    stmt = (
        select(
            _memberships.c.member_id,
            _members.c.external_id,
            _memberships.c.entered_at,
            _versions.c.version,
        )
        .select_from(
            _memberships.join(_members, _members.c.id == _memberships.c.member_id).join(
                _versions, _versions.c.id == _memberships.c.version_id
            )
        )
        .where(_memberships.c.segment_id == segment_id)
    )
    if cursor is not None:
        stmt = stmt.where(_memberships.c.member_id > int(_decode(cursor, "m")[0]))
    rows = session.execute(stmt.order_by(_memberships.c.member_id).limit(limit + 1)).all()
    items = [
        {"member_id": r.external_id, "entered_at": r.entered_at, "version": r.version}
        for r in rows[:limit]
    ]
    nxt = _encode("m", rows[limit - 1].member_id) if len(rows) > limit else None
    return items, nxt


def list_changes(
    session: Session,
    segment_id: int,
    *,
    since: datetime,
    kind: ChangeKind | None = None,
    cursor: str | None = None,
    limit: int = 100,
) -> tuple[list[dict[str, Any]], str | None]:
    """Who entered / left a segment at or after `since`, oldest first, keyset-paginated."""
    _segment_row(session, segment_id)
    c = _changes.c
    stmt = (
        select(c.id, c.at, c.kind, c.refresh_id, _members.c.external_id, _versions.c.version)
        .select_from(
            _changes.join(_members, _members.c.id == c.member_id).join(
                _versions, _versions.c.id == c.version_id
            )
        )
        .where(c.segment_id == segment_id, c.at >= since)
    )
    if kind is not None:
        stmt = stmt.where(c.kind == kind.value)
    if cursor is not None:
        at_s, id_s = _decode(cursor, "c")
        try:
            after = (datetime.fromisoformat(at_s), int(id_s))
        except ValueError:
            raise ValidationFailed(
                "the cursor is not one this API returned", errors={"cursor": ["invalid cursor"]}
            ) from None
        stmt = stmt.where(tuple_(c.at, c.id) > tuple_(*after))
    rows = session.execute(stmt.order_by(c.at, c.id).limit(limit + 1)).all()
    items = [
        {
            "member_id": r.external_id,
            "kind": r.kind,
            "at": r.at,
            "version": r.version,
            "refresh_id": r.refresh_id,
        }
        for r in rows[:limit]
    ]
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1]
        nxt = _encode("c", last.at.isoformat(), last.id)
    return items, nxt


# --- preview ---------------------------------------------------------------------------------


def preview(
    session: Session, vocab: Vocabulary, source: Any, *, at: datetime, sample: int = 10
) -> dict[str, Any]:
    """How many members a rule selects at `at`, and a sample with why each is in."""
    rule = rule_or_422(source, vocab, Scope.MEMBER)
    _tune_for_bulk(session)
    count = session.scalar(count_query(rule, vocab, at))
    ids = list(session.scalars(member_query(rule, vocab, at).limit(sample))) if sample else []
    facts = load_member_facts(session, ids)
    items = [
        {
            "member_id": facts[i]["external_id"],
            "explanation": explain(rule, vocab, facts[i], now=at).to_json(),
        }
        for i in ids
        if i in facts
    ]
    return {
        "count": int(count or 0),
        "evaluated_at": at,
        "text": to_text(rule.root),
        "hash": rule.hash,
        "sample": items,
    }


# --- one member, on the purchase path -------------------------------------------------------


@dataclass(frozen=True)
class _Watched:
    segment_id: int
    name: str
    version: int
    version_id: int
    fields: frozenset[str]
    check: PythonPredicate


class _Catalogue:
    """The active dynamic segments with their compiled predicates, cached per process.

    Predicates are cached per segment version (versions are immutable); the list of
    segments is re-read after CATALOGUE_TTL_SECONDS. A stale list is harmless: the write
    only applies to segments still active at the version the predicate came from.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded_at = 0.0
        self._entries: list[_Watched] | None = None
        self._predicates: dict[int, PythonPredicate] = {}

    def clear(self) -> None:
        with self._lock:
            self._entries = None

    def entries(self, session: Session, vocab: Vocabulary) -> list[_Watched]:
        with self._lock:
            fresh = time.monotonic() - self._loaded_at < CATALOGUE_TTL_SECONDS
            if self._entries is not None and fresh:
                return self._entries
        rows = session.execute(
            select(
                _segments.c.id,
                _segments.c.name,
                _segments.c.current_version,
                _versions.c.id,
                _versions.c.rule,
                _versions.c.fields,
            )
            .select_from(
                _segments.join(
                    _versions,
                    (_versions.c.segment_id == _segments.c.id)
                    & (_versions.c.version == _segments.c.current_version),
                )
            )
            .where(
                _segments.c.status == SegmentStatus.ACTIVE.value,
                _segments.c.kind == SegmentKind.DYNAMIC.value,
            )
            .order_by(_segments.c.id)
        ).all()
        entries: list[_Watched] = []
        for seg_id, name, number, version_id, tree, fields in rows:
            check = self._predicates.get(version_id)
            if check is None:
                try:
                    check = compile_py(validate(tree, vocab, Scope.MEMBER), vocab)
                except Exception:
                    log.exception("segment %s version %s does not compile", seg_id, number)
                    continue
                self._predicates[version_id] = check
            entries.append(_Watched(seg_id, name, number, version_id, frozenset(fields), check))
        with self._lock:
            self._entries, self._loaded_at = entries, time.monotonic()
        return entries


_CATALOGUE = _Catalogue()


def forget_catalogue() -> None:
    """Drop this process's cached segment list (after an edit, and in tests)."""
    _CATALOGUE.clear()


def purchase_fields(vocab: Vocabulary) -> frozenset[str]:
    """The rule fields a purchase can change (the statistics group)."""
    return frozenset(f.name for f in vocab.fields() if f.group in PURCHASE_GROUPS)


_MEMBER_WRITE = text(
    """
    WITH leave AS (
        SELECT * FROM unnest(CAST(:leave_ids AS integer[]), CAST(:leave_versions AS integer[]),
                             CAST(:leave_version_ids AS bigint[])) AS l(segment_id, version,
                                                                        version_id)
    ), enter AS (
        SELECT * FROM unnest(CAST(:enter_ids AS integer[]), CAST(:enter_versions AS integer[]),
                             CAST(:enter_version_ids AS bigint[])) AS e(segment_id, version,
                                                                        version_id)
    ), gone AS (
        DELETE FROM segment_memberships sm
        USING leave l, segments s
        WHERE sm.member_id = :member_id AND sm.segment_id = l.segment_id
          AND s.id = l.segment_id AND s.status = 'active' AND s.current_version = l.version
        RETURNING sm.segment_id, l.version_id
    ), came AS (
        INSERT INTO segment_memberships (segment_id, member_id, entered_at, version_id)
        SELECT e.segment_id, :member_id, :at, e.version_id
        FROM enter e JOIN segments s ON s.id = e.segment_id
        WHERE s.status = 'active' AND s.current_version = e.version
        ON CONFLICT DO NOTHING
        RETURNING segment_id, version_id
    )
    INSERT INTO segment_membership_changes (segment_id, member_id, kind, at, version_id)
    SELECT segment_id, :member_id, 'left', :at, version_id FROM gone
    UNION ALL
    SELECT segment_id, :member_id, 'entered', :at, version_id FROM came
    RETURNING segment_id, kind
    """
)


def refresh_member(
    session: Session,
    member_id: int,
    now: datetime,
    fields_changed: Iterable[str] | None = None,
    *,
    facts: dict[str, Any] | None = None,
    vocab: Vocabulary | None = None,
) -> MemberSegmentChanges:
    """Re-evaluate, for one member, the dynamic segments a purchase can change.

    Those are the segments whose rule reads a field in `fields_changed` (default: the
    statistics fields). Evaluated with the cached Python predicates on the member's
    facts (pass `facts` if already loaded, read after the stats update); entries and
    exits are written with the same history as a refresh, in the caller's transaction.
    Costs one query for the facts and one more only when membership changes.
    """
    vocab = vocab or default_vocabulary()
    touched = frozenset(fields_changed) if fields_changed is not None else purchase_fields(vocab)
    watched = [w for w in _CATALOGUE.entries(session, vocab) if w.fields & touched]
    if not watched and facts is None:
        # The common case on a till with no purchase-sensitive segment: no query at all.
        return MemberSegmentChanges(segments=None)
    if facts is None:
        loaded = load_member_facts(session, [member_id])
        if member_id not in loaded:
            return MemberSegmentChanges()
        facts = loaded[member_id]
    current = set(facts.get("segments") or ())
    if not watched:
        return MemberSegmentChanges(segments=sorted(current))
    enter: list[_Watched] = []
    leave: list[_Watched] = []
    for w in watched:
        inside = bool(w.check.at(now)(facts))
        if inside and w.name not in current:
            enter.append(w)
        elif not inside and w.name in current:
            leave.append(w)
    if not enter and not leave:
        return MemberSegmentChanges(segments=sorted(current))
    rows = session.execute(
        _MEMBER_WRITE,
        {
            "member_id": member_id,
            "at": now,
            "leave_ids": [w.segment_id for w in leave],
            "leave_versions": [w.version for w in leave],
            "leave_version_ids": [w.version_id for w in leave],
            "enter_ids": [w.segment_id for w in enter],
            "enter_versions": [w.version for w in enter],
            "enter_version_ids": [w.version_id for w in enter],
        },
    ).all()
    names = {w.segment_id: w.name for w in watched}
    result = MemberSegmentChanges(
        entered=sorted(names[s] for s, k in rows if k == ChangeKind.ENTERED),
        left=sorted(names[s] for s, k in rows if k == ChangeKind.LEFT),
    )
    result.segments = sorted((current | set(result.entered)) - set(result.left))
    return result


# --- jobs ------------------------------------------------------------------------------------


def enqueue_refresh(queue: Queue, segment_ids: Iterable[int], as_of: datetime) -> list[str]:
    """Enqueue one refresh job per segment (call after commit); returns the job ids."""
    return [
        queue.enqueue(
            refresh_segment_job,
            segment_id,
            as_of.isoformat(),
            job_timeout=JOB_TIMEOUT_SECONDS,
            result_ttl=JOB_RESULT_TTL_SECONDS,
            failure_ttl=JOB_RESULT_TTL_SECONDS,
            description=f"refresh segment {segment_id} as of {as_of.isoformat()}",
        ).id
        for segment_id in segment_ids
    ]


@job
def refresh_segment_job(segment_id: int, as_of_iso: str) -> dict[str, Any]:
    """RQ job: refresh one segment as of an instant, in its own unit of work."""
    as_of = datetime.fromisoformat(as_of_iso)
    current = get_current_job()
    log.info(
        "job %s: refresh segment %s as of %s", current.id if current else "-", segment_id, as_of_iso
    )
    with unit_of_work() as session:
        result = refresh_segment(session, segment_id, as_of)
    return result.to_json()


@job
def refresh_all_job(as_of_iso: str) -> list[str]:
    """RQ job: fan the refresh of every active dynamic segment out as one job each."""
    as_of = datetime.fromisoformat(as_of_iso)
    with unit_of_work() as session:
        ids = dynamic_segment_ids(session)
    current = get_current_job()
    queue = (
        Queue(current.origin, connection=current.connection)
        if current is not None
        else Queue(job_app().config["PATRON"].queue_name, connection=get_redis())
    )
    return enqueue_refresh(queue, ids, as_of)
