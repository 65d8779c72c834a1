"""Label selectors as one small expression tree, whatever syntax they were written in.

Kubernetes ``LabelSelector`` maps (``matchLabels``/``matchExpressions``) and Calico
selector expressions (``app == 'x' && has(tier)``) both become these nodes, so the
compiler (``egresscore.core.selector``) evaluates one language. The semantics of each
node are the ones both systems agree on:

- ``LabelIn(key, values)`` matches when the label is present and its value is one of
  ``values`` (Kubernetes ``In`` and ``matchLabels``; Calico ``==`` and ``in {..}``).
- ``HasLabel(key)`` matches when the label is present, whatever its value.
- ``LabelMatch(key, op, operand)`` matches when the label is present and its value
  starts with / ends with / contains ``operand`` (Calico only).
- ``Not``, ``And`` and ``Or`` are the logic. Kubernetes ``NotIn`` and Calico ``!=`` /
  ``not in`` are ``Not(LabelIn(..))``, so a missing label matches them, as in both
  systems; ``DoesNotExist`` and ``!has()`` are ``Not(HasLabel(..))``.
- ``And(())`` matches everything: an empty Kubernetes selector, Calico ``all()``.

Nodes are frozen and hashable; ``str(node)`` renders Calico syntax, which is how
``egresscore explain`` shows a selector whatever format it came from.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MATCH_ALL",
    "And",
    "HasLabel",
    "LabelIn",
    "LabelMatch",
    "MatchOp",
    "Not",
    "Or",
    "Selector",
    "quote",
]


class MatchOp(enum.Enum):
    """The string tests of Calico's selector language."""

    STARTS_WITH = "starts with"
    ENDS_WITH = "ends with"
    CONTAINS = "contains"

    def test(self, value: str, operand: str) -> bool:
        if self is MatchOp.STARTS_WITH:
            return value.startswith(operand)
        if self is MatchOp.ENDS_WITH:
            return value.endswith(operand)
        return operand in value


def quote(text: str) -> str:
    """Calico string literal for ``text`` (double quotes unless it holds one)."""
    return f"'{text}'" if '"' in text else f'"{text}"'


@dataclass(frozen=True, slots=True)
class LabelIn:
    key: str
    values: frozenset[str]

    def __str__(self) -> str:
        if len(self.values) == 1:
            (value,) = self.values
            return f"{self.key} == {quote(value)}"
        return f"{self.key} in {{{', '.join(quote(v) for v in sorted(self.values))}}}"


@dataclass(frozen=True, slots=True)
class HasLabel:
    key: str

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True, slots=True)
class LabelMatch:
    key: str
    op: MatchOp
    operand: str

    def __str__(self) -> str:
        return f"{self.key} {self.op.value} {quote(self.operand)}"


@dataclass(frozen=True, slots=True)
class Not:
    operand: Selector

    def __str__(self) -> str:
        inner = self.operand
        if isinstance(inner, LabelIn):
            if len(inner.values) == 1:
                (value,) = inner.values
                return f"{inner.key} != {quote(value)}"
            return f"{inner.key} not in {{{', '.join(quote(v) for v in sorted(inner.values))}}}"
        if isinstance(inner, HasLabel):
            return f"!has({inner.key})"
        if isinstance(inner, LabelMatch | Not):
            return f"!{inner}"
        return f"!({inner})"


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Selector, ...]

    def __str__(self) -> str:
        if not self.operands:
            return "all()"
        return " && ".join(f"({op})" if isinstance(op, Or) else str(op) for op in self.operands)


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Selector, ...]

    def __str__(self) -> str:
        if not self.operands:
            return "!all()"
        return " || ".join(str(op) for op in self.operands)


Selector = LabelIn | HasLabel | LabelMatch | Not | And | Or

#: The selector that matches everything (an empty Kubernetes selector, Calico ``all()``).
MATCH_ALL: Selector = And(())


def walk(selector: Selector) -> Iterator[Selector]:
    """Every node of ``selector``, parents before children."""
    yield selector
    if isinstance(selector, Not):
        yield from walk(selector.operand)
    elif isinstance(selector, And | Or):
        for operand in selector.operands:
            yield from walk(operand)
