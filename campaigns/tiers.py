"""Tiers: the configurable ladder, upgrades at once, downgrades only at the yearly review.

The rule. The ladder is an ordered list of tiers (rank 1 is the lowest). A member
qualifies for a tier when, over the rolling 12 months of `member_stats`
(`spend_365d`, `purchases_365d`, see segments/stats.py), their spend reaches the
tier's `min_spend_12m` OR their number of purchases reaches its `min_purchases_12m`
(a threshold left empty never qualifies on its own). A member's *qualifying tier* is
the highest tier they qualify for.

The policy.
- Up at once: a purchase (or the daily review, which catches imports and ladder
  changes) that makes the qualifying tier higher than the member's tier moves the
  member straight to it, skipping levels if need be. A campaign can upgrade to a
  named tier. Nothing but the review ever moves a member down.
- Down only at the yearly review: each tiered member has a review date, one year
  after they last got a higher tier, as a date in the member's own time zone. On the
  daily refresh whose date reaches it, a member whose qualifying tier is lower than
  their tier goes down exactly one step; either way the review date rolls forward to
  the next anniversary, so the next step down can come a year later at the earliest.

The purchase path is one prepared statement that reads the ladder inside PostgreSQL
(same snapshot as the rest of the sale, no extra round trip). Python-side readers (the
profile, the API, campaign validation) use `ladder()`, an in-process cache keyed by
the ladder's version stamp, which `replace_ladder` changes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Date,
    Select,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy import (
    cast as sql_cast,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from campaigns.models_tiers import (
    MemberTier,
    Tier,
    TierChange,
    TierChangeReason,
    TierDirection,
)
from service.audit import record as audit
from service.db import execute_prepared
from service.errors import Conflict, ValidationFailed
from service.models import Member, MemberStatus

MAX_TIERS = 20
HISTORY_LIMIT = 50
NAME_PATTERN = re.compile(r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,30}[^\s\x00-\x1f\x7f])?$")

RULE = (
    "A member qualifies for a tier when their spend over the rolling 12 months reaches "
    "min_spend_12m OR their number of purchases over the rolling 12 months reaches "
    "min_purchases_12m; their tier is the highest they qualify for. Upgrades happen at "
    "once; downgrades only at the member's yearly review date, one step at a time."
)


@dataclass(frozen=True)
class TierDef:
    name: str
    rank: int
    min_spend_12m: Decimal | None
    min_purchases_12m: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rank": self.rank,
            "min_spend_12m": self.min_spend_12m,
            "min_purchases_12m": self.min_purchases_12m,
        }


@dataclass(frozen=True)
class Ladder:
    version: int
    updated_at: datetime
    updated_by: str
    tiers: tuple[TierDef, ...]

    def by_name(self, name: str) -> TierDef | None:
        return next((t for t in self.tiers if t.name == name), None)

    def above(self, rank: int) -> TierDef | None:
        """The next tier up from `rank` (0 = no tier)."""
        return next((t for t in self.tiers if t.rank > rank), None)

    def qualifying(self, spend: Decimal, purchases: int) -> TierDef | None:
        """The highest tier these 12-month figures qualify for (the Python twin of _QUALIFY)."""
        best = None
        for t in self.tiers:
            if (t.min_spend_12m is not None and spend >= t.min_spend_12m) or (
                t.min_purchases_12m is not None and purchases >= t.min_purchases_12m
            ):
                best = t
        return best


# --- the ladder: cached reads, validated replacement --------------------------------------


class _LadderCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ladder: Ladder | None = None

    def get(self, version: int, updated_at: datetime) -> Ladder | None:
        with self._lock:
            found = self._ladder
        if found is not None and (found.version, found.updated_at) == (version, updated_at):
            return found
        return None

    def put(self, ladder: Ladder) -> None:
        with self._lock:
            self._ladder = ladder

    def clear(self) -> None:
        with self._lock:
            self._ladder = None


_CACHE = _LadderCache()


def ladder(session: Session) -> Ladder:
    """The current ladder: one single-row lookup of its version stamp, tiers from cache.

    The stamp is (version, updated_at with clock_timestamp()), so a replacement that was
    rolled back can never be mistaken for a later one that reused its version number.
    """
    stamp = session.execute(
        text("SELECT version, updated_at, updated_by FROM tier_ladder WHERE id = 1")
    ).one()
    cached = _CACHE.get(stamp.version, stamp.updated_at)
    if cached is not None:
        return cached
    rows = session.execute(
        select(Tier.name, Tier.rank, Tier.min_spend_12m, Tier.min_purchases_12m).order_by(Tier.rank)
    ).all()
    found = Ladder(
        version=stamp.version,
        updated_at=stamp.updated_at,
        updated_by=stamp.updated_by,
        tiers=tuple(TierDef(r.name, r.rank, r.min_spend_12m, r.min_purchases_12m) for r in rows),
    )
    _CACHE.put(found)
    return found


def ladder_dict(found: Ladder) -> dict[str, Any]:
    return {
        "version": found.version,
        "updated_at": found.updated_at,
        "updated_by": found.updated_by,
        "rule": RULE,
        "tiers": [t.as_dict() for t in found.tiers],
    }


def validate_ladder(items: Iterable[Mapping[str, Any]]) -> list[TierDef]:
    """Check a ladder given lowest tier first; ValidationFailed names each bad item's field.

    Names are unique (ignoring case); every tier has at least one threshold; each kind of
    threshold, where set, strictly increases up the ladder.
    """
    items = list(items)
    errors: dict[str, Any] = {}

    def err(i: int, field: str, message: str) -> None:
        errors.setdefault("tiers", {}).setdefault(str(i), {}).setdefault(field, []).append(message)

    if not items:
        raise ValidationFailed(
            "The ladder needs at least one tier.", errors={"tiers": ["at least one tier"]}
        )
    if len(items) > MAX_TIERS:
        raise ValidationFailed(
            "The ladder is too long.", errors={"tiers": [f"at most {MAX_TIERS} tiers"]}
        )
    seen: dict[str, int] = {}
    last_spend: tuple[str, Decimal] | None = None
    last_count: tuple[str, int] | None = None
    result: list[TierDef] = []
    for i, item in enumerate(items):
        name = item.get("name")
        spend = item.get("min_spend_12m")
        count = item.get("min_purchases_12m")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            err(i, "name", "must be 1-32 characters without surrounding spaces")
        elif name.casefold() in seen:
            err(i, "name", f"duplicate of tier {seen[name.casefold()]} ({name!r})")
        else:
            seen[name.casefold()] = i
        if spend is not None and (not isinstance(spend, Decimal) or spend < 0):
            err(i, "min_spend_12m", "must be a decimal amount of 0 or more")
            spend = None
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 1
        ):
            err(i, "min_purchases_12m", "must be a whole number of 1 or more")
            count = None
        given = item.get("min_spend_12m") is not None or item.get("min_purchases_12m") is not None
        if not given:
            err(i, "min_spend_12m", "set min_spend_12m or min_purchases_12m (or both)")
        if spend is not None:
            if last_spend is not None and spend <= last_spend[1]:
                err(
                    i,
                    "min_spend_12m",
                    f"must be more than {last_spend[1]} (min_spend_12m of {last_spend[0]!r},"
                    " the tier below)",
                )
            last_spend = (str(name), spend)
        if count is not None:
            if last_count is not None and count <= last_count[1]:
                err(
                    i,
                    "min_purchases_12m",
                    f"must be more than {last_count[1]} (min_purchases_12m of"
                    f" {last_count[0]!r}, the tier below)",
                )
            last_count = (str(name), count)
        result.append(TierDef(str(name), i + 1, spend, count))
    if errors:
        raise ValidationFailed("The tier ladder is not valid; nothing was changed.", errors=errors)
    return result


def replace_ladder(
    session: Session,
    items: Iterable[Mapping[str, Any]],
    *,
    actor: str,
    renames: Mapping[str, str] | None = None,
    base_version: int | None = None,
) -> Ladder:
    """Replace the whole ladder atomically (audited); members keep their tiers.

    `renames` maps a current tier name to its new name; members holding it move with it.
    A tier that members still hold cannot simply disappear (409): rename it or keep it.
    `base_version` guards against overwriting a concurrent edit (409 when stale).
    """
    tiers = validate_ladder(items)
    renames = dict(renames or {})
    # Serialises replacements: the second waits here and then sees the first one's result.
    current = session.execute(
        text("SELECT version FROM tier_ladder WHERE id = 1 FOR UPDATE")
    ).scalar_one()
    if base_version is not None and base_version != current:
        raise Conflict(
            f"the ladder changed since version {base_version}; it is now version {current}",
            errors={"base_version": [f"is {current} now"]},
        )
    old = {r.name: r for r in session.execute(select(Tier.name, Tier.rank)).all()}
    new_names = {t.name for t in tiers}
    rename_errors: dict[str, list[str]] = {}
    for source, target in renames.items():
        if source not in old:
            rename_errors.setdefault(source, []).append("is not a tier of the current ladder")
        if target not in new_names:
            rename_errors.setdefault(source, []).append(
                f"target {target!r} is not a tier of the new ladder"
            )
    if rename_errors:
        raise ValidationFailed(
            "The renames do not match the ladders; nothing was changed.",
            errors={"renames": rename_errors},
        )
    if renames:
        session.execute(
            text(
                "UPDATE members m SET tier = r.target, updated_at = now()"
                " FROM jsonb_each_text(CAST(:renames AS jsonb)) AS r(source, target)"
                " WHERE m.tier = r.source"
            ),
            {"renames": json.dumps(renames)},
        )
    held = session.execute(
        select(Member.tier, func.count())
        .where(Member.tier.is_not(None), Member.tier.not_in(new_names))
        .group_by(Member.tier)
    ).all()
    if held:
        raise Conflict(
            "Members still hold tiers the new ladder drops; rename or keep them.",
            errors={
                "tiers": [
                    f"{n} member(s) hold {tier!r}: keep it or map it in renames" for tier, n in held
                ]
            },
        )
    session.execute(text("DELETE FROM tiers"))
    session.execute(insert(Tier), [t.as_dict() for t in tiers])
    version = session.execute(
        text(
            "UPDATE tier_ladder SET version = version + 1, updated_at = clock_timestamp(),"
            " updated_by = :actor WHERE id = 1 RETURNING version"
        ),
        {"actor": actor},
    ).scalar_one()
    audit(
        session,
        actor,
        "tiers.replaced",
        "tier_ladder",
        "1",
        {
            "version": version,
            "tiers": [_jsonable(t.as_dict()) for t in tiers],
            "previous": sorted(old, key=lambda n: old[n].rank),
            "renames": renames,
        },
    )
    _CACHE.clear()
    return ladder(session)


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Decimal) else v for k, v in value.items()}


# --- SQL shared by the paths ----------------------------------------------------------------

# The highest tier a member_stats row `ms` qualifies for (NULL: none).
_QUALIFIES = "(ms.spend_365d >= {t}.min_spend_12m OR ms.purchases_365d >= {t}.min_purchases_12m)"
# A member's next review: a year after `at`, as a date in the member's own time zone.
_REVIEW_AFTER = "CAST(CAST(timezone({tz}, {at}) AS date) + interval '1 year' AS date)"
# The first anniversary of `review_on` strictly after :as_of (a missed year is skipped).
_NEXT_ANNIVERSARY = (
    "CAST({d} + make_interval(years => CAST(date_part('year', age(CAST(:as_of AS date), {d}))"
    " AS integer) + 1) AS date)"
)

# The purchase path, one round trip: which tier the 12-month figures reach (q), the member
# row locked only when that is above their tier (cur, rechecked after any lock wait), the
# upgrade, the review date and the history row. No row back: no upgrade.
_APPLY_PURCHASE = text(
    f"""
    WITH q AS (
        SELECT t.name, t.rank
        FROM member_stats ms JOIN tiers t ON {_QUALIFIES.format(t="t")}
        WHERE ms.member_id = CAST(:member_id AS bigint)
        ORDER BY t.rank DESC
        LIMIT 1
    ), cur AS (
        SELECT m.id, m.tier AS from_tier, m.timezone, q.name AS to_tier
        FROM members m, q
        WHERE m.id = CAST(:member_id AS bigint)
          AND q.rank > COALESCE((SELECT c.rank FROM tiers c WHERE c.name = m.tier), 0)
        FOR UPDATE OF m
    ), up AS (
        UPDATE members m SET tier = cur.to_tier, updated_at = CAST(:now AS timestamptz)
        FROM cur
        WHERE m.id = cur.id
        RETURNING m.id, cur.from_tier, cur.to_tier, cur.timezone
    ), dates AS (
        INSERT INTO member_tiers AS mt (member_id, tier_since, review_on)
        SELECT id, CAST(:now AS timestamptz),
               {_REVIEW_AFTER.format(tz="timezone", at="CAST(:now AS timestamptz)")}
        FROM up
        ON CONFLICT (member_id) DO UPDATE
            SET tier_since = EXCLUDED.tier_since, review_on = EXCLUDED.review_on
        RETURNING member_id, review_on
    ), hist AS (
        INSERT INTO tier_changes (member_id, from_tier, to_tier, direction, reason,
                                  transaction_id, changed_at)
        SELECT id, from_tier, to_tier, 'up', 'purchase', CAST(:transaction_id AS bigint),
               CAST(:now AS timestamptz)
        FROM up
    )
    SELECT up.from_tier, up.to_tier, dates.review_on
    FROM up JOIN dates ON dates.member_id = up.id
    """  # noqa: S608 - fixed fragments of this module, values are bound parameters
)


def apply_purchase(
    session: Session, member_id: int, now: datetime, *, transaction_id: int | None = None
) -> dict[str, Any] | None:
    """Upgrade at once when this member's 12-month figures now reach a higher tier.

    Call after the purchase updated `member_stats` in the same transaction. Returns
    {"from", "to", "reason": "purchase", "review_on"} or None. Concurrent purchases of a
    member are serialised by their member_stats row lock, so only one of them upgrades.
    """
    row = execute_prepared(
        session,
        _APPLY_PURCHASE,
        {"member_id": member_id, "now": now, "transaction_id": transaction_id},
    )
    if row is None:
        return None
    return {
        "from": row.from_tier,
        "to": row.to_tier,
        "reason": TierChangeReason.PURCHASE.value,
        "review_on": row.review_on.isoformat(),
    }


def _target(session: Session, to_tier: str) -> TierDef:
    found = ladder(session).by_name(to_tier)
    if found is None:
        names = ", ".join(t.name for t in ladder(session).tiers)
        raise ValidationFailed(
            f"unknown tier {to_tier!r}", errors={"to_tier": [f"must be one of: {names}"]}
        )
    return found


def _upgrade_statement(
    member_ids: Select[Any],
    target: TierDef,
    *,
    reason: TierChangeReason,
    now: datetime,
    campaign_id: int | None,
    actor: str | None,
) -> Any:
    """Upgrade the selected active members below `target` to it, set-based, with history."""
    current_rank = func.coalesce(
        select(Tier.rank).where(Tier.name == Member.tier).correlate(Member).scalar_subquery(), 0
    )
    cur = (
        select(Member.id, Member.tier.label("from_tier"), Member.timezone)
        .where(
            Member.id.in_(member_ids),
            Member.status == MemberStatus.ACTIVE.value,
            current_rank < target.rank,
        )
        .with_for_update(of=Member)
        .cte("cur")
    )
    up = (
        update(Member)
        .where(Member.id == cur.c.id)
        .values(tier=target.name, updated_at=now)
        .returning(Member.id, cur.c.from_tier, cur.c.timezone)
        .cte("up")
    )
    at = literal(now)
    review_on = sql_cast(
        sql_cast(func.timezone(up.c.timezone, at), Date) + text("interval '1 year'"), Date
    )
    dates_ins = pg_insert(MemberTier).from_select(
        ["member_id", "tier_since", "review_on"], select(up.c.id, at, review_on)
    )
    dates = dates_ins.on_conflict_do_update(
        index_elements=[MemberTier.member_id],
        set_={
            "tier_since": dates_ins.excluded.tier_since,
            "review_on": dates_ins.excluded.review_on,
        },
    ).cte("dates")
    history = (
        insert(TierChange)
        .from_select(
            [
                "member_id",
                "from_tier",
                "to_tier",
                "direction",
                "reason",
                "campaign_id",
                "actor",
                "changed_at",
            ],
            select(
                up.c.id,
                up.c.from_tier,
                literal(target.name),
                literal(TierDirection.UP.value),
                literal(reason.value),
                literal(campaign_id),
                literal(actor),
                at,
            ),
        )
        .returning(TierChange.member_id, TierChange.from_tier)
        .add_cte(dates)
    )
    return history


def upgrade_tier(
    session: Session,
    member_id: int,
    to_tier: str,
    *,
    reason: str | TierChangeReason,
    actor: str,
    campaign_id: int | None = None,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Raise one member to `to_tier` (a campaign action or staff); never lowers; idempotent.

    Returns {"from", "to", "reason"} when the member moved, None when they already hold
    that tier or a higher one. Manual changes go to the audit log.
    """
    kind = TierChangeReason(reason)
    target = _target(session, to_tier)
    when = now or _now(session)
    stmt = _upgrade_statement(
        select(literal(member_id)),
        target,
        reason=kind,
        now=when,
        campaign_id=campaign_id,
        actor=actor,
    )
    row = session.execute(stmt).first()
    if row is None:
        return None
    if kind is TierChangeReason.MANUAL:
        audit(
            session,
            actor,
            "tier.upgraded",
            "member",
            str(member_id),
            {"from": row.from_tier, "to": target.name},
        )
    change: dict[str, Any] = {"from": row.from_tier, "to": target.name, "reason": kind.value}
    if campaign_id is not None:
        change["campaign_id"] = campaign_id
    return change


