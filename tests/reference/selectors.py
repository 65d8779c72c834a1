"""Plain-Python oracles for label selectors.

Two readings, kept apart on purpose:

- :func:`k8s_selector_matches` works on the raw Kubernetes ``LabelSelector`` dict, as
  the Kubernetes documentation ("Labels and Selectors", "Resources that support
  set-based requirements") states the rules, one rule per line. It never looks at the
  selector AST, so comparing it with ``evaluate(parse_label_selector(...))`` tests the
  loader's translation of a LabelSelector into the AST.
- :func:`evaluate` walks the AST of ``egresscore.policy.selector`` recursively, with
  the semantics of that module's docstring. It is the oracle for the compiled matcher
  (``egresscore.policy.compiler.match_selector``) and for the reference classifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from egresscore.policy.selector import And, HasLabel, LabelIn, LabelMatch, MatchOp, Not, Or, Selector

__all__ = ["evaluate", "k8s_selector_matches"]


def k8s_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether the Kubernetes ``LabelSelector`` ``selector`` (the dict form) matches ``labels``.

    The rules, from the Kubernetes documentation:

    - every ``matchLabels`` entry ``key: value`` requires the label ``key`` with exactly
      the value ``value``;
    - ``matchExpressions`` entries: ``In`` requires the label with one of ``values``;
      ``NotIn`` requires the label to be absent or to have none of ``values``;
      ``Exists`` requires the label; ``DoesNotExist`` requires it to be absent;
    - all requirements are ANDed; a selector with none (``{}``) matches everything.

    An unknown operator raises ``ValueError`` (the loader rejects it before this point).
    """
    match_labels = selector.get("matchLabels") or {}
    for key, value in match_labels.items():
        if key not in labels:
            return False
        if labels[key] != value:
            return False

    match_expressions = selector.get("matchExpressions") or []
    for requirement in match_expressions:
        key = requirement["key"]
        operator = requirement["operator"]
        values = requirement.get("values") or []
        if operator == "In":
            if key not in labels:
                return False
            if labels[key] not in values:
                return False
        elif operator == "NotIn":
            if key in labels and labels[key] in values:
                return False
        elif operator == "Exists":
            if key not in labels:
                return False
        elif operator == "DoesNotExist":
            if key in labels:
                return False
        else:
            raise ValueError(f"unknown LabelSelector operator {operator!r}")

    return True


def evaluate(selector: Selector, labels: Mapping[str, str]) -> bool:
    """Whether the selector AST ``selector`` matches ``labels``, node by node."""
    if isinstance(selector, LabelIn):
        return selector.key in labels and labels[selector.key] in selector.values
    if isinstance(selector, HasLabel):
        return selector.key in labels
    if isinstance(selector, LabelMatch):
        if selector.key not in labels:
            return False
        value = labels[selector.key]
        if selector.op is MatchOp.STARTS_WITH:
            return value.startswith(selector.operand)
        if selector.op is MatchOp.ENDS_WITH:
            return value.endswith(selector.operand)
        if selector.op is MatchOp.CONTAINS:
            return selector.operand in value
        raise ValueError(f"unknown match operator {selector.op!r}")
    if isinstance(selector, Not):
        return not evaluate(selector.operand, labels)
    if isinstance(selector, And):
        # And(()) is "all()": the loop finds nothing false.
        return all(evaluate(operand, labels) for operand in selector.operands)
    if isinstance(selector, Or):
        # Or(()) is "!all()": any() of nothing is false.
        return any(evaluate(operand, labels) for operand in selector.operands)
    raise TypeError(f"not a selector node: {selector!r}")
