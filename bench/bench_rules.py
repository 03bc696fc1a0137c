"""Rule language benchmark: the compiled Python predicate and the SQL count over 1M members.

Python (no database needed): one 10-leaf member rule evaluated over 10,000
synthetic members, measured side by side in this process against

- **json-walker**: the baseline the issue asks for — an interpreter that walks the
  stored JSON tree on every evaluation (dispatching on the operator, reading the
  field and turning the JSON value into a Decimal / list / ... each time);
- **typed-walker**: a fairer interpreter that walks the already validated tree
  (typed values, no per-evaluation parsing), to show what compiling itself buys.

All three must return the same answer for every member (checked) and follow the
same missing-value semantics.

SQL: the same rule through `rules.count_query` over N members (default 1,000,000)
in its own database (`patron_bench_rules`, created and loaded on first run):
members from `python -m bench.generate` output when present (COPY of
members.csv), otherwise generated with generate_series; member statistics are
synthetic (seeded). Timing is the best of several runs after one warm-up, and
the `EXPLAIN (ANALYZE, BUFFERS)` plan is printed.

    python -m bench.bench_rules                    # both parts
    python -m bench.bench_rules --python-only
    python -m bench.bench_rules --members 1000000 --members-csv /tmp/patron-gen-1m/members.csv

Results go to stdout (markdown) and bench/out/bench_rules.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rules import Rule, Scope, Vocabulary, compile_py, count_query, parse_rule
from rules.ast import All, AnyOf, Leaf, Node, Not, leaves
from rules.calendar import days_to_anniversary, local_today
from rules.vocabulary import FieldType
from service.vocabulary import default_vocabulary

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
NOW = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)

# The same ten leaves joined by `or` and tuned to match few members, so PostgreSQL must
# evaluate every leaf on nearly every row: the worst case for the SQL compiler.
RULE_WIDE = (
    "age between 25 and 30 or birth_date anniversary within next 7 days "
    "or days_since_last_purchase between 30 and 31 or net_spend > 2990 "
    'or region = "Nowhere" or tags contains "nothing" or tier = "platinum" '
    'or locale starts with "fr" or purchase_count >= 30 or last_purchase_at within last 1 days'
)
RULE = (
    'gender in ("female", "other") and age between 25 and 45 and consent.sms = true '
    "and net_spend > 500 and purchase_count >= 3 and days_since_last_purchase >= 30 "
    'and region in ("East", "North") and not tags contains "staff" '
    'and tier != "blocked" and locale starts with "zh"'
)

# --------------------------------------------------------------------------------------
# Baselines: tree-walking interpreters with the same semantics
# --------------------------------------------------------------------------------------


def _read(vocab: Vocabulary, name: str, member: Mapping[str, Any], now: datetime) -> Any:
    f = vocab.get(name)
    if f is None:
        raise KeyError(name)
    if f.py is not None:
        return f.py(member, now)
    return member.get(f.fact_key)


def _coerce(ftype: FieldType, raw: Any) -> Any:
    """What an interpreter over stored JSON must do on every evaluation."""
    if isinstance(raw, list):
        return [_coerce(ftype, r) for r in raw]
    if ftype in (FieldType.MONEY, FieldType.DECIMAL):
        return Decimal(str(raw))
    if ftype is FieldType.DATE:
        return date.fromisoformat(raw)
    if ftype is FieldType.DATETIME:
        return datetime.fromisoformat(raw)
    return raw


def _test(op: str, actual: Any, value: Any, listy: bool, today: Callable[[], date]) -> bool:
    if op == "is_set":
        return bool(actual) if listy else actual is not None
    if op == "is_not_set":
        return not actual if listy else actual is None
    if actual is None:
        return False
    if op == "eq":
        return bool(actual == value)
    if op == "ne":
        return bool(actual != value)
    if op == "lt":
        return bool(actual < value)
    if op == "le":
        return bool(actual <= value)
    if op == "gt":
        return bool(actual > value)
    if op == "ge":
        return bool(actual >= value)
    if op == "between":
        return bool(value[0] <= actual <= value[1])
    if op == "in":
        return actual in value
    if op == "not_in":
        return actual not in value
    if op == "contains":
        return value in actual
    if op == "contains_any":
        return any(v in actual for v in value)
    if op == "contains_all":
        return all(v in actual for v in value)
    if op == "starts_with":
        return bool(actual.startswith(value))
    if op == "anniversary_within_next_days":
        return days_to_anniversary(actual, today()) <= value
    raise ValueError(f"baseline does not implement {op}")


def json_walker(
    node: Mapping[str, Any], vocab: Vocabulary, member: Mapping[str, Any], now: datetime
) -> bool:
    """The naive interpreter: walk the stored JSON tree on every evaluation."""
    # Explicit loops rather than all()/any() over generators: faster in CPython, so the
    # baselines are not handicapped.
    if "all" in node:
        for child in node["all"]:  # noqa: SIM110
            if not json_walker(child, vocab, member, now):
                return False
        return True
    if "any" in node:
        for child in node["any"]:  # noqa: SIM110
            if json_walker(child, vocab, member, now):
                return True
        return False
    if "not" in node:
        return not json_walker(node["not"], vocab, member, now)
    f = vocab.get(node["field"])
    if f is None:
        raise KeyError(node["field"])
    actual = _read(vocab, node["field"], member, now)
    value = _coerce(f.type, node.get("value"))
    listy = f.type is FieldType.STRING_LIST
    return _test(node["op"], actual, value, listy, lambda: local_today(member.get("timezone"), now))


def typed_walker(node: Node, vocab: Vocabulary, member: Mapping[str, Any], now: datetime) -> bool:
    """A better interpreter: walk the validated tree, values already typed."""
    if isinstance(node, All):
        for child in node.children:  # noqa: SIM110
            if not typed_walker(child, vocab, member, now):
                return False
        return True
    if isinstance(node, AnyOf):
        for child in node.children:  # noqa: SIM110
            if typed_walker(child, vocab, member, now):
                return True
        return False
    if isinstance(node, Not):
        return not typed_walker(node.child, vocab, member, now)
    leaf: Leaf = node
    f = vocab.get(leaf.field)
    if f is None:
        raise KeyError(leaf.field)
    actual = _read(vocab, leaf.field, member, now)
    listy = f.type is FieldType.STRING_LIST
    return _test(
        leaf.op.value,
        actual,
        leaf.value,
        listy,
        lambda: local_today(member.get("timezone"), now),
    )


# --------------------------------------------------------------------------------------
# Python predicate benchmark
# --------------------------------------------------------------------------------------


def synthetic_members(n: int, seed: int, *, all_pass: bool = False) -> list[dict[str, Any]]:
    """Members shaped like load_member_facts() output; `all_pass` makes every leaf true."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        born = date(1960, 1, 1) + timedelta(days=rng.randrange(0, 20_000))
        if all_pass:
            born = date(1990, 1, 1) + timedelta(days=rng.randrange(0, 3_000))
        member: dict[str, Any] = {
            "gender": "female" if all_pass else rng.choice(("female", "male", "other", None)),
            "birth_date": born if all_pass or rng.random() < 0.8 else None,
            "timezone": rng.choice(("Asia/Shanghai", "Asia/Shanghai", "America/Los_Angeles")),
            "locale": "zh-CN" if all_pass or rng.random() < 0.8 else "en",
            "home_store": "S-1",
            "region": "East" if all_pass else rng.choice(("East", "North", "South", None)),
            "tags": [] if all_pass else rng.choice(([], ["vip"], ["staff"], ["a", "b"])),
            "tier": rng.choice(("gold", "silver") if all_pass else (None, "gold", "blocked")),
            "consent.sms": all_pass or rng.random() < 0.7,
            "purchase_count": rng.randrange(3, 40) if all_pass else rng.randrange(0, 40),
            "net_spend": Decimal(rng.randrange(50_001 if all_pass else 0, 500_000)) / 100,
            "last_purchase_at": NOW - timedelta(seconds=rng.randrange(31 * 86_400, 400 * 86_400))
            if all_pass or rng.random() < 0.9
            else None,
        }
        out.append(member)
    return out