def upgrade_tier_sql(
    session: Session,
    member_ids_select: Select[Any],
    to_tier: str,
    campaign_id: int | None,
    now: datetime,
) -> int:
    """Raise every selected member below `to_tier` to it in one statement; returns how many."""
    target = _target(session, to_tier)
    stmt = _upgrade_statement(
        member_ids_select,
        target,
        reason=TierChangeReason.CAMPAIGN,
        now=now,
        campaign_id=campaign_id,
        actor=f"campaign:{campaign_id}" if campaign_id is not None else None,
    )
    return len(session.execute(stmt).all())


def _now(session: Session) -> datetime:
    return cast(datetime, session.scalar(text("SELECT now()")))


# --- the daily review ---------------------------------------------------------------------

# Anyone whose figures reach a higher tier than they hold (imports, a lowered ladder, a
# purchase made before the ladder existed): up at once, like a purchase would.
_REVIEW_UP = text(
    f"""
    WITH cur AS (
        SELECT m.id, m.tier AS from_tier, q.name AS to_tier
        FROM member_stats ms
        JOIN members m ON m.id = ms.member_id AND m.status = 'active'
        CROSS JOIN LATERAL (
            SELECT t.name, t.rank FROM tiers t WHERE {_QUALIFIES.format(t="t")}
            ORDER BY t.rank DESC LIMIT 1
        ) q
        WHERE (ms.spend_365d >= (SELECT min(min_spend_12m) FROM tiers)
               OR ms.purchases_365d >= (SELECT min(min_purchases_12m) FROM tiers))
          AND q.rank > COALESCE((SELECT c.rank FROM tiers c WHERE c.name = m.tier), 0)
    ), up AS (
        UPDATE members m SET tier = cur.to_tier, updated_at = :at
        FROM cur
        WHERE m.id = cur.id AND m.tier IS NOT DISTINCT FROM cur.from_tier
        RETURNING m.id, cur.from_tier, cur.to_tier
    ), dates AS (
        INSERT INTO member_tiers AS mt (member_id, tier_since, review_on)
        SELECT id, :at, CAST(CAST(:as_of AS date) + interval '1 year' AS date) FROM up
        ON CONFLICT (member_id) DO UPDATE
            SET tier_since = EXCLUDED.tier_since, review_on = EXCLUDED.review_on
    )
    INSERT INTO tier_changes (member_id, from_tier, to_tier, direction, reason, changed_at)
    SELECT id, from_tier, to_tier, 'up', 'review', :at FROM up
    """  # noqa: S608 - fixed fragments of this module, values are bound parameters
)

