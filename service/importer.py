"""Bulk import of stores, members and transactions: COPY into staging, set-based merge.

The file is streamed into an UNLOGGED staging table (all text columns) with COPY,
checked by one set-based statement into a typed table (regexes and lookups guard
every cast, so a bad value becomes a reject instead of aborting the statement), and
merged into the real tables with one INSERT … SELECT per table; member statistics
follow in the same statement, grouped by member. Rejected rows go to a CSV file with
their line number, the reason and the raw values. Everything runs in one
transaction: an import lands completely or not at all.

Well-formed CSV is handed to PostgreSQL byte for byte (the fast route). A file that
COPY cannot take as it is (a record with the wrong number of fields, bad UTF-8, a
NUL byte, a quoted line break) is re-read with Python's csv module, which turns each
broken record into a reject; NDJSON always takes that route.

SQL here is assembled from constants and generated work-table names only; values
from the file never enter a statement's text (hence the S608 waivers).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, cast
from zoneinfo import available_timezones

import psycopg2
import psycopg2.errors
from sqlalchemy import Connection, CursorResult, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from tqdm import tqdm

from service.config import Config

KINDS = ("stores", "members", "transactions")

STORE_FIELDS = ("code", "name", "region")
MEMBER_FIELDS = (
    "external_id",
    "name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "timezone",
    "locale",
    "home_store",
    "consent_email",
    "consent_sms",
    "consent_push",
    "consent_wechat",
    "tags",
    "attributes",
)
TRANSACTION_FIELDS = (
    "transaction_id",
    "member_id",
    "kind",
    "original_transaction_id",
    "amount",
    "currency",
    "store",
    "channel",
    "occurred_at",
    "items",
)
FIELDS = {"stores": STORE_FIELDS, "members": MEMBER_FIELDS, "transactions": TRANSACTION_FIELDS}
# Columns whose NDJSON value is structured (a list or an object) rather than a scalar.
JSON_FIELDS = frozenset({"items", "attributes"})

# PostgreSQL regular expressions (ARE). Bounded repetitions such as {0,63} are slow in
# PostgreSQL's engine, so lengths are checked with length() instead.
RE_EXTERNAL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
RE_STORE_CODE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
RE_CURRENCY = r"^[A-Z]{3}$"
RE_PHONE = r"^\+?[0-9][0-9 -]{4,30}$"
RE_LOCALE = r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-[A-Z]{2})?$"
RE_MONEY = r"^[0-9]+(\.[0-9][0-9]?)?$"
# Calendar-exact dates of the years 1000-9999 (30-day months, February, leap years),
# so a matching string always casts: 2026-02-30 fails here instead of in the cast.
_DATE = (
    r"(?:[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    r"|[1-9][0-9](?:0[48]|[2468][048]|[13579][26])-02-29"
    r"|(?:[2468][048]|[13579][26])00-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,6})?)?"
_OFFSET = r"(?:[Zz]|[+-](?:0[0-9]|1[0-4])(?::?[0-5][0-9])?)"
RE_DATE = rf"^{_DATE}$"
RE_TIMESTAMP = rf"^{_DATE}[Tt ]{_TIME}{_OFFSET}$"
RE_NAIVE_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([Tt ][0-9:.]*)?$"
RE_TIMESTAMP_SHAPE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9:.]+([Zz]|[+-][0-9:]+)$"
RE_JSON_ARRAY = r"^[[:space:]]*\["
RE_JSON_OBJECT = r"^[[:space:]]*\{"
# marshmallow's Email validator (dot-atom local part; domain or localhost).
RE_EMAIL = (
    r"^[-!#$%&'*+/=?^`{}|~\w]+(\.[-!#$%&'*+/=?^`{}|~\w]+)*@"
    r"((?:[[:alnum:]](?:[[:alnum:]-]{0,61}[[:alnum:]])?\.)+"
    r"(?:[[:alpha:]]{2,6}|[[:alnum:]-]{2,})|localhost)$"
)
TRUTHY = ("true", "t", "yes", "y", "on", "1")
FALSY = ("false", "f", "no", "n", "off", "0")

MSG_EXTERNAL_ID = (
    "must be 1-64 characters: letters, digits and . _ : @ - (starting with a letter or digit)"
)
MSG_STORE_CODE = (
    "must be 1-64 characters: letters, digits and . _ - (starting with one of the first two)"
)
MSG_AMOUNT = "must be a decimal with at most 2 places (0 or more for purchases, more for refunds)"
MSG_TIMESTAMP = "must be an ISO 8601 timestamp with offset, e.g. 2026-11-01T10:00:00+08:00"
MSG_NAIVE = "must include a time-zone offset, e.g. 2026-11-01T10:00:00+08:00"

_READ_CHUNK = 1 << 20
_CONVERTED_BATCH = 5000


class ImportFailed(Exception):
    """The file as a whole cannot be imported (bad header, unreadable); nothing was written."""


@dataclass
class ImportReport:
    """What an import did; `summary()` is the paragraph the CLI prints."""

    kind: str
    path: Path
    fmt: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    skipped: int = 0
    rejected: int = 0
    seconds: float = 0.0
    rejects_path: Path | None = None
    # Which loading route was taken: "copy" (COPY of the raw file) or "python" (re-read).
    route: str = "copy"
    # Seconds spent in each phase (staging, validation, merge, …), for tuning.
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        """Rows read per wall-clock second."""
        return self.read / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One paragraph for humans."""
        parts = [
            f"Imported {self.kind} from {self.path} ({self.fmt}): read {self.read:,} rows,",
            f"inserted {self.inserted:,},",
        ]
        if self.kind != "transactions":
            parts.append(f"updated {self.updated:,},")
        parts.append(f"skipped {self.skipped:,} (already present or unchanged),")
        parts.append(f"rejected {self.rejected:,}")
        text_ = " ".join(parts)
        text_ += f" in {self.seconds:.1f}s ({self.rows_per_second:,.0f} rows/s)."
        if self.rejected and self.rejects_path is not None:
            text_ += f" Rejected rows, with line numbers and reasons, are in {self.rejects_path}."
        for note in self.notes:
            text_ += f" {note}"
        return text_


# --------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------


def detect_format(path: Path, fmt: str | None) -> str:
    """Return "csv" or "ndjson": as given, else by extension, else by the first byte."""
    if fmt is not None:
        if fmt not in ("csv", "ndjson"):
            raise ImportFailed(f"unknown format {fmt!r}: use csv or ndjson")
        return fmt
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".ndjson", ".jsonl", ".json"):
        return "ndjson"
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "ndjson" if head.startswith(b"{") else "csv"


def _read_header(path: Path, expected: Sequence[str]) -> tuple[list[str], int]:
    """Parse and check the CSV header; returns (columns in file order, its size in bytes)."""
    with path.open("rb") as f:
        raw = f.readline()
    try:
        line = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportFailed("line 1: the header is not valid UTF-8") from None
    if not line.strip():
        raise ImportFailed(
            f"the file has no header row; expected the columns {', '.join(expected)}"
        )
    columns = [c.strip() for c in next(csv.reader([line]))]
    missing = [c for c in expected if c not in columns]
    unknown = [c for c in columns if c not in expected]
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    problems = []
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown columns: {', '.join(unknown)}")
    if doubled:
        problems.append(f"repeated columns: {', '.join(doubled)}")
    if problems:
        raise ImportFailed(
            f"bad header in {path.name}: {'; '.join(problems)} (expected: {', '.join(expected)})"
        )
    return columns, len(raw)


class _Progress:
    """A tqdm bar over the bytes of the file (stderr; silent when not a terminal)."""

    def __init__(self, path: Path, enabled: bool | None, label: str) -> None:
        self.bar = tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=(not sys.stderr.isatty()) if enabled is None else not enabled,
            leave=False,
        )

    def advance(self, n: int) -> None:
        """Count `n` more bytes as done."""
        self.bar.update(n)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


