"""`patron demo`: embedded servers, the CDNOW sample loaded, the API served, keys printed."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from service import importer
from service.config import Config

DEMO_STORE = "CDNOW-WEB"
DEMO_REGION = "Online"
# CDNOW was a US web shop; its amounts are dollars.
DEMO_CURRENCY = "USD"
DEMO_TZ = "America/New_York"


def cdnow_rows() -> list[tuple[str, date, int, str]]:
    """Parse the bundled CDNOW sample: (customer id, date, CDs, dollar value)."""
    raw = resources.files("service.data").joinpath("CDNOW_sample.txt").read_text()
    rows = []
    for line in raw.splitlines():
        parts = line.split()
        if len(parts) != 5:
            continue
        _, sample_id, ymd, cds, value = parts
        rows.append((sample_id, date(int(ymd[:4]), int(ymd[4:6]), int(ymd[6:])), int(cds), value))
    return rows


def _demo_birthday(cid: int) -> date:
    # Spread over the year from today's date on, so a few fall within the next week.
    start = datetime.now(UTC).date()
    return date(1950 + cid % 50, 1, 1) + (
        (start - date(start.year, 1, 1)) + timedelta(days=cid % 365)
    )


def write_demo_files(folder: Path) -> dict[str, Path]:
    """Write the CDNOW sample as Patron import files (stores, members, transactions)."""
    rows = cdnow_rows()
    paths = {k: folder / f"{k}.csv" for k in ("stores", "members", "transactions")}
    with paths["stores"].open("w", newline="") as f:
        csv.writer(f).writerows([("code", "name", "region"), (DEMO_STORE, "CDNOW", DEMO_REGION)])
    with paths["members"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=importer.MEMBER_FIELDS, restval="")
        w.writeheader()
        for cid in sorted({r[0] for r in rows}):
            w.writerow(
                {
                    "external_id": f"CDNOW-{cid}",
                    "timezone": DEMO_TZ,
                    # CDNOW has no birthdays: a fixed, made-up one per customer, so the
                    # demo's birthday campaign has someone to greet.
                    "birth_date": _demo_birthday(int(cid)).isoformat(),
                    "locale": "en",
                    # Made-up addresses on the reserved example domain (RFC 2606), so the
                    # demo's e-mails have somewhere to go (the log channel prints them).
                    "email": f"customer{int(cid)}@example.com",
                    "home_store": DEMO_STORE,
                    "consent_email": "true",
                    "consent_sms": "false",
                    "consent_push": "false",
                    "consent_wechat": "false",
                    "tags": "cdnow",
                }
            )
    with paths["transactions"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=importer.TRANSACTION_FIELDS, restval="")
        w.writeheader()
        for n, (cid, day, cds, value) in enumerate(rows, start=1):
            item = {"sku": "CD", "category": "music", "quantity": cds, "amount": value}
            w.writerow(
                {
                    "transaction_id": f"CDNOW-T-{n:05d}",
                    "member_id": f"CDNOW-{cid}",
                    "kind": "purchase",
                    "amount": value,
                    "currency": DEMO_CURRENCY,
                    "store": DEMO_STORE,
                    "channel": "ecom",
                    "occurred_at": f"{day.isoformat()}T12:00:00-05:00",
                    "items": json.dumps([item]),
                }
            )
    return paths


def load(engine: Engine, echo: Any = click.echo) -> None:
    """Import the demo data set (idempotent: a second run changes nothing)."""
    with tempfile.TemporaryDirectory(prefix="patron-demo-") as tmp:
        paths = write_demo_files(Path(tmp))
        for kind in ("stores", "members", "transactions"):
            report = importer.run_import(
                engine, kind, paths[kind], rejects_path=Path(tmp) / f"{kind}.rejects.csv"
            )
            echo(f"  {kind}: {report.summary()}")


def summary(engine: Engine) -> dict[str, Any]:
    """Headline numbers of the loaded data."""
    from service.models import Member, MemberStats, Transaction

    with Session(engine) as s:
        top = s.execute(
            select(Member.external_id, MemberStats.purchase_count, MemberStats.net_spend)
            .join(MemberStats, MemberStats.member_id == Member.id)
            .order_by(MemberStats.net_spend.desc())
            .limit(5)
        ).all()
        return {
            "members": s.scalar(select(func.count()).select_from(Member)),
            "transactions": s.scalar(select(func.count()).select_from(Transaction)),
            "revenue": s.scalar(select(func.coalesce(func.sum(MemberStats.net_spend), 0))),
            "repeat_buyers": s.scalar(
                select(func.count()).select_from(MemberStats).where(MemberStats.purchase_count > 1)
            ),
            "top": top,
        }


def show_segments(engine: Engine, echo: Any = click.echo) -> dict[str, Any]:
    """Score the loaded data (the day after its last purchase) and print the segment summary."""
    from collections.abc import Iterator
    from contextlib import contextmanager

    from segments.config import ScoringConfig
    from segments.report import refresh_and_summarise, summary_lines

    @contextmanager
    def unit() -> Iterator[Session]:
        with Session(engine) as session, session.begin():
            yield session

    echo("\nScoring (windows, lifecycle, RFM, churn, segments)…")
    summary = refresh_and_summarise(unit, ScoringConfig.from_env())
    for line in summary_lines(summary):
        echo(line)
    return summary


DEMO_TEMPLATES = {
    # Templates the demo campaigns name; every channel, English and Chinese.
    "birthday-offer": (
        (
            "Happy birthday from CDNOW",
            "Happy birthday, {{ member.external_id }}! "
            "{% if coupon %}Your gift: {{ coupon.value }} off with code {{ coupon.code }}, "
            "valid until {{ coupon.expiry }}.{% endif %}",
        ),
        (
            "生日快乐",
            "{{ member.external_id }}，生日快乐！{% if coupon %}送您 {{ coupon.value }} "
            "优惠券 {{ coupon.code }}，{{ coupon.expiry }} 前有效。{% endif %}",
        ),
    ),
    "winback-offer": (
        (
            "We miss you",
            "It has been a while, {{ member.external_id }}. {% if coupon %}"
            "Come back with code {{ coupon.code }} ({{ coupon.value }} off).{% endif %}",
        ),
        (
            "好久不见",
            "{{ member.external_id }}，好久不见！{% if coupon %}回来看看吧，优惠码 "
            "{{ coupon.code }}。{% endif %}",
        ),
    ),
}


def run_demo_campaigns(engine: Engine, echo: Any = click.echo) -> dict[str, Any]:
    """A birthday and a win-back campaign on the demo data, run now; prints the decisions."""
    echo("\nCampaigns (birthday in the next 7 days; win-back of at-risk and dormant members):")
    with Session(engine) as s, s.begin():
        return demo_campaigns(s, datetime.now(UTC), echo)


def demo_campaigns(s: Session, now: datetime, echo: Any = click.echo) -> dict[str, Any]:
    """Create (once) and run the demo campaigns in the caller's transaction."""
    from campaigns import coupons, service
    from campaigns.channels.config import CHANNELS
    from campaigns.models import Campaign
    from campaigns.ready_made import birthday_coupon, win_back
    from campaigns.runs import run_campaign
    from campaigns.templates import save_variant, template_exists

    results: dict[str, Any] = {}
    for name, ((en_subject, en_body), (zh_subject, zh_body)) in DEMO_TEMPLATES.items():
        if not template_exists(s, name):
            for channel in CHANNELS:
                save_variant(s, name, channel, "en", subject=en_subject, body=en_body, actor="demo")
                save_variant(
                    s, name, channel, "zh-CN", subject=zh_subject, body=zh_body, actor="demo"
                )
    for code, amount in (("DEMO-BDAY-10", "10.00"), ("DEMO-WINBACK-5", "5.00")):
        if coupons.get_template(s, code) is None:
            coupons.create_template(
                s,
                {
                    "code": code,
                    "name": code,
                    "kind": "amount",
                    "amount_off": Decimal(amount),
                    "valid_days": 30,
                },
                actor="demo",
                default_timezone=DEMO_TZ,
                currency=DEMO_CURRENCY,
            )
    s.flush()
    definitions = [
        birthday_coupon(
            "demo-birthday",
            coupon_template="DEMO-BDAY-10",
            message_template="birthday-offer",
            budget_value="2000",
        ),
        win_back(
            "demo-win-back",
            coupon_template="DEMO-WINBACK-5",
            message_template="winback-offer",
            budget_value="5000",
        ),
    ]
    for definition in definitions:
        row = s.scalar(select(Campaign).where(Campaign.name == definition["name"]))
        if row is None:
            created = service.create_campaign(
                s, definition, actor="demo", approval_budget=Decimal(10_000)
            )
            service.activate(s, created["id"], actor="demo")
            campaign_id = created["id"]
        else:
            campaign_id = row.id
        counts = run_campaign(
            s, campaign_id, run_key=f"demo:{now.date()}", now=now, trigger="schedule"
        )
        results[definition["name"]] = counts
        suppressed = ", ".join(
            f"{k.removeprefix('reason_')} {v}" for k, v in counts.items() if k.startswith("reason_")
        )
        echo(
            f"  {definition['name']:<14} qualified {counts.get('qualified', 0):>5}, coupons "
            f"{counts.get('coupons', 0):>5}, messages {counts.get('messages', 0):>5}"
            + (f"; suppressed: {suppressed}" if suppressed else "")
            + (" (already run today)" if counts.get("replayed") else "")
        )
    return results