def _rates(
    fns: dict[str, Callable[[Mapping[str, Any]], bool]], members: list[dict[str, Any]]
) -> dict[str, float]:
    """Evaluations per second of each function: the best of 7 passes over the population,
    the functions taking turns so a noisy neighbour slows them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(7):
        for name, fn in fns.items():
            started = time.perf_counter()
            for m in members:
                fn(m)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: len(members) / seconds for name, seconds in best.items()}


def bench_python(vocab: Vocabulary, rule: Rule, n: int) -> dict[str, Any]:
    compiled = compile_py(rule, vocab)
    check = compiled.at(NOW)
    tree = rule.to_json()
    results: dict[str, Any] = {"rule": RULE, "leaves": len(leaves(rule.root)), "members": n}
    for label, population in (
        ("mixed", synthetic_members(n, 1)),
        ("all leaves true", synthetic_members(n, 2, all_pass=True)),
    ):
        expected = [check(m) for m in population]
        for name, fn in (
            ("json-walker", lambda m: json_walker(tree, vocab, m, NOW)),
            ("typed-walker", lambda m: typed_walker(rule.root, vocab, m, NOW)),
        ):
            got = [fn(m) for m in population]
            if got != expected:
                raise SystemExit(f"{name} disagrees with the compiled predicate ({label})")
        rates = _rates(
            {
                "compiled": check,
                "json": lambda m: json_walker(tree, vocab, m, NOW),
                "typed": lambda m: typed_walker(rule.root, vocab, m, NOW),
            },
            population,
        )
        compiled_rate, json_rate, typed_rate = rates["compiled"], rates["json"], rates["typed"]
        results[label] = {
            "match_rate": sum(expected) / n,
            "compiled_per_s": round(compiled_rate),
            "json_walker_per_s": round(json_rate),
            "typed_walker_per_s": round(typed_rate),
            "speedup_vs_json_walker": round(compiled_rate / json_rate, 1),
            "speedup_vs_typed_walker": round(compiled_rate / typed_rate, 1),
        }
    started = time.perf_counter()
    for _ in range(10_000):
        compiled.at(NOW)
    results["bind_now_us"] = round((time.perf_counter() - started) / 10_000 * 1e6, 2)
    started = time.perf_counter()
    for _ in range(200):
        compile_py(rule, vocab)
    results["compile_ms"] = round((time.perf_counter() - started) / 200 * 1e3, 3)
    return results


# --------------------------------------------------------------------------------------
# SQL benchmark
# --------------------------------------------------------------------------------------

LOAD_MEMBERS_CSV = """
CREATE TEMP TABLE staging (
    external_id text, name text, gender text, birth_date text, phone text, email text,
    timezone text, locale text, home_store text, consent_email text, consent_sms text,
    consent_push text, consent_wechat text, tags text, attributes text
)
"""
INSERT_FROM_STAGING = """
INSERT INTO members (external_id, name, gender, birth_date, timezone, locale, home_store_id,
                     consent_email, consent_sms, consent_push, consent_wechat, tags, tier)
