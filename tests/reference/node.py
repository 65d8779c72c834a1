"""A plain-Python oracle for ``egresscore.core.node.NodeDecisions``: what the node does
with each classifier decision (docs/nfqueue.md, "The node datapath"), read literally.

Gateways are named by node here, as an operator thinks of them: every gateway of one
node is reached through the same tunnel, so it has one mark.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .classifier import ReferenceDecision

__all__ = ["NodeSettings", "node_verdict"]


@dataclass(frozen=True, slots=True)
class NodeSettings:
    marks_by_node: Mapping[str, int]  # gateway node -> its tunnel's mark value; absent: no tunnel
    pass_value: int
    local_value: int | None  # None: this node runs no gateway
    drop_unknown: bool
    ipv6: bool


def node_verdict(
    decision: ReferenceDecision, family: int, settings: NodeSettings
) -> tuple[bool, int | None, str]:
    """``(accepted, mark value, outcome)`` of one packet whose classifier decision is
    ``decision``."""
    if decision.action == "pass":
        if decision.reason == "not_an_endpoint" and settings.drop_unknown:
            return False, None, "unknown_source_drop"
        return True, settings.pass_value, "passed"
    if decision.action in ("redirect", "snat"):
        if family == 6 and not settings.ipv6:
            return False, None, "family_drop"
        if decision.action == "snat":
            if settings.local_value is None:
                return False, None, "not_here_drop"
            return True, settings.local_value, "local"
        mark = settings.marks_by_node.get(decision.gateway_node or "")
        if mark is None:
            return False, None, "no_tunnel_drop"
        return True, mark, "redirected"
    if decision.reason == "no_gateway":
        return False, None, "no_gateway_drop"
    return False, None, "rule_drop"