class _CopySource:
    """The file-like object psycopg2's copy_expert reads from: chunks of an iterator."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> bytes:
        """The next chunk, whatever its size (psycopg2 accepts any)."""
        # psycopg2 accepts chunks of any length; an empty one ends the COPY.
        return next(self._chunks, b"")


@dataclass
class _RawStats:
    """What the fast path saw while passing bytes through: physical lines after the header."""

    lines: int = 0


def _raw_chunks(path: Path, skip: int, progress: _Progress, stats: _RawStats) -> Iterator[bytes]:
    """The file's bytes after the header, counting line breaks (for line numbers)."""
    last = b""
    with path.open("rb") as f:
        f.seek(skip)
        progress.advance(skip)
        while chunk := f.read(_READ_CHUNK):
            stats.lines += chunk.count(b"\n")
            progress.advance(len(chunk))
            last = chunk
            yield chunk
    if last and not last.endswith(b"\n"):
        stats.lines += 1


def _decoded_lines(
    f: IO[bytes], first_line: int, bad: dict[int, str], progress: _Progress
) -> Iterator[str]:
    """Decode physical lines one by one; undecodable or NUL-bearing lines are noted in `bad`."""
    pending = 0
    for number, raw in enumerate(f, start=first_line):
        pending += len(raw)
        if pending >= _READ_CHUNK:
            progress.advance(pending)
            pending = 0
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", "replace")
            bad[number] = "the line is not valid UTF-8"
        if "\x00" in line:
            # PostgreSQL text cannot hold NUL; keep the rest for the reject file.
            line = line.replace("\x00", "")
            bad[number] = "the line contains a NUL character"
        yield line
    progress.advance(pending)


def _csv_rows(
    path: Path, columns: Sequence[str], skip: int, progress: _Progress
) -> Iterator[list[Any]]:
    """Tolerant CSV reading: [line, *fields, error, raw] per record, broken records kept."""
    width = len(columns)
    bad: dict[int, str] = {}
    with path.open("rb") as f:
        f.seek(skip)
        progress.advance(skip)
        reader = csv.reader(_decoded_lines(f, 2, bad, progress), strict=False)
        consumed = 0
        while True:
            start = consumed + 2
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise ImportFailed(f"line {start}: unreadable CSV ({exc})") from None
            end = reader.line_num + 1
            consumed = reader.line_num
            if not row or row == [""]:
                continue  # blank line
            problems = [bad[n] for n in range(start, end + 1) if n in bad]
            if len(row) != width:
                problems.append(f"the record has {len(row)} fields, the header has {width}")
            raw = None
            if problems:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="").writerow(row)
                raw = buf.getvalue()
                row = (row + [""] * width)[:width]
            error = "; ".join(dict.fromkeys(problems)) if problems else None
            yield [start, *row, error, raw]


def _ndjson_value(name: str, value: Any) -> tuple[str | None, str | None]:
    """One NDJSON value as staging text, or an error message."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, str):
        return value, None
    if isinstance(value, int | float):
        return json.dumps(value), None
    if name == "tags":
        if isinstance(value, list) and all(isinstance(t, str) and ";" not in t for t in value):
            return (";".join(value) if value else None), None
        return None, "tags: must be a list of strings (without ';')"
    if name in JSON_FIELDS:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")), None
    return None, f"{name}: must be a string, number or boolean, not {type(value).__name__}"


def _ndjson_rows(path: Path, columns: Sequence[str], progress: _Progress) -> Iterator[list[Any]]:
    """NDJSON lines as [line, *fields, error, raw]; bad lines become rejects."""
    known = set(columns)
    bad: dict[int, str] = {}
    with path.open("rb") as f:
        for number, line in enumerate(_decoded_lines(f, 1, bad, progress), start=1):
            stripped = line.strip().lstrip("\ufeff")
            if not stripped:
                continue
            values: list[str | None] = [None] * len(columns)
            problems = [bad[number]] if number in bad else []
            obj: Any = None
            if not problems:
                try:
                    obj = json.loads(stripped)
                except ValueError as exc:
                    problems.append(f"line: not valid JSON ({exc})")
                else:
                    if not isinstance(obj, dict):
                        problems.append("line: must be a JSON object")
            if isinstance(obj, dict) and not problems:
                unknown = [k for k in obj if k not in known]
                if unknown:
                    problems.append(f"unexpected fields: {', '.join(map(str, unknown))}")
                for i, name in enumerate(columns):
                    value, error = _ndjson_value(name, obj.get(name))
                    values[i] = value
                    if error:
                        problems.append(error)
            if problems:
                yield [number, *values, "; ".join(problems), stripped]
            else:
                yield [number, *values, None, None]


def _csv_chunks(rows: Iterable[list[Any]]) -> Iterator[bytes]:
    """Rows re-encoded as CSV for COPY, in batches."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    batch = 0
    for row in rows:
        writer.writerow(row)
        batch += 1
        if batch >= _CONVERTED_BATCH:
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
            batch = 0
    if batch:
        yield buf.getvalue().encode("utf-8")


# --------------------------------------------------------------------------------------
# SQL helpers
# --------------------------------------------------------------------------------------