SELECT s.external_id, s.name, nullif(s.gender, ''), nullif(s.birth_date, '')::date,
       s.timezone, s.locale, st.id,
       s.consent_email = 'true', s.consent_sms = 'true', s.consent_push = 'true',
       s.consent_wechat = 'true',
       coalesce(string_to_array(nullif(s.tags, ''), ';'), '{}'),
       (ARRAY[NULL, NULL, NULL, 'silver', 'gold', 'blocked'])[1 + abs(hashtext(s.external_id)) %% 6]
FROM staging s LEFT JOIN stores st ON st.code = s.home_store
"""
SYNTHETIC_MEMBERS = """
INSERT INTO members (external_id, gender, birth_date, timezone, locale, home_store_id,
                     consent_email, consent_sms, consent_push, consent_wechat, tags, tier)
SELECT 'M-' || lpad(g::text, 8, '0'),
       (ARRAY['female', 'male', 'other', NULL])[1 + floor(random() * 4)::int],
       CASE WHEN random() < 0.8 THEN date '1950-01-01' + floor(random() * 20000)::int END,
       (ARRAY['Asia/Shanghai', 'Asia/Shanghai', 'Asia/Shanghai', 'Asia/Hong_Kong',
              'America/Los_Angeles', 'Europe/London'])[1 + floor(random() * 6)::int],
       (ARRAY['zh-CN', 'zh-CN', 'zh-CN', 'en'])[1 + floor(random() * 4)::int],
       (SELECT id FROM stores ORDER BY id OFFSET (g %% (SELECT count(*) FROM stores)) LIMIT 1),
       random() < 0.5, random() < 0.6, random() < 0.4, random() < 0.5,
       (ARRAY[ARRAY[]::text[], ARRAY['vip'], ARRAY['staff'], ARRAY['newsletter', 'student']])
           [1 + floor(random() * 4)::int],
       (ARRAY[NULL, NULL, NULL, 'silver', 'gold', 'blocked'])[1 + floor(random() * 6)::int]
