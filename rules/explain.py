"""Why a rule held or failed for one member (and event): the evaluation trace.

Each leaf is shown with the value the member actually has, the comparison and
its result; groups carry their result and which children decided it. Leaves are
compiled from the same templates as the predicate, so the trace cannot disagree
with the decision it explains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rules.ast import All, Leaf, Node, Not, Rule, child_pointer, encode_value, leaves
from rules.compile_py import EMPTY, Facts, compile_leaves
from rules.text import format_leaf, to_text
from rules.vocabulary import Vocabulary


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


# Rule text and leaf texts per rule (by content hash and scope): `summary` runs for every
# campaign condition a purchase fails, and formatting the same rule each time was most
# of its cost.
_TEXTS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
_TEXTS_SIZE = 512


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
    the texts are cached per rule.
    """
    key = (rule.hash, rule.scope.value)
    texts = _TEXTS.get(key)
    if texts is None:
        if len(_TEXTS) >= _TEXTS_SIZE:
            _TEXTS.clear()
        texts = _TEXTS[key] = (
            to_text(rule.root),
            tuple(format_leaf(leaf) for _, leaf in leaves(rule.root)),
        )
    rule_text, leaf_texts = texts
    probes = compile_leaves(rule, vocab, now)
    ev = event if event is not None else EMPTY
    results: list[bool] = []
    actuals: list[Any] = []
    for probe in probes:
        results.append(bool(probe.test(member, ev)))
        actuals.append(probe.read(member, ev))
    position = {p.pointer: i for i, p in enumerate(probes)}

    def visit(node: Node, pointer: str) -> tuple[bool, list[str]]:
        # (result, the leaves that settle it when this node is decisive, in trace order)
        if isinstance(node, Leaf):
            return results[position[pointer]], [pointer]
        if isinstance(node, Not):
            result, decided = visit(node.child, child_pointer(pointer, node))
            return not result, decided
        kids = [visit(c, child_pointer(pointer, node, i)) for i, c in enumerate(node.children)]
        if isinstance(node, All):
            result = all(k[0] for k in kids)
            chosen = [d for r, d in kids if result or not r]
        else:
            result = any(k[0] for k in kids)
            chosen = [d for r, d in kids if not result or r]
        return result, [p for d in chosen for p in d]

    outcome, decided_by = visit(rule.root, "")
    decided = set(decided_by)
    lines = []
    for i, probe in enumerate(probes):
        mark = "✓" if results[i] else "✗"
        actual = "missing" if _is_missing(actuals[i]) else repr(_jsonable(actuals[i]))
        star = " ← decisive" if probe.pointer in decided else ""
        lines.append(f"{mark} {leaf_texts[i]}  (actual: {actual}){star}")
    return {
        "outcome": outcome,
        "rule_text": rule_text,
        "decided_by": decided_by,
        "conditions": lines,
        "evaluated_at": now.isoformat(),
    }
