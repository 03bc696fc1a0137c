"""Coupon codes: unguessable, easy to read aloud and type, with a check character.

The scheme (the same in Python and in the SQL function `patron_coupon_code()` that
migration 0005b creates, so campaigns can issue codes set-based):

- Alphabet of 31 symbols, ``23456789ABCDEFGHJKMNPQRSTUVWXYZ``: digits and capital
  letters without the look-alikes 0/O, 1/I/L. 31 is prime, which the check needs.
- 15 random symbols (secrets in Python, md5 of two `gen_random_uuid()` in SQL):
  15 * log2(31) = 74.3 bits, far above the 60-bit floor. Python draws one uniform
  integer below 31**15; SQL takes two 63-bit random integers and uses 8 and 7 base-31
  digits of them, which is uniform to within 31**8 / 2**63 < 1e-7 (no usable bias).
- One check symbol: with values v_0..v_15 (position 0 first, the check last) and
  weights w_i = 16 - i, the code is well formed when sum(w_i * v_i) = 0 (mod 31).
  Like the ISO/IEC 7064 pure systems with a prime modulus, this catches every
  single-symbol substitution (w_i * d is never 0 mod 31 for 0 < w_i, |d| < 31) and
  every transposition of two adjacent symbols (the weights differ by 1, so the sum
  changes by a - b, never 0 mod 31 for a != b); also transpositions across one
  symbol (weights differ by 2). Luhn mod N misses some adjacent transpositions.
- Bulk issuing (a campaign run over its audience) draws the two 63-bit integers per
  code from `secrets` and does the same arithmetic vectorised with numpy
  (`bulk_codes`): the SQL function costs ~10 us a code, the array ~0.3 us.
- Stored without separators (16 characters); shown in groups of four with dashes
  (`display`). Input is normalised (`normalise`): Unicode compatibility forms
  (full-width characters from a Chinese IME), case, spaces, dashes, dots and
  underscores, and Cyrillic / Greek capitals that look like Latin ones.
"""

from __future__ import annotations

import secrets
import unicodedata

import numpy as np

ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
BASE = len(ALPHABET)  # 31, prime
BODY_LENGTH = 15
LENGTH = BODY_LENGTH + 1
GROUP = 4
RANDOM_BITS = 74  # floor(15 * log2(31))

_VALUE = {ch: i for i, ch in enumerate(ALPHABET)}
_SEPARATORS = dict.fromkeys(map(ord, " \t\r\n-_.\u00a0\u2010\u2011\u2012\u2013\u2014\u2212"))
# Homoglyphs a keyboard in another layout produces for the Latin capitals we use.
_HOMOGLYPHS = str.maketrans(
    {
        "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "К": "K", "М": "M",
        "Р": "P", "Т": "T", "Х": "X", "У": "Y", "Ѕ": "S",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Κ": "K", "Μ": "M",
        "Ν": "N", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    }
)  # fmt: skip


def _check_symbol(body: str) -> str:
    total = sum((LENGTH - i) * _VALUE[ch] for i, ch in enumerate(body))
    return ALPHABET[-total % BASE]


def new_code() -> str:
    """A fresh random code in stored form (16 symbols, no dashes)."""
    n = secrets.randbelow(BASE**BODY_LENGTH)
    body = []
    for _ in range(BODY_LENGTH):
        n, digit = divmod(n, BASE)
        body.append(ALPHABET[digit])
    text = "".join(body)
    return text + _check_symbol(text)


def normalise(code: str) -> str:
    """What the customer typed, in stored form; may still be malformed (see is_well_formed)."""
    text = unicodedata.normalize("NFKC", code).translate(_SEPARATORS).upper()
    return text.translate(_HOMOGLYPHS)


def is_well_formed(code: str) -> bool:
    """True when `code` (in any accepted spelling) has the length, symbols and check."""
    text = normalise(code)
    if len(text) != LENGTH or any(ch not in _VALUE for ch in text):
        return False
    return sum((LENGTH - i) * _VALUE[ch] for i, ch in enumerate(text)) % BASE == 0


def display(code: str) -> str:
    """Grouped for people: ABCD-EFGH-JKMN-PQRS. Other (legacy) codes are returned as is."""
    text = normalise(code)
    if len(text) != LENGTH:
        return code
    return "-".join(text[i : i + GROUP] for i in range(0, LENGTH, GROUP))