FROM generate_series(1, %(n)s) g
"""
SYNTHETIC_STATS = """
INSERT INTO member_stats (member_id, first_purchase_at, last_purchase_at, purchase_count,
                          purchase_amount, refund_count, refund_amount, net_spend)
SELECT id, first_at, last_at, cnt, amount, refunds, refunded, amount - refunded
FROM (
    SELECT id,
           floor(-ln(1 - random()) * 6)::int + 1 AS cnt,
           round((random() * 3000)::numeric, 2) AS amount,
           (random() < 0.1)::int AS refunds,
           0::numeric AS refunded,
           %(now)s::timestamptz
               - make_interval(days => 400 + floor(random() * 600)::int) AS first_at,
           %(now)s::timestamptz - make_interval(secs => floor(random() * 400 * 86400)) AS last_at
    FROM members WHERE random() < 0.85
) s
"""


def _dsn(database: str) -> str:
    base = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/")
    return base.rstrip("/") + "/" + database


def prepare_database(database: str, n: int, members_csv: Path | None) -> None:
    import psycopg2
    from sqlalchemy import create_engine

    from service import migrate

    admin = psycopg2.connect(_dsn("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{database}"')
    admin.close()
    engine = create_engine(_dsn(database).replace("postgresql://", "postgresql+psycopg2://"))
    migrate.upgrade(engine)
    engine.dispose()
    conn = psycopg2.connect(_dsn(database))
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM members")
        have = cur.fetchone()[0]
        if have == n:
            print(f"[sql] reusing {n:,} members in {database}", file=sys.stderr)
            return
        print(f"[sql] loading {n:,} members into {database} ...", file=sys.stderr)
        started = time.perf_counter()
        cur.execute("TRUNCATE member_stats, transactions, members, stores, regions CASCADE")
        cur.execute("SELECT setseed(0.42)")
        stores_csv = members_csv.with_name("stores.csv") if members_csv else None
        if stores_csv is not None and stores_csv.exists():
            cur.execute("CREATE TEMP TABLE staging_stores (code text, name text, region text)")
            with stores_csv.open("rb") as fh:
                cur.copy_expert("COPY staging_stores FROM STDIN WITH (FORMAT csv, HEADER)", fh)
            cur.execute(
                "INSERT INTO regions (code, name) "
                "SELECT DISTINCT region, region FROM staging_stores"
            )
            cur.execute(
                "INSERT INTO stores (code, name, region_id) SELECT s.code, s.name, r.id "
                "FROM staging_stores s JOIN regions r ON r.code = s.region"
            )
        else:
            cur.execute(
                "INSERT INTO regions (code, name) SELECT r, r FROM "
                "unnest(ARRAY['East', 'North', 'South', 'West', 'Central']) r"
            )
            cur.execute(
                "INSERT INTO stores (code, name, region_id) SELECT 'S-' || g, 'Store ' || g, "
                "(SELECT id FROM regions ORDER BY id OFFSET g % 5 LIMIT 1) "
                "FROM generate_series(1, 40) g"
            )
        if members_csv is not None and members_csv.exists():
            cur.execute(LOAD_MEMBERS_CSV)
            with members_csv.open("rb") as fh:
                cur.copy_expert("COPY staging FROM STDIN WITH (FORMAT csv, HEADER)", fh)
            cur.execute(INSERT_FROM_STAGING + " ORDER BY s.external_id LIMIT %(n)s", {"n": n})
        else:
            cur.execute(SYNTHETIC_MEMBERS, {"n": n})
        cur.execute(SYNTHETIC_STATS, {"now": NOW})
        print(f"[sql] loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE members")
        cur.execute("VACUUM ANALYZE member_stats")
        cur.execute("ANALYZE stores")
        cur.execute("ANALYZE regions")
    conn.close()


def _shorten(line: str, width: int = 200) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


# Server defaults, and what a segment refresh job would set for its own transaction.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "tuned": {"jit": "off", "work_mem": "64MB"},
}


def bench_sql(vocab: Vocabulary, database: str, runs: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.dialects import postgresql

    engine = create_engine(_dsn(database).replace("postgresql://", "postgresql+psycopg2://"))
    out: dict[str, Any] = {"runs": runs, "rules": []}
    with engine.connect() as conn:
        out["members"] = conn.execute(text("SELECT count(*) FROM members")).scalar_one()
        out["settings"] = {
            name: conn.execute(text(f"SHOW {name}")).scalar_one()
            for name in ("server_version", "shared_buffers", "work_mem",
                         "max_parallel_workers_per_gather", "jit")
        }  # fmt: skip
        for label, source in (("headline", RULE), ("wide", RULE_WIDE)):
            rule = parse_rule(source, vocab, Scope.MEMBER)
            stmt = count_query(rule, vocab, NOW)
            entry: dict[str, Any] = {"label": label, "rule": source}
            for variant, settings in VARIANTS.items():
                for name, value in settings.items():
                    conn.exec_driver_sql(f"SET {name} = '{value}'")
                count = conn.execute(stmt).scalar_one()  # warm-up (fills the OS cache too)
                timings = []
                for _ in range(runs):
                    started = time.perf_counter()
                    if conn.execute(stmt).scalar_one() != count:
                        raise SystemExit("count changed between runs")
                    timings.append(time.perf_counter() - started)
                entry["matching"] = count
                entry[variant] = {
                    "best_s": round(min(timings), 3),
                    "median_s": round(sorted(timings)[len(timings) // 2], 3),
                }
            conn.exec_driver_sql("RESET jit")
            conn.exec_driver_sql("RESET work_mem")
            compiled = stmt.compile(
                dialect=postgresql.dialect(), compile_kwargs={"render_postcompile": True}
            )
            plan = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params
            ).fetchall()
            # The zone table's arrays (every IANA zone) would fill pages: shorten long lines.
            entry["plan"] = "\n".join(_shorten(r[0]) for r in plan)
            out["rules"].append(entry)
    engine.dispose()
    return out


# --------------------------------------------------------------------------------------


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {result['machine']}", ""]
    py = result.get("python")
    if py:
        lines += [
            f"Rule ({py['leaves']} leaves): `{py['rule']}`",
            "",
            "| population | matches | compiled | json-walker | typed-walker | × json | × typed |",
            "|---|---|---|---|---|---|---|",
        ]
        for label in ("mixed", "all leaves true"):
            r = py[label]
            lines.append(
                f"| {label} | {r['match_rate']:.0%} | {r['compiled_per_s']:,}/s "
                f"| {r['json_walker_per_s']:,}/s | {r['typed_walker_per_s']:,}/s "
                f"| {r['speedup_vs_json_walker']}× | {r['speedup_vs_typed_walker']}× |"
            )
        lines += [
            "",
            f"Compiling the rule: {py['compile_ms']} ms; binding `now` per request: "
            f"{py['bind_now_us']} µs.",
            "",
        ]
    sql = result.get("sql")
    if sql:
        lines += [
            f"SQL: `count_query` over {sql['members']:,} members ({sql.get('data', '')}), "
            f"best / median of {sql['runs']} runs after a warm-up. Server: {sql['settings']}",
            "",
            "| rule | matches | server defaults | jit off, work_mem 64MB |",
            "|---|---|---|---|",
        ]
        for r in sql["rules"]:
            d, t = r["default"], r["tuned"]
            lines.append(
                f"| {r['label']} | {r['matching']:,} | {d['best_s']} s / {d['median_s']} s "
                f"| {t['best_s']} s / {t['median_s']} s |"
            )
        for r in sql["rules"]:
            lines += ["", f"{r['label']}: `{r['rule']}`", "", "```", r["plan"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-only", action="store_true")
    parser.add_argument("--sql-only", action="store_true")
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--members", type=int, default=1_000_000)
    generated = Path("/tmp/patron-gen-1m/members.csv")  # noqa: S108 - bench.generate's output
    parser.add_argument("--members-csv", type=Path, default=generated)
    parser.add_argument("--database", default="patron_bench_rules")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    vocab = default_vocabulary()
    rule = parse_rule(RULE, vocab, Scope.MEMBER)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "now": NOW.isoformat(),
    }
    if not args.sql_only:
        result["python"] = bench_python(vocab, rule, args.population)
    if not args.python_only:
        csv = args.members_csv if args.members_csv.exists() else None
        prepare_database(args.database, args.members, csv)
        result["sql"] = bench_sql(vocab, args.database, args.runs)
        result["sql"]["data"] = f"members from {csv}" if csv else "synthetic members"
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_rules.json").write_text(json.dumps(result, indent=2, default=str))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
