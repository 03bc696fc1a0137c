"""The readable text form: a tokenizer and recursive-descent parser with positions, and a printer.

    rfm.segment in ("at_risk", "cant_lose") and days_since_last_purchase >= 90
    and not (tags contains "staff" or consent.sms = false)

Precedence is `not` > `and` > `or`; parentheses group. Strings are double-quoted
with JSON escapes; dates (2026-02-28) and timestamps (2026-02-28T09:30:00+08:00)
are bare. The parser produces the same JSON-shaped tree the API accepts, plus
the text position of every node so validation errors can point into the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from rules.ast import All, AnyOf, Leaf, Node, Not
from rules.errors import RuleSyntaxError
from rules.vocabulary import KEYWORDS, Operator

MAX_TEXT = 20_000
# Deeper than validation allows, so a too-deep rule gets a proper pointer-based error,
# yet shallow enough that the recursive descent can never exhaust the Python stack.
MAX_NESTING = 40

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:\d{2})?)
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\w.:-]))
  | (?P<number>-?\d{1,30}(?:\.\d{1,30})?(?![\w.]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<symbol><=|>=|!=|==|<>|=|<|>|\(|\)|,)
    """,
    re.VERBOSE,
)

_COMPARE = {
    "=": Operator.EQ,
    "==": Operator.EQ,
    "!=": Operator.NE,
    "<>": Operator.NE,
    "<": Operator.LT,
    "<=": Operator.LE,
    ">": Operator.GT,
    ">=": Operator.GE,
}
_SYMBOL = {
    Operator.EQ: "=",
    Operator.NE: "!=",
    Operator.LT: "<",
    Operator.LE: "<=",
    Operator.GT: ">",
    Operator.GE: ">=",
}


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # string, datetime, date, number, ident, keyword, symbol, end
    text: str
    pos: int
    value: Any = None


def tokenize(text: str) -> list[Token]:
    if len(text) > MAX_TEXT:
        raise RuleSyntaxError(f"rule text is longer than {MAX_TEXT} characters", text, MAX_TEXT)
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            what = "a NUL byte" if ch == "\x00" else f"character {ch!r}"
            hint = "a field, value, operator or parenthesis"
            if ch.isdigit() or ch == "-":
                what, hint = "number", "at most 30 digits before and after the decimal point"
            elif ch == '"':
                hint = "a closing quote (control characters must be escaped, e.g. \\n)"
            raise RuleSyntaxError(f"unexpected {what}", text, pos, hint)
        kind = m.lastgroup or ""
        raw = m.group()
        if kind != "ws":
            tokens.append(_token(kind, raw, pos, text))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _token(kind: str, raw: str, pos: int, text: str) -> Token:
    if kind == "string":
        return Token(kind, raw, pos, json.loads(raw))
    if kind == "number":
        return Token(kind, raw, pos, Decimal(raw) if "." in raw else int(raw))
    if kind == "date":
        try:
            return Token(kind, raw, pos, date.fromisoformat(raw))
        except ValueError:
            raise RuleSyntaxError(f"{raw} is not a calendar date", text, pos) from None
    if kind == "datetime":
        try:
            return Token(kind, raw, pos, datetime.fromisoformat(raw))
        except ValueError:
            raise RuleSyntaxError(f"{raw} is not a valid timestamp", text, pos) from None
    if kind == "ident" and raw.lower() in KEYWORDS:
        word = raw.lower()
        if word in ("true", "false"):
            return Token("bool", word, pos, word == "true")
        return Token("keyword", word, pos)
    return Token(kind, raw, pos)