def sql_function_body() -> str:
    """The PL/pgSQL body of `patron_coupon_code()` (used by the migration and the tests).

    One expression over two random 63-bit integers: per-symbol loops or `translate`
    cost 10 to 20 times more in PL/pgSQL than this straight-line arithmetic.
    """
    symbols, weights = [], []
    for i in range(BODY_LENGTH):
        var, k = ("x", i) if i < 8 else ("y", i - 8)
        digit = f"(({var} / {BASE**k}) % {BASE})" if k else f"({var} % {BASE})"
        symbols.append(f"substr(a, (1 + {digit})::int, 1)")
        weights.append(f"{LENGTH - i} * {digit}")
    body = " || ".join(symbols)
    total = " + ".join(weights)
    return f"""
DECLARE
    a CONSTANT text := '{ALPHABET}';
    -- Two v4 UUIDs (pg_strong_random, 244 random bits) hashed to 128 uniform bits: core
    -- PostgreSQL only, so the embedded server (no pgcrypto) runs it too.
    h bit(128) := ('x' || md5(gen_random_uuid()::text || gen_random_uuid()::text))::bit(128);
    x bigint := substring(h from 2 for 63)::bigint;
    y bigint := substring(h from 66 for 63)::bigint;
BEGIN
    RETURN {body}
        || substr(a, (1 + ({BASE} - ({total}) % {BASE}) % {BASE})::int, 1);
END
"""


def sql_code_expression(x: str = "x", y: str = "y") -> str:
    """A SQL expression for one code from two random non-negative bigints `x`, `y` (the
    same arithmetic as `patron_coupon_code()`, inlined: bulk generation then needs no
    PL/pgSQL call per row)."""
    symbols, weights = [], []
    for i in range(BODY_LENGTH):
        var, k = (x, i) if i < 8 else (y, i - 8)
        digit = f"(({var} / {BASE**k}) % {BASE})" if k else f"({var} % {BASE})"
        symbols.append(f"substr('{ALPHABET}', (1 + {digit})::int, 1)")
        weights.append(f"{LENGTH - i} * {digit}")
    check = (
        f"substr('{ALPHABET}', (1 + ({BASE} - ({' + '.join(weights)}) % {BASE}) % {BASE})::int, 1)"
    )
    return " || ".join(symbols) + " || " + check


# `n` rows of two random 63-bit integers (x, y), from the same source as the function.
# OFFSET 0 keeps the planner from inlining the volatile draw into each use of x and y.
SQL_RANDOM_PAIRS = """
    SELECT substring(h from 2 for 63)::bigint AS x, substring(h from 66 for 63)::bigint AS y
    FROM (SELECT ('x' || md5(gen_random_uuid()::text || gen_random_uuid()::text))::bit(128) AS h
          FROM generate_series(1, :n) OFFSET 0) AS draws
    OFFSET 0
"""


def codes_from_pairs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Codes (16-byte ASCII strings) from arrays of non-negative 63-bit integers `x`, `y`:
    the arithmetic of `sql_code_expression`, element-wise."""
    x, y = x.astype(np.uint64), y.astype(np.uint64)
    base = np.uint64(BASE)
    digits = np.empty((len(x), LENGTH), dtype=np.uint64)
    total = np.zeros(len(x), dtype=np.uint64)
    for i in range(BODY_LENGTH):
        var, k = (x, i) if i < 8 else (y, i - 8)
        digits[:, i] = (var // np.uint64(BASE**k)) % base
        total += np.uint64(LENGTH - i) * digits[:, i]
    digits[:, BODY_LENGTH] = (base - total % base) % base
    symbols = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)[digits]
    return np.ascontiguousarray(symbols).view(f"S{LENGTH}").ravel()


def bulk_codes(n: int) -> np.ndarray:
    """`n` fresh codes in stored form, sorted (so inserting them in this order fills the
    unique index on `code` left to right). Random bits from `secrets` (the OS CSPRNG)."""
    pairs = np.frombuffer(secrets.token_bytes(16 * n), dtype=np.uint64).reshape(n, 2)
    codes = codes_from_pairs(pairs[:, 0] >> np.uint64(1), pairs[:, 1] >> np.uint64(1))
    codes.sort()
    return codes
