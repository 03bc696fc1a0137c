"""Scoring settings: business time zone, RFM method and mapping, lifecycle thresholds.

Read from the environment (`PATRON_TIMEZONE`, `PATRON_REFRESH_AT`, and optionally
`PATRON_SCORING`: a JSON object, or `@path` to a JSON file, overriding any key below).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rules import LeapDay
from segments.models import RfmSegment

_S = RfmSegment
# Rows R = 5 (top) down to R = 1; columns FM = 1..5, where FM = round-half-up((F + M) / 2).
# A grid is a total function of (R, FM), so every (R, F, M) gets exactly one name.
DEFAULT_SEGMENT_GRID: tuple[tuple[str, ...], ...] = (
    (_S.NEW, _S.POTENTIAL_LOYALIST, _S.POTENTIAL_LOYALIST, _S.CHAMPIONS, _S.CHAMPIONS),
    (_S.PROMISING, _S.POTENTIAL_LOYALIST, _S.POTENTIAL_LOYALIST, _S.LOYAL, _S.CHAMPIONS),
    (_S.ABOUT_TO_SLEEP, _S.ABOUT_TO_SLEEP, _S.NEED_ATTENTION, _S.LOYAL, _S.LOYAL),
    (_S.HIBERNATING, _S.HIBERNATING, _S.AT_RISK, _S.AT_RISK, _S.CANT_LOSE),
    (_S.LOST, _S.LOST, _S.AT_RISK, _S.AT_RISK, _S.CANT_LOSE),
)
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class ConfigError(ValueError):
    """A scoring setting is invalid."""


@dataclass(frozen=True)
class ScoringConfig:
    """How members are scored; every field can be overridden in PATRON_SCORING."""

    # Day boundaries of windows, recency and lifecycle are local days in this zone.
    timezone: str = "Asia/Shanghai"
    refresh_at: str = "03:00"
    # RFM is computed over members with a purchase in the last `rfm_lookback_days`.
    rfm_lookback_days: int = 365
    # "quintile" or "thresholds" per dimension; thresholds are the 4 upper bounds of
    # scores 1..4 (R in days, low is good: R = 5 when days <= r_thresholds[0]).
    r_method: str = "quintile"
    f_method: str = "thresholds"
    m_method: str = "quintile"
    r_thresholds: tuple[float, ...] = (14, 30, 90, 180)
    f_thresholds: tuple[float, ...] = (1, 2, 4, 9)
    m_thresholds: tuple[float, ...] = (100, 300, 1000, 3000)
    segment_grid: tuple[tuple[str, ...], ...] = DEFAULT_SEGMENT_GRID
    # Lifecycle: new while the first purchase is at most `new_days` old; then by days
    # since the last purchase: active <= active_days < at_risk <= at_risk_days <
    # dormant <= dormant_days < lost.
    new_days: int = 30
    active_days: int = 90
    at_risk_days: int = 180
    dormant_days: int = 365
    # Personal variant: with at least `personal_min_days` purchase days, a member is at
    # risk once the silence exceeds `personal_k` times their median gap (0 turns it off).
    personal_k: float = 3.0
    personal_min_days: int = 3
    # The early-warning list: members who became at risk within this many days.
    early_warning_days: int = 7
    churn_horizon_days: int = 90
    # 29 February birthdays in common years: "feb28" or "mar1".
    leap_day: str = LeapDay.FEB28.value

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except Exception as exc:
            raise ConfigError(f"unknown time zone {self.timezone!r}") from exc
        if not _HHMM.match(self.refresh_at):
            raise ConfigError(f"refresh_at must be HH:MM, not {self.refresh_at!r}")
        for dim in ("r", "f", "m"):
            method = getattr(self, f"{dim}_method")
            if method not in ("quintile", "thresholds"):
                raise ConfigError(f"{dim}_method must be quintile or thresholds")
            cuts = [float(v) for v in getattr(self, f"{dim}_thresholds")]
            if len(cuts) != 4 or cuts != sorted(cuts):
                raise ConfigError(f"{dim}_thresholds must be 4 increasing numbers")
        names = {s.value for s in RfmSegment}
        grid = self.segment_grid
        if len(grid) != 5 or any(len(row) != 5 for row in grid):
            raise ConfigError("segment_grid must be 5 rows (R = 5..1) of 5 names (FM = 1..5)")
        unknown = {str(c) for row in grid for c in row} - names
        if unknown:
            raise ConfigError(f"unknown segment names in segment_grid: {sorted(unknown)}")
        if not (self.new_days > 0 and self.active_days < self.at_risk_days < self.dormant_days):
            raise ConfigError("lifecycle thresholds must satisfy active < at_risk < dormant")
        if self.personal_k < 0 or self.personal_min_days < 2:
            raise ConfigError("personal_k must be >= 0 and personal_min_days >= 2")
        if self.leap_day not in {v.value for v in LeapDay}:
            raise ConfigError("leap_day must be feb28 or mar1")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["segment_grid"] = [[str(c) for c in row] for row in self.segment_grid]
        return data

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ScoringConfig:
        """Defaults, then PATRON_TIMEZONE / PATRON_REFRESH_AT, then PATRON_SCORING."""
        env = dict(os.environ if env is None else env)
        overrides: dict[str, Any] = {}
        if env.get("PATRON_TIMEZONE"):
            overrides["timezone"] = env["PATRON_TIMEZONE"]
        if env.get("PATRON_REFRESH_AT"):
            overrides["refresh_at"] = env["PATRON_REFRESH_AT"]
        raw = env.get("PATRON_SCORING", "").strip()
        if raw:
            text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"PATRON_SCORING is not JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError("PATRON_SCORING must be a JSON object")
            overrides.update(loaded)
        return cls.from_mapping(overrides)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ScoringConfig:
        """A config from defaults plus `values` (lists become tuples)."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown scoring settings: {sorted(unknown)}")
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if key == "segment_grid":
                value = tuple(tuple(row) for row in value)
            elif isinstance(value, list):
                value = tuple(value)
            clean[key] = value
        return replace(cls(), **clean)