def deliver_demo_messages(engine: Engine, redis_url: str, echo: Any = click.echo) -> list[Any]:
    """Deliver what the demo campaigns queued to the log channel and print a summary."""
    from campaigns.channels.config import CHANNELS, MessagingConfig
    from campaigns.dispatch import deliver_now, outbox_summary
    from campaigns.templates import save_variant, template_exists
    from service.redis_client import make_redis

    with Session(engine) as s, s.begin():
        for name, ((en_subject, en_body), (zh_subject, zh_body)) in DEMO_TEMPLATES.items():
            if template_exists(s, name):
                continue
            for channel in CHANNELS:
                save_variant(s, name, channel, "en", subject=en_subject, body=en_body, actor="demo")
                save_variant(
                    s, name, channel, "zh-CN", subject=zh_subject, body=zh_body, actor="demo"
                )
    echo("\nDelivering queued messages (log channel; contact policy applies)…")
    totals = deliver_now(engine, make_redis(redis_url), MessagingConfig.from_env())
    rows = outbox_summary(engine)
    if not rows:
        echo("  no messages were queued")
    for row in rows:
        reason = f" ({row['reason']})" if row["reason"] else ""
        echo(f"  {row['status']:<10} {row['channel']:<11} {row['n']:>6}{reason}")
    echo(f"  dispatched {totals['messages']} messages in {totals['jobs']} jobs")
    return rows


