"""Coupon codes: Python and SQL generators follow one scheme; the check catches typos."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from campaigns import codes

SQL_SAMPLE = 20_000


@pytest.fixture(scope="module")
def sql_codes(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT patron_coupon_code() FROM generate_series(1, :n)"), {"n": SQL_SAMPLE}
            ).scalars()
        )


_PY_CODES = st.builds(lambda _: codes.new_code(), st.integers())


def _typo_positions(code: str) -> st.SearchStrategy[tuple[int, str]]:
    return st.tuples(st.integers(0, len(code) - 1), st.sampled_from(codes.ALPHABET))


def _assert_catches_typos(code: str, data: st.DataObject) -> None:
    assert codes.is_well_formed(code)
    pos, symbol = data.draw(_typo_positions(code))
    if symbol != code[pos]:
        typo = code[:pos] + symbol + code[pos + 1 :]
        assert not codes.is_well_formed(typo), f"{code} -> {typo} passed the check"
    i = data.draw(st.integers(0, len(code) - 2))
    if code[i] != code[i + 1]:
        swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
        assert not codes.is_well_formed(swapped), f"{code} -> {swapped} passed the check"


@given(_PY_CODES, st.data())
def test_python_codes_are_well_formed_and_any_typo_or_swap_is_caught(code: str, data: Any):
    assert len(code) == codes.LENGTH
    assert set(code) <= set(codes.ALPHABET)
    _assert_catches_typos(code, data)


@settings(max_examples=300)
@given(st.data())
def test_sql_codes_are_well_formed_and_any_typo_or_swap_is_caught(sql_codes: list[str], data: Any):
    code = data.draw(st.sampled_from(sql_codes))
    assert len(code) == codes.LENGTH
    _assert_catches_typos(code, data)


def test_every_sql_code_passes_the_check(sql_codes: list[str]):
    assert all(codes.is_well_formed(c) for c in sql_codes)
    assert len(set(sql_codes)) == len(sql_codes)


_BIG = st.integers(0, 2**63 - 1)


@settings(max_examples=200)
@given(st.lists(st.tuples(_BIG, _BIG), min_size=1, max_size=20))
def test_bulk_arithmetic_is_the_sql_arithmetic(engine: Engine, pairs: list[tuple[int, int]]):
    # The same (x, y) must give the same code from numpy (bulk issuing) and from the SQL
    # expression behind patron_coupon_code() and bearer-code batches.
    xs, ys = (np.array(v, dtype=np.uint64) for v in zip(*pairs, strict=True))
    bulk = [c.decode() for c in codes.codes_from_pairs(xs, ys)]
    with engine.connect() as conn:
        sql = conn.execute(
            text(
                f"SELECT {codes.sql_code_expression('p.x', 'p.y')} FROM unnest("
                "CAST(:x AS bigint[]), CAST(:y AS bigint[])) WITH ORDINALITY AS p(x, y, i)"
                " ORDER BY p.i"
            ),
            {"x": [x for x, _ in pairs], "y": [y for _, y in pairs]},
        ).scalars()
        assert bulk == list(sql)


def test_bulk_codes_are_sorted_distinct_and_well_formed():
    drawn = [c.decode() for c in codes.bulk_codes(SQL_SAMPLE)]
    assert drawn == sorted(drawn) and len(set(drawn)) == SQL_SAMPLE
    assert all(codes.is_well_formed(c) for c in drawn)
    assert codes.bulk_codes(0).size == 0


@pytest.mark.parametrize("source", ["python", "sql", "bulk"])
def test_every_symbol_is_used_evenly_at_every_position(source: str, sql_codes: list[str]):
    sample = {
        "sql": lambda: sql_codes,
        "python": lambda: [codes.new_code() for _ in range(SQL_SAMPLE)],
        "bulk": lambda: [c.decode() for c in codes.bulk_codes(SQL_SAMPLE)],
    }[source]()
    expected = len(sample) / codes.BASE
    for pos in range(codes.BODY_LENGTH):
        counts = Counter(c[pos] for c in sample)
        assert set(counts) == set(codes.ALPHABET), f"position {pos} misses symbols"
        # About 25 standard deviations each side: fails only if the draw is biased.
        assert all(0.75 * expected < n < 1.25 * expected for n in counts.values()), (pos, counts)


def test_no_look_alike_symbols():
    assert not set("0O1IL") & set(codes.ALPHABET)
    assert len(codes.ALPHABET) == codes.BASE == 31
    assert codes.RANDOM_BITS >= 60


def test_input_is_normalised_from_what_people_type():
    code = codes.new_code()
    shown = codes.display(code)
    assert shown.count("-") == 3 and shown.replace("-", "") == code
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in code)  # a Chinese IME's output
    for typed in (
        shown,
        shown.lower(),
        f"  {code[:8]} {code[8:]} ",
        fullwidth,
        code.replace("A", "\u0410").replace("E", "\u0395"),  # Cyrillic A, Greek E
    ):
        assert codes.normalise(typed) == code, typed
        assert codes.is_well_formed(typed)


def test_malformed_inputs_are_rejected():
    code = codes.new_code()
    assert not codes.is_well_formed(code[:-1])
    assert not codes.is_well_formed(code + "2")
    assert not codes.is_well_formed("O" + code[1:])
    assert not codes.is_well_formed("")
