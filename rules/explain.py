"""Why a rule held or failed for one member (and event): the evaluation trace.

Each leaf is shown with the value the member actually has, the comparison and
its result; groups carry their result and which children decided it. Leaves are
compiled from the same templates as the predicate, so the trace cannot disagree
with the decision it explains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

from rules.ast import All, Leaf, Node, Not, Rule, child_pointer, encode_value, leaves
from rules.compile_py import EMPTY, Facts, compile_leaves, trace_leaves
from rules.text import format_leaf, to_text
from rules.vocabulary import Scope, Vocabulary


@dataclass
class Step:
    """One node of the trace."""

    pointer: str
    kind: str  # all, any, not, leaf
    result: bool
    decisive: bool = False
    children: list[Step] = field(default_factory=list)
    leaf: Leaf | None = None
    actual: Any = None
    missing: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "pointer": self.pointer,
            "kind": self.kind,
            "result": self.result,
            "decisive": self.decisive,
        }
        if self.leaf is not None:
            data.update(
                field=self.leaf.field,
                op=self.leaf.op.value,
                value=encode_value(self.leaf.value),
                text=format_leaf(self.leaf),
                actual=_jsonable(self.actual),
                missing=self.missing,
            )
        else:
            data["children"] = [c.to_json() for c in self.children]
        return data


@dataclass
class Explanation:
    outcome: bool
    trace: Step
    text: str
    now: datetime

    @property
    def decided_by(self) -> list[str]:
        """Pointers of the leaves that settled the outcome (follow `decisive` down the tree)."""
        found: list[str] = []
        stack = [self.trace]
        while stack:
            step = stack.pop()
            if step.kind == "leaf":
                found.append(step.pointer)
            stack.extend(reversed([c for c in step.children if c.decisive]))
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "decided_by": self.decided_by,
            "rule_text": self.text,
            "evaluated_at": self.now.isoformat(),
            "trace": self.trace.to_json(),
        }

    def lines(self) -> list[str]:
        """A plain-text rendering, one leaf per line, for logs and the CLI."""
        out: list[str] = []
        decided = set(self.decided_by)
        for step in _leaves(self.trace):
            if step.leaf is None:
                continue
            mark = "✓" if step.result else "✗"
            actual = "missing" if step.missing else repr(_jsonable(step.actual))
            star = " ← decisive" if step.pointer in decided else ""
            out.append(f"{mark} {format_leaf(step.leaf)}  (actual: {actual}){star}")
        return out


def _leaves(step: Step) -> list[Step]:
    if step.kind == "leaf":
        return [step]
    return [leaf for c in step.children for leaf in _leaves(c)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    try:
        return encode_value(value)
    except TypeError:
        return repr(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, list | tuple | set | frozenset) and not value)


def explain(
    rule: Rule,
    vocab: Vocabulary,
    member: Facts,
    event: Facts | None = None,
    *,
    now: datetime,
) -> Explanation:
    """Evaluate every leaf (no short-circuit, so the console can show all of them)."""
    probes = {p.pointer: p for p in compile_leaves(rule, vocab, now)}
    ev = event if event is not None else EMPTY

    def visit(node: Node, pointer: str) -> Step:
        if isinstance(node, Leaf):
            probe = probes[pointer]
            actual = probe.read(member, ev)
            return Step(
                pointer,
                "leaf",
                bool(probe.test(member, ev)),
                leaf=node,
                actual=actual,
                missing=_is_missing(actual),
            )
        if isinstance(node, Not):
            child = visit(node.child, child_pointer(pointer, node))
            child.decisive = True
            return Step(pointer, "not", not child.result, children=[child])
        kids = [visit(c, child_pointer(pointer, node, i)) for i, c in enumerate(node.children)]
        if isinstance(node, All):
            result = all(k.result for k in kids)
        else:
            result = any(k.result for k in kids)
        kind = "all" if isinstance(node, All) else "any"
        for k in kids:
            if kind == "all":
                # A true `all` needed every child; a false one is settled by its false children.
                k.decisive = result or not k.result
            else:
                # A true `any` is settled by its true children; a false one needed every child.
                k.decisive = not result or k.result
        return Step(pointer, kind, result, children=kids)

    trace = visit(rule.root, "")
    trace.decisive = True
    return Explanation(trace.result, trace, to_text(rule.root), now)


# What `summary` needs of a rule apart from the member, per rule (by content hash and
# scope): the texts, the leaf pointers and the tree over leaf positions. `summary` runs
# for every campaign condition a purchase fails; formatting the rule and walking its tree
# each time was most of its cost.
_LEAF, _NOT, _ALL, _ANY = 0, 1, 2, 3
# (_LEAF, position) | (_NOT, shape) | (_ALL or _ANY, (shape, ...))
_Shape: TypeAlias = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    rule_text: str
    leaf_texts: tuple[str, ...]
    pointers: tuple[str, ...]
    shape: _Shape


_PLANS: dict[tuple[str, Scope], _Plan] = {}
_PLANS_SIZE = 512


def _plan(rule: Rule) -> _Plan:
    key = (rule.hash, rule.scope)
    found = _PLANS.get(key)
    if found is None:
        positions: dict[str, int] = {}
        texts: list[str] = []
        for i, (pointer, leaf) in enumerate(leaves(rule.root)):
            positions[pointer] = i
            texts.append(format_leaf(leaf))

        def shape(node: Node, pointer: str) -> _Shape:
            if isinstance(node, Leaf):
                return (_LEAF, positions[pointer])
            if isinstance(node, Not):
                return (_NOT, shape(node.child, child_pointer(pointer, node)))
            kids = tuple(
                shape(c, child_pointer(pointer, node, i)) for i, c in enumerate(node.children)
            )
            return (_ALL if isinstance(node, All) else _ANY, kids)

        if len(_PLANS) >= _PLANS_SIZE:
            _PLANS.clear()
        found = _PLANS[key] = _Plan(
            to_text(rule.root), tuple(texts), tuple(positions), shape(rule.root, "")
        )
    return found


def _decide(shape: _Shape, results: tuple[bool, ...]) -> tuple[bool, list[int]]:
    """(result, the leaves that settle it when this node is decisive, in trace order): the
    `decisive` rules of `explain`, over leaf positions."""
    kind = shape[0]
    if kind == _LEAF:
        return results[shape[1]], [shape[1]]
    if kind == _NOT:
        result, decided = _decide(shape[1], results)
        return not result, decided
    kids = [_decide(c, results) for c in shape[1]]
    if kind == _ALL:
        result = all(r for r, _ in kids)
        return result, [p for r, d in kids if result or not r for p in d]
    result = any(r for r, _ in kids)
    return result, [p for r, d in kids if not result or r for p in d]


# The last instant `summary` formatted: one evaluation explains all its failed campaign
# conditions at the same instant, and formatting an aware datetime costs more than the
# rest of a one-leaf explanation. Compared by identity, so an equal instant in another
# zone is formatted anew; replaced whole, so threads only ever miss.
_LAST_INSTANT: tuple[datetime, str] | None = None


def _isoformat(now: datetime) -> str:
    global _LAST_INSTANT
    last = _LAST_INSTANT
    if last is not None and last[0] is now:
        return last[1]
    text = now.isoformat()
    _LAST_INSTANT = (now, text)
    return text


def summary(
    rule: Rule,
    vocab: Vocabulary,
    member: Facts,
    event: Facts | None = None,
    *,
    now: datetime,
) -> dict[str, Any]:
    """What a recorded decision keeps of `explain(...)`: the outcome, the rule text, the
    decisive leaves and one line per leaf (as `Explanation.lines`), and the instant.

    Equal to building the explanation and reading those parts, without building the trace;
    everything but the member's values is prepared once per rule.
    """
    plan = _plan(rule)
    results, actuals = trace_leaves(rule, vocab, now)(member, event if event is not None else EMPTY)
    outcome, decided = _decide(plan.shape, results)
    decisive = set(decided)
    lines = []
    for i, text in enumerate(plan.leaf_texts):
        actual = actuals[i]
        shown = "missing" if _is_missing(actual) else repr(_jsonable(actual))
        mark = "✓" if results[i] else "✗"
        star = " ← decisive" if i in decisive else ""
        lines.append(f"{mark} {text}  (actual: {shown}){star}")
    return {
        "outcome": outcome,
        "rule_text": plan.rule_text,
        "decided_by": [plan.pointers[i] for i in decided],
        "conditions": lines,
        "evaluated_at": _isoformat(now),
    }
