"""Rule trees: node types, the canonical JSON form and its content hash.

A validated tree holds typed values (int, Decimal, str, bool, date, aware UTC
datetime, tuples for pairs and lists); `to_json` turns them back into plain JSON
(money and decimals as strings so no precision is lost).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeAlias

from rules.vocabulary import Operator, Scope


@dataclass(frozen=True, slots=True)
class Leaf:
    field: str
    op: Operator
    value: Any = None


@dataclass(frozen=True, slots=True)
class All:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


Node: TypeAlias = Leaf | All | AnyOf | Not


def child_pointer(pointer: str, node: Node, index: int = 0) -> str:
    if isinstance(node, All):
        return f"{pointer}/all/{index}"
    if isinstance(node, AnyOf):
        return f"{pointer}/any/{index}"
    return f"{pointer}/not"


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, All | AnyOf):
        return node.children
    if isinstance(node, Not):
        return (node.child,)
    return ()


def walk(node: Node, pointer: str = "") -> Iterator[tuple[str, Node]]:
    """Every node with its JSON pointer, parents before children, in order."""
    stack: list[tuple[str, Node]] = [(pointer, node)]
    while stack:
        here, current = stack.pop()
        yield here, current
        kids = children(current)
        for i in range(len(kids) - 1, -1, -1):
            stack.append((child_pointer(here, current, i), kids[i]))


def leaves(node: Node) -> list[tuple[str, Leaf]]:
    return [(p, n) for p, n in walk(node) if isinstance(n, Leaf)]


def encode_value(value: Any) -> Any:
    """A typed leaf value as plain JSON."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [encode_value(v) for v in value]
    raise TypeError(f"cannot encode {type(value).__name__} in a rule")


def to_json(node: Node) -> dict[str, Any]:
    """The tree as JSON data (the form stored and returned by the API)."""
    if isinstance(node, Leaf):
        data: dict[str, Any] = {"field": node.field, "op": node.op.value}
        if node.value is not None:
            data["value"] = encode_value(node.value)
        return data
    if isinstance(node, All):
        return {"all": [to_json(c) for c in node.children]}
    if isinstance(node, AnyOf):
        return {"any": [to_json(c) for c in node.children]}
    return {"not": to_json(node.child)}


def canonical_json(node: Node) -> str:
    """One byte-exact spelling per tree: sorted keys, no spaces, UTF-8 text."""
    return json.dumps(to_json(node), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(node: Node) -> str:
    """sha256 of the canonical JSON, hex: equal trees have equal hashes."""
    return hashlib.sha256(canonical_json(node).encode("utf-8")).hexdigest()


def size(node: Node) -> int:
    return sum(1 for _ in walk(node))


def depth(node: Node) -> int:
    best = 0
    stack: list[tuple[Node, int]] = [(node, 1)]
    while stack:
        current, level = stack.pop()
        best = max(best, level)
        stack.extend((c, level + 1) for c in children(current))
    return best


@dataclass(frozen=True, slots=True)
class Rule:
    """A validated, normalised rule for one scope; only `rules.validate` makes these."""

    root: Node
    scope: Scope
    # The content hash, computed once: engines key caches and decisions by it per request.
    _hash: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return to_json(self.root)

    @property
    def hash(self) -> str:
        if self._hash is None:
            object.__setattr__(self, "_hash", content_hash(self.root))
        assert self._hash is not None
        return self._hash

    @property
    def fields(self) -> list[str]:
        return sorted({leaf.field for _, leaf in leaves(self.root)})
