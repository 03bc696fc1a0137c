"""`patron demo`: embedded servers, the CDNOW sample loaded, the API served, keys printed."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from datetime import date
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
                    "locale": "en",
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


def run_demo(port: int = 8000, serve: bool = True) -> None:
    """Start, load, report and serve."""
    from service import embedded, migrate
    from service.auth import create_key
    from service.db import make_engine

    os.environ.setdefault("PATRON_CURRENCY", DEMO_CURRENCY)
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
