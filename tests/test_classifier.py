"""The compiled classifier (``egresscore.policy.compiler``) against the plain-Python
reference (tests/reference/classifier.py), habit 7 of CONVENTIONS.md.

- Hypothesis generates small, collision-rich PolicySets (the strategies of
  tests/test_reference_classifier.py: a few namespaces, nodes and pods, random
  selectors, nested and repeated prefixes in one IPv4 /24 and one IPv6 /120, Calico
  annotations, every rule action and gateway kind, ``local_node`` set or not) and
  compares every decision: action, reason, policy, gateway node and egress IP; then
  the batch codes of ``classify_many``/``classify_many6`` with the single calls.
- The benchmark workload (benches/_classifier_workload.py), scaled down, is compared
  on a few thousand of its pairs.
- ``match_selector`` (the Cython selector core) is compared with ``evaluate`` and,
  through the loader, with the literal Kubernetes rules.
"""

from __future__ import annotations

import ipaddress
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.classifier import ReferenceClassifier, ReferenceDecision, decision_of
from reference.selectors import evaluate, k8s_selector_matches

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path.
from test_reference_classifier import (
    SELECTORS,
    k8s_labels,
    k8s_selectors,
    label_maps,
    packets,
    policy_sets,
)

from egresscore.policy.compiler import compile_policies, match_selector
from egresscore.policy.model import IPAddress, PolicySet

BENCHES = Path(__file__).resolve().parent.parent / "benches"
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))

import _classifier_workload  # noqa: E402

PACKETS_PER_EXAMPLE = 30


def code_decision(classifier: Any, code: int) -> tuple[str, str, str | None, str | None]:
    """(action, reason, gateway node, egress IP) of a batch code (codes carry no policy)."""
    decoded = classifier.decode(code)
    gateway = decoded.gateway
    return (
        decoded.action.name.lower(),
        decoded.reason.name.lower(),
        None if gateway is None else gateway.node,
        None if gateway is None else str(gateway.egress_ip),
    )


def without_policy(decision: ReferenceDecision) -> tuple[str, str, str | None, str | None]:
    return decision.action, decision.reason, decision.gateway_node, decision.egress_ip


def compare_batches(
    classifier: Any, reference: ReferenceClassifier, pairs: Sequence[tuple[IPAddress, IPAddress]]
) -> None:
    """``classify_many`` and ``classify_many6`` give the codes of the reference's decisions."""
    v4 = [(s, d) for s, d in pairs if s.version == 4]
    v6 = [(s, d) for s, d in pairs if s.version == 6]
    flat = array("I", [int(a) for pair in v4 for a in pair])
    codes = classifier.classify_many(flat)
    assert len(codes) == len(v4)
    for (src, dst), code in zip(v4, codes, strict=True):
        assert code_decision(classifier, code) == without_policy(reference.classify(src, dst)), (src, dst)
    packed = b"".join(s.packed + d.packed for s, d in v6)
    codes6 = classifier.classify_many6(packed)
    assert len(codes6) == len(v6)
    for (src6, dst6), code in zip(v6, codes6, strict=True):
        assert code_decision(classifier, code) == without_policy(reference.classify(src6, dst6)), (src6, dst6)


def describe(policy_set: PolicySet) -> str:
    """The policy set in a few lines, for failure messages."""
    inventory = policy_set.inventory
    lines = [f"namespaces: {inventory.namespaces}", f"nodes: {inventory.nodes}"]
    lines += [f"endpoint: {endpoint}" for endpoint in inventory.endpoints]
    lines += [f"policy: {policy}" for policy in policy_set.policies]
    return "\n".join(lines)


