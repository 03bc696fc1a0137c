"""Calendar names for campaign triggers: public holidays and the 24 solar terms."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from flask.testing import FlaskClient

from campaigns import calendar_dates as cal
from tests.conftest import KeyFactory


def test_names_cover_both_kinds_with_english_and_chinese():
    names = cal.calendar_names()
    terms = [n for n in names if n["kind"] == cal.SOLAR_TERM]
    holidays = [n for n in names if n["kind"] == cal.HOLIDAY]
    assert len(terms) == 24
    assert len({t["name_zh"] for t in terms}) == 24
    assert {"National Day", "Mid-Autumn Festival", "Dragon Boat Festival"} <= {
        h["name"] for h in holidays
    }
    national = next(h for h in holidays if h["name"] == "National Day")
    assert national["name_zh"] == "国庆节"
    # Swapped working days (调休) are dates, not names a marketer picks.
    assert not any("substituted" in n["name"] for n in names)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("冬至", "Winter Solstice"),
        ("winter solstice", "Winter Solstice"),
        ("DongZhi", "Winter Solstice"),
        ("国庆节", "National Day"),
        ("new years day", "New Year's Day"),
        ("Spring Festival", "Chinese New Year (Spring Festival)"),
        ("春节", "Chinese New Year (Spring Festival)"),
        ("清明", "Pure Brightness"),
        ("清明节", "Tomb-Sweeping Day"),
    ],
)
def test_validate_name_accepts_english_chinese_and_pinyin(given: str, canonical: str):
    assert cal.validate_name(given) == canonical


def test_unknown_names_say_which_names_exist():
    with pytest.raises(ValueError, match="unknown calendar name 'Christmas'") as err:
        cal.validate_name("Christmas")
    assert "National Day" in str(err.value) and "冬至" in str(err.value)
    with pytest.raises(ValueError, match="required"):
        cal.validate_name("  ")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Published by the China Meteorological Administration for 2026.
        ("立春", date(2026, 2, 4)),
        ("清明", date(2026, 4, 5)),
        ("夏至", date(2026, 6, 21)),
        ("冬至", date(2026, 12, 22)),
    ],
)
def test_solar_term_dates(name: str, expected: date):
    assert cal.dates_for(name, 2026) == [expected]
    assert cal.occurs_on(name, expected)
    assert not cal.occurs_on(name, expected + timedelta(days=1))


def test_every_year_has_24_terms_in_calendar_order():
    for year in (1990, 2024, 2026, 2050):
        days = [cal.dates_for(t.en, year)[0] for t in cal.SOLAR_TERMS]
        assert days == sorted(days)
        assert {d.year for d in days} == {year}


def test_year_boundaries():
    # Minor Cold is early January: 2026's is not the one that follows 2026's Winter Solstice.
    assert cal.dates_for("Minor Cold", 2026) == [date(2026, 1, 5)]
    assert cal.dates_for("Minor Cold", 2027) == [date(2027, 1, 5)]
    assert cal.occurs_on("Minor Cold", date(2027, 1, 5))
    assert cal.dates_for("New Year's Day", 2027) == [date(2027, 1, 1)]
    assert cal.occurs_on("元旦", date(2027, 1, 1))
    assert not cal.occurs_on("元旦", date(2026, 12, 31))
    with pytest.raises(ValueError, match="year"):
        cal.dates_for("冬至", 1800)


def test_holiday_dates_are_every_official_day_of_it():
    assert cal.dates_for("National Day", 2026) == [
        date(2026, 10, 1),
        date(2026, 10, 2),
        date(2026, 10, 3),
    ]
    assert cal.dates_for("春节", 2026) == [date(2026, 2, 17), date(2026, 2, 18), date(2026, 2, 19)]
    assert cal.dates_for("Mid-Autumn Festival", 2026) == [date(2026, 9, 25)]
    # Lunar holidays move: Mid-Autumn 2025 was on 6 October.
    assert cal.dates_for("Mid-Autumn Festival", 2025) == [date(2025, 10, 6)]


def test_other_countries(client: FlaskClient):
    assert "Christmas Day" in {n["name"] for n in cal.calendar_names("GB")}
    assert cal.dates_for("Christmas Day", 2026, country="GB") == [date(2026, 12, 25)]
    with pytest.raises(ValueError, match="country"):
        cal.calendar_names("XX")


def test_calendar_api(client: FlaskClient, auth: KeyFactory):
    headers = auth("marketer")
    names = client.get("/v1/calendar/names", headers=headers)
    assert names.status_code == 200
    assert names.json["country"] == "CN"
    assert len([n for n in names.json["items"] if n["kind"] == "solar_term"]) == 24
    dates = client.get("/v1/calendar/dates?name=冬至&year=2026", headers=headers)
    assert dates.status_code == 200
    assert dates.json == {
        "name": "Winter Solstice",
        "kind": "solar_term",
        "country": "CN",
        "year": 2026,
        "dates": ["2026-12-22"],
    }
    unknown = client.get("/v1/calendar/dates?name=Christmas&year=2026", headers=headers)
    assert unknown.status_code == 422
    assert "unknown calendar name" in unknown.json["errors"]["name"][0]
    bad_year = client.get("/v1/calendar/dates?name=冬至&year=3000", headers=headers)
    assert bad_year.status_code == 422 and "year" in bad_year.json["errors"]
    bad_country = client.get("/v1/calendar/names?country=XX", headers=headers)
    assert bad_country.status_code == 422 and "country" in bad_country.json["errors"]
    assert client.get("/v1/calendar/names", headers=auth("pos")).status_code == 403
