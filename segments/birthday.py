"""Birthdays: members whose birthday falls in the next N days in their own time zone.

Reuses the rule language (`birth_date anniversary within next N days`), so the list, a
segment rule and a campaign rule all agree: "today" is the member's local date, the
window runs across the year end, and a 29 February birthday is kept on 28 February
(policy `feb28`, the default) or 1 March (`mar1`) in common years — set with
`leap_day` in PATRON_SCORING, which also applies to the rule field.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rules import LeapDay, member_query, parse_rule
from rules.calendar import age_on, anniversary_in, days_to_anniversary, local_today
from segments.vocabulary import age_band
from service.models import Member
from service.vocabulary import default_vocabulary


def upcoming_birthdays(
    session: Session, days: int, now: datetime, *, limit: int = 1000
) -> list[dict[str, Any]]:
    """Active members with a birthday within `days` days (0 = today), soonest first."""
    vocab = default_vocabulary()
    field = vocab.get("birth_date")
    policy = field.leap_day if field is not None else LeapDay.FEB28
    rule = parse_rule(f"birth_date anniversary within next {int(days)} days", vocab)
    ids = member_query(rule, vocab, now).subquery()
    rows = session.execute(
        select(Member.id, Member.external_id, Member.birth_date, Member.timezone).where(
            Member.id.in_(select(ids.c[0]))
        )
    ).all()
    out = []
    for row in rows:  # the page of matches only, never the member base
        today = local_today(row.timezone, now)
        until = days_to_anniversary(row.birth_date, today, policy)
        on: date = anniversary_in(today.year, row.birth_date, policy)
        if on < today:
            on = anniversary_in(today.year + 1, row.birth_date, policy)
        turning = age_on(row.birth_date, on, policy)
        out.append(
            {
                "member_id": row.external_id,
                "birthday_on": on,
                "in_days": until,
                "turning": turning,
                "age_band": age_band(turning - 1 if until else turning),
            }
        )
    out.sort(key=lambda r: (r["in_days"], r["member_id"]))
    return out[:limit]