# Due members whose figures no longer reach their tier: one step down (NULL below the
# lowest), and the review date rolls to the next anniversary.
_REVIEW_DOWN = text(
    f"""
    WITH due AS (
        SELECT m.id, m.tier AS from_tier, below.name AS to_tier
        FROM member_tiers mt
        JOIN members m ON m.id = mt.member_id
        JOIN tiers cur ON cur.name = m.tier
        LEFT JOIN member_stats ms ON ms.member_id = m.id
        LEFT JOIN LATERAL (
            SELECT l.name FROM tiers l WHERE l.rank < cur.rank ORDER BY l.rank DESC LIMIT 1
        ) below ON true
        WHERE mt.review_on <= CAST(:as_of AS date)
          AND COALESCE((SELECT max(t.rank) FROM tiers t WHERE {_QUALIFIES.format(t="t")}), 0)
              < cur.rank
    ), down AS (
        UPDATE members m SET tier = due.to_tier, updated_at = :at
        FROM due
        WHERE m.id = due.id AND m.tier = due.from_tier
        RETURNING m.id, due.from_tier, due.to_tier
    ), dates AS (
        UPDATE member_tiers mt SET
            tier_since = :at,
            review_on = CASE WHEN down.to_tier IS NULL THEN NULL
                             ELSE {_NEXT_ANNIVERSARY.format(d="mt.review_on")} END
        FROM down
        WHERE mt.member_id = down.id
    )
    INSERT INTO tier_changes (member_id, from_tier, to_tier, direction, reason, changed_at)
    SELECT id, from_tier, to_tier, 'down', 'review', :at FROM down
    """  # noqa: S608 - fixed fragments of this module, values are bound parameters
)

