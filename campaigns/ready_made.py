"""Ready-made campaign definitions for the common cases, as functions and as examples.

Each function returns a complete definition that `POST /v1/campaigns` accepts once
the named coupon / message templates exist; docs/campaigns.md shows them in full.
"""

from __future__ import annotations

from typing import Any


def birthday_coupon(
    name: str = "birthday-coupon",
    *,
    coupon_template: str,
    message_template: str | None = None,
    days_ahead: int = 7,
    daily_at: str = "09:00",
    budget_value: str | None = None,
) -> dict[str, Any]:
    """A coupon when the birthday is within the next N days in the member's own time
    zone; once per (member-local) calendar year; runs daily."""
    actions: dict[str, Any] = {"coupon": {"template": coupon_template}}
    if message_template:
        actions["message"] = {"template": message_template}
    return {
        "name": name,
        "kind": "birthday",
        "description": f"Birthday coupon: birthday within the next {days_ahead} days, once a year.",
        "trigger": {"type": "schedule", "daily_at": daily_at},
        "condition": f"birth_date anniversary within next {days_ahead} days",
        "actions": actions,
        "cap": {"per": "year"},
        "budget": {"value": budget_value} if budget_value else {},
        "holdout_percent": "0",
    }


def win_back(
    name: str = "win-back",
    *,
    coupon_template: str,
    message_template: str | None = None,
    holdout_percent: str = "10",
    daily_at: str = "10:00",
    budget_value: str | None = None,
) -> dict[str, Any]:
    """Dormant or at-risk members get a coupon; success = a purchase within 30 days
    (the report's uplift against the holdout); at most once a quarter… a month here."""
    actions: dict[str, Any] = {"coupon": {"template": coupon_template}}
    if message_template:
        actions["message"] = {"template": message_template}
    return {
        "name": name,
        "kind": "win_back",
        "description": "Win back dormant and at-risk members; reactivation = purchase in 30 days.",
        "trigger": {"type": "schedule", "daily_at": daily_at},
        "condition": 'lifecycle.stage in ("at_risk", "dormant")',
        "actions": actions,
        "cap": {"per": "month"},
        "budget": {"value": budget_value} if budget_value else {},
        "holdout_percent": holdout_percent,
        "measure_days": 30,
    }


def tier_congratulation(
    name: str = "tier-congratulation", *, tier: str | None = None, message_template: str
) -> dict[str, Any]:
    """A message (and nothing else) the moment a purchase lifts the member to `tier`."""
    trigger: dict[str, Any] = {"type": "tier_change"}
    if tier:
        trigger["to"] = tier
    return {
        "name": name,
        "kind": "tier_upgrade",
        "description": "Congratulate members on reaching a new tier.",
        "trigger": trigger,
        "actions": {"message": {"template": message_template, "kind": "transactional"}},
        "cap": {"per": "evaluation"},
    }


def holiday_promotion(
    name: str = "holiday-promotion",
    *,
    dates: list[str],
    coupon_template: str,
    message_template: str | None = None,
    at: str = "09:00",
    budget_value: str | None = None,
) -> dict[str, Any]:
    """A coupon to active members on public holidays / solar terms (by name)."""
    actions: dict[str, Any] = {"coupon": {"template": coupon_template}}
    if message_template:
        actions["message"] = {"template": message_template}
    return {
        "name": name,
        "kind": "coupon",
        "description": "Holiday / solar-term promotion.",
        "trigger": {"type": "calendar", "dates": dates, "at": at},
        "condition": "days_since_last_purchase <= 365",
        "actions": actions,
        "cap": {"per": "day"},
        "exclusivity_group": "promotions",
        "exclusivity_period": "day",
        "budget": {"value": budget_value} if budget_value else {},
    }


def catalogue() -> list[dict[str, Any]]:
    """The ready-made definitions with example arguments (for the API and the docs)."""
    return [
        {
            "template": "birthday_coupon",
            "example": birthday_coupon(coupon_template="BDAY-50", message_template="birthday"),
        },
        {
            "template": "win_back",
            "example": win_back(coupon_template="WINBACK-30", message_template="win-back"),
        },
        {
            "template": "tier_congratulation",
            "example": tier_congratulation(tier="gold", message_template="tier-up"),
        },
        {
            "template": "holiday_promotion",
            "example": holiday_promotion(
                dates=["dongzhi", "qingming"], coupon_template="HOLIDAY-20"
            ),
        },
    ]
