"""Bulk import: COPY into staging, set-based validation and merge, rejects, statistics."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from service import importer
from service.cli import main
from service.config import Config
from service.events import record_purchase, record_refund
from service.importer import (
    MEMBER_FIELDS,
    STORE_FIELDS,
    TRANSACTION_FIELDS,
    ImportFailed,
    rebuild_member_stats,
    run_import,
)
from tests.conftest import unique

ITEMS = '[{"sku": "SKU-1", "category": "shoes", "quantity": 1, "amount": "10.00"}]'
STATS_COLUMNS = (
    "first_purchase_at, last_purchase_at, purchase_count, purchase_amount, "
    "refund_count, refund_amount, net_spend"
)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rejects(path: Path) -> dict[int, dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return {int(row["line"]): row for row in csv.DictReader(f)}


def tx(
    tid: str,
    member: str,
    store: str,
    amount: str = "10.00",
    *,
    kind: str = "purchase",
    original: str = "",
    currency: str = "CNY",
    channel: str = "pos",
    occurred: str = "2026-01-05T10:00:00+08:00",
    items: str = ITEMS,
) -> list[str]:
    return [tid, member, kind, original, amount, currency, store, channel, occurred, items]


class World:
    """Two stores and three members (the last one erased) with ids unique to one test."""

    def __init__(self, conn: Connection, tmp: Path) -> None:
        self.conn = conn
        self.tmp = tmp
        self.prefix = unique("I")
        self.stores = [f"{self.prefix}-S{i}" for i in (1, 2)]
        self.members = [f"{self.prefix}-M{i}" for i in (1, 2, 3)]
        stores = write_csv(
            tmp / "stores.csv", STORE_FIELDS, [[s, f"Store {s}", "East"] for s in self.stores]
        )
        assert run_import(conn, "stores", stores).inserted == 2
        members = write_csv(
            tmp / "members.csv",
            MEMBER_FIELDS,
            [member_row(m, self.stores[0]) for m in self.members],
        )
        assert run_import(conn, "members", members).inserted == 3
        conn.execute(
            text("UPDATE members SET status = 'erased' WHERE external_id = :m"),
            {"m": self.members[2]},
        )

    def tid(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def transactions(self, name: str, rows: Sequence[Sequence[Any]]) -> Path:
        return write_csv(self.tmp / name, TRANSACTION_FIELDS, rows)

    def stats(self, member: str) -> dict[str, Any] | None:
        row = (
            self.conn.execute(
                text(
                    f"SELECT {STATS_COLUMNS} FROM member_stats ms JOIN members m"
                    " ON m.id = ms.member_id WHERE m.external_id = :m"
                ),
                {"m": member},
            )
            .mappings()
            .first()
        )
        return dict(row) if row else None

    def count(self, sql: str, **params: Any) -> int:
        return int(self.conn.execute(text(sql), params).scalar_one())


def member_row(external_id: str, store: str, **overrides: str) -> list[str]:
    values = {
        "external_id": external_id,
        "name": "Li Lei",
        "gender": "male",
        "birth_date": "1990-05-17",
        "phone": "+8613812345678",
        "email": "li.lei@example.com",
        "timezone": "Asia/Shanghai",
        "locale": "zh-CN",
        "home_store": store,
        "consent_email": "true",
        "consent_sms": "false",
        "consent_push": "",
        "consent_wechat": "true",
        "tags": "vip;newsletter",
        "attributes": '{"favourite_category": "shoes", "children": 2}',
    }
    values.update(overrides)
    return [values[f] for f in MEMBER_FIELDS]


@pytest.fixture
def world(connection: Connection, tmp_path: Path) -> World:
    return World(connection, tmp_path)


def snapshot_stats(conn: Connection, member_ids: list[int]) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in conn.execute(
            text(
                f"SELECT member_id, {STATS_COLUMNS} FROM member_stats"
                " WHERE member_id = ANY(:ids) ORDER BY member_id"
            ),
            {"ids": member_ids},
        )
    ]


def member_ids(conn: Connection, externals: Sequence[str]) -> list[int]:
    return list(
        conn.execute(
            text("SELECT id FROM members WHERE external_id = ANY(:e) ORDER BY id"),
            {"e": list(externals)},
        ).scalars()
    )


# -- happy paths ----------------------------------------------------------------------


def test_csv_import_loads_transactions_and_statistics(world: World):
    m1, m2, _ = world.members
    s1, s2 = world.stores
    path = world.transactions(
        "tx.csv",
        [
            tx(world.tid("P1"), m1, s1, "100.00", occurred="2026-01-05T10:00:00+08:00"),
            tx(world.tid("P2"), m1, s2, "20.50", channel="ecom", occurred="2026-03-01T09:30:00Z"),
            tx(world.tid("R1"), m1, s1, "30.00", kind="refund", original=world.tid("P1")),
            tx(world.tid("P3"), m2, s1, "7.00", items=""),
        ],
    )
    report = run_import(world.conn, "transactions", path)
    assert (report.read, report.inserted, report.skipped, report.rejected) == (4, 4, 0, 0)
    assert report.route == "copy"
    assert not (path.parent / "tx.csv.rejects.csv").exists()
    assert "inserted 4" in report.summary() and "rows/s" in report.summary()
    stats = world.stats(m1)
    assert stats is not None
    assert stats["purchase_count"] == 2 and stats["refund_count"] == 1
    assert stats["purchase_amount"] == Decimal("120.50")
    assert stats["net_spend"] == Decimal("90.50")
    assert stats["first_purchase_at"] == datetime.fromisoformat("2026-01-05T02:00:00+00:00")
    assert stats["last_purchase_at"] == datetime.fromisoformat("2026-03-01T09:30:00+00:00")
    row = world.conn.execute(
        text(
            "SELECT p.refunded_amount, r.original_id = p.id AS linked, p.items, n.items AS none"
            " FROM transactions p, transactions r, transactions n"
            " WHERE p.external_id = :p AND r.external_id = :r AND n.external_id = :n"
        ),
        {"p": world.tid("P1"), "r": world.tid("R1"), "n": world.tid("P3")},
    ).one()
    assert row.refunded_amount == Decimal("30.00") and row.linked
    assert row.items == json.loads(ITEMS) and row.none is None


def test_ndjson_import_of_all_three_kinds(connection: Connection, tmp_path: Path):
    prefix = unique("N")
    store, member = f"{prefix}-S", f"{prefix}-M"
    (tmp_path / "stores.ndjson").write_text(
        json.dumps({"code": store, "name": "Online", "region": f"{prefix}-R"}) + "\n"
    )
    member_obj = {
        "external_id": member,
        "name": "王芳",
        "gender": "female",
        "birth_date": None,
        "timezone": "Europe/London",
        "home_store": store,
        "consent_email": True,
        "consent_sms": False,
        "tags": ["vip", "student"],
        "attributes": {"referral": "friend", "score": 1.5},
    }
    (tmp_path / "members.ndjson").write_text(json.dumps(member_obj, ensure_ascii=False) + "\n")
    purchase = {
        "transaction_id": f"{prefix}-P",
        "member_id": member,
        "kind": "purchase",
        "original_transaction_id": None,
        "amount": "88.80",
        "currency": "CNY",
        "store": store,
        "channel": "ecom",
        "occurred_at": "2026-05-01T20:00:00+01:00",
        "items": [{"sku": "A-1", "amount": "88.80", "quantity": 2}],
    }
    refund = dict(
        purchase, transaction_id=f"{prefix}-R", kind="refund",
        original_transaction_id=f"{prefix}-P", amount="8.80",
    )  # fmt: skip
    lines = [json.dumps(purchase), "", json.dumps(refund)]
    (tmp_path / "tx.ndjson").write_text("\n".join(lines) + "\n")

    assert run_import(connection, "stores", tmp_path / "stores.ndjson").inserted == 1
    members = run_import(connection, "members", tmp_path / "members.ndjson")
    assert (members.fmt, members.inserted, members.rejected) == ("ndjson", 1, 0)
    report = run_import(connection, "transactions", tmp_path / "tx.ndjson")
    assert (report.read, report.inserted, report.rejected) == (2, 2, 0)

    m = connection.execute(
        text(
            "SELECT m.name, m.birth_date, m.timezone, m.locale, m.consent_email, m.consent_sms,"
            " m.consent_push, m.tags, m.attributes, s.code AS home, r.code AS region,"
            " ms.net_spend FROM members m JOIN stores s ON s.id = m.home_store_id"
            " JOIN regions r ON r.id = s.region_id"
            " JOIN member_stats ms ON ms.member_id = m.id WHERE m.external_id = :m"
        ),
        {"m": member},
    ).one()
    assert m.name == "王芳" and m.birth_date is None and m.timezone == "Europe/London"
    assert m.locale == "zh-CN"  # empty means the default
    assert (m.consent_email, m.consent_sms, m.consent_push) == (True, False, False)
    assert m.tags == ["vip", "student"]
    assert m.attributes == {"referral": "friend", "score": 1.5}
    assert (m.home, m.region, m.net_spend) == (store, f"{prefix}-R", Decimal("80.00"))


# -- rejects --------------------------------------------------------------------------


def test_bad_transaction_rows_are_rejected_with_line_and_reason(world: World):
    m1, m2, erased = world.members
    s1, _ = world.stores
    t = world.tid
    rows = [
        tx(t("P1"), m1, s1, "100.00"),  # line 2
        tx(t("A1"), m1, s1, "12.345"),  # 3
        tx(t("A2"), m1, s1, "-5"),  # 4
        tx(t("T1"), m1, s1, occurred="2026-01-05T10:00:00"),  # 5
        tx(t("T2"), m1, s1, occurred="2026-02-30T10:00:00+08:00"),  # 6
        tx(t("U1"), f"{world.prefix}-NOBODY", s1),  # 7
        tx(t("E1"), erased, s1),  # 8
        tx(t("S1"), m1, f"{world.prefix}-NOWHERE"),  # 9
        tx(t("R1"), m1, s1, "60.00", kind="refund", original=t("P1")),  # 10
        tx(t("R2"), m1, s1, "50.00", kind="refund", original=t("P1")),  # 11: only 40 left
        tx(t("R3"), m1, s1, "40.00", kind="refund", original=t("P1")),  # 12: fits
        tx(t("R4"), m1, s1, "1.00", kind="refund", original=t("NOPE")),  # 13
        tx(t("K1"), m1, s1, kind="sale"),  # 14
        tx(t("C1"), m1, s1, channel="web"),  # 15
        tx(t("J1"), m1, s1, items="[{'sku': 'A'}]"),  # 16: not JSON at all
        tx(t("J2"), m1, s1, items='{"sku": "A"}'),  # 17: JSON, not an array
        tx(t("R5"), m2, s1, "1.00", kind="refund", original=t("P1")),  # 18
        tx(t("F1"), m1, s1, occurred="2099-01-01T00:00:00+00:00"),  # 19
        tx(t("X1"), m1, s1, currency="USD"),  # 20
        tx(t("P2"), m2, s1, "5.00", occurred="2026-04-01T08:00:00.250-05:30"),  # 21
        tx(t("Y0"), m1, s1, occurred="0000-01-05T10:00:00+08:00"),  # 22
    ]
    path = world.transactions("tx.csv", rows)
    report = run_import(world.conn, "transactions", path)
    assert (report.read, report.inserted, report.rejected) == (21, 4, 17)
    assert report.rejects_path == path.with_name("tx.csv.rejects.csv")
    rejects = read_rejects(report.rejects_path)
    expected = {
        3: "amount: must be a decimal with at most 2 places",
        4: "amount: must be a decimal with at most 2 places",
        5: "occurred_at: must include a time-zone offset",
        6: "occurred_at: is not a valid date and time",
        7: f"member_id: unknown member '{world.prefix}-NOBODY'",
        8: f"member_id: member '{erased}' was erased",
        9: f"store: unknown store '{world.prefix}-NOWHERE'",
        11: f"amount: exceeds what is left to refund on purchase '{t('P1')}' (at most 40.00)",
        13: f"original_transaction_id: no purchase '{t('NOPE')}'",
        14: "kind: must be purchase or refund",
        15: "channel: must be pos or ecom",
        16: "items: must be a JSON array",
        17: "items: must be a JSON array",
        18: "original_transaction_id: the purchase belongs to another member",
        19: "occurred_at: must not be in the future",
        20: "currency: must be CNY",
        22: "occurred_at: is not a valid date and time",
    }
    assert sorted(rejects) == sorted(expected)
    for line, reason in expected.items():
        assert rejects[line]["reason"].startswith(reason), (line, rejects[line]["reason"])
    # The raw values travel with the reason.
    assert rejects[3]["amount"] == "12.345" and rejects[3]["transaction_id"] == t("A1")
    assert rejects[16]["items"] == "[{'sku': 'A'}]"
    refunded = world.conn.execute(
        text("SELECT refunded_amount FROM transactions WHERE external_id = :p"), {"p": t("P1")}
    ).scalar_one()
    assert refunded == Decimal("100.00")
    stats = world.stats(m1)
    assert stats is not None
    assert (stats["purchase_count"], stats["refund_count"]) == (1, 2)
    assert stats["net_spend"] == Decimal("0.00")


def test_duplicate_transaction_ids_in_one_file(world: World):
    m1, _, _ = world.members
    s1, _ = world.stores
    t = world.tid
    rows = [
        tx(t("D1"), m1, s1, "10.00"),  # 2
        tx(t("SAME"), m1, s1, "3.00"),  # 3
        tx(t("D1"), m1, s1, "11.00"),  # 4: same id, other amount
        tx(t("SAME"), m1, s1, "3.00"),  # 5: identical: one row
        tx(t("R"), m1, s1, "1.00", kind="refund", original=t("D1")),  # 6
        tx(t("OK"), m1, s1, "4.00"),  # 7
    ]
    report = run_import(world.conn, "transactions", world.transactions("dup.csv", rows))
    assert (report.read, report.inserted, report.skipped, report.rejected) == (6, 2, 1, 3)
    assert report.rejects_path is not None
    rejects = read_rejects(report.rejects_path)
    assert sorted(rejects) == [2, 4, 6]
    assert rejects[2]["reason"] == "transaction_id: appears on lines 2, 4 with different values"
    assert rejects[4]["reason"] == rejects[2]["reason"]
    assert rejects[6]["reason"].startswith(
        f"original_transaction_id: the purchase '{t('D1')}' (line 2) was rejected"
    )
    stats = world.stats(m1)
    assert stats is not None and stats["purchase_amount"] == Decimal("7.00")


def test_refunds_of_stored_purchases_and_concurrent_totals(world: World):
    m1, _, _ = world.members
    s1, _ = world.stores
    t = world.tid
    first = world.transactions("a.csv", [tx(t("P"), m1, s1, "50.00")])
    assert run_import(world.conn, "transactions", first).inserted == 1
    second = world.transactions(
        "b.csv",
        [
            tx(t("R1"), m1, s1, "20.00", kind="refund", original=t("P")),
            tx(t("R2"), m1, s1, "40.00", kind="refund", original=t("P")),
            tx(t("R3"), m1, s1, "30.00", kind="refund", original=t("P")),
        ],
    )
    report = run_import(world.conn, "transactions", second)
    assert (report.inserted, report.rejected) == (2, 1)
    assert report.rejects_path is not None
    assert read_rejects(report.rejects_path)[3]["reason"].endswith("(at most 30.00)")
    assert (
        world.count("SELECT refunded_amount FROM transactions WHERE external_id = :p", p=t("P"))
        == 50
    )
    ids = member_ids(world.conn, [m1])
    before = snapshot_stats(world.conn, ids)
    rebuild_member_stats(world.conn, ids)
    assert snapshot_stats(world.conn, ids) == before


def test_ndjson_bad_lines_are_rejects_with_their_line_numbers(world: World):
    m1, _, _ = world.members
    s1, _ = world.stores
    good = dict(zip(TRANSACTION_FIELDS, tx(world.tid("G"), m1, s1), strict=True))
    good["items"] = json.loads(ITEMS)
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        json.dumps({**good, "transaction_id": world.tid("U"), "colour": "red"}),  # 4
        "",  # 5: blank lines are skipped
        json.dumps({**good, "transaction_id": world.tid("N"), "amount": {"v": 1}}),  # 6
        json.dumps({**good, "transaction_id": world.tid("A"), "amount": 12.5}),  # 7: fine
    ]
    path = world.tmp / "tx.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = run_import(world.conn, "transactions", path)
    assert (report.read, report.inserted, report.rejected) == (6, 2, 4)
    assert report.rejects_path is not None
    rejects = read_rejects(report.rejects_path)
    assert sorted(rejects) == [2, 3, 4, 6]
    assert rejects[2]["reason"].startswith("line: not valid JSON")
    assert rejects[2]["raw_record"] == "{not json"
    assert rejects[3]["reason"] == "line: must be a JSON object"
    assert rejects[4]["reason"] == "unexpected fields: colour"
    assert rejects[6]["reason"] == "amount: must be a string, number or boolean, not dict"


def test_broken_csv_records_take_the_python_route_with_exact_lines(world: World):
    s1, _ = world.stores
    p = world.prefix
    path = world.tmp / "members.csv"
    good = member_row(f"{p}-A", s1)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MEMBER_FIELDS)
        writer.writerow(member_row(f"{p}-B", s1, name="first line\nsecond line"))  # 2-3
        writer.writerow(good[:5])  # 4: too few fields
        writer.writerow(member_row(f"{p}-C", s1, gender="robot"))  # 5
        writer.writerow(good)  # 6
    report = run_import(world.conn, "members", path)
    assert report.route == "python"
    assert (report.read, report.inserted, report.rejected) == (4, 2, 2)
    assert report.rejects_path is not None
    rejects = read_rejects(report.rejects_path)
    assert rejects[4]["reason"] == "the record has 5 fields, the header has 15"
    assert rejects[4]["raw_record"].startswith(f"{p}-A,Li Lei,male")
    assert rejects[5]["reason"] == "gender: must be one of female, male, other"
    name = world.conn.execute(
        text("SELECT name FROM members WHERE external_id = :m"), {"m": f"{p}-B"}
    ).scalar_one()
    assert name == "first line\nsecond line"


def test_a_quoted_line_break_alone_keeps_line_numbers_exact(world: World):
    s1, _ = world.stores
    p = world.prefix
    rows = [
        member_row(f"{p}-L1", s1, name="two\nlines"),  # 2-3
        member_row(f"{p}-L2", s1),  # 4
        member_row(f"{p}-L3", s1, gender="x"),  # 5
    ]
    report = run_import(world.conn, "members", write_csv(world.tmp / "nl.csv", MEMBER_FIELDS, rows))
    assert report.route == "python" and "re-read" in report.summary()
    assert (report.read, report.inserted, report.rejected) == (3, 2, 1)
    assert report.rejects_path is not None
    assert list(read_rejects(report.rejects_path)) == [5]


def test_member_validation_and_update(world: World):
    s1, s2 = world.stores
    m1, _, erased = world.members
    p = world.prefix
    rows = [
        member_row(m1, s2, name="Renamed"),  # 2: update
        member_row(f"{p}-N1", s1, timezone="Mars/Olympus"),  # 3
        member_row(f"{p}-N2", s1, birth_date="2999-01-01"),  # 4
        member_row(f"{p}-N3", s1, birth_date="1990-02-30"),  # 5
        member_row(f"{p}-N4", f"{p}-GONE"),  # 6
        member_row(f"{p}-N5", s1, attributes='{"a": {"nested": 1}}'),  # 7
        member_row(f"{p}-N6", s1, attributes="[1, 2]"),  # 8
        member_row(f"{p}-N7", s1, tags=";".join(f"t{i}" for i in range(51))),  # 9
        member_row(erased, s1),  # 10
        member_row(f"{p}-N8", s1, consent_sms="maybe"),  # 11
        member_row(f"{p}-N9", s1, email="not-an-email"),  # 12
        member_row(f"{p}-N10", s1, phone="12"),  # 13
        member_row(f"{p}-N11", s1, locale="english"),  # 14
        member_row("bad id!", s1),  # 15
        member_row(f"{p}-N12", s1, attributes="{oops"),  # 16
        member_row(f"{p}-OK", "", tags="", attributes="", timezone="", birth_date=""),  # 17
    ]
    path = write_csv(world.tmp / "m2.csv", MEMBER_FIELDS, rows)
    report = run_import(world.conn, "members", path)
    assert (report.read, report.inserted, report.updated, report.rejected) == (16, 1, 1, 14)
    assert report.rejects_path is not None
    rejects = read_rejects(report.rejects_path)
    expected = {
        3: "timezone: must be an IANA time zone",
        4: "birth_date: must be between 1900-01-01 and today",
        5: "birth_date: must be a date like 1990-05-17",
        6: f"home_store: unknown store '{p}-GONE'",
        7: "attributes: values must be strings, numbers, booleans or null",
        8: "attributes: must be a JSON object",
        9: "tags: at most 50 tags",
        10: f"external_id: member '{erased}' was erased",
        11: "consent_sms: must be true or false",
        12: "email: must be a valid e-mail address",
        13: "phone: must be a phone number",
        14: "locale: must be a locale like zh-CN or en",
        15: "external_id: must be 1-64 characters",
        16: "attributes: must be a JSON object",
    }
    assert sorted(rejects) == sorted(expected)
    for line, reason in expected.items():
        assert rejects[line]["reason"].startswith(reason), (line, rejects[line]["reason"])
    renamed = world.conn.execute(
        text(
            "SELECT m.name, s.code FROM members m JOIN stores s ON s.id = m.home_store_id"
            " WHERE m.external_id = :m"
        ),
        {"m": m1},
    ).one()
    assert tuple(renamed) == ("Renamed", s2)
    fresh = world.conn.execute(
        text(
            "SELECT timezone, tags, attributes, home_store_id, birth_date FROM members"
            " WHERE external_id = :m"
        ),
        {"m": f"{p}-OK"},
    ).one()
    assert tuple(fresh) == ("UTC", [], {}, None, None)


def test_store_import_creates_regions_and_updates(connection: Connection, tmp_path: Path):
    p = unique("ST")
    first = write_csv(
        tmp_path / "s1.csv",
        ["region", "code", "name"],  # any column order
        [[f"{p}-R", f"{p}-1", "One"], [f"{p}-R", f"{p}-2", "Two"]],
    )
    assert run_import(connection, "stores", first).inserted == 2
    second = write_csv(
        tmp_path / "s2.csv",
        STORE_FIELDS,
        [[f"{p}-1", "One renamed", f"{p}-R2"], [f"{p}-2", "Two", f"{p}-R"], ["", "x", "y"]],
    )
    report = run_import(connection, "stores", second)
    assert (report.inserted, report.updated, report.skipped, report.rejected) == (0, 1, 1, 1)
    row = connection.execute(
        text(
            "SELECT s.name, r.code FROM stores s JOIN regions r ON r.id = s.region_id"
            " WHERE s.code = :c"
        ),
        {"c": f"{p}-1"},
    ).one()
    assert tuple(row) == ("One renamed", f"{p}-R2")


def test_bad_header_fails_and_writes_nothing(world: World):
    path = world.tmp / "bad.csv"
    path.write_text("transaction_id,member,kind,amount\nX,Y,purchase,1.00\n", encoding="utf-8")
    with pytest.raises(ImportFailed) as failed:
        run_import(world.conn, "transactions", path)
    message = str(failed.value)
    assert "missing columns: member_id, original_transaction_id, currency" in message
    assert "unknown columns: member" in message
    assert not path.with_name("bad.csv.rejects.csv").exists()


def test_a_failure_midway_leaves_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch, connection: Connection
):
    s1, _ = world.stores
    p = world.prefix
    path = write_csv(
        world.tmp / "m.csv",
        MEMBER_FIELDS,
        [member_row(f"{p}-X1", s1), member_row(f"{p}-X2", s1, gender="robot")],
    )

    def explode(self: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer._Run, "audit", explode)
    with pytest.raises(RuntimeError):
        run_import(connection, "members", path)
    assert world.count("SELECT count(*) FROM members WHERE external_id LIKE :p", p=f"{p}-X%") == 0
    assert not path.with_name("m.csv.rejects.csv").exists()
    assert not list(world.tmp.glob(".m.csv.rejects.csv.*"))


# -- idempotency and statistics -------------------------------------------------------


def test_reimporting_the_same_files_changes_nothing(world: World):
    m1, m2, _ = world.members
    s1, s2 = world.stores
    t = world.tid
    path = world.transactions(
        "tx.csv",
        [
            tx(t("P1"), m1, s1, "10.00"),
            tx(t("P2"), m2, s2, "20.00"),
            tx(t("R1"), m1, s1, "5.00", kind="refund", original=t("P1")),
        ],
    )
    members = write_csv(
        world.tmp / "again.csv", MEMBER_FIELDS, [member_row(m, s1) for m in world.members[:2]]
    )
    run_import(world.conn, "transactions", path)

    def state() -> list[Any]:
        return list(
            world.conn.execute(
                text(
                    "SELECT 'm', ctid::text, external_id FROM members WHERE external_id LIKE :p"
                    " UNION ALL SELECT 't', ctid::text, external_id FROM transactions"
                    "   WHERE external_id LIKE :p"
                    " UNION ALL SELECT 's', ms.ctid::text, ms.updated_at::text FROM member_stats ms"
                    "   JOIN members m ON m.id = ms.member_id WHERE m.external_id LIKE :p"
                    " ORDER BY 1, 2"
                ),
                {"p": f"{world.prefix}%"},
            )
        )

    before = state()
    again = run_import(world.conn, "transactions", path)
    assert (again.read, again.inserted, again.skipped, again.rejected) == (3, 0, 3, 0)
    unchanged = run_import(world.conn, "members", members)
    assert (unchanged.inserted, unchanged.updated, unchanged.skipped) == (0, 0, 2)
    assert state() == before


def test_import_statistics_equal_the_event_path_and_a_rebuild(world: World, session: Session):
    """The same purchases and refunds give the same member_stats via the API path and import."""
    api_member, imported_member, _ = world.members
    s1, s2 = world.stores
    t = world.tid
    events = [
        ("purchase", "E1", None, "100.00", s1, "2026-01-05T10:00:00+08:00"),
        ("purchase", "E2", None, "35.10", s2, "2025-12-24T23:59:59-05:00"),
        ("refund", "E3", "E1", "40.00", s1, "2026-01-06T10:00:00+08:00"),
        ("purchase", "E4", None, "0.99", s1, "2026-02-01T00:00:00Z"),
        ("refund", "E5", "E1", "60.00", s1, "2026-01-07T10:00:00+08:00"),
    ]
    for kind, tid, original, amount, store, occurred in events:
        payload: dict[str, Any] = {
            "member_id": api_member,
            "transaction_id": t(f"api-{tid}"),
            "amount": Decimal(amount),
            "currency": "CNY",
            "store": store,
            "channel": "pos",
            "occurred_at": datetime.fromisoformat(occurred),
        }
        if kind == "purchase":
            record_purchase(session, payload)
        else:
            record_refund(session, {**payload, "original_transaction_id": t(f"api-{original}")})
    session.flush()
    rows = [
        tx(
            t(f"imp-{tid}"), imported_member, store, amount, kind=kind,
            original=t(f"imp-{original}") if original else "", occurred=occurred,
        )
        for kind, tid, original, amount, store, occurred in events
    ]  # fmt: skip
    # Split over two files so that the second one also refunds stored purchases.
    run_import(world.conn, "transactions", world.transactions("one.csv", rows[:3]))
    run_import(world.conn, "transactions", world.transactions("two.csv", rows[3:]))
    assert world.stats(api_member) == world.stats(imported_member)
    refunded = world.conn.execute(
        text(
            "SELECT external_id, refunded_amount FROM transactions"
            " WHERE external_id IN (:a, :b) ORDER BY external_id"
        ),
        {"a": t("api-E1"), "b": t("imp-E1")},
    ).all()
    assert [r.refunded_amount for r in refunded] == [Decimal("100.00")] * 2

    ids = member_ids(world.conn, [api_member, imported_member])
    before = snapshot_stats(world.conn, ids)
    assert rebuild_member_stats(world.conn, ids) == 2
    assert snapshot_stats(world.conn, ids) == before


def test_rebuild_removes_statistics_of_members_without_transactions(world: World):
    m1, m2, _ = world.members
    ids = member_ids(world.conn, [m1, m2])
    world.conn.execute(
        text("INSERT INTO member_stats (member_id, purchase_count) VALUES (:m, 7)"),
        {"m": ids[0]},
    )
    assert rebuild_member_stats(world.conn, ids) == 0
    assert world.stats(m1) is None


# -- the command line -----------------------------------------------------------------


@pytest.fixture
def cli_env(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")


def test_cli_imports_and_exits_3_when_rows_were_rejected(
    cli_env: None, engine: Engine, tmp_path: Path
):
    p = unique("CLI")
    store, member = f"{p}-S", f"{p}-M"
    runner = CliRunner()
    stores = write_csv(tmp_path / "stores.csv", STORE_FIELDS, [[store, "CLI store", "East"]])
    ok = runner.invoke(main, ["import", "stores", str(stores)])
    assert ok.exit_code == 0, ok.output
    assert "inserted 1" in ok.output
    members = write_csv(tmp_path / "members.csv", MEMBER_FIELDS, [member_row(member, store)])
    assert runner.invoke(main, ["import", "members", str(members)]).exit_code == 0
    path = write_csv(
        tmp_path / "tx.csv",
        TRANSACTION_FIELDS,
        [tx(f"{p}-1", member, store), tx(f"{p}-2", member, store, "abc")],
    )
    rejects = tmp_path / "out" / "bad.csv"
    result = runner.invoke(main, ["import", "transactions", str(path), "--rejects", str(rejects)])
    assert result.exit_code == 3, result.output
    assert "inserted 1" in result.output and "rejected 1" in result.output
    assert read_rejects(rejects)[3]["reason"].startswith(
        "amount: must be a decimal with at most 2 places"
    )
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM transactions WHERE external_id LIKE :p"), {"p": f"{p}-%"}
        ).scalar_one()
    assert stored == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("code,name\nX,Y\n", encoding="utf-8")
    failed = runner.invoke(main, ["import", "stores", str(bad)])
    assert failed.exit_code == 1 and "missing columns: region" in failed.output


def test_the_callers_transaction_keeps_its_settings(world: World):
    m1, _, _ = world.members
    path = world.transactions("set.csv", [tx(world.tid("SET"), m1, world.stores[0])])
    names = ("work_mem", "parallel_tuple_cost", "session_replication_role")

    def settings() -> list[str]:
        return [world.conn.exec_driver_sql(f"SHOW {n}").scalar_one() for n in names]

    before = settings()
    assert run_import(world.conn, "transactions", path).inserted == 1
    assert settings() == before


def test_engine_import_commits_and_cleans_up_its_work_tables(engine: Engine, tmp_path: Path):
    p = unique("ENG")
    path = write_csv(tmp_path / "s.csv", STORE_FIELDS, [[f"{p}-S", "Engine", "East"]])
    report = run_import(engine, "stores", path)
    assert report.inserted == 1
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM stores WHERE code = :c"), {"c": f"{p}-S"}
            ).scalar_one()
            == 1
        )
        leftovers = conn.execute(
            text("SELECT count(*) FROM pg_class WHERE relname LIKE 'patron_import_%'")
        ).scalar_one()
    assert leftovers == 0


def test_zero_value_purchase_loads_but_zero_refund_is_rejected(world: World):
    m1, _, _ = world.members
    s1, _ = world.stores
    t = world.tid
    rows = [
        tx(t("Z1"), m1, s1, "0.00"),  # line 2: a gift counts as a purchase
        tx(t("Z2"), m1, s1, "0.00", kind="refund", original=t("Z1")),  # 3
    ]
    report = run_import(world.conn, "transactions", world.transactions("zero.csv", rows))
    assert (report.inserted, report.rejected) == (1, 1)
    assert read_rejects(report.rejects_path)[3]["reason"].startswith("amount:")
    assert world.stats(m1)["purchase_count"] == 1


def test_import_leaves_rolling_windows_equal_to_a_rebuild(world: World):
    from datetime import UTC, timedelta

    from segments.stats import rebuild_windows

    m1, _, _ = world.members
    s1, _ = world.stores
    t = world.tid
    recent = (datetime.now(UTC) - timedelta(days=3)).isoformat(timespec="seconds")
    older = (datetime.now(UTC) - timedelta(days=60)).isoformat(timespec="seconds")
    rows = [
        tx(t("W1"), m1, s1, "10.00", occurred=recent),
        tx(t("W2"), m1, s1, "5.00", occurred=older),
    ]
    assert run_import(world.conn, "transactions", world.transactions("w.csv", rows)).inserted == 2
    cols = "purchases_30d, spend_30d, purchases_90d, spend_90d, purchases_365d, spend_365d"
    query = text(
        f"SELECT {cols} FROM member_stats ms JOIN members m ON m.id = ms.member_id"
        " WHERE m.external_id = :m"
    )
    after_import = world.conn.execute(query, {"m": m1}).one()
    assert after_import[0] == 1 and after_import[2] == 2
    rebuild_windows(world.conn)
    assert world.conn.execute(query, {"m": m1}).one() == after_import
