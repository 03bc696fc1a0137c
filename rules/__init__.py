"""The rule language: vocabulary, text and JSON forms, validation, two compilers, explanation.

Pure: no Flask, no RQ, no commits. Typical use::

    rule = parse_rule('days_since_last_purchase >= 90 and consent.sms = true', vocab)
    check = compile_py(rule, vocab).at(now)      # fast Python predicate
    ids = member_query(rule, vocab, now)          # SQLAlchemy Select of member ids
"""

from rules.ast import Rule, canonical_json, content_hash, to_json
from rules.compile_py import PythonPredicate, compile_py
from rules.compile_sql import SqlPredicate, compile_sql, count_query, member_query
from rules.errors import (
    Problem,
    ProblemCode,
    RuleCompileError,
    RuleError,
    RuleSyntaxError,
    RuleValidationError,
    VocabularyError,
)
from rules.explain import Explanation, explain
from rules.text import parse, to_text
from rules.validate import parse_rule, validate
from rules.vocabulary import (
    Field,
    FieldType,
    LeapDay,
    Operator,
    Scope,
    SqlContext,
    Vocabulary,
)

__all__ = [
    "Explanation",
    "Field",
    "FieldType",
    "LeapDay",
    "Operator",
    "Problem",
    "ProblemCode",
    "PythonPredicate",
    "Rule",
    "RuleCompileError",
    "RuleError",
    "RuleSyntaxError",
    "RuleValidationError",
    "Scope",
    "SqlContext",
    "SqlPredicate",
    "Vocabulary",
    "VocabularyError",
    "canonical_json",
    "compile_py",
    "compile_sql",
    "content_hash",
    "count_query",
    "explain",
    "member_query",
    "parse",
    "parse_rule",
    "to_json",
    "to_text",
    "validate",
]
