"""Score endpoints, roles, the profile, the refresh job chain and `patron refresh`."""

from __future__ import annotations

import os
from datetime import date, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from rq import Queue, SimpleWorker
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from segments import refresh
from segments.config import ScoringConfig
from service import jobs
from service.cli import main
from service.config import Config
from service.models import Member, Store
from service.redis_client import get_redis
from tests.conftest import KeyFactory
from tests.segments.conftest import TZ, add_member, add_purchase
from tests.segments.test_stats import local

AS_OF = date(2026, 6, 30)


@pytest.fixture
def scored(
    session: Session, shop: int, isolated: None, uow: Any, scoring: ScoringConfig
) -> dict[str, Any]:
    """A few members with purchases, refreshed as of AS_OF and AS_OF + 1 month."""
    ids = []
    for k in range(8):
        m = add_member(session, shop)
        ids.append(m)
        for j in range(k % 4 + 1):
            add_purchase(session, m, shop, local(AS_OF - timedelta(days=5 + 30 * j + k)), "25.00")
    refresh.run_refresh(uow, AS_OF, config=scoring)
    refresh.run_refresh(uow, date(2026, 7, 1), config=scoring)
    code = session.scalar(select(Store.code).where(Store.id == shop))
    external = session.scalar(select(Member.external_id).where(Member.id == ids[-1]))
    return {"ids": ids, "store": code, "member": external}


@pytest.fixture(autouse=True)
def _timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATRON_TIMEZONE", TZ)


def test_rfm_summary_grid_segments_and_stages(
    client: FlaskClient, auth: KeyFactory, scored: dict[str, Any]
) -> None:
    headers = auth("analyst")
    body = client.get("/v1/rfm/summary", headers=headers).get_json()
    assert len(body["grid"]) == 25
    assert sum(c["members"] for c in body["grid"]) == 8
    assert sum(s["members"] for s in body["segments"]) == 8
    assert {s["segment"] for s in body["segments"]} >= {"champions", "lost"}
    assert sum(s["members"] for s in body["stages"]) == 8
    assert body["as_of"] == "2026-07-01" and len(body["cut_points"]["r"]) == 4
    by_store = client.get(f"/v1/rfm/summary?store={scored['store']}", headers=headers).get_json()
    assert sum(c["members"] for c in by_store["grid"]) == 8
    by_region = client.get("/v1/rfm/summary?region=NOWHERE", headers=headers).get_json()
    assert sum(c["members"] for c in by_region["grid"]) == 0
    east = client.get("/v1/rfm/summary?region=SEG-East", headers=headers).get_json()
    assert sum(c["members"] for c in east["grid"]) == 8


def test_movement_and_early_warning(
    client: FlaskClient, auth: KeyFactory, scored: dict[str, Any]
) -> None:
    headers = auth("marketer")
    moved = client.get("/v1/rfm/movement?from=2026-06&to=2026-07", headers=headers)
    assert moved.status_code == 200
    assert moved.get_json()["total"] == 8
    bad = client.get("/v1/rfm/movement?from=2026-13&to=2026-07", headers=headers)
    assert bad.status_code == 422
    page = client.get("/v1/lifecycle/early-warning?limit=5", headers=headers)
    assert page.status_code == 200 and "items" in page.get_json()
    assert client.get("/v1/lifecycle/early-warning?cursor=zz", headers=headers).status_code == 422


@pytest.mark.parametrize(
    ("role", "read", "refresh_status"),
    [("admin", 200, 202), ("marketer", 200, 202), ("approver", 200, 403), ("analyst", 200, 403),
     ("pos", 403, 403)],
)  # fmt: skip
def test_roles(
    client: FlaskClient, auth: KeyFactory, role: str, read: int, refresh_status: int
) -> None:
    headers = auth(role)
    assert client.get("/v1/rfm/summary", headers=headers).status_code == read
    assert client.get("/v1/lifecycle/early-warning", headers=headers).status_code == read
    posted = client.post("/v1/scores/refresh", json={"as_of": "2026-06-30"}, headers=headers)
    assert posted.status_code == refresh_status
    if posted.status_code == 202:
        Queue(connection=get_redis(client.application)).empty()


