"""Validation when a rule is saved: JSON or text in, a typed normalised `Rule` out.

Every problem is collected (not just the first) and located by a JSON pointer
into the tree as written, plus the text offset when the rule came as text.
The walk is bounded by the depth and size limits, so hostile input (10,000
levels of nesting, a million children) is rejected without deep recursion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from rules import text as text_form
from rules.ast import All, AnyOf, Leaf, Node, Not, Rule
from rules.errors import Problem, ProblemCode, RuleValidationError
from rules.vocabulary import (
    OPERATORS,
    Field,
    FieldType,
    Operator,
    Scope,
    ValueKind,
    Vocabulary,
)

MAX_DEPTH = 10
MAX_NODES = 200
MAX_LIST = 500
MAX_STRING = 500
MAX_DAYS = 36_500
MAX_ANNIVERSARY_DAYS = 366
MAX_INTEGER = 2**63 - 1
MAX_DECIMAL_DIGITS = 15
DECIMAL_PLACES = {FieldType.MONEY: 2, FieldType.DECIMAL: 6}


def limits() -> dict[str, int]:
    """The size limits a saved rule must respect (exported with the vocabulary)."""
    return {
        "max_depth": MAX_DEPTH,
        "max_nodes": MAX_NODES,
        "max_list_items": MAX_LIST,
        "max_string_length": MAX_STRING,
        "max_days": MAX_DAYS,
    }


_DECIMAL_TEXT = re.compile(r"^-?\d{1,15}(\.\d{1,6})?$")
_DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# Spellings accepted for an operator besides its name: the text form's symbols and words.
_ALIASES: dict[str, Operator] = {info.text: op for op, info in OPERATORS.items()}
_ALIASES.update({"==": Operator.EQ, "<>": Operator.NE, "not in": Operator.NOT_IN})
_ALIASES.update({op.value: op for op in Operator})
# The text words of the day operators are not whole spellings on their own.
for _word in ("within last", "before", "anniversary within next"):
    _ALIASES.pop(_word, None)

_GROUP_KEYS = ("all", "any", "not")
_LEAF_KEYS = {"field", "op", "value"}


class _Invalid(Exception):
    def __init__(self, message: str, expected: str | None = None, code: ProblemCode | None = None):
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.code = code or ProblemCode.WRONG_VALUE


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"got {_type_name(value)}", "a string")
    if len(value) > MAX_STRING:
        raise _Invalid(f"string is {len(value)} characters long", f"at most {MAX_STRING}")
    if "\x00" in value:
        raise _Invalid("string contains a NUL byte", "text without NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid("string is not valid Unicode (lone surrogate)", "valid text") from None
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid("got a boolean", "a whole number")
    if isinstance(value, float | Decimal):
        # JSON clients may send 90.0; accept whole numbers, reject 90.5, NaN and infinities.
        try:
            if value == int(value):
                value = int(value)
        except (ValueError, OverflowError, InvalidOperation):
            raise _Invalid("not a finite number", "a whole number") from None
    if not isinstance(value, int):
        raise _Invalid(f"got {_type_name(value)}", "a whole number")
    if abs(value) > MAX_INTEGER:
        raise _Invalid("number is out of range", f"between -{MAX_INTEGER} and {MAX_INTEGER}")
    return value


def _decimal(value: Any, places: int, what: str) -> Decimal:
    if isinstance(value, bool):
        raise _Invalid("got a boolean", what)
    try:
        if isinstance(value, float):
            # repr is the shortest text that round-trips: 0.1 means 0.1, not 0.1000000000000000055.
            value = Decimal(repr(value))
        elif isinstance(value, str):
            if not _DECIMAL_TEXT.match(value):
                raise _Invalid(f"{value[:40]!r} is not a decimal number", what)
            value = Decimal(value)
        elif isinstance(value, int):
            value = Decimal(value)
    except InvalidOperation:
        raise _Invalid("not a decimal number", what) from None
    if not isinstance(value, Decimal):
        raise _Invalid(f"got {_type_name(value)}", what)
    if not value.is_finite():
        raise _Invalid("not a finite number", what)
    # One spelling per value (500, 500.0 and 5E+2 hash alike), never "-0".
    normal = value.normalize()
    exponent = normal.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise _Invalid(f"more than {places} decimal places", what)
    if normal.adjusted() >= MAX_DECIMAL_DIGITS:
        raise _Invalid("number is out of range", f"less than 10^{MAX_DECIMAL_DIGITS}")
    return normal if normal != 0 else Decimal(0)


def _date(value: Any) -> date:
    if isinstance(value, datetime):
        raise _Invalid("got a timestamp", "a date such as 2026-02-28")
    if isinstance(value, date):
        return value
    if isinstance(value, str) and _DATE_TEXT.match(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise _Invalid(
                f"{value!r} is not a calendar date", "a date such as 2026-02-28"
            ) from None
    raise _Invalid(f"got {_type_name(value)}", "a date such as 2026-02-28")


def _datetime(value: Any) -> datetime:
    expected = "a timestamp with offset such as 2026-02-28T09:00:00+08:00"
    if isinstance(value, str) and 10 < len(value) <= 40:
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid(f"{value!r} is not a timestamp", expected) from None
    if not isinstance(value, datetime):
        raise _Invalid(f"got {_type_name(value)}", expected)
    if value.tzinfo is None or value.utcoffset() is None:
        raise _Invalid("timestamp has no time-zone offset", expected)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise _Invalid("timestamp is out of range", expected) from None


def _scalar(f: Field, value: Any) -> Any:
    t = f.type
    if t is FieldType.INTEGER:
        n = _integer(value)
        if f.bounds is not None and not f.bounds[0] <= n <= f.bounds[1]:
            low, high = f.bounds
            raise _Invalid(f"{n} is outside the range of {f.name}", f"from {low} to {high}")
        return n
    if t in DECIMAL_PLACES:
        places = DECIMAL_PLACES[t]
        what = 'an amount such as 500 or "499.90"' if t is FieldType.MONEY else "a number"
        return _decimal(value, places, what)
    if t is FieldType.BOOLEAN:
        if not isinstance(value, bool):
            raise _Invalid(f"got {_type_name(value)}", "true or false")
        return value
    if t is FieldType.DATE:
        return _date(value)
    if t is FieldType.DATETIME:
        return _datetime(value)
    s = _string(value)
    if t is FieldType.ENUM and s not in f.values:
        raise _Invalid(
            f"{s[:60]!r} is not a value of {f.name}",
            "one of " + ", ".join(repr(v) for v in f.values),
            ProblemCode.NOT_IN_ENUM,
        )
    return s


def _value(f: Field, op: Operator, raw: Any, has_value: bool) -> Any:
    kind = OPERATORS[op].value
    if kind is ValueKind.NONE:
        if has_value and raw is not None:
            raise _Invalid(f"'{OPERATORS[op].text}' takes no value", "no value")
        return None
    if not has_value or raw is None:
        raise _Invalid("the value is missing", _expected_value(f, op))
    if kind is ValueKind.DAYS:
        n = _integer(raw)
        top = MAX_ANNIVERSARY_DAYS if op is Operator.ANNIVERSARY_WITHIN_NEXT_DAYS else MAX_DAYS
        if not 0 <= n <= top:
            raise _Invalid(f"{n} days is out of range", f"a whole number from 0 to {top}")
        return n
    if kind is ValueKind.ELEMENT:
        return _string(raw)
    if kind is ValueKind.PAIR:
        if not isinstance(raw, list | tuple) or len(raw) != 2:
            raise _Invalid(f"got {_type_name(raw)}", "a list of two bounds [low, high]")
        low, high = (_in_item(f, v, i) for i, v in enumerate(raw))
        if low > high:
            raise _Invalid("the low bound is above the high bound", "[low, high] with low <= high")
        return (low, high)
    if kind is ValueKind.LIST:
        if not isinstance(raw, list | tuple) or not raw:
            raise _Invalid(f"got {_type_name(raw)}", "a non-empty list of values")
        if len(raw) > MAX_LIST:
            raise _Invalid(f"the list has {len(raw)} items", f"at most {MAX_LIST}")
        element = f.type in (FieldType.STRING_LIST, FieldType.SEGMENTS)
        items = [_in_item(f, v, i, as_string=element) for i, v in enumerate(raw)]
        return tuple(dict.fromkeys(items))  # drop repeats, keep the writer's order
    return _scalar(f, raw)


def _in_item(f: Field, value: Any, index: int, *, as_string: bool = False) -> Any:
    try:
        return _string(value) if as_string else _scalar(f, value)
    except _Invalid as exc:
        raise _Invalid(f"item {index}: {exc.message}", exc.expected, exc.code) from None


def _expected_value(f: Field, op: Operator) -> str:
    kind = OPERATORS[op].value
    if kind is ValueKind.DAYS:
        return "a whole number of days"
    if kind is ValueKind.PAIR:
        return "a list of two bounds [low, high]"
    if kind is ValueKind.LIST:
        return "a non-empty list of values"
    if kind is ValueKind.ELEMENT:
        return "a string"
    return f"a {f.type.value}"


def _operator(raw: Any) -> Operator | None:
    if not isinstance(raw, str) or len(raw) > 40:
        return None
    return _ALIASES.get(" ".join(raw.lower().split()))


class _Validator:
    def __init__(self, vocab: Vocabulary, scope: Scope, spans: Mapping[str, int] | None) -> None:
        self.vocab = vocab
        self.scope = scope
        self.spans = spans or {}
        self.problems: list[Problem] = []
        self.nodes = 0

    def problem(
        self, pointer: str, code: ProblemCode, message: str, expected: str | None = None
    ) -> None:
        self.problems.append(Problem(pointer, code, message, expected, self.spans.get(pointer)))

    def node(self, raw: Any, pointer: str, level: int) -> Node | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            if self.nodes == MAX_NODES + 1:
                self.problem(
                    pointer,
                    ProblemCode.TOO_LARGE,
                    f"the rule has more than {MAX_NODES} conditions and groups",
                    f"at most {MAX_NODES} nodes; split it into segments",
                )
            return None
        if level > MAX_DEPTH:
            self.problem(
                pointer,
                ProblemCode.TOO_DEEP,
                f"the rule is nested more than {MAX_DEPTH} levels deep",
                f"at most {MAX_DEPTH} levels",
            )
            return None
        if not isinstance(raw, Mapping):
            self.problem(
                pointer,
                ProblemCode.MALFORMED,
                f"a node must be an object, got {_type_name(raw)}",
                'a group {"all": [...]}, {"any": [...]}, {"not": {...}} or a condition '
                '{"field": ..., "op": ..., "value": ...}',
            )
            return None
        groups = [k for k in _GROUP_KEYS if k in raw]
        if groups:
            if len(raw) != 1:
                extra = ", ".join(sorted(repr(str(k)[:40]) for k in raw if k != groups[0]))
                self.problem(
                    pointer,
                    ProblemCode.MALFORMED,
                    f"a group has exactly one key, found also {extra}",
                    f"only {groups[0]!r}",
                )
                return None
            return self.group(groups[0], raw[groups[0]], pointer, level)
        return self.leaf(raw, pointer)

    def group(self, key: str, body: Any, pointer: str, level: int) -> Node | None:
        if key == "not":
            child = self.node(body, f"{pointer}/not", level + 1)
            return Not(child) if child is not None else None
        if not isinstance(body, list):
            self.problem(
                pointer,
                ProblemCode.MALFORMED,
                f"'{key}' must hold a list, got {_type_name(body)}",
                "a list of conditions",
            )
            return None
        if not body:
            self.problem(
                pointer,
                ProblemCode.EMPTY_GROUP,
                f"'{key}' has no conditions",
                "at least one condition",
            )
            return None
        if len(body) > MAX_NODES:
            self.problem(
                pointer,
                ProblemCode.TOO_LARGE,
                f"'{key}' has {len(body)} conditions",
                f"at most {MAX_NODES} nodes in the whole rule",
            )
            return None
        kids: list[Node] = []
        for i, raw in enumerate(body):
            child = self.node(raw, f"{pointer}/{key}/{i}", level + 1)
            if child is not None:
                kids.append(child)
            if self.nodes > MAX_NODES:
                return None
        if len(kids) != len(body):
            return None
        return All(tuple(kids)) if key == "all" else AnyOf(tuple(kids))

    def leaf(self, raw: Mapping[str, Any], pointer: str) -> Node | None:
        unknown = [k for k in raw if k not in _LEAF_KEYS]
        if unknown:
            shown = ", ".join(repr(str(k)[:40]) for k in unknown[:5])
            self.problem(
                pointer,
                ProblemCode.MALFORMED,
                f"unexpected key {shown}",
                "a condition has 'field', 'op' and 'value'; a group has 'all', 'any' or 'not'",
            )
            return None
        name = raw.get("field")
        if not isinstance(name, str):
            self.problem(
                pointer,
                ProblemCode.MALFORMED,
                "the condition has no field name",
                "'field': a name from the vocabulary",
            )
            return None
        f = self.vocab.get(name)
        if f is None:
            self.problem(
                pointer,
                ProblemCode.UNKNOWN_FIELD,
                f"unknown field {name[:64]!r}",
                "one of "
                + ", ".join(self.vocab.names(None if self.scope is Scope.EVENT else Scope.MEMBER)),
            )
            return None
        if f.scope is Scope.EVENT and self.scope is Scope.MEMBER:
            self.problem(
                pointer,
                ProblemCode.WRONG_SCOPE,
                f"{name!r} describes the triggering event; member rules (segments, audiences) "
                "cannot use event fields",
                "a member field: " + ", ".join(self.vocab.names(Scope.MEMBER)),
            )
            return None
        allowed = ", ".join(o.value for o in Operator if o in f.allowed)
        op = _operator(raw.get("op"))
        if op is None:
            shown = str(raw.get("op"))[:40]
            self.problem(
                pointer,
                ProblemCode.UNKNOWN_OPERATOR,
                f"unknown operator {shown!r}",
                f"one of {allowed}",
            )
            return None
        if op not in f.allowed:
            self.problem(
                pointer,
                ProblemCode.OPERATOR_NOT_ALLOWED,
                f"operator {op.value!r} is not allowed for {name} ({f.type.value})",
                f"one of {allowed}",
            )
            return None
        try:
            value = _value(f, op, raw.get("value"), "value" in raw)
        except _Invalid as exc:
            self.problem(pointer, exc.code, f"{name} {op.value}: {exc.message}", exc.expected)
            return None
        return Leaf(name, op, value)


def normalise(node: Node) -> Node:
    """Drop one-child groups and merge a group into a parent of the same kind.

    The text form cannot tell these shapes apart, so the normalised tree is the
    one that round-trips and is hashed.
    """
    if isinstance(node, Leaf):
        return node
    if isinstance(node, Not):
        return Not(normalise(node.child))
    kind = type(node)
    flat: list[Node] = []
    for child in node.children:
        n = normalise(child)
        if type(n) is kind:
            flat.extend(n.children)
        else:
            flat.append(n)
    if len(flat) == 1:
        return flat[0]
    return kind(tuple(flat))


def validate(
    raw: Any,
    vocab: Vocabulary,
    scope: Scope = Scope.MEMBER,
    *,
    spans: Mapping[str, int] | None = None,
) -> Rule:
    """Check a JSON tree against the vocabulary; raise RuleValidationError with every problem."""
    checker = _Validator(vocab, scope, spans)
    root = checker.node(raw, "", 1)
    if checker.problems or root is None:
        raise RuleValidationError(checker.problems)
    return Rule(normalise(root), scope)


def parse_rule(source: Any, vocab: Vocabulary, scope: Scope = Scope.MEMBER) -> Rule:
    """Accept either form: a JSON tree (mapping) or the text form (string)."""
    if isinstance(source, str):
        tree, spans = text_form.parse(source)
        return validate(tree, vocab, scope, spans=spans)
    return validate(source, vocab, scope)
