"""Compile a validated rule to a fast Python predicate over one member (and one event).

The tree is turned into the source of one Python function and compiled once, so
evaluating it is a single call with no tree walking, no dispatch and no value
parsing. This is safe because nothing from the rule is ever written into the
source: every field name, key and value is bound as a constant in the
function's namespace (`_k0`, `_c0`, ...), and the source is assembled only from
those generated names and the fixed templates below. Field names are in any
case validated identifiers from the vocabulary. The namespace has no builtins
beyond `bool`.

Missing values (None, an absent key, an empty list) make every condition false
except `is not set`; `not` is plain negation. See docs/rules.md.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from rules import calendar
from rules.ast import All, Leaf, Node, Not, Rule, leaves
from rules.errors import RuleCompileError
from rules.vocabulary import Field, FieldType, Operator, Scope, Vocabulary

Facts = Mapping[str, Any]
Check = Callable[..., bool]
EMPTY: Facts = MappingProxyType({})

_COMPARE = {
    Operator.EQ: "==",
    Operator.NE: "!=",
    Operator.LT: "<",
    Operator.LE: "<=",
    Operator.GT: ">",
    Operator.GE: ">=",
}
_LISTS = (FieldType.STRING_LIST, FieldType.SEGMENTS)


class _Builder:
    """Assembles source text from generated names; values only ever go into `ns`."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.ns: dict[str, Any] = {
            "__builtins__": {"bool": bool},
            "_local_today": calendar.local_today,
            "_days_to_anniversary": calendar.days_to_anniversary,
        }
        self.setup: list[str] = []
        self.counter = itertools.count()

    def const(self, value: Any) -> str:
        name = f"_c{next(self.counter)}"
        self.ns[name] = value
        return name

    def field(self, name: str) -> Field:
        f = self.vocab.get(name)
        if f is None:
            raise RuleCompileError(f"field {name!r} is not in the vocabulary")
        return f

    def read(self, f: Field) -> str:
        """Source reading `f` from the member (`m`) or event (`e`) facts."""
        facts = "e" if f.scope is Scope.EVENT else "m"
        if f.py is not None:
            return f"{self.const(f.py)}({facts}, _now)"
        return f"{facts}.get({self.const(f.fact_key)})"

    def today(self, f: Field) -> str:
        if f.timezone_field is None:
            name = self.const(None)
            self.setup.append(f"{name} = _now.date()")
            return name
        return f"_local_today({self.read(self.field(f.timezone_field))}, _now)"

    def leaf(self, leaf: Leaf, slot: int) -> str:
        f = self.field(leaf.field)
        op, v = leaf.op, leaf.value
        read = self.read(f)
        x = f"_x{slot}"
        # `(x := read) is not None and ...` reads the value once and makes a missing value false.
        present = f"({x} := {read}) is not None and "
        if op in (Operator.IS_SET, Operator.IS_NOT_SET):
            test = f"bool({read})" if f.type in _LISTS else f"{read} is not None"
            return f"({test})" if op is Operator.IS_SET else f"(not {test})"
        if f.type is FieldType.SEGMENTS:
            keys = self.const(frozenset(v))
            hit = f"not {keys}.isdisjoint({read} or ())"
            return f"({hit})" if op is Operator.IN else f"(not ({hit}))"
        if op is Operator.EQ:
            return f"({read} == {self.const(v)})"  # None never equals a validated value
        if op in _COMPARE:
            return f"({present}{x} {_COMPARE[op]} {self.const(v)})"
        if op is Operator.BETWEEN:
            return f"({present}{self.const(v[0])} <= {x} <= {self.const(v[1])})"
        if op is Operator.IN:
            return f"({read} in {self.const(frozenset(v))})"
        if op is Operator.NOT_IN:
            return f"({present}{x} not in {self.const(frozenset(v))})"
        if op is Operator.CONTAINS:
            return f"({present}{self.const(v)} in {x})"
        if op is Operator.CONTAINS_ANY:
            return f"({present}not {self.const(frozenset(v))}.isdisjoint({x}))"
        if op is Operator.CONTAINS_ALL:
            return f"({present}{self.const(frozenset(v))}.issubset({x}))"
        if op is Operator.STARTS_WITH:
            return f"({present}{x}.startswith({self.const(v)}))"
        return self.time_leaf(f, op, v, present, x)

    def time_leaf(self, f: Field, op: Operator, n: int, present: str, x: str) -> str:
        days = self.const(timedelta(days=n))
        if f.type is FieldType.DATETIME:
            edge = self.const(None)
            self.setup.append(f"{edge} = _now - {days}")
            if op is Operator.WITHIN_LAST_DAYS:
                return f"({present}{edge} <= {x} <= _now)"
            return f"({present}{x} < {edge})"
        today = self.today(f)
        if op is Operator.WITHIN_LAST_DAYS:
            t = f"_t{next(self.counter)}"
            return f"({present}({t} := {today}) - {days} <= {x} <= {t})"
        if op is Operator.BEFORE_DAYS_AGO:
            return f"({present}{x} < {today} - {days})"
        leap = self.const(f.leap_day)
        return f"({present}_days_to_anniversary({x}, {today}, {leap}) <= {self.const(n)})"

    def tree(self, node: Node, slots: dict[int, int]) -> str:
        if isinstance(node, Leaf):
            return self.leaf(node, slots[id(node)])
        if isinstance(node, Not):
            return f"(not {self.tree(node.child, slots)})"
        joiner = " and " if isinstance(node, All) else " or "
        return "(" + joiner.join(self.tree(c, slots) for c in node.children) + ")"