def _lit(value: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported server)."""
    return "'" + value.replace("'", "''") + "'"


def _msg(name: str, message: str) -> str:
    return _lit(f"{name}: {message}")


def _case(*whens: tuple[str, str], default: str | None = None) -> str:
    """CASE WHEN … THEN … END from (condition, message SQL) pairs, first match wins."""
    body = " ".join(f"WHEN {cond} THEN {msg}" for cond, msg in whens)
    tail = f" ELSE {default}" if default is not None else ""
    return f"CASE {body}{tail} END"


def _errors(*cases: str) -> str:
    """Join the per-field messages of one row; NULL when the row is valid."""
    return "NULLIF(concat_ws('; ', " + ", ".join(cases) + "), '')"


def _bool(expr: str) -> str:
    truthy = ", ".join(map(_lit, TRUTHY))
    falsy = ", ".join(map(_lit, FALSY))
    return (
        f"CASE WHEN lower({expr}) IN ({truthy}) THEN true"
        f" WHEN lower({expr}) IN ({falsy}) THEN false END"
    )


def _sql(template: str, **names: str) -> str:
    """Fill generated identifiers (never user input) into `{name}` slots of a template."""
    # Plain replacement, not str.format: regex quantifiers such as {3} must stay as they are.
    for name, value in names.items():
        template = template.replace("{" + name + "}", value)
    return template


# Temporary helper used only when a JSON cast failed somewhere: PostgreSQL 15 has no
# pg_input_is_valid, so the slow route asks the parser itself, row by row, once.
_TRY_JSONB = """
CREATE OR REPLACE FUNCTION pg_temp.patron_import_is_jsonb(value text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM value::jsonb;
    RETURN true;
EXCEPTION WHEN others THEN
    RETURN false;
END
$$
"""


# --------------------------------------------------------------------------------------
# The import run
# --------------------------------------------------------------------------------------


# Hash joins and aggregates over millions of rows want memory; the validation scan is
# CPU-bound (regexes, casts, hash joins), so parallel workers should take it, which
# the planner would not do when every row comes back.
_TUNED = {"work_mem": "256MB", "parallel_tuple_cost": "0.0001", "parallel_setup_cost": "10"}

_WORK_TABLES = (
    "stage",
    "valid",
    "refunds",
    "originals",
    "pids",
    "links",
    "zones",
    "dups",
    "calendar",
    "clock",
    "offsets",
)


class _Run:
    """One import: staging, validation, merge and the reject file, on one connection."""

    # Transactions only: set before the merge.
    windows: _Windows

    def __init__(
        self,
        conn: Connection,
        kind: str,
        path: Path,
        fmt: str,
        columns: list[str],
        header_bytes: int,
        report: ImportReport,
        currency: str,
        actor: str,
        progress: bool | None,
    ) -> None:
        self.conn = conn
        self.kind = kind
        self.path = path
        self.fmt = fmt
        self.fields = FIELDS[kind]
        self.columns = columns
        self.header_bytes = header_bytes
        self.report = report
        self.currency = currency
        self.actor = actor
        self.progress = progress
        self.chatty = sys.stderr.isatty() if progress is None else progress
        # Unique names, so that two imports in one session or database never collide.
        base = f"patron_import_{secrets.token_hex(5)}"
        self.names = {t: f"{base}_{t}" for t in _WORK_TABLES}
        self.names["seq"] = f"{base}_seq"

    # -- plumbing -------------------------------------------------------------------

    def sql(self, template: str, **params: Any) -> Any:
        """Execute a template whose {slots} are this run's work-table names."""
        statement = _sql(template, **self.names)
        if params:
            return self.conn.execute(text(statement), params)
        # No parameters: keeps psycopg2 from reading the % of a regex as a placeholder.
        return self.conn.exec_driver_sql(statement, execution_options={"no_parameters": True})

    def cursor(self) -> Any:
        """The psycopg2 cursor of this connection (COPY is not part of SQLAlchemy)."""
        dbapi = self.conn.connection.dbapi_connection
        assert dbapi is not None
        return dbapi.cursor()

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in `phase` to the report."""
        if self.chatty:
            # After the bytes are in, a large file still takes minutes: say what is going on.
            tqdm.write(f"import {self.kind}: {phase}…", file=sys.stderr)
        began = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            self.report.timings[phase] = self.report.timings.get(phase, 0.0) + spent

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Undo a failed step without losing the import transaction."""
        with self.conn.begin_nested():
            yield

    @contextmanager
    def tuned(self) -> Iterator[None]:
        """Planner settings for bulk work, put back afterwards for the caller's transaction."""
        saved = self.sql(
            "SELECT " + ", ".join(f"current_setting('{name}')" for name in _TUNED)
        ).one()
        for name, value in _TUNED.items():
            self.sql("SELECT set_config(:name, :value, true)", name=name, value=value)
        yield
        for name, value in zip(_TUNED, saved, strict=True):
            self.sql("SELECT set_config(:name, :value, true)", name=name, value=value)

    # -- staging ----------------------------------------------------------------------

    def create_stage(self) -> None:
        """The staging table: the file's columns as text, plus line number and errors."""
        cols = ", ".join(f'"{c}" text' for c in self.fields)
        self.sql("CREATE TEMP SEQUENCE {seq} START 2 CACHE 100000")
        # UNLOGGED rather than TEMP: parallel workers can read it, and it skips the WAL.
        self.sql(
            "CREATE UNLOGGED TABLE {stage} (_line bigint DEFAULT nextval('{seq}'), "
            + cols
            + ", _error text, _raw text, _badjson boolean) WITH (autovacuum_enabled = off)"
        )

    def load(self) -> int:
        """Fill the staging table: the raw bytes when COPY takes them, else re-read rows."""
        if self.fmt == "csv":
            try:
                with self.savepoint():
                    copied = self._copy_raw()
                    if copied is not None:
                        return copied
                    raise _Retry
            except (_Retry, psycopg2.DataError, psycopg2.errors.ProgramLimitExceeded):
                pass
            self.report.route = "python"
            self.report.notes.append(
                "COPY could not take the file as it is (a broken record, bad UTF-8 or a quoted"
                " line break), so it was re-read record by record."
            )
            progress = self._progress()
            rows = _csv_rows(self.path, self.columns, self.header_bytes, progress)
        else:
            self.report.route = "python"
            progress = self._progress()
            rows = _ndjson_rows(self.path, self.fields, progress)
        cols = ", ".join(f'"{c}"' for c in self.columns)
        statement = self.render(
            "COPY {stage} (_line, " + cols + ", _error, _raw) FROM STDIN"
            " (FORMAT csv, ENCODING 'UTF8')"
        )
        return self._copy(statement, _csv_chunks(rows), progress)

    def render(self, template: str) -> str:
        """A template with this run's work-table names filled in."""
        return _sql(template, **self.names)

    def _progress(self) -> _Progress:
        return _Progress(self.path, self.progress, f"import {self.kind}")

    def _copy(self, statement: str, chunks: Iterator[bytes], progress: _Progress) -> int:
        try:
            with self.cursor() as cur:
                cur.copy_expert(statement, _CopySource(chunks), size=_READ_CHUNK)
                return int(cur.rowcount)
        finally:
            progress.close()

    def _copy_raw(self) -> int | None:
        """COPY the file as it is; None when records and lines do not correspond."""
        cols = ", ".join(f'"{c}"' for c in self.columns)
        statement = self.render(
            "COPY {stage} (" + cols + ") FROM STDIN "
            # Quoted empty strings are NULL as well, exactly as on the re-read route.
            "(FORMAT csv, ENCODING 'UTF8', FORCE_NULL (" + cols + "))"
        )
        stats = _RawStats()
        progress = self._progress()
        copied = self._copy(
            statement, _raw_chunks(self.path, self.header_bytes, progress, stats), progress
        )
        # A quoted line break spreads one record over two lines, and numbering records
        # by position would then be off: such files are re-read with exact tracking.
        return copied if copied == stats.lines else None

    # -- validation -------------------------------------------------------------------

    def validate(self, statement: str, json_columns: Sequence[str]) -> None:
        """Create the typed, checked table; values PostgreSQL's JSON parser refuses are marked."""
        try:
            with self.savepoint(), self.timed("validate"):
                self.sql(statement)
            return
        except DBAPIError as exc:
            if not json_columns or not isinstance(exc.orig, psycopg2.DataError):
                raise
        # Some JSON text passed the cheap shape check but does not parse. PostgreSQL 15
        # has no pg_input_is_valid, so ask the parser row by row, once, then retry.
        self.sql(_TRY_JSONB)
        for column in json_columns:
            self.sql(
                f'UPDATE {{stage}} SET _badjson = true WHERE "{column}" IS NOT NULL'  # noqa: S608
                f' AND NOT pg_temp.patron_import_is_jsonb("{column}")'
            )
        self.sql(statement)

    def create_lookups(self) -> None:
        """Valid dates (1900-2100), times of day and UTC offsets, as text for hash joins."""
        # UNLOGGED like the staging table, so that parallel workers can read them.
        self.sql(
            "CREATE UNLOGGED TABLE {calendar} AS SELECT to_char(d, 'YYYY-MM-DD') AS day"
            " FROM generate_series(DATE '1900-01-01', DATE '2100-12-31', interval '1 day') d"
        )
        self.sql(
            "CREATE UNLOGGED TABLE {clock} AS SELECT to_char(t, 'HH24:MI:SS') AS hms"
            " FROM generate_series(TIMESTAMP '2000-01-01 00:00:00',"
            "                      TIMESTAMP '2000-01-01 23:59:59', interval '1 second') t"
        )
        self.sql(
            "CREATE UNLOGGED TABLE {offsets} AS"
            " SELECT sign || to_char(h, 'FM00') || ':' || to_char(m, 'FM00') AS off"
            " FROM (VALUES ('+'), ('-')) signs (sign), generate_series(0, 14) h,"
            "      generate_series(0, 59) m"
        )
        for table in ("calendar", "clock", "offsets"):
            self.sql(f"ANALYZE {{{table}}}")

    def mark_duplicates(self, key: str, compared: Sequence[str]) -> None:
        """Repeated keys among valid rows: identical repeats skipped, differing ones rejected."""
        values = ", ".join(f"v.{c}" for c in compared)
        self.sql(
            "CREATE TEMP TABLE {dups} AS SELECT v.ctid AS vctid, v.line,"  # noqa: S608
            " min(v.line) OVER w AS first_line, count(*) OVER w AS n,"
            f" count(*) OVER (PARTITION BY v.{key}, {values}) AS same,"
            " array_to_string((array_agg(v.line) OVER w)[1:10], ', ')"
            " || CASE WHEN count(*) OVER w > 10 THEN ', …' ELSE '' END AS lines"
            " FROM {valid} v"
            f" WHERE v.error IS NULL AND v.{key} IN (SELECT {key} FROM {{valid}}"
            f"   WHERE error IS NULL GROUP BY {key} HAVING count(*) > 1)"
            f" WINDOW w AS (PARTITION BY v.{key} ORDER BY v.line"
            "   ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)"
        )
        # Rows are addressed by ctid: the work tables have no index, and a TID lookup
        # beats scanning millions of rows to change a handful.
        self.sql(
            "UPDATE {valid} v SET skip = d.same = d.n, error = CASE WHEN d.same < d.n THEN "  # noqa: S608
            + _lit(f"{key}: appears on lines ")
            + " || d.lines || ' with different values' END"
            " FROM {dups} d WHERE v.ctid = d.vctid AND (d.same < d.n OR d.line > d.first_line)"
        )

    # -- rejects and bookkeeping ------------------------------------------------------

    def count_rejects(self) -> int:
        """Rows that failed validation, duplicates or refund checks."""
        return int(self.sql("SELECT count(*) FROM {valid} WHERE error IS NOT NULL").scalar_one())

    def write_rejects(self, target: Path) -> Path:
        """Write rejected rows (line, reason, raw values) to a temporary file beside `target`."""
        cols = ", ".join(f's."{c}"' for c in self.fields)
        statement = self.render(
            "COPY (SELECT s._line AS line, v.error AS reason, "  # noqa: S608
            + cols
            + ", s._raw AS raw_record FROM {valid} v JOIN {stage} s ON s._line = v.line"
            " WHERE v.error IS NOT NULL ORDER BY s._line)"
            " TO STDOUT (FORMAT csv, HEADER, ENCODING 'UTF8')"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as out, self.cursor() as cur:
            cur.copy_expert(statement, out)
        return Path(tmp)

    def audit(self) -> None:
        """One audit entry for the whole import, with its counts."""
        details = {
            "file": self.path.name,
            "format": self.fmt,
            "route": self.report.route,
            "read": self.report.read,
            "inserted": self.report.inserted,
            "updated": self.report.updated,
            "skipped": self.report.skipped,
            "rejected": self.report.rejected,
        }
        self.sql(
            "INSERT INTO audit_log (actor, action, entity_type, entity_id, details)"
            " VALUES (:actor, :action, 'import', :entity, CAST(:details AS jsonb))",
            actor=self.actor,
            action=f"import.{self.kind}",
            entity=self.path.name[:200],
            details=json.dumps(details),
        )

    def drop_work_tables(self) -> None:
        """Drop this run's staging and helper tables before the commit."""
        tables = ", ".join(self.names[t] for t in _WORK_TABLES)
        self.sql(f"DROP TABLE IF EXISTS {tables}")
        self.sql("DROP SEQUENCE IF EXISTS {seq}")


class _Retry(Exception):
    """The raw COPY succeeded but cannot be used (line numbers would be off)."""


# --------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------


def _stores_sql() -> str:
    error = _errors(
        _case(
            ("s.code IS NULL", _msg("code", "is required")),
            (
                f"NOT (s.code ~ {_lit(RE_STORE_CODE)} AND length(s.code) <= 64)",
                _msg("code", MSG_STORE_CODE),
            ),
        ),
        _case(
            ("s.name IS NULL", _msg("name", "is required")),
            ("length(s.name) > 200", _msg("name", "must be at most 200 characters")),
        ),
        _case(
            ("s.region IS NULL", _msg("region", "is required")),
            (
                f"NOT (s.region ~ {_lit(RE_STORE_CODE)} AND length(s.region) <= 64)",
                _msg("region", MSG_STORE_CODE),
            ),
        ),
    )
    return (
        "CREATE UNLOGGED TABLE {valid} AS SELECT s._line AS line, s.code, s.name, s.region,"  # noqa: S608
        " false AS skip, "
        "COALESCE(s._error, " + error + ") AS error FROM {stage} s"
    )


def _merge_stores(run: _Run) -> None:
    run.sql(
        "INSERT INTO regions (code, name) SELECT DISTINCT v.region, v.region FROM {valid} v "
        "WHERE v.error IS NULL AND NOT v.skip "
        "ON CONFLICT (code) DO NOTHING"
    )
    row = run.sql(
        "WITH up AS ("
        " INSERT INTO stores AS st (code, name, region_id)"
        " SELECT v.code, v.name, r.id FROM {valid} v JOIN regions r ON r.code = v.region"
        " WHERE v.error IS NULL AND NOT v.skip"
        " ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name, region_id = EXCLUDED.region_id"
        " WHERE (st.name, st.region_id) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.region_id)"
        " RETURNING (xmax = 0) AS created)"
        " SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM up"
    ).one()
    run.report.inserted, run.report.updated = int(row[0]), int(row[1])


# --------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------


def _members_sql() -> str:
    consent = {c: _bool(f"s.{c}") for c in MEMBER_FIELDS if c.startswith("consent_")}
    inner = (
        "SELECT s._line AS line, s._error, s.external_id, s.name, s.gender, s.phone, s.email,"  # noqa: S608
        " s.birth_date AS birth_date_raw, s.timezone AS timezone_raw, s.locale AS locale_raw,"
        " s.home_store, s.tags AS tags_raw, s.attributes AS attributes_raw,"
        " CASE WHEN bd.day IS NOT NULL THEN s.birth_date::date END AS birth_date,"
        " COALESCE(s.timezone, 'UTC') AS timezone, COALESCE(s.locale, 'zh-CN') AS locale,"
        " hs.id AS home_store_id, m.status AS existing_status, z.name IS NOT NULL AS zone_ok,"
        + "".join(
            f" COALESCE({expr}, false) AS {name}, {expr} IS NULL AND s.{name} IS NOT NULL "
            f"AS {name}_bad,"
            for name, expr in consent.items()
        )
        + " COALESCE(string_to_array(s.tags, ';'), '{}') AS tags,"
        " CASE WHEN s._badjson IS NULL AND s.attributes ~ "
        + _lit(RE_JSON_OBJECT)
        + " THEN s.attributes::jsonb END AS attributes"
        " FROM {stage} s"
        " LEFT JOIN stores hs ON hs.code = s.home_store"
        " LEFT JOIN members m ON m.external_id = s.external_id"
        " LEFT JOIN {zones} z ON z.name = s.timezone"
        " LEFT JOIN {calendar} bd ON bd.day = s.birth_date"
        " OFFSET 0"
    )
    attrs = "t.attributes"
    error = _errors(
        _case(
            ("t.external_id IS NULL", _msg("external_id", "is required")),
            (
                f"NOT (t.external_id ~ {_lit(RE_EXTERNAL_ID)} AND length(t.external_id) <= 64)",
                _msg("external_id", MSG_EXTERNAL_ID),
            ),
            (
                "t.existing_status = 'erased'",
                "format('external_id: member %L was erased and cannot be changed', t.external_id)",
            ),
        ),
        _case(("length(t.name) > 200", _msg("name", "must be at most 200 characters"))),
        _case(
            (
                "t.gender NOT IN ('female', 'male', 'other')",
                _msg("gender", "must be one of female, male, other"),
            )
        ),
        _case(
            # The calendar holds 1900-2100, so a well-formed date missing from it is
            # out of range; one later than today is caught below.
            (
                f"t.birth_date IS NULL AND t.birth_date_raw ~ {_lit(RE_DATE)}",
                _msg("birth_date", "must be between 1900-01-01 and today"),
            ),
            (
                "t.birth_date IS NULL AND t.birth_date_raw IS NOT NULL",
                _msg("birth_date", "must be a date like 1990-05-17"),
            ),
            (
                "t.birth_date > (now() AT TIME ZONE 'UTC')::date",
                _msg("birth_date", "must be between 1900-01-01 and today"),
            ),
        ),
        _case(
            (
                f"NOT t.phone ~ {_lit(RE_PHONE)}",
                _msg("phone", "must be a phone number like +8613812345678"),
            )
        ),
        _case(
            (
                f"length(t.email) > 254 OR NOT t.email ~ {_lit(RE_EMAIL)}",
                _msg("email", "must be a valid e-mail address"),
            )
        ),
        _case(
            (
                "t.timezone_raw IS NOT NULL AND NOT t.zone_ok",
                _msg("timezone", "must be an IANA time zone such as Asia/Shanghai"),
            )
        ),
        _case(
            (
                f"NOT t.locale_raw ~ {_lit(RE_LOCALE)}",
                _msg("locale", "must be a locale like zh-CN or en"),
            )
        ),
        _case(
            (
                f"NOT (t.home_store ~ {_lit(RE_STORE_CODE)} AND length(t.home_store) <= 64)",
                _msg("home_store", MSG_STORE_CODE),
            ),
            (
                "t.home_store IS NOT NULL AND t.home_store_id IS NULL",
                "format('home_store: unknown store %L', t.home_store)",
            ),
        ),
        *(_case((f"t.{name}_bad", _msg(name, "must be true or false"))) for name in consent),
        _case(
            ("cardinality(t.tags) > 50", _msg("tags", "at most 50 tags")),
            (
                "EXISTS (SELECT 1 FROM unnest(t.tags) tag WHERE length(tag) NOT BETWEEN 1 AND 64)",
                _msg("tags", "each tag must be 1-64 characters (separate tags with ;)"),
            ),
        ),
        _case(
            (
                f"t.attributes_raw IS NOT NULL AND {attrs} IS NULL",
                _msg("attributes", "must be a JSON object"),
            ),
            (
                f"(SELECT count(*) FROM jsonb_object_keys({attrs})) > 50",  # noqa: S608
                _msg("attributes", "at most 50 custom attributes"),
            ),
            (
                f"EXISTS (SELECT 1 FROM jsonb_object_keys({attrs}) k"  # noqa: S608
                " WHERE length(k) NOT BETWEEN 1 AND 64)",
                _msg("attributes", "keys must be 1-64 characters"),
            ),
            (
                f"EXISTS (SELECT 1 FROM jsonb_each({attrs}) e "  # noqa: S608
                "WHERE jsonb_typeof(e.value) IN ('object', 'array'))",
                _msg("attributes", "values must be strings, numbers, booleans or null"),
            ),
            (
                f"octet_length({attrs}::text) > 4096",
                _msg("attributes", "must fit in 4096 bytes of JSON"),
            ),
        ),
    )
    return (
        "CREATE UNLOGGED TABLE {valid} AS SELECT t.line, t.external_id, t.name, t.gender,"  # noqa: S608
        " t.birth_date, t.phone, t.email, t.timezone, t.locale, t.home_store_id,"
        " t.consent_email, t.consent_sms, t.consent_push, t.consent_wechat, t.tags,"
        " COALESCE(t.attributes, '{}') AS attributes, false AS skip,"
        " COALESCE(t._error, " + error + ") AS error FROM (" + inner + ") t"
    )


_MEMBER_COLUMNS = (
    "name",
    "gender",
    "birth_date",
    "phone",
    "email",
    "timezone",
    "locale",
    "home_store_id",
    "consent_email",
    "consent_sms",
    "consent_push",
    "consent_wechat",
    "tags",
    "attributes",
)


def _merge_members(run: _Run) -> None:
    cols = ", ".join(_MEMBER_COLUMNS)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _MEMBER_COLUMNS)
    current = ", ".join(f"m.{c}" for c in _MEMBER_COLUMNS)
    incoming = ", ".join(f"EXCLUDED.{c}" for c in _MEMBER_COLUMNS)
    row = run.sql(
        "WITH up AS ("  # noqa: S608
        f" INSERT INTO members AS m (external_id, {cols})"
        f" SELECT v.external_id, {', '.join('v.' + c for c in _MEMBER_COLUMNS)} FROM {{valid}} v"
        " WHERE v.error IS NULL AND NOT v.skip"
        f" ON CONFLICT (external_id) DO UPDATE SET {sets}, updated_at = now()"
        # Erased members stay erased; unchanged rows are not rewritten (idempotent re-import).
        f" WHERE m.status = 'active' AND ({current}) IS DISTINCT FROM ({incoming})"
        " RETURNING (xmax = 0) AS created)"
        " SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM up"
    ).one()
    run.report.inserted, run.report.updated = int(row[0]), int(row[1])


def _load_zones(run: _Run) -> None:
    run.sql("CREATE TEMP TABLE {zones} (name text PRIMARY KEY)")
    run.sql(
        "INSERT INTO {zones} (name) SELECT unnest(CAST(:zones AS text[]))",
        zones=sorted(available_timezones()),
    )


# --------------------------------------------------------------------------------------
# Transactions
# --------------------------------------------------------------------------------------


def _transactions_sql(currency: str) -> str:
    inner = (
        "SELECT s._line AS line, s._error, s.transaction_id, s.member_id AS member_ext,"  # noqa: S608
        " s.kind, s.original_transaction_id AS original_ext, s.currency, s.store AS store_code,"
        " s.channel, s.amount AS amount_raw, s.occurred_at AS occurred_raw,"
        " s.items IS NOT NULL AS has_items,"
        f" s.transaction_id ~ {_lit(RE_EXTERNAL_ID)} AND length(s.transaction_id) <= 64"
        " AS transaction_id_ok,"
        " m.id AS member_pk, m.status AS member_status, st.id AS store_pk,"
        f" CASE WHEN s.amount ~ {_lit(RE_MONEY)} THEN s.amount::numeric END AS amount,"
        # The usual shape (2026-11-01T10:00:00+08:00) is checked by three hash lookups,
        # several times cheaper than the calendar regex that every other shape takes.
        " CASE WHEN length(s.occurred_at) = 25 AND substr(s.occurred_at, 11, 1) = 'T'"
        "   AND day.day IS NOT NULL AND clock.hms IS NOT NULL AND utc.off IS NOT NULL"
        "   THEN s.occurred_at::timestamptz"
        f" WHEN s.occurred_at ~ {_lit(RE_TIMESTAMP)} THEN s.occurred_at::timestamptz END"
        " AS occurred_at,"
        f" CASE WHEN s._badjson IS NULL AND s.items ~ {_lit(RE_JSON_ARRAY)}"
        " THEN s.items::jsonb END AS items,"
        " e.id IS NOT NULL AS present"
        " FROM {stage} s"
        " LEFT JOIN members m ON m.external_id = s.member_id"
        " LEFT JOIN stores st ON st.code = s.store"
        " LEFT JOIN transactions e ON e.external_id = s.transaction_id"
        " LEFT JOIN {calendar} day ON day.day = left(s.occurred_at, 10)"
        " LEFT JOIN {clock} clock ON clock.hms = substr(s.occurred_at, 12, 8)"
        " LEFT JOIN {offsets} utc ON utc.off = substr(s.occurred_at, 20)"
        # The fence keeps each cast evaluated once (below) instead of once per use.
        " OFFSET 0"
    )
    error = _errors(
        _case(
            ("t.transaction_id IS NULL", _msg("transaction_id", "is required")),
            ("NOT t.transaction_id_ok", _msg("transaction_id", MSG_EXTERNAL_ID)),
        ),
        _case(
            ("t.member_ext IS NULL", _msg("member_id", "is required")),
            ("t.member_status = 'active'", "NULL"),
            (
                "t.member_status = 'erased'",
                "format('member_id: member %L was erased', t.member_ext)",
            ),
            (
                f"t.member_ext ~ {_lit(RE_EXTERNAL_ID)} AND length(t.member_ext) <= 64",
                "format('member_id: unknown member %L', t.member_ext)",
            ),
            default=_msg("member_id", MSG_EXTERNAL_ID),
        ),
        _case(
            ("t.kind IS NULL", _msg("kind", "is required")),
            ("t.kind NOT IN ('purchase', 'refund')", _msg("kind", "must be purchase or refund")),
        ),
        _case(
            (
                "t.original_ext IS NULL AND t.kind = 'refund'",
                _msg("original_transaction_id", "is required for a refund"),
            ),
            ("t.original_ext IS NULL", "NULL"),
            (
                "t.kind = 'purchase'",
                _msg("original_transaction_id", "must be empty for a purchase"),
            ),
            (
                f"NOT (t.original_ext ~ {_lit(RE_EXTERNAL_ID)} AND length(t.original_ext) <= 64)",
                _msg("original_transaction_id", MSG_EXTERNAL_ID),
            ),
            (
                "t.original_ext = t.transaction_id",
                _msg("original_transaction_id", "must name another transaction"),
            ),
        ),
        _case(
            ("t.amount_raw IS NULL", _msg("amount", "is required")),
            ("t.amount IS NULL", _msg("amount", MSG_AMOUNT)),
            # As over HTTP: a fully discounted sale is a purchase; a refund of nothing is not.
            ("t.amount < 0 OR (t.amount = 0 AND t.kind = 'refund')", _msg("amount", MSG_AMOUNT)),
            ("t.amount >= 1000000000", _msg("amount", "is implausibly large")),
        ),
        _case(
            (f"t.currency = {_lit(currency)}", "NULL"),
            ("t.currency IS NULL", _msg("currency", "is required")),
            (f"t.currency ~ {_lit(RE_CURRENCY)}", _msg("currency", f"must be {currency}")),
            default=_msg("currency", "must be an ISO 4217 code such as CNY"),
        ),
        _case(
            ("t.store_pk IS NOT NULL", "NULL"),
            ("t.store_code IS NULL", _msg("store", "is required")),
            (
                f"t.store_code ~ {_lit(RE_STORE_CODE)} AND length(t.store_code) <= 64",
                "format('store: unknown store %L', t.store_code)",
            ),
            default=_msg("store", MSG_STORE_CODE),
        ),
        _case(
            ("t.channel IS NULL", _msg("channel", "is required")),
            ("t.channel NOT IN ('pos', 'ecom')", _msg("channel", "must be pos or ecom")),
        ),
        _case(
            (
                "t.occurred_at IS NOT NULL",
                "CASE WHEN t.occurred_at > now() + interval '1 day' THEN "
                + _msg("occurred_at", "must not be in the future")
                + " END",
            ),
            ("t.occurred_raw IS NULL", _msg("occurred_at", "is required")),
            (f"t.occurred_raw ~ {_lit(RE_NAIVE_TIMESTAMP)}", _msg("occurred_at", MSG_NAIVE)),
            (
                f"t.occurred_raw ~ {_lit(RE_TIMESTAMP_SHAPE)}",
                _msg("occurred_at", "is not a valid date and time"),
            ),
            default=_msg("occurred_at", MSG_TIMESTAMP),
        ),
        _case(
            ("NOT t.has_items", "NULL"),
            # A valid JSON text that starts with [ is an array.
            ("t.items IS NULL", _msg("items", "must be a JSON array")),
            ("jsonb_array_length(t.items) > 500", _msg("items", "at most 500 items")),
            (
                "jsonb_path_exists(t.items, 'strict $[*] ? (@.type() != \"object\")')",
                _msg("items", "each item must be a JSON object"),
            ),
        ),
    )
    return (
        "CREATE UNLOGGED TABLE {valid} AS SELECT t.line, t.transaction_id, t.kind,"  # noqa: S608
        " t.original_ext, t.member_pk, t.store_pk, t.channel, t.currency,"
        " t.amount, t.occurred_at, t.items, t.present, false AS skip,"
        " COALESCE(t._error, " + error + ") AS error FROM (" + inner + ") t"
    )


def _resolve_refunds(run: _Run) -> None:
    """Check refunds against their purchases, set-based; over-refunds are rejected in line order."""
    # The helper tables are UNLOGGED rather than TEMP: with hundreds of thousands of
    # refunds they outgrow the few megabytes of temp_buffers a session starts with.
    # What each refund points at, one row per id: a purchase stored before (locked, so
    # concurrent API refunds cannot race this import), else its line in this file.
    run.sql(
        "CREATE UNLOGGED TABLE {originals} AS"
        " WITH wanted AS ("
        "  SELECT DISTINCT original_ext FROM {valid}"
        "  WHERE kind = 'refund' AND error IS NULL AND NOT present AND NOT skip),"
        " stored AS ("
        "  SELECT t.external_id, t.id, t.kind, t.member_id, t.currency,"
        "         t.amount - t.refunded_amount AS remaining"
        "  FROM transactions t WHERE t.external_id IN (SELECT original_ext FROM wanted)"
        "  FOR UPDATE),"
        " candidates AS ("
        "  SELECT external_id, id, NULL::bigint AS line, kind, member_id, currency,"
        "         remaining, true AS stored, false AS rejected FROM stored"
        "  UNION ALL"
        "  SELECT v.transaction_id, NULL, v.line, v.kind, v.member_pk, v.currency, v.amount,"
        "         false, v.error IS NOT NULL"
        "  FROM {valid} v"
        # An identical repeat is represented by its first line.
        "  WHERE v.transaction_id IN (SELECT original_ext FROM wanted)"
        "    AND NOT v.present AND NOT v.skip)"
        " SELECT DISTINCT ON (external_id) * FROM candidates"
        " ORDER BY external_id, stored DESC, rejected, line"
    )
    run.sql(
        "CREATE UNLOGGED TABLE {refunds} AS"
        " SELECT v.ctid AS vctid, v.line, v.original_ext, v.amount, o.id AS original_id,"
        "   o.line AS original_line, o.remaining, CASE"
        "   WHEN o.external_id IS NULL THEN format("
        "     'original_transaction_id: no purchase %L, neither stored nor in this file',"
        "     v.original_ext)"
        "   WHEN o.kind <> 'purchase' THEN"
        "     format('original_transaction_id: %L is not a purchase', v.original_ext)"
        "   WHEN o.rejected THEN format("
        "     'original_transaction_id: the purchase %L (line %s) was rejected',"
        "     v.original_ext, o.line)"
        "   WHEN o.member_id <> v.member_pk THEN"
        "     'original_transaction_id: the purchase belongs to another member'"
        "   WHEN o.currency <> v.currency THEN"
        "     format('currency: must be %s, the currency of the purchase', o.currency)"
        "   END AS reason"
        " FROM {valid} v LEFT JOIN {originals} o ON o.external_id = v.original_ext"
        " WHERE v.kind = 'refund' AND v.error IS NULL AND NOT v.present AND NOT v.skip"
    )
    # Over-refunds: walk each purchase's refunds in line order and reject the first one
    # that does not fit what is left. A rejected refund frees its amount for later
    # lines, hence the loop; it repeats only while some purchase still overflows.
    while run.sql(
        "UPDATE {refunds} r SET reason = format("
        "  'amount: exceeds what is left to refund on purchase %L (at most %s)',"
        "  f.original_ext, f.remaining - f.before)"
        " FROM (SELECT DISTINCT ON (c.original_ext) c.line, c.original_ext, c.remaining,"
        "         c.before"
        "       FROM (SELECT line, original_ext, amount, remaining,"
        "               COALESCE(sum(amount) OVER (PARTITION BY original_ext ORDER BY line"
        "                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before"
        "             FROM {refunds} WHERE reason IS NULL) c"
        "       WHERE c.before + c.amount > c.remaining"
        "       ORDER BY c.original_ext, c.line) f"
        " WHERE r.line = f.line"
    ).rowcount:
        pass
    if run.sql("SELECT count(*) FROM {refunds} WHERE reason IS NOT NULL").scalar_one():
        # Rows are addressed by ctid: the work tables have no index, and a TID lookup
        # beats scanning millions of rows to change a few.
        run.sql(
            "UPDATE {valid} v SET error = r.reason FROM {refunds} r"
            " WHERE v.ctid = r.vctid AND r.reason IS NOT NULL"
        )
    # New purchases that new refunds point at get their id now, so that one INSERT can
    # hold both, and they are stored with what has already been refunded of them.
    run.sql(
        "CREATE UNLOGGED TABLE {pids} AS SELECT original_line AS line,"
        " nextval('{idseq}'::regclass) AS id, sum(amount) AS refunded"
        " FROM {refunds} WHERE reason IS NULL AND original_line IS NOT NULL"
        " GROUP BY original_line"
    )
    # One table of what the INSERT adds to those rows: the pre-assigned id and refunded
    # total of purchases, the purchase id of refunds.
    run.sql(
        "CREATE UNLOGGED TABLE {links} AS"
        " SELECT line, id AS new_id, NULL::bigint AS original_id, refunded FROM {pids}"
        " UNION ALL"
        " SELECT r.line, NULL, COALESCE(r.original_id, p.id), 0"
        " FROM {refunds} r LEFT JOIN {pids} p ON p.line = r.original_line"
        " WHERE r.reason IS NULL"
    )
    run.sql("ANALYZE {links}")


# Rolling windows (30/90/365 days), distinct purchase days and the median gap between
# them, for members who had no statistics row before this import: all their purchases
# are in the statement's RETURNING rows, so they come out of the same GROUP BY as the
# lifetime figures instead of a second pass over transactions afterwards. The
# definitions are those of segments.stats (a test compares the two on every import):
# spend is net of what has been refunded, days are local days in the business time
# zone, gaps are between consecutive distinct purchase days. Members that already had
# a row are rebuilt from all their transactions after the merge.
_WINDOW_VALUES = (
    ", ".join(
        f"count(*) FILTER (WHERE kind = 'purchase' AND occurred_at >= :s{n})" for n in (30, 90, 365)
    )
    + ", "
    + ", ".join(
        "COALESCE(sum(amount - refunded_amount)"
        f" FILTER (WHERE kind = 'purchase' AND occurred_at >= :s{n}), 0)"
        for n in (30, 90, 365)
    )
    + ", count(*) FILTER (WHERE kind = 'purchase' AND (gap IS NULL OR gap > 0)),"
    " CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY gap)"
    "   FILTER (WHERE kind = 'purchase' AND gap > 0) AS numeric(8, 1)),"
    # The sorted distinct purchase days the purchase path then extends (segments.stats).
    " COALESCE(array_agg(day ORDER BY occurred_at)"
    "   FILTER (WHERE kind = 'purchase' AND (gap IS NULL OR gap > 0)), '{}')"
)

_TX_INSERT = (
    "WITH ins AS ("  # noqa: S608
    " INSERT INTO transactions (id, external_id, kind, member_id, store_id, channel,"
    "   occurred_at, amount, currency, items, original_id, refunded_amount)"
    " SELECT COALESCE(l.new_id, nextval('{idseq}'::regclass)),"
    "   v.transaction_id, v.kind, v.member_pk, v.store_pk, v.channel, v.occurred_at, v.amount,"
    "   v.currency, v.items, l.original_id, COALESCE(l.refunded, 0)"
    " FROM {valid} v LEFT JOIN {links} l ON l.line = v.line"
    " WHERE v.error IS NULL AND NOT v.present AND NOT v.skip"
    " {conflict}"
    " RETURNING member_id, kind, amount, refunded_amount, occurred_at),"
    # The gap from each purchase's local day to the previous purchase's (refunds are
    # their own partition and only counted as lifetime figures).
    " gaps AS ("
    " SELECT member_id, kind, amount, refunded_amount, occurred_at, day,"
    "   day - lag(day) OVER (PARTITION BY member_id, kind ORDER BY occurred_at) AS gap"
    " FROM (SELECT *, CAST(timezone(:tz, occurred_at) AS date) AS day FROM ins) d),"
    " stats AS ("
    " INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at,"
    "   purchase_count, purchase_amount, refund_count, refund_amount, net_spend, updated_at,"
    "   purchases_30d, purchases_90d, purchases_365d, spend_30d, spend_90d, spend_365d,"
    "   purchase_days, median_interpurchase_days, purchase_dates)"
    " SELECT member_id,"
    "   min(occurred_at) FILTER (WHERE kind = 'purchase'),"
    "   max(occurred_at) FILTER (WHERE kind = 'purchase'),"
    "   count(*) FILTER (WHERE kind = 'purchase'),"
    "   COALESCE(sum(amount) FILTER (WHERE kind = 'purchase'), 0),"
    "   count(*) FILTER (WHERE kind = 'refund'),"
    "   COALESCE(sum(amount) FILTER (WHERE kind = 'refund'), 0),"
    "   COALESCE(sum(CASE WHEN kind = 'purchase' THEN amount ELSE -amount END), 0),"
    "   now(), " + _WINDOW_VALUES + " FROM gaps GROUP BY member_id"
    # The per-event arithmetic, applied to all of a member's new rows at once. Windows
    # and purchase days of such a member are rebuilt after this statement.
    " ON CONFLICT (member_id) DO UPDATE SET"
    "   first_purchase_at = LEAST(ms.first_purchase_at, EXCLUDED.first_purchase_at),"
    "   last_purchase_at = GREATEST(ms.last_purchase_at, EXCLUDED.last_purchase_at),"
    "   purchase_count = ms.purchase_count + EXCLUDED.purchase_count,"
    "   purchase_amount = ms.purchase_amount + EXCLUDED.purchase_amount,"
    "   refund_count = ms.refund_count + EXCLUDED.refund_count,"
    "   refund_amount = ms.refund_amount + EXCLUDED.refund_amount,"
    "   net_spend = ms.net_spend + EXCLUDED.net_spend,"
    "   updated_at = now()"
    " RETURNING member_id, xmax = 0 AS created),"
    # The referenced members are locked as the RI triggers lock them (FOR KEY SHARE),
    # but once per member rather than once per inserted row.
    " members_locked AS ("
    " SELECT m.id FROM members m WHERE m.id IN (SELECT member_id FROM stats)"
    " FOR KEY SHARE OF m),"
    " counted AS ("
    " SELECT count(*) AS n, count(*) FILTER (WHERE kind = 'refund') AS refunds FROM ins)"
    " SELECT counted.n, counted.refunds,"
    "   (SELECT count(*) FROM stats) - (SELECT count(*) FROM members_locked),"
    "   (SELECT array_agg(member_id) FROM stats WHERE NOT created)"
    " FROM counted"
)

# Purchases stored before this import take the refunds of this file now; refunds of
# purchases in the file are counted into the purchase row as it is inserted.
_STORED_REFUNDS = (
    "UPDATE transactions t SET refunded_amount = t.refunded_amount + r.total"
    " FROM (SELECT original_id, sum(amount) AS total FROM {refunds}"
    "       WHERE reason IS NULL AND original_line IS NULL GROUP BY original_id) r"
    " WHERE t.id = r.original_id"
)


def _use_set_based_keys(run: _Run) -> bool:
    """Whether this import may skip PostgreSQL's per-row foreign-key triggers."""
    # The RI triggers run one lookup query per inserted row and reference. The import
    # has resolved every reference with a join already and locks each referenced row
    # once instead. Skipping them needs session_replication_role (superuser, or GRANT
    # SET ON PARAMETER), and is refused when the tables carry triggers of their own,
    # which replica mode would silence as well.
    own_triggers = run.sql(
        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"
        " AND tgrelid IN ('transactions'::regclass, 'member_stats'::regclass)"
    ).scalar_one()
    if own_triggers:
        return False
    try:
        with run.savepoint():
            run.sql("SET LOCAL session_replication_role = replica")
            run.sql("SET LOCAL session_replication_role = origin")
    except DBAPIError:
        return False
    return True


def _merge_transactions(run: _Run, *, dedupe: bool) -> None:
    if dedupe:
        with run.timed("duplicates"):
            run.mark_duplicates("transaction_id", _TX_COMPARED)
    with run.timed("refunds"):
        _resolve_refunds(run)
        expected_refunds = int(
            run.sql("SELECT count(*) FROM {refunds} WHERE reason IS NULL").scalar_one()
        )
        run.sql(_STORED_REFUNDS)
    # ON CONFLICT only when duplicates were possible. The per-row triggers stay on then:
    # a concurrent writer could leave a pre-assigned purchase id pointing at nothing.
    fast_keys = not dedupe and _use_set_based_keys(run)
    if fast_keys:
        # A chain has hundreds of stores: locking them all (FOR KEY SHARE only blocks
        # deleting them or changing their id) is cheaper than finding the ones used.
        run.sql("SELECT count(*) FROM (SELECT id FROM stores FOR KEY SHARE) s")
        run.sql("SET LOCAL session_replication_role = replica")
    conflict = "ON CONFLICT (external_id) DO NOTHING" if dedupe else ""
    with run.timed("merge"):
        row = run.sql(_TX_INSERT.replace("{conflict}", conflict), **run.windows.params()).one()
    if fast_keys:
        run.sql("SET LOCAL session_replication_role = origin")
    inserted, refunds, lost_members = (int(x) for x in row[:3])
    run.windows.stale = [int(i) for i in row[3] or ()]
    if lost_members:
        raise ImportFailed("members were deleted during the import; run it again")
    if refunds != expected_refunds:
        raise ImportFailed("another writer stored some of these refunds meanwhile; run it again")
    run.report.inserted = inserted


_TX_COMPARED = (
    "kind",
    "original_ext",
    "member_pk",
    "store_pk",
    "channel",
    "currency",
    "amount",
    "occurred_at",
    "items",
)


@dataclass
class _Windows:
    """The window state the merge computes new members' windows for, and who needs more."""

    as_of: date
    timezone: str
    starts: dict[int, datetime]
    # Members whose statistics row existed before the import: rebuilt afterwards.
    stale: list[int] = field(default_factory=list)

    @classmethod
    def locked(cls, conn: Connection) -> _Windows:
        """The stored state, locked until commit so the daily ageing cannot interleave."""
        from segments.config import ScoringConfig
        from segments.stats import current_state, local_today, window_starts

        state = current_state(conn, lock=True)
        tz = state.timezone if state else ScoringConfig.from_env().timezone
        # Before the first refresh the rebuild after the merge stores this state.
        as_of = state.as_of if state else local_today(tz)
        return cls(as_of, tz, window_starts(as_of, tz))

    def params(self) -> dict[str, Any]:
        """Bind parameters of _TX_INSERT."""
        return {"tz": self.timezone, **{f"s{n}": start for n, start in self.starts.items()}}


def _import_transactions(run: _Run) -> None:
    run.names["idseq"] = str(
        run.sql("SELECT pg_get_serial_sequence('transactions', 'id')").scalar_one()
    )
    run.windows = _Windows.locked(run.conn)
    run.create_lookups()
    run.validate(_transactions_sql(run.currency), ["items"])
    # Optimistic: a file without repeated ids (the normal case) needs no duplicate scan.
    # If the unique index finds one, undo the merge and redo it with duplicates sorted out.
    try:
        with run.savepoint():
            _merge_transactions(run, dedupe=False)
    except DBAPIError as exc:
        if not isinstance(exc.orig, psycopg2.errors.UniqueViolation):
            raise
        run.sql("DROP TABLE IF EXISTS {refunds}, {originals}, {pids}, {links}")
        _merge_transactions(run, dedupe=True)
    _refresh_windows(run)


def _refresh_windows(run: _Run) -> None:
    # Members who had statistics before get windows and purchase days recomputed from
    # all their transactions, in the import's transaction; the merge wrote everyone
    # else's. This also stores the window state if there was none yet.
    from segments.stats import rebuild_windows

    if not run.report.inserted:
        return
    with run.timed("windows"):
        rebuild_windows(
            run.conn,
            run.windows.as_of,
            member_ids=run.windows.stale,
            timezone=run.windows.timezone,
        )


def _import_members(run: _Run) -> None:
    _load_zones(run)
    run.create_lookups()
    run.validate(_members_sql(), ["attributes"])
    run.mark_duplicates("external_id", ("external_id", *_MEMBER_COLUMNS))
    _merge_members(run)


def _import_stores(run: _Run) -> None:
    run.validate(_stores_sql(), [])
    run.mark_duplicates("code", ("name", "region"))
    _merge_stores(run)


_IMPORTERS: dict[str, Callable[[_Run], None]] = {
    "stores": _import_stores,
    "members": _import_members,
    "transactions": _import_transactions,
}


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def default_rejects_path(path: Path) -> Path:
    """FILE.rejects.csv next to the imported file."""
    return path.with_name(path.name + ".rejects.csv")


def run_import(
    bind: Engine | Connection,
    kind: str,
    path: Path | str,
    *,
    rejects_path: Path | None = None,
    fmt: str | None = None,
    currency: str | None = None,
    actor: str = "import",
    progress: bool | None = None,
) -> ImportReport:
    """Import a CSV or NDJSON file of `kind` in one transaction and return the report."""
    # With an Engine the import commits on success. With a Connection it runs in a
    # savepoint of the caller's open transaction (the caller commits), or in its own
    # transaction when none is open. Nothing is written when it raises.
    if kind not in KINDS:
        raise ImportFailed(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise ImportFailed(f"{path} is not a readable file")
    fmt = detect_format(path, fmt)
    expected = FIELDS[kind]
    if fmt == "csv":
        columns, header_bytes = _read_header(path, expected)
    else:
        columns, header_bytes = list(expected), 0
    report = ImportReport(kind=kind, path=path, fmt=fmt)
    target = rejects_path if rejects_path is not None else default_rejects_path(path)
    currency = (currency or Config.from_env().currency).upper()
    started = time.perf_counter()
    written: list[Path] = []

    def work(conn: Connection) -> None:
        """The import proper, inside whatever transaction the caller set up."""
        run = _Run(conn, kind, path, fmt, columns, header_bytes, report, currency, actor, progress)
        run.create_stage()
        with run.timed("copy"):
            report.read = run.load()
        with run.tuned():
            _IMPORTERS[kind](run)
        # Every row read is inserted, updated, skipped or rejected: when the first two
        # account for all of them there is nothing to count (the common, fast case).
        with run.timed("rejects"):
            if report.inserted + report.updated < report.read:
                report.rejected = run.count_rejects()
            report.skipped = report.read - report.rejected - report.inserted - report.updated
            if report.rejected:
                written.append(run.write_rejects(target))
        run.audit()
        run.drop_work_tables()

    try:
        if isinstance(bind, Engine):
            with bind.begin() as conn:
                work(conn)
        elif bind.in_transaction():
            with bind.begin_nested():
                work(bind)
        else:
            with bind.begin():
                work(bind)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    if written:
        # Only after the data is committed does the reject file replace an older one.
        os.replace(written[0], target)
        report.rejects_path = target
    report.seconds = time.perf_counter() - started
    return report


_REBUILD = """
INSERT INTO member_stats AS ms (member_id, first_purchase_at, last_purchase_at, purchase_count,
                                purchase_amount, refund_count, refund_amount, net_spend,
                                updated_at)
SELECT member_id,
       min(occurred_at) FILTER (WHERE kind = 'purchase'),
       max(occurred_at) FILTER (WHERE kind = 'purchase'),
       count(*) FILTER (WHERE kind = 'purchase'),
       COALESCE(sum(amount) FILTER (WHERE kind = 'purchase'), 0),
       count(*) FILTER (WHERE kind = 'refund'),
       COALESCE(sum(amount) FILTER (WHERE kind = 'refund'), 0),
       COALESCE(sum(CASE WHEN kind = 'purchase' THEN amount ELSE -amount END), 0),
       now()
FROM transactions
WHERE CAST(:ids AS bigint[]) IS NULL OR member_id = ANY(CAST(:ids AS bigint[]))
GROUP BY member_id
ON CONFLICT (member_id) DO UPDATE SET
    first_purchase_at = EXCLUDED.first_purchase_at,
    last_purchase_at = EXCLUDED.last_purchase_at,
    purchase_count = EXCLUDED.purchase_count,
    purchase_amount = EXCLUDED.purchase_amount,
    refund_count = EXCLUDED.refund_count,
    refund_amount = EXCLUDED.refund_amount,
    net_spend = EXCLUDED.net_spend,
    updated_at = now()
"""

_REBUILD_ORPHANS = """
DELETE FROM member_stats ms
WHERE (CAST(:ids AS bigint[]) IS NULL OR ms.member_id = ANY(CAST(:ids AS bigint[])))
  AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.member_id = ms.member_id)
"""


def rebuild_member_stats(
    bind: Session | Connection, member_ids: Iterable[int] | None = None
) -> int:
    """Recompute purchase statistics from transactions (all members, or the given ids)."""
    ids = None if member_ids is None else sorted(set(member_ids))
    result = bind.execute(text(_REBUILD), {"ids": ids})
    upserted = cast(CursorResult[Any], result).rowcount
    # A member without transactions has no statistics row, as on the event path.
    bind.execute(text(_REBUILD_ORPHANS), {"ids": ids})
    return int(upserted)
