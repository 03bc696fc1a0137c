"""Campaign benchmarks: a scheduled batch run over ~200k members, and event campaigns.

**Batch** (this script): on a database loaded with generated data (``python -m
bench.generate`` + ``patron import``), one scheduled coupon + message campaign whose
audience is a set of regions (South and Central: 210,544 of the 1M generated members),
run with `campaigns.runs.run_campaign` and committed, timed end to end:

1. run key ``<tag>-1``: everyone in the audience qualifies (decision, grant, coupon,
   outbox message per member);
2. run key ``<tag>-2`` (same year, cap once per year): everyone is ``cap_reached``
   (a suppressed decision per member, nothing else).

Each SQL statement of a run is timed (SQLAlchemy cursor events) so the report says which
one dominates. ``--explain`` then repeats the first run on a fresh campaign inside a
transaction that is rolled back, with ``auto_explain`` (``log_analyze``, nested
statements, logged at NOTICE level to this client) and writes every plan to
``bench/out/bench_campaigns_explain.txt``. ``--condition`` adds a second campaign whose
audience is everybody and whose condition selects about 20% (the other 80% get a
``condition_failed`` decision: one decision row per member).

    python -m bench.bench_campaigns postgresql://postgres@127.0.0.1:5432/patron_h5_bench
    python -m bench.bench_campaigns URL --explain --condition
    python -m bench.bench_campaigns URL --decision-inserts 300   # purchase path's INSERT

``--decision-inserts N`` only compares three ways of writing one purchase's 20 decisions
(Python CPU and wall time, rolled back; needs 20 campaigns in the database).

**Purchase endpoint with 20 event campaigns**: `bench/bench_purchase.py --campaigns 20`
calls `install_purchase_campaigns` below on its seeded database before starting the
servers (the definitions are in `PURCHASE_CAMPAIGNS`).

Results are printed and written to bench/out/bench_campaigns.json. Every campaign,
template and run is named with a time tag, so the script can run again on the same
database (earlier runs' rows stay; they do not overlap with later ones).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session

from campaigns import coupons as coupon_service
from campaigns import service as campaign_service
from campaigns.runs import run_campaign
from campaigns.templates import save_variant
from service.db import normalise_url

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
APPROVAL_BUDGET = Decimal("10000")  # PATRON_APPROVAL_BUDGET's default
AUTHOR = "bench-marketer"
APPROVER = "bench-approver"
# Inside the generated data's period (2024-01-01 .. 2026-11-01), a Monday morning in China.
BATCH_NOW = datetime(2026, 10, 26, 1, 0, tzinfo=UTC)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Setting campaigns up through the services (as the API would), committed
# --------------------------------------------------------------------------------------


def coupon_template(session: Session, code: str, amount: str, days: int = 30) -> str:
    coupon_service.create_template(
        session,
        {
            "code": code,
            "name": f"{amount} off",
            "kind": "amount",
            "amount_off": Decimal(amount),
            "valid_days": days,
        },
        actor=AUTHOR,
        default_timezone="Asia/Shanghai",
        currency="CNY",
    )
    return code


def message_template(session: Session, name: str) -> str:
    # One variant per consented channel the engine may pick, so every message renders.
    for channel in ("email", "sms", "push", "wechat"):
        for locale in ("zh-CN", "en"):
            save_variant(
                session,
                name,
                channel,
                locale,
                subject="For you" if channel == "email" else "",
                body="Hi {{ member.name }}, a gift for you",
                actor=AUTHOR,
            )
    return name


def make_active(session: Session, definition: dict[str, Any]) -> int:
    """Create, activate and (when four-eyes applies) approve by a second person."""
    created = campaign_service.create_campaign(
        session, definition, actor=AUTHOR, approval_budget=APPROVAL_BUDGET
    )
    state = campaign_service.activate(session, created["id"], actor=AUTHOR)
    if state["status"] == "pending_approval":
        state = campaign_service.approve(session, created["id"], actor=APPROVER, note="bench")
    assert state["status"] == "active", state
    return int(created["id"])


def batch_definition(name: str, coupon: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "coupon",
        "trigger": {"type": "schedule", "daily_at": "09:00"},
        "actions": {"coupon": {"template": coupon}, "message": {"template": message}},
        "cap": {"per": "year"},
        "budget": {"coupons": 1_000_000},
        **extra,
    }


# --------------------------------------------------------------------------------------
# 20 purchase-triggered campaigns for bench_purchase.py --campaigns N
# --------------------------------------------------------------------------------------

# For bench_purchase.py's seed: stores S001..S050 in regions R1..R5 (store g is in
# region 1 + g % 5), members with purchase_count 3, net_spend 300, last purchase 30 days
# ago, a third with e-mail consent, nobody with SMS consent or a tier; purchases of a
# uniform 1.00..999.99 with one apparel item at a random store, channel pos.
# "actions": c = coupon, m = message, cm = both. Expected per purchase: ~20 decisions,
# about 1-2 qualified (coupon and/or message), the rest suppressed for every reason the
# engine has (condition, holdout, cap, exclusivity, no consent, audience, budget).
PURCHASE_CAMPAIGNS: list[dict[str, Any]] = [
    {"condition": "event.amount >= 900", "actions": "c", "cap": "day", "budget": 2000},
    {
        "condition": 'event.amount >= 500 and event.region in ("R1", "R2")',
        "actions": "c",
        "group": ("spend", 10),
    },
    {"condition": "event.amount >= 300", "actions": "c", "group": ("spend", 5)},
    {
        "condition": 'event.amount >= 200 and event.store in ("S001", "S002", "S003", "S004")',
        "actions": "c",
        "value_budget": "50000.00",
    },
    {"condition": "consent.email = true and event.amount >= 600", "actions": "cm", "holdout": "10"},
    {"condition": "event.amount >= 950", "actions": "m", "channel": "email", "cap": "week"},
    {"condition": "event.amount >= 100", "actions": "m", "channel": "sms"},  # no SMS consent
    {"condition": "purchase_count >= 50", "actions": "c"},
    {"condition": "net_spend >= 20000", "actions": "c"},
    {"condition": "event.amount >= 50", "actions": "c", "audience": {"stores": ["S001", "S002"]}},
    {"condition": "event.amount >= 400", "actions": "c", "audience": {"regions": ["R3"]}},
    {"condition": "event.amount >= 700", "actions": "cm", "budget": 500},
    {
        "condition": 'event.item_categories contains "apparel" and event.amount >= 850',
        "actions": "c",
    },
    {"condition": "days_since_last_purchase >= 25 and event.amount >= 750", "actions": "c"},
    {"condition": "event.amount >= 990", "actions": "c", "cap": "lifetime"},
    {"condition": 'event.channel = "ecom"', "actions": "c"},
    {"condition": 'tier = "gold" and event.amount >= 100', "actions": "c"},
    {"condition": "age >= 30 and event.amount >= 200", "actions": "c"},
    {"condition": 'tags contains "vip"', "actions": "cm"},
    {"condition": "spend_30d >= 1000 and event.amount >= 100", "actions": "c"},
]


def purchase_definitions(tag: str, n: int, coupon: str, message: str) -> list[dict[str, Any]]:
    """The first n of PURCHASE_CAMPAIGNS as campaign definitions (cycled when n > 20)."""
    out = []
    for i in range(n):
        spec = PURCHASE_CAMPAIGNS[i % len(PURCHASE_CAMPAIGNS)]
        actions: dict[str, Any] = {}
        if "c" in spec["actions"]:
            actions["coupon"] = {"template": coupon}
        if "m" in spec["actions"]:
            actions["message"] = {"template": message}
            if spec.get("channel"):
                actions["message"]["channel"] = spec["channel"]
        d: dict[str, Any] = {
            "name": f"bench-p{tag}-{i + 1:02d}",
            "kind": "coupon" if "coupon" in actions else "custom",
            "trigger": {"type": "purchase"},
            "condition": spec["condition"],
            "actions": actions,
            "cap": {"per": spec.get("cap", "evaluation")},
            "priority": 100 - i,
        }
        if "group" in spec:
            d["exclusivity_group"], d["priority"] = spec["group"]
        if "budget" in spec:
            d["budget"] = {"coupons": spec["budget"]}
        if "value_budget" in spec:
            d["budget"] = {"value": spec["value_budget"]}
        if "holdout" in spec:
            d["holdout_percent"] = spec["holdout"]
        if "audience" in spec:
            d["audience"] = spec["audience"]
        out.append(d)
    return out


def install_purchase_campaigns(db_url: str, n: int) -> list[int]:
    """Create and activate n purchase-triggered campaigns (committed); their ids."""
    engine = create_engine(normalise_url(db_url))
    tag = datetime.now(UTC).strftime("%H%M%S")
    try:
        with Session(engine) as session, session.begin():
            earlier = session.scalars(
                text("SELECT id FROM campaigns WHERE name LIKE 'bench-p%' AND status = 'active'")
            ).all()
            for campaign_id in earlier:  # a reused database (--keep-db): only these n run
                campaign_service.end(session, campaign_id, actor=AUTHOR)
            coupon = coupon_template(session, f"BENCH-P{tag}", "10.00")
            message = message_template(session, f"bench-p{tag}")
            return [make_active(session, d) for d in purchase_definitions(tag, n, coupon, message)]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------
# Timing statements
# --------------------------------------------------------------------------------------


class StatementTimer:
    """Wall time of every statement on an engine, keyed by its first words."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.active = False
        self.times: list[tuple[str, float]] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.active:
            elapsed = time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
            self.times.append((_label(statement), elapsed))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, float]]]:
        self.times = []
        self.active = True
        try:
            yield self.times
        finally:
            self.active = False