def _exec(builder: _Builder, body: list[str], returns: str, label: str) -> Any:
    lines = ["def _factory(_now):"]
    lines += [f"    {s}" for s in builder.setup]
    lines += [f"    {s}" for s in body]
    lines.append(f"    return {returns}")
    source = "\n".join(lines) + "\n"
    code = compile(source, f"<rule {label}>", "exec")
    exec(code, builder.ns)  # noqa: S102 - source holds generated names only (module docstring)
    return builder.ns["_factory"], source


@dataclass(frozen=True)
class PythonPredicate:
    """A compiled rule. `at(now)` gives the check `(member, event=None) -> bool`."""

    rule: Rule
    source: str
    _factory: Callable[[datetime], Check] = field(repr=False)

    def at(self, now: datetime) -> Check:
        """The predicate with time-relative thresholds fixed at `now` (cheap; call per request)."""
        return self._factory(calendar.utc_instant(now))

    def __call__(self, member: Facts, event: Facts | None = None, *, now: datetime) -> bool:
        return bool(self.at(now)(member, event if event is not None else EMPTY))


def compile_py(rule: Rule, vocab: Vocabulary) -> PythonPredicate:
    """Compile once (per rule version); evaluate millions of times."""
    builder = _Builder(vocab)
    slots = {id(leaf): i for i, (_, leaf) in enumerate(leaves(rule.root))}
    expr = builder.tree(rule.root, slots)
    empty = builder.const(EMPTY)
    body = [f"def _rule(m, e={empty}):", f"    return {expr}"]
    factory, source = _exec(builder, body, "_rule", rule.hash[:12])
    return PythonPredicate(rule, source, factory)


@dataclass(frozen=True)
class LeafProbe:
    """One condition compiled on its own, for explanations: its test and the value it reads."""

    pointer: str
    leaf: Leaf
    test: Check
    read: Callable[..., Any]


# Compiled leaf factories per vocabulary, by (rule hash, scope, kind): explaining a rule on
# the hot path (a campaign's condition failing at the till) must not compile Python each
# time. Vocabularies are filled before rules are compiled against them.
_LEAF_FACTORIES: weakref.WeakKeyDictionary[Vocabulary, dict[tuple[str, Scope, str], Any]] = (
    weakref.WeakKeyDictionary()
)
_LEAF_CACHE_SIZE = 512


def _cached_factory(rule: Rule, vocab: Vocabulary, kind: Literal["leaves", "trace"]) -> Any:
    cache = _LEAF_FACTORIES.setdefault(vocab, {})
    key = (rule.hash, rule.scope, kind)
    factory = cache.get(key)
    if factory is None:
        factory = (_trace_factory if kind == "trace" else _leaf_factory)(rule, vocab)
        if len(cache) >= _LEAF_CACHE_SIZE:
            cache.clear()
        cache[key] = factory
    return factory


def compile_leaves(rule: Rule, vocab: Vocabulary, now: datetime) -> list[LeafProbe]:
    """Each leaf as its own function, from the same templates the predicate is made of."""
    made = _cached_factory(rule, vocab, "leaves")(calendar.utc_instant(now))
    return [
        LeafProbe(pointer, leaf, made[2 * i], made[2 * i + 1])
        for i, (pointer, leaf) in enumerate(leaves(rule.root))
    ]


Trace = Callable[[Facts, Facts], tuple[tuple[bool, ...], tuple[Any, ...]]]


def trace_leaves(rule: Rule, vocab: Vocabulary, now: datetime) -> Trace:
    """Every leaf at once, for explanations on the hot path: `(member, event)` to each
    leaf's result and the value it read, in `leaves` order (no short-circuit).

    The same leaf templates as `compile_leaves`, in one function: a failed campaign
    condition is explained on every purchase, and making and calling two functions per
    leaf cost more than evaluating the leaves.
    """
    trace: Trace = _cached_factory(rule, vocab, "trace")(calendar.utc_instant(now))
    return trace


def _trace_factory(rule: Rule, vocab: Vocabulary) -> Any:
    builder = _Builder(vocab)
    tests: list[str] = []
    reads: list[str] = []
    for i, (_, leaf) in enumerate(leaves(rule.root)):
        tests.append(f"bool({builder.leaf(leaf, i)})")
        reads.append(builder.read(builder.field(leaf.field)))
    empty = builder.const(EMPTY)
    body = [
        f"def _trace(m, e={empty}):",
        f"    return ({', '.join(tests)},), ({', '.join(reads)},)",
    ]
    factory, _ = _exec(builder, body, "_trace", "trace")
    return factory


def _leaf_factory(rule: Rule, vocab: Vocabulary) -> Any:
    builder = _Builder(vocab)
    found = leaves(rule.root)
    body: list[str] = []
    names: list[str] = []
    empty = builder.const(EMPTY)
    for i, (_, leaf) in enumerate(found):
        expr = builder.leaf(leaf, i)
        read = builder.read(builder.field(leaf.field))
        body += [f"def _leaf{i}(m, e={empty}):", f"    return {expr}"]
        body += [f"def _read{i}(m, e={empty}):", f"    return {read}"]
        names += [f"_leaf{i}", f"_read{i}"]
    factory, _ = _exec(builder, body, "(" + "".join(n + ", " for n in names) + ")", "leaves")
    return factory
