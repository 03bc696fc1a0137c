"""Calendar dates a campaign can trigger on: public holidays and the 24 solar terms (节气).

Both come from maintained libraries, never from hand-kept tables of dates:

- public holidays: `holidays` (per country; China by default), with the English and,
  where the library has it, the Chinese name. A holiday's dates are the days that carry
  its name in the official calendar (Spring Festival is three days); the working days
  swapped into a holiday week (调休 "Day off (substituted from ...)") and "observed"
  extra days are not selectable names of their own.
- solar terms: `lunar-python` (6tail), which computes each term's moment
  astronomically; the date is the civil date in China Standard Time (UTC+8), as
  published by the China Meteorological Administration. The English names follow the
  Hong Kong Observatory's usage; pinyin works as well.

A marketer picks a name (English, Chinese or pinyin, any case); the campaign stores the
canonical name returned by `validate_name`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import holidays
from lunar_python import Solar

HOLIDAY = "holiday"
SOLAR_TERM = "solar_term"
DEFAULT_COUNTRY = "CN"
# lunar-python's astronomy is good far beyond this; holidays' Chinese calendar starts in
# 1950. Campaign dates outside these years are a typo, not a plan.
MIN_YEAR, MAX_YEAR = 1950, 2100
# Holiday names are those the library uses from last year to this many years ahead.
NAME_YEARS_AHEAD = 5


@dataclass(frozen=True)
class SolarTerm:
    zh: str
    en: str
    pinyin: str


# Calendar-year order (the first term of a year is 小寒, early January).
SOLAR_TERMS: tuple[SolarTerm, ...] = (
    SolarTerm("小寒", "Minor Cold", "xiaohan"),
    SolarTerm("大寒", "Major Cold", "dahan"),
    SolarTerm("立春", "Start of Spring", "lichun"),
    SolarTerm("雨水", "Rain Water", "yushui"),
    SolarTerm("惊蛰", "Awakening of Insects", "jingzhe"),
    SolarTerm("春分", "Spring Equinox", "chunfen"),
    SolarTerm("清明", "Pure Brightness", "qingming"),
    SolarTerm("谷雨", "Grain Rain", "guyu"),
    SolarTerm("立夏", "Start of Summer", "lixia"),
    SolarTerm("小满", "Grain Buds", "xiaoman"),
    SolarTerm("芒种", "Grain in Ear", "mangzhong"),
    SolarTerm("夏至", "Summer Solstice", "xiazhi"),
    SolarTerm("小暑", "Minor Heat", "xiaoshu"),
    SolarTerm("大暑", "Major Heat", "dashu"),
    SolarTerm("立秋", "Start of Autumn", "liqiu"),
    SolarTerm("处暑", "End of Heat", "chushu"),
    SolarTerm("白露", "White Dew", "bailu"),
    SolarTerm("秋分", "Autumn Equinox", "qiufen"),
    SolarTerm("寒露", "Cold Dew", "hanlu"),
    SolarTerm("霜降", "Frost's Descent", "shuangjiang"),
    SolarTerm("立冬", "Start of Winter", "lidong"),
    SolarTerm("小雪", "Minor Snow", "xiaoxue"),
    SolarTerm("大雪", "Major Snow", "daxue"),
    SolarTerm("冬至", "Winter Solstice", "dongzhi"),
)
_TERM_BY_ZH = {t.zh: t for t in SOLAR_TERMS}
# lunar-python names the terms at the edges of its table by pinyin constant (DONG_ZHI).
_TERM_BY_KEY = {t.pinyin: t for t in SOLAR_TERMS}


def _key(name: str) -> str:
    """Matching key: case, spacing, apostrophes and hyphens do not matter."""
    return re.sub(r"[\s'’_\-]+", "", name).casefold()


def _check_year(year: int) -> None:
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise ValueError(f"year must be between {MIN_YEAR} and {MAX_YEAR}, not {year}")


@functools.lru_cache(maxsize=64)
def _holidays(country: str, year: int, language: str | None) -> holidays.HolidayBase:
    return holidays.country_holidays(country, years=year, observed=False, language=language)


def _languages(country: str) -> tuple[str | None, str | None]:
    """(English, Chinese) language codes the library has for the country (None: absent)."""
    supported = holidays.list_localized_countries().get(country, [])
    english = next((code for code in ("en_US", "en_GB", "en") if code in supported), None)
    chinese = "zh_CN" if "zh_CN" in supported else None
    return english, chinese


def _not_a_name(calendar: holidays.HolidayBase) -> re.Pattern[str]:
    # Swapped working days and observed extras are generated from these labels.
    labels = [getattr(calendar, attr, None) for attr in ("substituted_label", "observed_label")]
    parts = [re.escape(calendar.tr(label)).replace("%s", ".*") for label in labels if label]
    return re.compile("^(?:" + "|".join(parts) + ")$") if parts else re.compile(r"^\b$")


def _holiday_names_of_year(country: str, year: int) -> list[tuple[str, str | None]]:
    english, chinese = _languages(country)
    en = _holidays(country, year, english)
    zh = _holidays(country, year, chinese) if chinese else None
    skip = _not_a_name(en)
    pairs: list[tuple[str, str | None]] = []
    for day in sorted(en):
        en_names = en.get_list(day)
        zh_names = zh.get_list(day) if zh is not None else []
        for i, name in enumerate(en_names):
            if skip.match(name):
                continue
            zh_name = zh_names[i] if len(zh_names) == len(en_names) else None
            pairs.append((name, zh_name))
    return pairs


def check_country(country: str) -> str:
    """The upper-case country code, or ValueError when `holidays` has no calendar for it."""
    code = country.upper()
    if code not in holidays.list_supported_countries():
        raise ValueError(f"no public holiday calendar for country {country!r}")
    return code


@functools.lru_cache(maxsize=16)
def _catalogue(country: str, first_year: int) -> tuple[dict[str, Any], ...]:
    entries: dict[str, dict[str, Any]] = {}
    for year in range(first_year, first_year + NAME_YEARS_AHEAD + 2):
        for en_name, zh_name in _holiday_names_of_year(country, year):
            entry = entries.setdefault(
                en_name,
                {
                    "name": en_name,
                    "kind": HOLIDAY,
                    "name_en": en_name,
                    "name_zh": zh_name,
                    # "Chinese New Year (Spring Festival)" is also "Spring Festival".
                    "aliases": [a.strip() for a in re.split(r"[()]", en_name) if a.strip()]
                    if "(" in en_name
                    else [],
                },
            )
            entry["name_zh"] = entry["name_zh"] or zh_name
    for term in SOLAR_TERMS:
        entries[term.en] = {
            "name": term.en,
            "kind": SOLAR_TERM,
            "name_en": term.en,
            "name_zh": term.zh,
            "pinyin": term.pinyin,
            "aliases": [term.pinyin],
        }
    return tuple(entries.values())


def _this_year() -> int:
    return datetime.now(UTC).year


def calendar_names(country: str = DEFAULT_COUNTRY) -> list[dict[str, Any]]:
    """Every selectable name: holidays of `country`, then the 24 solar terms in order.

    Each entry has `name` (canonical, English), `kind` (holiday / solar_term),
    `name_en`, `name_zh` (None where the library has no Chinese name), `aliases` (other
    accepted spellings) and, for solar terms, `pinyin`.
    """
    return [dict(e) for e in _catalogue(check_country(country), _this_year() - 1)]


def _lookup(country: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in calendar_names(country):
        for alias in (entry["name_en"], entry["name_zh"], *entry["aliases"]):
            if alias:
                found.setdefault(_key(alias), entry)
    return found


def _entry(name: str, country: str) -> dict[str, Any]:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a calendar name is required (see GET /v1/calendar/names)")
    entry = _lookup(country).get(_key(name))
    if entry is None:
        names = calendar_names(country)
        holiday_names = ", ".join(e["name"] for e in names if e["kind"] == HOLIDAY)
        raise ValueError(
            f"unknown calendar name {name!r}. Holidays ({country.upper()}): {holiday_names}. "
            "Solar terms: the 24 节气 by English, Chinese or pinyin name, e.g. "
            "'Winter Solstice' / '冬至' / 'dongzhi'."
        )
    return entry


def validate_name(name: str, country: str = DEFAULT_COUNTRY) -> str:
    """The canonical (English) name for a holiday or solar term given in any accepted form.

    Raises ValueError that lists the names that exist.
    """
    return str(_entry(name, country)["name"])


def kind_of(name: str, country: str = DEFAULT_COUNTRY) -> str:
    """'holiday' or 'solar_term' for a valid name."""
    return str(_entry(name, country)["kind"])


@functools.lru_cache(maxsize=256)
def _solar_terms(year: int) -> dict[str, date]:
    """The 24 terms of a Gregorian year, by Chinese name (dates in China Standard Time)."""
    found: dict[str, date] = {}
    # A lunar year's table runs from the previous 大雪 to the next 惊蛰; two of them cover
    # every term that falls in the Gregorian year.
    for month in (1, 7):
        table = Solar.fromYmd(year, month, 1).getLunar().getJieQiTable()
        for key, solar in table.items():
            term = _TERM_BY_ZH.get(key) or _TERM_BY_KEY.get(key.replace("_", "").lower())
            if term is None or solar.getYear() != year:
                continue
            found[term.zh] = date(solar.getYear(), solar.getMonth(), solar.getDay())
    if len(found) != len(SOLAR_TERMS):
        missing = sorted(set(_TERM_BY_ZH) - set(found))
        raise RuntimeError(f"lunar-python gave no date for {missing} in {year}")
    return found


def dates_for(name: str, year: int, country: str = DEFAULT_COUNTRY) -> list[date]:
    """The dates of `name` in `year`, sorted (one for a solar term; every day of a holiday)."""
    _check_year(year)
    entry = _entry(name, country)
    if entry["kind"] == SOLAR_TERM:
        return [_solar_terms(year)[entry["name_zh"]]]
    english, _ = _languages(country.upper())
    calendar = _holidays(country.upper(), year, english)
    return sorted(day for day in calendar if entry["name_en"] in calendar.get_list(day))


def occurs_on(name: str, day: date, country: str = DEFAULT_COUNTRY) -> bool:
    """Is `day` (a local date) one of the dates of `name`?"""
    return day in dates_for(name, day.year, country)
