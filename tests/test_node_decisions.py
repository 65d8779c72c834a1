"""The node's per-flow decision (egresscore.core.node.NodeDecisions) against the
plain-Python reference (tests/reference/node.py), on Hypothesis-generated policy sets
(the strategies of tests/test_reference_classifier.py), and its input checks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.classifier import ReferenceClassifier
from reference.node import NodeSettings, node_verdict
from test_reference_classifier import packets, policy_sets

from egresscore.core.node import OUTCOME_NAMES, NodeDecisions
from egresscore.policy import load_files
from egresscore.policy.compiler import compile_policies

MASK = 0x7E000000
PASS = 0x02000000
LOCAL = 0x04000000
SLOTS = [0x40000000 | (k << 25) for k in range(32)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_node_decisions_match_the_reference(data: st.DataObject) -> None:
    policy_set = data.draw(policy_sets())
    nodes = sorted(
        {n.name for n in policy_set.inventory.nodes} | {e.node for e in policy_set.inventory.endpoints}
    )
    local_node = data.draw(st.sampled_from((None, *nodes)))
    classifier = compile_policies(policy_set, local_node=local_node)
    reference = ReferenceClassifier(policy_set, local_node)
    gateway_nodes = sorted({g.node for g in classifier.gateways})
    # Each gateway node gets a slot, or none (no tunnel to it: its flows are dropped).
    slots = data.draw(st.permutations(SLOTS))
    marks_by_node = {
        node: slots[k] for k, node in enumerate(gateway_nodes) if data.draw(st.booleans()) or k == 0
    }
    node_settings = NodeSettings(
        marks_by_node=marks_by_node,
        pass_value=PASS,
        local_value=data.draw(st.sampled_from((None, LOCAL))),
        drop_unknown=data.draw(st.booleans()),
        ipv6=data.draw(st.booleans()),
    )
    decisions = NodeDecisions(
        classifier,
        [marks_by_node.get(g.node) for g in classifier.gateways],
        mask=MASK,
        pass_value=PASS,
        local_value=node_settings.local_value,
        drop_unknown=node_settings.drop_unknown,
        ipv6=node_settings.ipv6,
    )
    for src, dst in data.draw(st.lists(packets(policy_set), min_size=1, max_size=30)):
        expected = node_verdict(reference.classify(src, dst), src.version, node_settings)
        assert decisions.decide(src, dst) == expected, f"{src} -> {dst} (local node {local_node})"
        assert decisions.decide(str(src), str(dst)) == expected


@pytest.fixture(scope="module")
def example() -> Any:
    return compile_policies(
        load_files(["tests/data/policies/cluster.yaml", "tests/data/policies/cilium.yaml"]), "node-a"
    )


def test_every_outcome_has_a_name_and_decisions_say_which(example: Any) -> None:
    marks = [SLOTS[k] for k in range(len(example.gateways))]
    decisions = NodeDecisions(example, marks, mask=MASK, pass_value=PASS)
    assert len(OUTCOME_NAMES) == len(set(OUTCOME_NAMES)) == 10
    accepted, mark, outcome = decisions.decide("10.244.1.5", "203.0.113.7")
    assert (accepted, outcome) == (True, "redirected") and mark in marks
    assert decisions.decide("10.244.1.5", "203.0.113.200") == (True, PASS, "passed")  # excludedCIDRs
    # A source the inventory does not know is held (dropped, undecided), not passed.
    assert decisions.decide("10.9.9.9", "203.0.113.7") == (False, None, "unknown_source_drop")
    assert decisions.gateway_marks == tuple(marks)


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"mask": 0}, "non-zero 32-bit"),
        ({"pass_value": 0x1}, "inside the mask"),
        ({"pass_value": PASS, "local_value": PASS}, "distinct"),
        ({"marks": [PASS]}, "value of its own"),
        ({"marks": [0x80000000]}, "inside the mask"),
        ({"marks": []}, "expected one per classifier gateway"),
    ],
)
def test_bad_settings_are_refused_with_what_was_expected(
    example: Any, keywords: dict[str, Any], message: str
) -> None:
    count = len(example.gateways)
    marks = keywords.pop("marks", [None] * count)
    if len(marks) == 1:
        marks = marks + [None] * (count - 1)
    options = {"mask": MASK, "pass_value": PASS, **keywords}
    with pytest.raises(ValueError, match=message):
        NodeDecisions(example, marks, **options)


def test_mismatched_address_families_are_an_error(example: Any) -> None:
    decisions = NodeDecisions(example, [None] * len(example.gateways), mask=MASK, pass_value=PASS)
    with pytest.raises(ValueError, match="one family"):
        decisions.decide("10.244.1.5", "2001:db8::1")