def test_profile_shows_scores_stage_churn_and_explanations(
    client: FlaskClient, auth: KeyFactory, scored: dict[str, Any]
) -> None:
    body = client.get(f"/v1/members/{scored['member']}/profile", headers=auth("analyst"))
    assert body.status_code == 200, body.get_json()
    scores = body.get_json()["scores"]
    assert scores["as_of"] == "2026-07-01"
    assert scores["windows"]["purchases_365d"] == 4
    assert scores["rfm"]["segment"] is not None
    assert scores["rfm"]["explanation"][0].startswith(f"R = {scores['rfm']['r']}: last purchase")
    assert scores["lifecycle"]["stage"] in {"new", "active", "at_risk"}
    assert scores["churn"]["p_alive"] is not None


def test_openapi_lists_the_score_endpoints(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    for path in (
        "/v1/rfm/summary",
        "/v1/rfm/movement",
        "/v1/lifecycle/early-warning",
        "/v1/scores/refresh",
        "/v1/scores/refresh/{job_id}",
    ):
        assert path in paths


def test_refresh_job_chain_runs_every_step(
    db_app: Flask,
    client: FlaskClient,
    auth: KeyFactory,
    session: Session,
    shop: int,
    isolated: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The jobs run in this process against this test's transaction.
    monkeypatch.setattr(jobs, "_APP", db_app)
    monkeypatch.setattr(jobs, "_APP_PID", os.getpid())
    member = add_member(session, shop)
    add_purchase(session, member, shop, local(AS_OF - timedelta(days=3)), "12.00")
    queue = Queue(db_app.config["PATRON"].queue_name, connection=get_redis(db_app))
    queue.empty()
    posted = client.post("/v1/scores/refresh", json={"as_of": "2026-06-30"}, headers=auth("admin"))
    assert posted.status_code == 202
    job_id = posted.get_json()["job_id"]
    SimpleWorker([queue], connection=queue.connection).work(burst=True)
    status = client.get(f"/v1/scores/refresh/{job_id}", headers=auth("analyst")).get_json()
    assert status["status"] == "finished", status
    assert [s["step"] for s in status["steps"]] == [*refresh.iter_step_names(), "finish"]
    assert {s["status"] for s in status["steps"]} == {"finished"}
    run = session.execute(
        text("SELECT finished_at, steps FROM score_runs WHERE as_of = :d"), {"d": AS_OF}
    ).one()
    assert run.finished_at is not None and "churn" in run.steps
    stage = session.scalar(
        text("SELECT lifecycle_stage FROM member_scores WHERE member_id = :m"), {"m": member}
    )
    assert stage == "new"
    missing = client.get("/v1/scores/refresh/nope", headers=auth("analyst"))
    assert missing.status_code == 404


def test_scheduler_registers_the_daily_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATRON_REFRESH_AT", "03:00")
    monkeypatch.setenv("PATRON_TIMEZONE", "UTC")
    (func, spec), *_ = jobs.daily_jobs()
    assert func.__name__ == "refresh_job"
    assert len(spec.split()) == 5 and spec.endswith("* * *")


def test_cli_refresh_reports_progress(config: Config, engine: Engine, monkeypatch: Any) -> None:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")
    day = date(2001, 1, 1)  # a date no other test uses; removed afterwards
    try:
        result = CliRunner().invoke(main, ["refresh", "--as-of", day.isoformat()])
        assert result.exit_code == 0, result.output
        for step in refresh.iter_step_names():
            assert step in result.output
        assert "done in" in result.output
        bad = CliRunner().invoke(main, ["refresh", "--step", "nope"])
        assert bad.exit_code == 1 and "unknown refresh steps" in bad.output
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM score_runs WHERE as_of = :d"), {"d": day})
            conn.execute(text("DELETE FROM rfm_snapshots WHERE month = :d"), {"d": day})
            conn.execute(text("DELETE FROM lifecycle_changes WHERE changed_on = :d"), {"d": day})
            conn.execute(text("DELETE FROM stats_windows"))