@dataclass
class _Parsed:
    """A parsed node before it becomes JSON: keeps its text position."""

    kind: str  # all, any, not, leaf
    pos: int
    parts: list[_Parsed]
    leaf: dict[str, Any] | None = None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.nesting = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def fail(self, message: str, expected: str | None = None, tok: Token | None = None) -> None:
        at = tok or self.tok
        found = "the end of the rule" if at.kind == "end" else repr(at.text)
        raise RuleSyntaxError(f"{message}, found {found}", self.text, at.pos, expected)

    def take(self) -> Token:
        tok = self.tok
        self.i += 1
        return tok

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def expect_word(self, word: str) -> Token:
        tok = self.accept("keyword", word)
        if tok is None:
            self.fail(f"expected '{word}'", f"'{word}'")
        return tok  # type: ignore[return-value]

    def parse(self) -> _Parsed:
        if self.tok.kind == "end":
            self.fail("the rule is empty", "a condition such as purchase_count >= 3")
        node = self.or_expr()
        if self.tok.kind != "end":
            self.fail("unexpected text after a complete condition", "'and', 'or' or the end")
        return node

    def nest(self) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.fail(f"conditions are nested more than {MAX_NESTING} levels deep")

    def or_expr(self) -> _Parsed:
        first = self.and_expr()
        parts = [first]
        while self.accept("keyword", "or"):
            parts.append(self.and_expr())
        return first if len(parts) == 1 else _Parsed("any", first.pos, parts)

    def and_expr(self) -> _Parsed:
        first = self.not_expr()
        parts = [first]
        while self.accept("keyword", "and"):
            parts.append(self.not_expr())
        return first if len(parts) == 1 else _Parsed("all", first.pos, parts)

    def not_expr(self) -> _Parsed:
        tok = self.accept("keyword", "not")
        if tok is not None:
            self.nest()
            child = self.not_expr()
            self.nesting -= 1
            return _Parsed("not", tok.pos, [child])
        return self.primary()

    def primary(self) -> _Parsed:
        if self.accept("symbol", "("):
            self.nest()
            inner = self.or_expr()
            self.nesting -= 1
            if not self.accept("symbol", ")"):
                self.fail("expected ')'", "')' or 'and' / 'or'")
            return inner
        if self.tok.kind != "ident":
            expected = "a field name (see GET /v1/rules/vocabulary), 'not' or '('"
            self.fail("expected a condition", expected)
        return self.leaf()

    def leaf(self) -> _Parsed:
        name = self.take()
        leaf: dict[str, Any] = {"field": name.text}
        tok = self.tok
        if tok.kind == "symbol" and tok.text in _COMPARE:
            self.i += 1
            leaf["op"] = _COMPARE[tok.text].value
            leaf["value"] = self.value()
        elif self.accept("keyword", "between"):
            low = self.value()
            self.expect_word("and")
            leaf.update(op=Operator.BETWEEN.value, value=[low, self.value()])
        elif self.accept("keyword", "in"):
            leaf.update(op=Operator.IN.value, value=self.value_list())
        elif self.accept("keyword", "not"):
            self.expect_word("in")
            leaf.update(op=Operator.NOT_IN.value, value=self.value_list())
        elif self.accept("keyword", "contains"):
            if self.accept("keyword", "any"):
                leaf.update(op=Operator.CONTAINS_ANY.value, value=self.value_list())
            elif self.accept("keyword", "all"):
                leaf.update(op=Operator.CONTAINS_ALL.value, value=self.value_list())
            else:
                leaf.update(op=Operator.CONTAINS.value, value=self.value())
        elif self.accept("keyword", "starts"):
            self.expect_word("with")
            leaf.update(op=Operator.STARTS_WITH.value, value=self.value())
        elif self.accept("keyword", "is"):
            negated = self.accept("keyword", "not") is not None
            self.expect_word("set")
            leaf["op"] = (Operator.IS_NOT_SET if negated else Operator.IS_SET).value
        elif self.accept("keyword", "within"):
            self.expect_word("last")
            leaf.update(op=Operator.WITHIN_LAST_DAYS.value, value=self.days())
        elif self.accept("keyword", "before"):
            leaf.update(op=Operator.BEFORE_DAYS_AGO.value, value=self.number())
            self.expect_word("days")
            self.expect_word("ago")
        elif self.accept("keyword", "anniversary"):
            self.expect_word("within")
            self.expect_word("next")
            leaf.update(op=Operator.ANNIVERSARY_WITHIN_NEXT_DAYS.value, value=self.days())
        else:
            self.fail(
                f"expected an operator after {name.text!r}",
                "=, !=, <, <=, >, >=, between, in, not in, contains, starts with, is set, "
                "is not set, within last N days, before N days ago, anniversary within next N days",
            )
        return _Parsed("leaf", name.pos, [], leaf)

    def number(self) -> Any:
        tok = self.accept("number")
        if tok is None:
            self.fail("expected a number of days", "a whole number such as 90")
        return tok.value  # type: ignore[union-attr]

    def days(self) -> Any:
        n = self.number()
        self.expect_word("days")
        return n

    def value(self) -> Any:
        tok = self.tok
        if tok.kind in ("string", "number", "date", "datetime", "bool"):
            self.i += 1
            return tok.value
        self.fail(
            "expected a value",
            'a "quoted string", a number, true / false, a date such as 2026-02-28',
        )
        return None  # pragma: no cover - fail() raises

    def value_list(self) -> list[Any]:
        if not self.accept("symbol", "("):
            self.fail("expected a parenthesised list", '("a", "b")')
        items = [self.value()]
        while self.accept("symbol", ","):
            if self.tok.kind == "symbol" and self.tok.text == ")":
                break
            items.append(self.value())
        if not self.accept("symbol", ")"):
            self.fail("expected ',' or ')' in the list", "',' or ')'")
        return items


