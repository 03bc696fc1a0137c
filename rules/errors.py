"""Typed errors of the rule language: syntax (with a position) and validation (with pointers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RuleError(Exception):
    """Base of every error raised by the rule language."""


class ProblemCode(enum.StrEnum):
    """Stable codes a UI can switch on; the message is for humans."""

    MALFORMED = "malformed"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_SCOPE = "wrong_scope"
    UNKNOWN_OPERATOR = "unknown_operator"
    OPERATOR_NOT_ALLOWED = "operator_not_allowed"
    WRONG_VALUE = "wrong_value"
    NOT_IN_ENUM = "not_in_enum"
    EMPTY_GROUP = "empty_group"
    TOO_DEEP = "too_deep"
    TOO_LARGE = "too_large"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a rule, located by a JSON pointer into the tree (RFC 6901).

    `position` is the offset in the text form when the rule was written as text.
    """

    pointer: str
    code: ProblemCode
    message: str
    expected: str | None = None
    position: int | None = None

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "pointer": self.pointer,
            "code": self.code.value,
            "message": self.message,
        }
        if self.expected is not None:
            data["expected"] = self.expected
        if self.position is not None:
            data["position"] = self.position
        return data


class RuleValidationError(RuleError):
    """The rule is well-formed data but breaks the vocabulary or the limits."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = problems[0] if problems else None
        summary = "invalid rule"
        if first is not None:
            summary = f"{first.pointer or '(root)'}: {first.message}"
            if first.expected is not None:
                summary += f"; expected {first.expected}"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(summary + more)

    def by_pointer(self) -> dict[str, list[str]]:
        """Messages grouped by pointer, the shape of a 422 problem's `errors`."""
        grouped: dict[str, list[str]] = {}
        for p in self.problems:
            text = p.message if p.expected is None else f"{p.message}; expected {p.expected}"
            grouped.setdefault(p.pointer, []).append(text)
        return grouped


class RuleSyntaxError(RuleError):
    """The text form does not parse; `position` is the 0-based character offset."""

    def __init__(self, message: str, text: str, position: int, expected: str | None = None):
        self.message = message
        self.position = position
        self.expected = expected
        self.line = text.count("\n", 0, position) + 1
        self.column = position - (text.rfind("\n", 0, position) + 1) + 1
        where = f"line {self.line}, column {self.column}"
        tail = f"; expected {expected}" if expected else ""
        super().__init__(f"{message} at {where}{tail}")

    def as_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "code": "syntax",
            "message": self.message,
            "position": self.position,
            "line": self.line,
            "column": self.column,
        }
        if self.expected is not None:
            data["expected"] = self.expected
        return data


class VocabularyError(RuleError):
    """A field was declared wrongly (bad name, duplicate, operator the type cannot support)."""


class RuleCompileError(RuleError):
    """A valid rule cannot be compiled for this target (e.g. an event field in SQL over members)."""
