"""Bulk-import benchmark: `patron import transactions` against a plain COPY of the same file.

Usage::

    python -m bench.generate --members 100000 --transactions 2000000 --out /tmp/patron-gen-100k
    python -m bench.bench_import /tmp/patron-gen-100k

It creates a fresh database (``--db``, dropped afterwards unless ``--keep``), migrates
it, loads stores.csv and members.csv with the importer, then times, in this order:

(a) ``COPY`` of transactions.csv into an UNLOGGED table of ten text columns, streamed
    from this process with psycopg2 ``copy_expert`` (the table is dropped afterwards),
    ``--copies`` times (the median counts: the machine may be busy with other work);
(b) ``patron import transactions transactions.csv`` run as a subprocess (or in this
    process with ``--in-process``, which also prints the time of each phase).

and prints the rows per second of both and their ratio. ``--ceiling`` adds (c): an
``INSERT … SELECT`` of the imported rows into an empty copy of ``transactions`` with
the same indexes (no foreign keys, nothing validated) — the cost of merely writing
the rows into a table shaped like the real one, which no importer can beat.
``--indexes`` writes the same rows into tables with one index of ``transactions``
after another (and a BRIN on occurred_at instead of its btree), printing seconds and
WAL bytes per row of each: what each index costs on the import path.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service import migrate
from service.db import normalise_url
from service.importer import TRANSACTION_FIELDS, rebuild_member_stats, run_import

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _libpq(url: str) -> str:
    """A URL libpq accepts (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(server_url: str, statement: str) -> None:
    conn = psycopg2.connect(_libpq(server_url))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def _db_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _psycopg(url: str) -> Any:
    return psycopg2.connect(_libpq(url))


def _checkpoint(url: str) -> None:
    conn = _psycopg(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CHECKPOINT")
    finally:
        conn.close()


def plain_copy(url: str, path: Path) -> tuple[int, float]:
    """(a): COPY the file into an UNLOGGED all-text table; returns (rows, seconds)."""
    columns = ", ".join(f"{c} text" for c in TRANSACTION_FIELDS)
    conn = _psycopg(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE UNLOGGED TABLE bench_plain_copy ({columns})")
            conn.commit()
            began = time.perf_counter()
            with path.open("rb") as f:
                cur.copy_expert(
                    "COPY bench_plain_copy FROM STDIN (FORMAT csv, HEADER true)", f, size=1 << 20
                )
                rows = cur.rowcount
            conn.commit()
            seconds = time.perf_counter() - began
            cur.execute("DROP TABLE bench_plain_copy")
            conn.commit()
    finally:
        conn.close()
    return rows, seconds


def cli_import(url: str, path: Path) -> tuple[int, float, str]:
    """(b) as a user runs it: the `patron` command in a subprocess."""
    env = dict(os.environ, DATABASE_URL=url, PATRON_LOG_JSON="0")
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
    patron = Path(sys.executable).with_name("patron")
    launcher = [str(patron)] if patron.exists() else [sys.executable, "-m", "service.cli"]
    command = [*launcher, "import", "transactions", str(path)]
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if done.returncode not in (0, 3):
        raise SystemExit(f"import failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    match = re.search(r"inserted ([\d,]+)", done.stdout)
    inserted = int(match.group(1).replace(",", "")) if match else 0
    return inserted, seconds, done.stdout.strip()


def ceiling(url: str) -> tuple[int, float]:
    """(c): write the imported rows again into an empty table with the same indexes."""
    engine = create_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench_ceiling (LIKE transactions INCLUDING ALL)"))
    _checkpoint(url)
    began = time.perf_counter()
    with engine.begin() as conn:
        rows = conn.execute(text("INSERT INTO bench_ceiling SELECT * FROM transactions")).rowcount
    seconds = time.perf_counter() - began
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE bench_ceiling"))
    engine.dispose()
    return int(rows), seconds


# Destination-table variants for --indexes: what each index of transactions costs when
# the same rows are written, and whether a BRIN on occurred_at could replace the btree.
INDEX_VARIANTS: dict[str, tuple[str, ...]] = {
    "heap only": (),
    "primary key": ("pk",),
    "+ unique external_id": ("pk", "ext"),
    "+ (member_id, occurred_at)": ("pk", "ext", "mo"),
    "+ partial idempotency_key (as migrated, minus occurred_at)": ("pk", "ext", "mo", "idem"),
    "+ btree occurred_at, plain (before migration 0007)": ("pk", "ext", "mo", "idem", "occ"),
    "+ btree occurred_at INCLUDE ageing columns (= today)": ("pk", "ext", "mo", "idem", "cov"),
    "+ BRIN occurred_at instead": ("pk", "ext", "mo", "idem", "brin"),
}
INDEX_DDL = {
    "pk": "ALTER TABLE bench_idx ADD PRIMARY KEY (id)",
    "ext": "ALTER TABLE bench_idx ADD UNIQUE (external_id)",
    "mo": "CREATE INDEX ON bench_idx (member_id, occurred_at)",
    "idem": "CREATE UNIQUE INDEX ON bench_idx (idempotency_key) WHERE idempotency_key IS NOT NULL",
    "occ": "CREATE INDEX ON bench_idx (occurred_at)",
    # As migrated (0007): the daily ageing reads one day per window from the index alone.
    "cov": "CREATE INDEX ON bench_idx (occurred_at) INCLUDE (member_id, kind, amount,"
    " refunded_amount)",
    "brin": "CREATE INDEX ON bench_idx USING brin (occurred_at)",
}


def index_costs(url: str) -> list[str]:
    """Write the imported rows (in import order) into tables with each index set."""
    conn = _psycopg(url)
    lines = []
    try:
        with conn.cursor() as cur:
            for name, indexes in INDEX_VARIANTS.items():
                cur.execute("DROP TABLE IF EXISTS bench_idx")
                cur.execute(
                    "CREATE TABLE bench_idx"
                    " (LIKE transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                )
                for index in indexes:
                    cur.execute(INDEX_DDL[index])
                conn.commit()
                cur.execute("CHECKPOINT")
                cur.execute("SELECT pg_current_wal_lsn()")
                lsn = cur.fetchone()[0]
                conn.commit()
                began = time.perf_counter()
                cur.execute("INSERT INTO bench_idx SELECT * FROM transactions ORDER BY id")
                rows = cur.rowcount
                conn.commit()
                seconds = time.perf_counter() - began
                cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
                wal = float(cur.fetchone()[0])
                lines.append(
                    f"    {name:60s} {seconds:6.1f} s  {wal / max(rows, 1):5.0f} WAL bytes/row"
                )
                _log(lines[-1])
            cur.execute("DROP TABLE IF EXISTS bench_idx")
            conn.commit()
    finally:
        conn.close()
    return lines


def verify(url: str) -> bool:
    """Statistics written by the import equal a rebuild from the transactions (bench DB only)."""
    engine = create_engine(normalise_url(url))
    columns = (
        "member_id, first_purchase_at, last_purchase_at, purchase_count, purchase_amount,"
        " refund_count, refund_amount, net_spend"
    )
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TEMP TABLE before AS SELECT {columns} FROM member_stats"))
        rebuild_member_stats(conn)
        differing = conn.execute(
            text(
                f"SELECT count(*) FROM ((SELECT {columns} FROM before EXCEPT"
                f" SELECT {columns} FROM member_stats) UNION ALL (SELECT {columns}"
                f" FROM member_stats EXCEPT SELECT {columns} FROM before)) d"
            )
        ).scalar_one()
    engine.dispose()
    return differing == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_import", description=__doc__)
    parser.add_argument("data", type=Path, help="directory written by bench.generate (CSV)")
    parser.add_argument(
        "--server",
        default=os.environ.get("BENCH_SERVER_URL", DEFAULT_SERVER),
        help="URL of any database on the server, used to create the benchmark database",
    )
    parser.add_argument("--db", default="patron_bench_import", help="database to (re)create")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--in-process", action="store_true", help="call run_import directly")
    parser.add_argument("--ceiling", action="store_true", help="also time (c), see above")
    parser.add_argument("--verify", action="store_true", help="compare stats with a rebuild")
    parser.add_argument(
        "--indexes",
        action="store_true",
        help="also write the imported rows into tables with each set of indexes",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=3,
        help="times to run (a); the ratio uses the median, as the machine may be shared",
    )
    args = parser.parse_args(argv)

    data: Path = args.data
    tx_file = data / "transactions.csv"
    for name in ("stores.csv", "members.csv", "transactions.csv"):
        if not (data / name).is_file():
            raise SystemExit(f"{data / name} is missing: run python -m bench.generate first")
    url = _db_url(args.server, args.db)
    _admin(args.server, f'DROP DATABASE IF EXISTS "{args.db}"')
    _admin(args.server, f'CREATE DATABASE "{args.db}"')
    try:
        engine = create_engine(normalise_url(url))
        migrate.upgrade(engine)
        for kind in ("stores", "members"):
            report = run_import(engine, kind, data / f"{kind}.csv", progress=False)
            _log(report.summary())
        engine.dispose()

        copy_runs: list[float] = []
        for n in range(1, max(args.copies, 1) + 1):
            _checkpoint(url)
            _log(f"(a) plain COPY into an UNLOGGED text table, run {n} …")
            copy_rows, seconds = plain_copy(url, tx_file)
            copy_runs.append(seconds)
        copy_seconds = statistics.median(copy_runs)
        _checkpoint(url)
        _log("(b) patron import transactions …")
        timings: dict[str, float] = {}
        if args.in_process:
            engine = create_engine(normalise_url(url))
            began = time.perf_counter()
            report = run_import(engine, "transactions", tx_file, progress=False)
            import_seconds = time.perf_counter() - began
            engine.dispose()
            imported, summary, timings = report.inserted, report.summary(), report.timings
        else:
            imported, import_seconds, summary = cli_import(url, tx_file)
        _log(summary)

        copy_rate = copy_rows / copy_seconds
        import_rate = copy_rows / import_seconds
        size_mb = tx_file.stat().st_size / 1e6
        command = " ".join(
            shlex.quote(a) for a in [sys.executable, "-m", "bench.bench_import", *sys.argv[1:]]
        )
        lines = [
            f"data: {tx_file} ({copy_rows:,} rows, {size_mb:,.0f} MB)",
            f"(a) plain COPY, unlogged text table: {copy_seconds:8.1f} s {copy_rate:12,.0f} rows/s"
            f" (median of {', '.join(f'{s:.1f}' for s in copy_runs)} s)",
            f"(b) patron import transactions:      {import_seconds:8.1f} s"
            f" {import_rate:12,.0f} rows/s ({imported:,} inserted)",
            f"ratio (b)/(a): {import_rate / copy_rate:.3f}",
        ]
        if timings:
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
            lines.append(f"import phases: {phases}")
        if args.ceiling:
            rows, seconds = ceiling(url)
            lines.append(
                f"(c) INSERT…SELECT into a copy of transactions (same indexes, no checks):"
                f" {seconds:.1f} s {rows / seconds:,.0f} rows/s,"
                f" ratio to (a) {rows / seconds / copy_rate:.3f}"
            )
        if args.verify:
            lines.append(f"member_stats equal a rebuild: {verify(url)}")
        if args.indexes:
            lines.append("INSERT…SELECT of the imported rows, by indexes on the target:")
            lines.extend(index_costs(url))
        lines.append(f"command: {command}")
        print("\n".join(lines), flush=True)
    finally:
        if not args.keep:
            _admin(args.server, f'DROP DATABASE IF EXISTS "{args.db}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