# --- Generated policy sets -------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_compiled_decisions_match_the_reference(data: st.DataObject) -> None:
    policy_set = data.draw(policy_sets())
    known = sorted(
        {node.name for node in policy_set.inventory.nodes} | {e.node for e in policy_set.inventory.endpoints}
    )
    local_node = data.draw(st.sampled_from((None, *known)))
    reference = ReferenceClassifier(policy_set, local_node)
    classifier = compile_policies(policy_set, local_node=local_node)
    pairs = data.draw(st.lists(packets(policy_set), min_size=1, max_size=PACKETS_PER_EXAMPLE))
    for src, dst in pairs:
        expected = reference.classify(src, dst)
        got = decision_of(classifier.classify(src, dst))
        assert got == expected, f"{src} -> {dst} (local_node={local_node})\n{describe(policy_set)}"
        # The same answer from text addresses.
        assert decision_of(classifier.classify(str(src), str(dst))) == expected
    compare_batches(classifier, reference, pairs)


# --- The benchmark workload ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workload() -> PolicySet:
    policy_set: PolicySet = _classifier_workload.build_workload(
        policies=150, endpoints=2000, prefixes=15000, seed=7
    )
    return policy_set


@pytest.mark.parametrize("local_node", [None, "gw-0", "node-00"])
def test_benchmark_workload_matches_the_reference(workload: PolicySet, local_node: str | None) -> None:
    reference = ReferenceClassifier(workload, local_node)
    classifier = compile_policies(workload, local_node=local_node)
    flat = _classifier_workload.make_pairs(workload, 3000, seed=11)
    expected = reference.classify_many(flat)
    reasons = {decision.reason for decision in expected}
    # The workload exercises the real path, not only the early exits.
    assert {"gateway", "no_policy", "not_an_endpoint", "cluster_internal"} <= reasons
    for i, decision in enumerate(expected):
        src, dst = ipaddress.IPv4Address(flat[2 * i]), ipaddress.IPv4Address(flat[2 * i + 1])
        assert decision_of(classifier.classify(src, dst)) == decision, (src, dst)
    codes = classifier.classify_many(flat)
    assert [code_decision(classifier, code) for code in codes] == [without_policy(d) for d in expected]


def test_benchmark_workload_ipv6(workload: PolicySet) -> None:
    reference = ReferenceClassifier(workload, "gw-1")
    classifier = compile_policies(workload, local_node="gw-1")
    sources = [ip for endpoint in workload.inventory.endpoints for ip in endpoint.ips if ip.version == 6]
    destinations = [
        network
        for policy in workload.policies
        for rule in policy.rules
        for network in rule.destinations
        if network.version == 6
    ]
    assert sources and destinations
    pairs: list[tuple[IPAddress, IPAddress]] = []
    for i in range(500):
        network = destinations[(i * 7) % len(destinations)]
        dst: IPAddress = network.network_address + (i * 0x9E3779B97F4A7C15) % network.num_addresses
        pairs.append((sources[(i * 13) % len(sources)], dst))
    for src, dst in pairs:
        assert decision_of(classifier.classify(src, dst)) == reference.classify(src, dst), (src, dst)
    compare_batches(classifier, reference, pairs)


# --- Selectors --------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(SELECTORS, st.lists(label_maps, max_size=8))
def test_match_selector_agrees_with_evaluate(selector: Any, label_sets: list[dict[str, str]]) -> None:
    expected = [i for i, labels in enumerate(label_sets) if evaluate(selector, labels)]
    assert match_selector(selector, label_sets) == expected, selector


@settings(max_examples=200, deadline=None)
@given(k8s_selectors(), st.lists(k8s_labels, max_size=8))
def test_match_selector_agrees_with_the_kubernetes_rules(
    selector: dict[str, Any], label_sets: list[dict[str, str]]
) -> None:
    from egresscore.policy.loader import parse_label_selector

    parsed = parse_label_selector(selector, "spec.selectors[0].podSelector")
    expected = [i for i, labels in enumerate(label_sets) if k8s_selector_matches(selector, labels)]
    assert match_selector(parsed, label_sets) == expected, selector