def _to_json(node: _Parsed, pointer: str, spans: dict[str, int]) -> dict[str, Any]:
    spans[pointer] = node.pos
    if node.kind == "leaf":
        return dict(node.leaf or {})
    if node.kind == "not":
        return {"not": _to_json(node.parts[0], f"{pointer}/not", spans)}
    return {
        node.kind: [
            _to_json(part, f"{pointer}/{node.kind}/{i}", spans) for i, part in enumerate(node.parts)
        ]
    }


def parse(text: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Text to the JSON tree, plus each node's text offset keyed by JSON pointer."""
    if not isinstance(text, str):
        raise TypeError("rule text must be a string")
    spans: dict[str, int] = {}
    tree = _to_json(_Parser(text).parse(), "", spans)
    return tree, spans


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date | datetime):
        return value.isoformat()
    return str(value)


def _list(values: Any) -> str:
    return "(" + ", ".join(format_value(v) for v in values) + ")"


def format_leaf(leaf: Leaf) -> str:
    """One condition in text form."""
    f, op, v = leaf.field, leaf.op, leaf.value
    if op in _SYMBOL:
        return f"{f} {_SYMBOL[op]} {format_value(v)}"
    match op:
        case Operator.BETWEEN:
            return f"{f} between {format_value(v[0])} and {format_value(v[1])}"
        case Operator.IN:
            return f"{f} in {_list(v)}"
        case Operator.NOT_IN:
            return f"{f} not in {_list(v)}"
        case Operator.CONTAINS:
            return f"{f} contains {format_value(v)}"
        case Operator.CONTAINS_ANY:
            return f"{f} contains any {_list(v)}"
        case Operator.CONTAINS_ALL:
            return f"{f} contains all {_list(v)}"
        case Operator.STARTS_WITH:
            return f"{f} starts with {format_value(v)}"
        case Operator.IS_SET:
            return f"{f} is set"
        case Operator.IS_NOT_SET:
            return f"{f} is not set"
        case Operator.WITHIN_LAST_DAYS:
            return f"{f} within last {v} days"
        case Operator.BEFORE_DAYS_AGO:
            return f"{f} before {v} days ago"
        case Operator.ANNIVERSARY_WITHIN_NEXT_DAYS:
            return f"{f} anniversary within next {v} days"
    raise ValueError(f"no text form for operator {op!r}")


def to_text(node: Node) -> str:
    """A validated tree in text form; parsing it gives the same tree back."""
    if isinstance(node, Leaf):
        return format_leaf(node)
    if isinstance(node, Not):
        inner = to_text(node.child)
        return f"not {inner}" if isinstance(node.child, Leaf | Not) else f"not ({inner})"
    joiner = " and " if isinstance(node, All) else " or "
    # Nested groups are always parenthesised: precedence is never left for the reader to know.
    return joiner.join(
        f"({to_text(c)})" if isinstance(c, All | AnyOf) else to_text(c) for c in node.children
    )