def _label(statement: str) -> str:
    """A short name for a statement: its first line of substance, squeezed."""
    words = " ".join(statement.split())
    if words.startswith("WITH d AS"):
        return "write: decisions -> coupons -> outbox (WITH d AS (INSERT INTO decisions ...))"
    if words.startswith("WITH g AS"):
        return "cap: INSERT campaign_grants ... UPDATE campaign_batch"
    if words.startswith("WITH x AS"):
        return "exclusivity: INSERT exclusivity_claims ..."
    if words.startswith("WITH over AS"):
        return "budget: mark over-budget members, delete their grants"
    if words.startswith("INSERT INTO campaign_batch"):
        return "candidates: INSERT INTO campaign_batch SELECT ... (audience, checks)"
    return words[:90]


def _machine_busy() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# The batch benchmark
# --------------------------------------------------------------------------------------


def _checkpoint(engine: Engine) -> None:
    # Start each timed run with clean shared buffers' dirty pages written, so a
    # checkpoint left over from the previous step does not land inside it.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CHECKPOINT"))


def _proc_cpu(pid: int) -> float:
    """utime + stime of a local process in seconds (the database backend of the run)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_run(
    engine: Engine, timer: StatementTimer, campaign_id: int, run_key: str
) -> dict[str, Any]:
    """run_campaign + commit in one session; wall seconds, statement times, CPU and WAL.

    CPU: the run's database backend (PostgreSQL on the same machine), this process, and
    everything else on the machine ("other", the neighbours' share of the two cores).
    """
    _checkpoint(engine)
    load_before = os.getloadavg()[0]
    with timer.recording() as statements, Session(engine) as session:
        backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        wal0 = session.execute(text("SELECT pg_current_wal_lsn()")).scalar_one()
        cpu0, own0 = _proc_cpu(backend), time.process_time()
        busy0, started = _machine_busy(), time.perf_counter()
        counts = run_campaign(
            session, campaign_id, run_key=run_key, now=BATCH_NOW, trigger="schedule"
        )
        before_commit = time.perf_counter()
        session.commit()
        finished = time.perf_counter()
        db_cpu, own = _proc_cpu(backend) - cpu0, time.process_time() - own0
        busy = _machine_busy() - busy0
        wal = session.execute(
            text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:w AS pg_lsn))"), {"w": wal0}
        ).scalar_one()
    wall = finished - started
    by_label: dict[str, float] = defaultdict(float)
    for label, seconds in statements:
        by_label[label] += seconds
    top = sorted(by_label.items(), key=lambda kv: -kv[1])
    return {
        "run_key": run_key,
        "seconds": round(wall, 2),
        "commit_seconds": round(finished - before_commit, 2),
        "counts": counts,
        "statements": len(statements),
        "statement_seconds": [{"statement": k, "seconds": round(v, 3)} for k, v in top[:8]],
        "db_backend_cpu_seconds": round(db_cpu, 2),
        "client_cpu_seconds": round(own, 2),
        "other_cores": round(max(0.0, busy - db_cpu - own) / wall, 2),
        "wal_mb": round(float(wal) / 1e6, 1),
        "load_average_before": round(load_before, 2),
    }


def rows_of(engine: Engine, campaign_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT (SELECT count(*) FROM decisions WHERE campaign_id = :c) AS decisions,
                       (SELECT count(*) FROM decisions
                        WHERE campaign_id = :c AND outcome = 'qualified') AS qualified,
                       (SELECT count(*) FROM coupons WHERE campaign_id = :c) AS coupons,
                       (SELECT count(*) FROM outbox_messages WHERE campaign_id = :c) AS messages,
                       (SELECT count(*) FROM campaign_grants WHERE campaign_id = :c) AS grants,
                       (SELECT issued_coupons FROM campaigns WHERE id = :c) AS issued
                """
            ),
            {"c": campaign_id},
        ).one()
    return dict(row._mapping)


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def explain_run(engine: Engine, definition: dict[str, Any], out: Path) -> dict[str, Any]:
    """The first run of a fresh copy of the campaign, every statement's plan, rolled back."""
    _checkpoint(engine)
    # SQLAlchemy's psycopg2 dialect drains the notices after every statement and logs
    # each at INFO on this logger: collect them there.
    notices: list[str] = []
    collector = _Collect(notices)
    pg_log = logging.getLogger("sqlalchemy.dialects.postgresql")
    level = pg_log.level
    pg_log.addHandler(collector)
    pg_log.setLevel(logging.INFO)
    try:
        counts, seconds = _explained(engine, definition)
    finally:
        pg_log.removeHandler(collector)
        pg_log.setLevel(level)
    out.write_text(
        f"# run_campaign with auto_explain (log_analyze), {seconds:.2f} s, rolled back\n"
        f"# counts: {json.dumps(counts)}\n\n" + "\n".join(notices)
    )
    return {"seconds": round(seconds, 2), "plans": len(notices), "file": str(out)}


