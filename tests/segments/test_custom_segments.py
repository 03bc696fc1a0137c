"""Custom segments: versions, set-based refresh with history, static uploads, the rule field,
concurrency, the API and its jobs, and the purchase path's one-member refresh."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from rq import Queue, SimpleWorker
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session

from rules import compile_py, member_query, parse_rule
from segments import custom
from segments.models_custom import (
    CustomSegment,
    SegmentKind,
    SegmentMembership,
    SegmentMembershipChange,
    SegmentRefresh,
    SegmentVersion,
)
from service import jobs
from service.config import Config
from service.errors import Conflict, ValidationFailed
from service.models import AuditEntry, Member, MemberStats
from service.redis_client import make_redis
from service.vocabulary import default_vocabulary, load_member_facts
from tests.conftest import KeyFactory

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
ACTOR = "test"


@pytest.fixture
def tag() -> str:
    """A tag only this test's members carry, so rules never see other tests' members."""
    return "t" + uuid.uuid4().hex[:10]


def add_member(session: Session, tag: str, spend: str | None = None, count: int = 1) -> int:
    member_id = session.execute(
        insert(Member)
        .values(external_id="CS-" + uuid.uuid4().hex[:14], tags=[tag])
        .returning(Member.id)
    ).scalar_one()
    if spend is not None:
        session.execute(
            insert(MemberStats).values(
                member_id=member_id,
                purchase_count=count,
                purchase_amount=Decimal(spend),
                net_spend=Decimal(spend),
                first_purchase_at=T0 - timedelta(days=30),
                last_purchase_at=T0 - timedelta(days=1),
            )
        )
    return member_id


def set_spend(session: Session, member_id: int, spend: str, count: int = 1) -> None:
    session.execute(
        update(MemberStats)
        .where(MemberStats.member_id == member_id)
        .values(net_spend=Decimal(spend), purchase_amount=Decimal(spend), purchase_count=count)
    )


def dynamic(session: Session, tag: str, rule: str, name: str | None = None) -> int:
    saved = custom.create_segment(
        session,
        default_vocabulary(),
        name or f"seg-{uuid.uuid4().hex[:10]}",
        kind=SegmentKind.DYNAMIC,
        rule=f'tags contains "{tag}" and ({rule})',
        actor=ACTOR,
    )
    return int(saved["id"])


def members_of(session: Session, segment_id: int) -> set[int]:
    return set(
        session.scalars(
            select(SegmentMembership.member_id).where(SegmentMembership.segment_id == segment_id)
        )
    )


def history(session: Session, segment_id: int) -> list[tuple[int, str, datetime, int]]:
    rows = session.execute(
        select(
            SegmentMembershipChange.member_id,
            SegmentMembershipChange.kind,
            SegmentMembershipChange.at,
            SegmentVersion.version,
        )
        .join(SegmentVersion, SegmentVersion.id == SegmentMembershipChange.version_id)
        .where(SegmentMembershipChange.segment_id == segment_id)
        .order_by(SegmentMembershipChange.id)
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


# --- refresh and history --------------------------------------------------------------


def test_refresh_records_who_entered_and_left_with_the_version(session: Session, tag: str):
    rich = add_member(session, tag, "900")
    poor = add_member(session, tag, "100")
    never = add_member(session, tag)
    seg = dynamic(session, tag, "net_spend > 500")

    first = custom.refresh_segment(session, seg, T0)
    assert (first.members, first.entered, first.left, first.version) == (1, 1, 0, 1)
    assert members_of(session, seg) == {rich}

    set_spend(session, rich, "200")
    set_spend(session, poor, "800")
    t1 = T0 + timedelta(days=1)
    second = custom.refresh_segment(session, seg, t1)
    assert (second.members, second.entered, second.left) == (1, 1, 1)
    assert members_of(session, seg) == {poor}

    custom.update_segment(
        session, default_vocabulary(), seg, rule=f'tags contains "{tag}"', actor=ACTOR
    )
    t2 = T0 + timedelta(days=2)
    third = custom.refresh_segment(session, seg, t2)
    assert (third.version, third.entered, third.left) == (2, 2, 0)
    assert members_of(session, seg) == {rich, poor, never}
    assert history(session, seg) == [
        (rich, "entered", T0, 1),
        (rich, "left", t1, 1),
        (poor, "entered", t1, 1),
        *sorted([(rich, "entered", t2, 2), (never, "entered", t2, 2)]),
    ]
    runs = session.scalars(select(SegmentRefresh).where(SegmentRefresh.segment_id == seg)).all()
    assert [r.as_of for r in runs] == [T0, t1, t2]


def test_refresh_twice_for_the_same_instant_is_a_no_op(session: Session, tag: str):
    add_member(session, tag, "900")
    seg = dynamic(session, tag, "net_spend > 500")
    first = custom.refresh_segment(session, seg, T0)
    again = custom.refresh_segment(session, seg, T0)
    assert again.replayed and again.refresh_id == first.refresh_id and again.entered == 1
    older = custom.refresh_segment(session, seg, T0 - timedelta(hours=1))
    assert older.skipped and not older.replayed
    assert len(history(session, seg)) == 1
    assert (
        session.scalar(
            select(SegmentRefresh.id).where(SegmentRefresh.segment_id == seg).limit(2).offset(1)
        )
        is None
    )


def test_edits_add_versions_and_same_content_changes_nothing(session: Session, tag: str):
    vocab = default_vocabulary()
    seg = dynamic(session, tag, "net_spend > 500")
    same, created = custom.update_segment(
        session, vocab, seg, rule=f'tags contains "{tag}" and (net_spend > 500)', actor=ACTOR
    )
    assert not created and same["version"] == 1
    edited, created = custom.update_segment(
        session, vocab, seg, rule={"field": "net_spend", "op": "gt", "value": "900"}, actor=ACTOR
    )
    assert created and edited["version"] == 2 and edited["text"] == "net_spend > 900"
    assert len(edited["hash"]) == 64 and edited["fields"] == ["net_spend"]
    described, created = custom.update_segment(session, vocab, seg, description="x", actor=ACTOR)
    assert created and described["version"] == 3 and described["hash"] == edited["hash"]
    with pytest.raises(Conflict):
        custom.update_segment(session, vocab, seg, description="y", base_version=1, actor=ACTOR)
    assert [v["version"] for v in custom.list_versions(session, seg)] == [1, 2, 3]


def test_archiving_closes_memberships_into_history(session: Session, tag: str):
    m = add_member(session, tag, "900")
    seg = dynamic(session, tag, "net_spend > 500")
    custom.refresh_segment(session, seg, T0)
    archived = custom.archive_segment(session, seg, at=T0 + timedelta(hours=1), actor=ACTOR)
    assert archived["status"] == "archived" and archived["members"] == 0
    assert [h[:2] for h in history(session, seg)] == [(m, "entered"), (m, "left")]
    with pytest.raises(Conflict):
        custom.refresh_segment(session, seg, T0 + timedelta(days=1))


def test_preview_count_equals_what_a_refresh_selects(session: Session, tag: str):
    for spend in ("100", "600", "700", "2000", None):
        add_member(session, tag, spend)
    text = f'tags contains "{tag}" and net_spend between 500 and 1000'
    shown = custom.preview(session, default_vocabulary(), text, at=T0, sample=5)
    seg = dynamic(session, tag, "net_spend between 500 and 1000")
    assert shown["count"] == custom.refresh_segment(session, seg, T0).members == 2
    assert len(shown["sample"]) == 2
    assert all(s["explanation"]["outcome"] for s in shown["sample"])


def test_refresh_all_covers_every_dynamic_segment(session: Session, tag: str):
    add_member(session, tag, "900")
    a = dynamic(session, tag, "net_spend > 500")
    b = dynamic(session, tag, "net_spend > 5000")
    done = {r.segment_id: r for r in custom.refresh_all(session, T0)}
    assert done[a].members == 1 and done[b].members == 0


# --- static segments --------------------------------------------------------------------------


def static(session: Session) -> int:
    saved = custom.create_segment(
        session,
        default_vocabulary(),
        f"static-{uuid.uuid4().hex[:8]}",
        kind=SegmentKind.STATIC,
        actor=ACTOR,
    )
    return int(saved["id"])


def external(session: Session, member_id: int) -> str:
    return session.scalar(select(Member.external_id).where(Member.id == member_id)) or ""


def test_static_upload_reports_ids_not_found_and_replaces_or_adds(session: Session, tag: str):
    a, b, c = (add_member(session, tag) for _ in range(3))
    seg = static(session)
    ext = {m: external(session, m) for m in (a, b, c)}
    report = custom.upload_members(
        session, seg, [ext[a], ext[b], ext[a], "NOPE-1"], replace=True, at=T0, actor=ACTOR
    )
    assert report["not_found"] == ["NOPE-1"] and report["matched"] == 2
    assert (report["entered"], report["left"], report["members"]) == (2, 0, 2)
    added = custom.upload_members(session, seg, [ext[c]], replace=False, at=T0, actor=ACTOR)
    assert added["entered"] == 1 and members_of(session, seg) == {a, b, c}
    replaced = custom.upload_members(session, seg, [ext[c]], replace=True, at=T0, actor=ACTOR)
    assert (replaced["entered"], replaced["left"]) == (0, 2)
    assert members_of(session, seg) == {c}


def test_static_upload_rejects_bad_input_and_writes_nothing(session: Session, tag: str):
    a = add_member(session, tag)
    seg = static(session)
    with pytest.raises(ValidationFailed) as err:
        custom.upload_members(
            session, seg, [external(session, a), "bad id!", 7], replace=True, at=T0, actor=ACTOR
        )
    assert set(err.value.errors["external_ids"]) == {"1", "2"}  # type: ignore[index]
    assert members_of(session, seg) == set() and history(session, seg) == []


# --- the rule field ------------------------------------------------------------------------


def test_segment_field_agrees_in_sql_and_python(session: Session, tag: str):
    vocab = default_vocabulary()
    inside, outside = add_member(session, tag, "900"), add_member(session, tag, "10")
    name = f"vip-{uuid.uuid4().hex[:8]}"
    seg = dynamic(session, tag, "net_spend > 500", name=name)
    custom.refresh_segment(session, seg, T0)
    facts = load_member_facts(session, [inside, outside])
    assert facts[inside]["segments"] == [name] and facts[outside]["segments"] == []
    for text, expected in [
        (f'segment in ("{name}", "other")', {inside}),
        (f'segment not in ("{name}")', {outside}),
        (f'not segment in ("{name}")', {outside}),
        (f'segment in ("{name}") or net_spend < 50', {inside, outside}),
    ]:
        rule = parse_rule(text, vocab)
        query = member_query(rule, vocab, T0).where(Member.id.in_([inside, outside]))
        assert set(session.scalars(query)) == expected, text
        check = compile_py(rule, vocab).at(T0)
        assert {i for i in (inside, outside) if check(facts[i])} == expected, text


# --- the purchase path ------------------------------------------------------------------------


def test_refresh_member_after_a_purchase_records_entry_and_exit(session: Session, tag: str):
    m = add_member(session, tag, "400", count=1)
    big = dynamic(session, tag, "net_spend > 500")
    loyal = dynamic(session, tag, "purchase_count >= 2")
    low = dynamic(session, tag, "net_spend <= 500")
    by_tag = dynamic(session, tag, 'tags contains "never-on-purchase"')
    for seg in (big, loyal, low, by_tag):
        custom.refresh_segment(session, seg, T0)
    custom.forget_catalogue()
    assert members_of(session, low) == {m}

    set_spend(session, m, "600", count=2)  # what the purchase did to member_stats
    now = T0 + timedelta(hours=3)
    changes = custom.refresh_member(session, m, now)
    names = {
        s: session.scalar(select(CustomSegment.name).where(CustomSegment.id == s))
        for s in (big, loyal, low)
    }
    assert sorted(changes.entered) == sorted([names[big], names[loyal]])
    assert changes.left == [names[low]]
    assert members_of(session, big) == {m} and members_of(session, low) == set()
    assert history(session, big)[-1] == (m, "entered", now, 1)
    assert history(session, low)[-1] == (m, "left", now, 1)
    # Nothing changed since: no writes, no history.
    assert custom.refresh_member(session, m, now).entered == []
    # Only segments reading the changed fields are considered.
    set_spend(session, m, "10", count=2)
    only_count = custom.refresh_member(session, m, now, fields_changed=["purchase_count"])
    assert only_count.left == [] and members_of(session, big) == {m}
    # A later nightly refresh agrees with what the purchase path did.
    assert custom.refresh_segment(session, loyal, now + timedelta(hours=1)).entered == 0


# --- concurrency (committed sessions) ---------------------------------------------------------


@pytest.fixture
def committed_segment(engine: Engine) -> Iterator[tuple[int, list[int]]]:
    """A dynamic segment and 50 matching members, committed; removed afterwards."""
    tag = "c" + uuid.uuid4().hex[:10]
    with Session(engine) as s, s.begin():
        ids = [add_member(s, tag, "900") for _ in range(50)]
        seg = dynamic(s, tag, "net_spend > 500")
    yield seg, ids
    with Session(engine) as s, s.begin():
        for table, column in (
            (SegmentMembershipChange, SegmentMembershipChange.segment_id),
            (SegmentMembership, SegmentMembership.segment_id),
            (SegmentRefresh, SegmentRefresh.segment_id),
            (SegmentVersion, SegmentVersion.segment_id),
            (CustomSegment, CustomSegment.id),
        ):
            s.execute(delete(table).where(column == seg))
        s.execute(
            delete(AuditEntry).where(
                AuditEntry.entity_type == "segment", AuditEntry.entity_id == str(seg)
            )
        )
        s.execute(delete(MemberStats).where(MemberStats.member_id.in_(ids)))
        s.execute(delete(Member).where(Member.id.in_(ids)))


def test_concurrent_refreshes_of_one_segment_serialise(
    engine: Engine, committed_segment: tuple[int, list[int]]
):
    seg, ids = committed_segment
    first_locked = threading.Event()
    release = threading.Event()
    results: dict[str, Any] = {}

    def first() -> None:
        with Session(engine) as s, s.begin():
            results["first"] = custom.refresh_segment(s, seg, T0)
            first_locked.set()
            release.wait(10)

    def second() -> None:
        first_locked.wait(10)
        with Session(engine) as s, s.begin():
            results["second"] = custom.refresh_segment(s, seg, T0)
            results["second_at"] = time.monotonic()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_locked.wait(10)
    time.sleep(0.5)
    assert "second" not in results  # blocked on the segment's row lock
    released_at = time.monotonic()
    release.set()
    for t in threads:
        t.join(20)
    assert results["second_at"] >= released_at
    assert results["first"].entered == 50 and not results["first"].replayed
    assert results["second"].replayed and results["second"].entered == 50
    with Session(engine) as s:
        assert len(history(s, seg)) == 50
        assert members_of(s, seg) == set(ids)


# --- API ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "read", "write"),
    [
        ("admin", 200, 201),
        ("marketer", 200, 201),
        ("approver", 200, 403),
        ("analyst", 200, 403),
        ("pos", 403, 403),
    ],
)
def test_role_matrix(client: FlaskClient, auth: KeyFactory, role: str, read: int, write: int):
    headers = auth(role)
    assert client.get("/v1/segments", headers=headers).status_code == read
    body = {"name": f"r-{uuid.uuid4().hex[:8]}", "rule": "net_spend > 1"}
    assert client.post("/v1/segments", json=body, headers=headers).status_code == write
    preview = client.post(
        "/v1/segments/preview", json={"rule": "net_spend > 1", "sample": 0}, headers=headers
    )
    assert preview.status_code == read


def test_bad_rules_are_422_with_pointers(client: FlaskClient, auth: KeyFactory):
    headers = auth("marketer")
    rule = {
        "all": [
            {"field": "net_spend", "op": "gt", "value": "1"},
            {"field": "nope", "op": "eq", "value": 1},
        ]
    }
    resp = client.post("/v1/segments", json={"name": "bad-rule", "rule": rule}, headers=headers)
    assert resp.status_code == 422
    assert resp.mimetype == "application/problem+json"
    assert "/all/1" in resp.get_json()["errors"]
    resp = client.post("/v1/segments/preview", json={"rule": "net_spend >"}, headers=headers)
    assert resp.status_code == 422 and "rule" in resp.get_json()["errors"]
    resp = client.post("/v1/segments", json={"name": "no-rule"}, headers=headers)
    assert resp.status_code == 422 and "rule" in resp.get_json()["errors"]
    resp = client.post(
        "/v1/segments", json={"name": "Bad Name", "rule": "net_spend > 1"}, headers=headers
    )
    assert resp.status_code == 422 and "name" in resp.get_json()["errors"]


def test_api_lifecycle_static_upload_members_and_changes(
    client: FlaskClient, auth: KeyFactory, session: Session, tag: str
):
    headers = auth("marketer")
    members = [add_member(session, tag) for _ in range(3)]
    ext = [external(session, m) for m in members]
    session.flush()
    resp = client.post(
        "/v1/segments", json={"name": f"fair-{tag}", "kind": "static"}, headers=headers
    )
    assert resp.status_code == 201, resp.get_json()
    seg = resp.get_json()["id"]
    bad = client.post(f"/v1/segments/{seg}/members", json=[ext[0], "bad id"], headers=headers)
    assert bad.status_code == 422 and "external_ids" in bad.get_json()["errors"]
    csv_body = "external_id\n" + "\n".join([*ext[:2], "NOT-THERE"]) + "\n"
    up = client.post(
        f"/v1/segments/{seg}/members?mode=replace",
        data=csv_body,
        content_type="text/csv",
        headers=headers,
    )
    assert up.status_code == 200, up.get_json()
    assert up.get_json()["not_found"] == ["NOT-THERE"] and up.get_json()["entered"] == 2
    up = client.post(f"/v1/segments/{seg}/members", json=[ext[2]], headers=headers)
    assert up.get_json()["members"] == 3
    page = client.get(f"/v1/segments/{seg}/members?limit=2", headers=auth("analyst")).get_json()
    rest = client.get(
        f"/v1/segments/{seg}/members?limit=2&cursor={page['next_cursor']}", headers=headers
    ).get_json()
    assert [i["member_id"] for i in page["items"] + rest["items"]] == ext
    assert rest["next_cursor"] is None
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    changes = client.get(
        f"/v1/segments/{seg}/changes",
        query_string={"since": since, "kind": "entered", "limit": 2},
        headers=headers,
    ).get_json()
    more = client.get(
        f"/v1/segments/{seg}/changes",
        query_string={"since": since, "kind": "entered", "cursor": changes["next_cursor"]},
        headers=headers,
    ).get_json()
    assert sorted(i["member_id"] for i in changes["items"] + more["items"]) == sorted(ext)
    assert client.delete(f"/v1/segments/{seg}", headers=headers).get_json()["status"] == "archived"
    left = client.get(
        f"/v1/segments/{seg}/changes",
        query_string={"since": since, "kind": "left"},
        headers=headers,
    ).get_json()
    assert len(left["items"]) == 3
    actions = set(
        session.scalars(
            select(AuditEntry.action).where(
                AuditEntry.entity_type == "segment", AuditEntry.entity_id == str(seg)
            )
        )
    )
    assert {"segment.created", "segment.members_uploaded", "segment.archived"} <= actions


def test_api_update_makes_a_new_version(client: FlaskClient, auth: KeyFactory):
    headers = auth("marketer")
    seg = client.post(
        "/v1/segments",
        json={"name": f"v-{uuid.uuid4().hex[:8]}", "rule": "net_spend > 1"},
        headers=headers,
    ).get_json()
    resp = client.put(
        f"/v1/segments/{seg['id']}",
        json={"rule": "net_spend > 2", "base_version": 1},
        headers=headers,
    )
    assert resp.status_code == 201 and resp.get_json()["version"] == 2
    assert (
        client.put(
            f"/v1/segments/{seg['id']}", json={"rule": "net_spend > 2"}, headers=headers
        ).status_code
        == 200
    )
    stale = client.put(
        f"/v1/segments/{seg['id']}",
        json={"rule": "net_spend > 3", "base_version": 1},
        headers=headers,
    )
    assert stale.status_code == 409
    versions = client.get(f"/v1/segments/{seg['id']}/versions", headers=headers).get_json()["items"]
    assert [v["text"] for v in versions] == ["net_spend > 1", "net_spend > 2"]


@pytest.fixture
def job_env(config: Config, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")
    monkeypatch.setattr(jobs, "_APP", None)
    return config


def test_refresh_job_runs_on_a_worker_and_reports_its_result(
    client: FlaskClient,
    auth: KeyFactory,
    job_env: Config,
    committed_segment: tuple[int, list[int]],
):
    seg, _ = committed_segment
    headers = auth("marketer")
    resp = client.post(
        f"/v1/segments/{seg}/refresh", json={"as_of": T0.isoformat()}, headers=headers
    )
    assert resp.status_code == 202, resp.get_json()
    (job_id,) = resp.get_json()["job_ids"]
    queued = client.get(f"/v1/segments/jobs/{job_id}", headers=auth("analyst")).get_json()
    assert queued["status"] == "queued"
    everything = client.post("/v1/segments/refresh", headers=headers)  # empty body: now
    assert everything.status_code == 202 and everything.get_json()["job_ids"]
    redis = make_redis(job_env.redis_url or "")
    SimpleWorker([Queue(job_env.queue_name, connection=redis)], connection=redis).work(burst=True)
    done = client.get(f"/v1/segments/jobs/{job_id}", headers=headers).get_json()
    assert done["status"] == "finished", done
    assert done["result"]["members"] == 50 and done["result"]["entered"] == 50
    assert client.get("/v1/segments/jobs/nope", headers=headers).status_code == 404