# Everyone else who was due keeps their tier for another year.
_REVIEW_KEEP = text(
    f"""
    UPDATE member_tiers mt SET review_on = {_NEXT_ANNIVERSARY.format(d="mt.review_on")}
    WHERE mt.review_on <= CAST(:as_of AS date)
    """  # noqa: S608 - fixed fragments of this module, values are bound parameters
)


def review_tiers(session: Session, as_of: date) -> dict[str, int]:
    """The daily tier review for `as_of`: upgrades due, one-step downgrades of due members.

    Set-based (three statements, no per-member loop) and idempotent for a date: after a
    run nobody is due on or before `as_of` and nobody is below their qualifying tier.
    """
    at = _now(session)
    params = {"as_of": as_of, "at": at}
    upgraded = cast(CursorResult[Any], session.execute(_REVIEW_UP, params)).rowcount
    downgraded = cast(CursorResult[Any], session.execute(_REVIEW_DOWN, params)).rowcount
    kept = cast(CursorResult[Any], session.execute(_REVIEW_KEEP, params)).rowcount
    return {"upgraded": upgraded, "downgraded": downgraded, "kept": kept}


# --- the member profile -----------------------------------------------------------------------


def member_tier_profile(session: Session, member_id: int) -> dict[str, Any]:
    """Current tier, since when, review date, next tier and the distance to it, history."""
    row = session.execute(
        text(
            "SELECT m.tier, mt.tier_since, mt.review_on,"
            " COALESCE(ms.spend_365d, 0) AS spend, COALESCE(ms.purchases_365d, 0) AS purchases"
            " FROM members m"
            " LEFT JOIN member_tiers mt ON mt.member_id = m.id"
            " LEFT JOIN member_stats ms ON ms.member_id = m.id"
            " WHERE m.id = :id"
        ),
        {"id": member_id},
    ).one()
    found = ladder(session)
    current = found.by_name(row.tier) if row.tier else None
    nxt = found.above(current.rank if current else 0)
    qualifying = found.qualifying(row.spend, row.purchases)
    next_tier = None
    if nxt is not None:
        next_tier = {
            "name": nxt.name,
            "min_spend_12m": nxt.min_spend_12m,
            "min_purchases_12m": nxt.min_purchases_12m,
            # Either one is enough (the OR rule); None where the tier has no such threshold.
            "spend_needed": max(nxt.min_spend_12m - row.spend, Decimal(0))
            if nxt.min_spend_12m is not None
            else None,
            "purchases_needed": max(nxt.min_purchases_12m - row.purchases, 0)
            if nxt.min_purchases_12m is not None
            else None,
        }
    history = session.execute(
        select(
            TierChange.from_tier,
            TierChange.to_tier,
            TierChange.direction,
            TierChange.reason,
            TierChange.transaction_id,
            TierChange.campaign_id,
            TierChange.changed_at,
        )
        .where(TierChange.member_id == member_id)
        .order_by(TierChange.changed_at.desc(), TierChange.id.desc())
        .limit(HISTORY_LIMIT)
    ).mappings()
    return {
        "current": row.tier,
        "rank": current.rank if current else None,
        "since": row.tier_since if row.tier else None,
        "review_on": row.review_on if row.tier else None,
        "spend_12m": row.spend,
        "purchases_12m": row.purchases,
        "qualifies_for": qualifying.name if qualifying else None,
        "next": next_tier,
        "history": [dict(h) for h in history],
    }