def _explained(engine: Engine, definition: dict[str, Any]) -> tuple[dict[str, Any], float]:
    with Session(engine) as session:
        session.execute(text("LOAD 'auto_explain'"))
        for setting, value in (
            ("auto_explain.log_min_duration", "50"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_buffers", "on"),
            ("auto_explain.log_triggers", "on"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_level", "notice"),
        ):
            session.execute(text(f"SET LOCAL {setting} = '{value}'"))
        campaign_id = make_active(session, definition)
        started = time.perf_counter()
        counts = run_campaign(
            session, campaign_id, run_key="explain", now=BATCH_NOW, trigger="schedule"
        )
        seconds = time.perf_counter() - started
        session.rollback()
    return counts, seconds


# --------------------------------------------------------------------------------------
# The purchase path's decision insert: how it is written vs. two alternatives
# --------------------------------------------------------------------------------------

_UNNEST_DECISIONS = text(
    """
    INSERT INTO decisions (campaign_id, campaign_version, member_id, period, trigger, outcome,
                           reason, rule_hash, detail, transaction_id, decided_at)
    SELECT c, v, :m, :p, 'purchase', o, r, h, CAST(d AS jsonb), NULL, :now
    FROM unnest(CAST(:c AS bigint[]), CAST(:v AS int[]), CAST(:o AS text[]),
                CAST(:r AS text[]), CAST(:h AS text[]), CAST(:d AS text[])) AS u(c, v, o, r, h, d)
    ON CONFLICT ON CONSTRAINT uq_decisions_evaluation DO NOTHING
    RETURNING campaign_id, id
    """
)


def decision_inserts(engine: Engine, n: int) -> dict[str, Any]:
    """Python CPU and wall time of writing one purchase's 20 decisions, three ways.

    "multi-VALUES" is what `campaigns.engine._write_decisions` does (a new INSERT ... VALUES
    of 20 rows, compiled by SQLAlchemy and planned by PostgreSQL on every call);
    "executemany" passes the rows as parameters of one cached INSERT (SQLAlchemy's
    insertmanyvalues); "unnest" sends six arrays to one fixed statement. Each way runs n
    times in a transaction that is rolled back.
    """
    from sqlalchemy.dialects.postgresql import insert

    from campaigns.models import Decision

    with engine.connect() as conn:
        ids = list(conn.scalars(text("SELECT id FROM campaigns ORDER BY id LIMIT 20")))
    if len(ids) < 20:
        raise SystemExit("--decision-inserts needs 20 campaigns in the database")
    now = datetime.now(UTC)
    detail = {"explanation": {"outcome": False, "rule_text": "event.amount >= 900"}}

    def rows(member: int, period: str) -> list[dict[str, Any]]:
        return [
            {
                "campaign_id": cid,
                "campaign_version": 1,
                "member_id": member,
                "period": period,
                "trigger": "purchase",
                "outcome": "suppressed",
                "reason": "condition_failed",
                "rule_hash": "0" * 64,
                "detail": detail,
                "transaction_id": None,
                "decided_at": now,
            }
            for cid in ids
        ]

    many = (
        insert(Decision)
        .on_conflict_do_nothing(constraint="uq_decisions_evaluation")
        .returning(Decision.campaign_id, Decision.id, sort_by_parameter_order=True)
    )

    def multi_values(session: Session, i: int) -> int:
        stmt = (
            insert(Decision)
            .values(rows(i, f"bench-mv-{i}"))
            .on_conflict_do_nothing(constraint="uq_decisions_evaluation")
            .returning(Decision.campaign_id, Decision.id)
        )
        return len(session.execute(stmt).all())

    def executemany(session: Session, i: int) -> int:
        return len(session.execute(many, rows(i, f"bench-em-{i}")).all())

    def unnest(session: Session, i: int) -> int:
        rs = rows(i, f"bench-un-{i}")
        params = {
            "m": i,
            "p": f"bench-un-{i}",
            "now": now,
            "c": [r["campaign_id"] for r in rs],
            "v": [r["campaign_version"] for r in rs],
            "o": [r["outcome"] for r in rs],
            "r": [r["reason"] for r in rs],
            "h": [r["rule_hash"] for r in rs],
            "d": [json.dumps(r["detail"]) for r in rs],
        }
        return len(session.execute(_UNNEST_DECISIONS, params).all())

    with engine.connect() as conn:
        members = list(conn.scalars(text("SELECT id FROM members ORDER BY id LIMIT :n"), {"n": n}))
    results: dict[str, Any] = {}
    # Twice, taking turns, so a change in the machine's load falls on all three.
    for _ in range(2):
        for name, fn in (
            ("multi-VALUES", multi_values),
            ("executemany", executemany),
            ("unnest", unnest),
        ):
            with Session(engine) as session:
                fn(session, members[0])  # warm: connection, compiled cache, plan
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for member in members[1:]:
                    assert fn(session, member) == 20
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                session.rollback()
            per = len(members) - 1
            best = results.get(name)
            entry = {
                "python_cpu_ms": round(cpu / per * 1000, 2),
                "wall_ms": round(wall / per * 1000, 2),
            }
            if best is None or entry["wall_ms"] < best["wall_ms"]:
                results[name] = entry
    return {"calls": len(members) - 1, "load_average": round(os.getloadavg()[0], 1), **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("db", help="database URL with generated members loaded")
    parser.add_argument(
        "--regions", default="South,Central", help="audience regions (comma-separated)"
    )
    parser.add_argument("--explain", action="store_true", help="also write auto_explain plans")
    parser.add_argument(
        "--condition",
        action="store_true",
        help="also run a campaign over all members with a ~20%% condition",
    )
    parser.add_argument(
        "--condition-rule",
        default="purchase_count >= 6",
        help="the condition of --condition (tune to ~20%% of members)",
    )
    parser.add_argument(
        "--decision-inserts",
        type=int,
        metavar="N",
        help="only compare three ways of writing a purchase's 20 decisions, N times each",
    )
    args = parser.parse_args(argv)

    OUT.mkdir(parents=True, exist_ok=True)
    engine = create_engine(normalise_url(args.db))
    if args.decision_inserts:
        result = decision_inserts(engine, args.decision_inserts + 1)
        print(json.dumps(result, indent=2))
        (OUT / "bench_campaigns_inserts.json").write_text(json.dumps(result, indent=2))
        return 0
    timer = StatementTimer(engine)
    tag = datetime.now(UTC).strftime("%m%d%H%M%S")
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]

    with engine.connect() as conn:
        members = conn.scalar(text("SELECT count(*) FROM members WHERE status = 'active'"))
        audience = conn.scalar(
            text(
                "SELECT count(*) FROM members m JOIN stores s ON s.id = m.home_store_id "
                "JOIN regions r ON r.id = s.region_id "
                "WHERE m.status = 'active' AND r.code = ANY(:r)"
            ),
            {"r": regions},
        )
        transactions = conn.scalar(text("SELECT count(*) FROM transactions"))
    _log(f"{members:,} members, {transactions:,} transactions; audience {regions}: {audience:,}")

    with Session(engine) as session, session.begin():
        coupon = coupon_template(session, f"BENCH-B{tag}", "20.00")
        message = message_template(session, f"bench-b{tag}")
        definition = batch_definition(
            f"bench-batch-{tag}", coupon, message, audience={"regions": regions}
        )
        campaign_id = make_active(session, definition)

    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.bench_campaigns", *(argv or sys.argv[1:])]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "members": members,
        "transactions": transactions,
        "audience": {"regions": regions, "members": audience},
        "runs": [],
    }
    for n in (1, 2):
        result = timed_run(engine, timer, campaign_id, f"{tag}-{n}")
        report["runs"].append(result)
        c = result["counts"]
        _log(
            f"run {n}: {result['seconds']:.2f} s (commit {result['commit_seconds']:.2f} s), "
            f"decisions {c.get('decisions')}, qualified {c.get('qualified')}, "
            f"coupons {c.get('coupons')}, messages {c.get('messages')}, "
            f"cap_reached {c.get('reason_cap_reached', 0)}; backend CPU "
            f"{result['db_backend_cpu_seconds']} s, WAL {result['wal_mb']} MB, "
            f"other load {result['other_cores']} cores"
        )
        for s in result["statement_seconds"][:5]:
            _log(f"    {s['seconds']:7.3f} s  {s['statement']}")
    report["rows"] = rows_of(engine, campaign_id)
    _log(f"rows of the campaign after both runs: {report['rows']}")

    if args.condition:
        with Session(engine) as session, session.begin():
            cond_id = make_active(
                session,
                batch_definition(
                    f"bench-cond-{tag}", coupon, message, condition=args.condition_rule
                ),
            )
        result = timed_run(engine, timer, cond_id, f"{tag}-c1")
        result["condition"] = args.condition_rule
        report["condition_run"] = result
        c = result["counts"]
        _log(
            f"condition run ({args.condition_rule}): {result['seconds']:.2f} s, "
            f"decisions {c.get('decisions')}, qualified {c.get('qualified')}, "
            f"coupons {c.get('coupons')}, messages {c.get('messages')}; backend CPU "
            f"{result['db_backend_cpu_seconds']} s, other load {result['other_cores']} cores"
        )
        for s in result["statement_seconds"][:5]:
            _log(f"    {s['seconds']:7.3f} s  {s['statement']}")

    if args.explain:
        report["explain"] = explain_run(
            engine,
            batch_definition(
                f"bench-explain-{tag}", coupon, message, audience={"regions": regions}
            ),
            OUT / "bench_campaigns_explain.txt",
        )
        _log(f"explained run: {report['explain']}")

    (OUT / "bench_campaigns.json").write_text(json.dumps(report, indent=2, default=str))
    _log(f"written {OUT / 'bench_campaigns.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