def run_demo(port: int = 8000, serve: bool = True) -> None:
    """Start, load, report and serve."""
    from service import embedded, migrate
    from service.auth import create_key
    from service.db import make_engine

    os.environ.setdefault("PATRON_CURRENCY", DEMO_CURRENCY)
    # CDNOW's days are New York days: score them there (RFM recency, lifecycle, windows).
    os.environ.setdefault("PATRON_TIMEZONE", DEMO_TZ)
    click.echo("Patron demo — starting PostgreSQL and Redis (embedded unless configured)…")
    config = embedded.resolve(Config.from_env())
    embedded.export_env(config)
    engine = make_engine(config)
    migrate.upgrade(engine)
    click.echo("Loading the CDNOW sample (2,357 customers, 6,919 purchases, 1997–98):")
    load(engine)
    facts = summary(engine)
    click.echo(
        f"\n{facts['members']:,} members, {facts['transactions']:,} transactions, "
        f"revenue {facts['revenue']:,} {DEMO_CURRENCY}, {facts['repeat_buyers']:,} repeat buyers."
    )
    click.echo("Top customers by net spend:")
    for ext, count, spend in facts["top"]:
        click.echo(f"  {ext:<12} {count:>3} purchases  {spend:>9} {DEMO_CURRENCY}")
    show_segments(engine)
    run_demo_campaigns(engine)
    assert config.redis_url is not None
    deliver_demo_messages(engine, config.redis_url)
    with Session(engine) as s, s.begin():
        admin = create_key(s, "admin", "demo-admin")
        pos = create_key(s, "pos", "demo-pos", DEMO_STORE)
        s.execute(text("SELECT 1"))
    base = f"http://127.0.0.1:{port}"
    click.echo(
        f"\nData folder: {config.data_dir}\n"
        f"API:         {base}\n"
        f"Docs:        {base}/docs   (OpenAPI: {base}/openapi.json)\n"
        f"Admin key:   {admin}\n"
        f"POS key:     {pos}\n\n"
        "Try:\n"
        f"  curl -H 'Authorization: Bearer {admin}' {base}/v1/members/CDNOW-0001/profile\n"
        f"  curl -H 'Authorization: Bearer {pos}' -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"member_id": "CDNOW-0001", "transaction_id": "DEMO-1", '
        f'"amount": "19.99", "currency": "{DEMO_CURRENCY}", "store": "{DEMO_STORE}", '
        f'"channel": "ecom", "occurred_at": "2026-11-01T10:00:00-05:00"}}\' \\\n'
        f"       {base}/v1/events/purchases\n"
    )
    engine.dispose()
    if serve:
        from service.gunicorn_app import run

        click.echo("Serving (Ctrl-C to stop; `patron embedded stop` stops the databases).")
        run(host="127.0.0.1", port=port, workers=2)
