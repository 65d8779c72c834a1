"""Tests of the plain-Python oracles themselves: tests/reference/classifier.py and
tests/reference/selectors.py.

The hand-written cases build small PolicySets from model objects and check one rule of
docs/policy.md "The decision" each: every Reason, every ordering rule, both families,
the gateway choice (PreferNodeLocal, maxGateways, Cilium's first node, interface and
explicit egress IPs, gateway pods) and the exact score. Hypothesis then checks that the
reference's indexed lookup agrees with its own linear scan on generated policy sets,
and that the loader's LabelSelector translation agrees with the literal reading of
the Kubernetes rules.

The Hypothesis strategies for policy sets live here and are imported by
tests/test_classifier.py, which compares the compiled classifier with this reference.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference.classifier import (
    ReferenceClassifier,
    ReferenceDecision,
    address_words,
    gateway_id,
    mix64,
    score,
)
from reference.selectors import evaluate, k8s_selector_matches

from egresscore.policy.model import (
    CALICO_NAMESPACE_SELECTOR_ANNOTATION,
    CALICO_POLICY_ANNOTATION,
    CALICO_SELECTOR_ANNOTATION,
    AnnotationSelection,
    ClusterNetwork,
    Endpoint,
    GatewaySpec,
    Inventory,
    IPAddress,
    IPNetwork,
    Namespace,
    Node,
    Origin,
    Policy,
    PolicySet,
    Rule,
    RuleAction,
    SourceTerm,
)
from egresscore.policy.selector import (
    MATCH_ALL,
    And,
    HasLabel,
    LabelIn,
    LabelMatch,
    MatchOp,
    Not,
    Or,
    Selector,
)

CILIUM = "CiliumEgressGatewayPolicy"
CALICO = "EgressGatewayPolicy"
NATIVE = "EgressPolicy"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def origin(kind: str, name: str) -> Origin:
    return Origin("test.yaml", f"document 1 ({kind} {name})", kind, name)


def labels(**pairs: str) -> dict[str, str]:
    return dict(pairs)


def match(key: str, *values: str) -> LabelIn:
    return LabelIn(key, frozenset(values))


GATEWAY_NODES = match("egress-gateway", "true")
RED_PODS = match("egress-code", "red")


def cilium(
    name: str,
    destinations: Sequence[str],
    *,
    pods: Selector | None = None,
    namespaces: Selector | None = None,
    nodes: Selector | None = None,
    excluded: Sequence[str] = (),
    gateway: GatewaySpec | None = None,
) -> Policy:
    """A CiliumEgressGatewayPolicy as the loader would make it: one redirect rule
    through the first node matching ``egress-gateway=true`` (unless ``gateway``)."""
    spec = gateway or GatewaySpec(node_selector=GATEWAY_NODES, first_node_only=True)
    return Policy(
        name=name,
        selection=(SourceTerm(pods=pods, namespaces=namespaces, nodes=nodes),),
        rules=(Rule(tuple(net(d) for d in destinations), RuleAction.REDIRECT, (spec,)),),
        excluded=tuple(net(e) for e in excluded),
        origin=origin(CILIUM, name),
    )


def native(
    name: str,
    rules: Sequence[Rule],
    *,
    pods: Selector | None = None,
    namespaces: Selector | None = None,
    excluded: Sequence[str] = (),
    priority: int = 0,
) -> Policy:
    return Policy(
        name=name,
        selection=(SourceTerm(pods=pods, namespaces=namespaces),),
        rules=tuple(rules),
        excluded=tuple(net(e) for e in excluded),
        priority=priority,
        origin=origin(NATIVE, name),
    )


def rule(
    *destinations: str,
    action: RuleAction = RuleAction.REDIRECT,
    gateways: Sequence[GatewaySpec] = (),
    prefer_node_local: bool = False,
    max_gateways: int = 0,
) -> Rule:
    return Rule(
        tuple(net(d) for d in destinations),
        action,
        tuple(gateways),
        prefer_node_local=prefer_node_local,
        max_gateways=max_gateways,
    )


NAMESPACES = (
    Namespace("payments", labels(team="payments")),
    Namespace("web", labels(team="web")),
    Namespace("egress", labels(role="egress")),
)
NODES = (
    Node("node-a", labels(zone="a"), (ip("192.168.0.1"), ip("2001:db8:ff::1"))),
    Node("node-b", labels(zone="b"), (ip("192.168.0.2"),)),
    Node(
        "gw-1",
        labels(**{"egress-gateway": "true"}),
        (ip("192.0.2.1"), ip("2001:db8::1")),
        {"eth1": (ip("192.0.2.101"), ip("192.0.2.102"), ip("2001:db8::101"))},
    ),
    Node("gw-2", labels(**{"egress-gateway": "true"}), (ip("192.0.2.2"), ip("2001:db8::2"))),
    # A gateway node without an IPv6 address, first by name among "v4only" nodes.
    Node("gw-0", labels(v4only="true"), (ip("198.51.100.1"),)),
    Node("gw-9", labels(v4only="true"), (ip("198.51.100.9"), ip("2001:db8::9"))),
)
ENDPOINTS = (
    Endpoint(
        "pay-1", "payments", "node-a", (ip("10.244.1.5"), ip("fd00:10:244:1::5")), labels(app="payment")
    ),
    Endpoint("pay-2", "payments", "node-b", (ip("10.244.1.6"),), labels(app="payment")),
    Endpoint("web-1", "web", "node-a", (ip("10.244.2.5"), ip("fd00:10:244:2::5")), labels(app="web")),
    # A pod outside the pod CIDR (a secondary range): its IP is still internal.
    Endpoint("batch-1", "batch", "node-c", (ip("172.16.5.5"),), labels(app="batch")),
    Endpoint(
        "egw-red-1",
        "egress",
        "gw-1",
        (ip("10.244.9.1"), ip("fd00:10:244:9::1")),
        labels(**{"egress-code": "red"}),
    ),
    Endpoint("egw-red-2", "egress", "node-b", (ip("10.244.9.2"),), labels(**{"egress-code": "red"})),
    Endpoint("egw-pay", "payments", "gw-2", (ip("10.244.1.99"),), labels(**{"egress-code": "red"})),
)
NETWORK = ClusterNetwork(
    pod_cidrs=(net("10.244.0.0/16"), net("fd00:10:244::/48")), service_cidrs=(net("10.96.0.0/12"),)
)

PAY_1, PAY_2, WEB_1, BATCH_1 = "10.244.1.5", "10.244.1.6", "10.244.2.5", "172.16.5.5"
PAY_1_V6, WEB_1_V6 = "fd00:10:244:1::5", "fd00:10:244:2::5"


def classifier(
    policies: Sequence[Policy],
    *,
    local_node: str | None = None,
    namespaces: Sequence[Namespace] = NAMESPACES,
    endpoints: Sequence[Endpoint] = ENDPOINTS,
) -> ReferenceClassifier:
    inventory = Inventory(tuple(namespaces), NODES, tuple(endpoints), NETWORK)
    return ReferenceClassifier(PolicySet(tuple(policies), inventory), local_node)


def destinations(prefix: str, count: int) -> list[str]:
    """The first ``count`` host addresses of ``prefix``."""
    network = net(prefix)
    return [str(network.network_address + i) for i in range(1, count + 1)]


def redirect(policy: str, node: str, egress_ip: str) -> ReferenceDecision:
    return ReferenceDecision("redirect", "gateway", policy, node, egress_ip)


# --- The reasons, in the order of "The decision" -----------------------------------------


def test_a_source_that_is_not_an_endpoint_passes() -> None:
    everything = cilium("all", ["0.0.0.0/0"])
    reference = classifier([everything])
    for src in ("10.244.200.200", "192.168.0.1", "203.0.113.9"):
        for dst in ("203.0.113.7", "10.244.1.6"):
            assert reference.classify(src, dst) == ReferenceDecision("pass", "not_an_endpoint")


@pytest.mark.parametrize(
    "dst",
    [
        "10.244.1.6",  # another pod, in the pod CIDR
        "10.244.77.77",  # the pod CIDR
        "10.100.0.1",  # the service CIDR
        "192.168.0.2",  # a node address
        "192.0.2.2",  # a gateway node's address
        "172.16.5.5",  # an endpoint IP outside every listed CIDR
        "10.244.1.5",  # the source itself
    ],
)
def test_cluster_internal_destinations_pass_whatever_the_policies_say(dst: str) -> None:
    reference = classifier([cilium("all", ["0.0.0.0/0"]), cilium("host", [f"{dst}/32"])])
    assert reference.is_internal(dst)
    assert reference.classify(PAY_1, dst) == ReferenceDecision("pass", "cluster_internal")


def test_cluster_internal_in_ipv6() -> None:
    reference = classifier([cilium("all6", ["::/0"])])
    assert reference.classify(PAY_1_V6, WEB_1_V6) == ReferenceDecision("pass", "cluster_internal")
    assert reference.classify(PAY_1_V6, "2001:db8:ff::1") == ReferenceDecision("pass", "cluster_internal")
    assert reference.classify(PAY_1_V6, "2001:db8:ff::2").reason == "gateway"


def test_interface_addresses_are_not_internal() -> None:
    # Only Node.addresses are the node's own IPs; an interface's egress IPs are not listed.
    reference = classifier([cilium("all", ["0.0.0.0/0"])])
    assert not reference.is_internal("192.0.2.101")


def test_no_policy_when_nothing_selects_the_source_or_contains_the_destination() -> None:
    assert classifier([]).classify(PAY_1, "203.0.113.7") == ReferenceDecision("pass", "no_policy")
    web_only = cilium("web", ["203.0.113.0/24"], pods=match("app", "web"))
    reference = classifier([web_only])
    assert reference.classify(PAY_1, "203.0.113.7") == ReferenceDecision("pass", "no_policy")
    assert reference.classify(WEB_1, "198.51.100.7") == ReferenceDecision("pass", "no_policy")
    assert reference.classify(WEB_1, "203.0.113.7").reason == "gateway"


def test_excluded_cidr_passes() -> None:
    policy = cilium("p", ["203.0.113.0/24"], excluded=["203.0.113.128/25"])
    reference = classifier([policy])
    assert reference.classify(PAY_1, "203.0.113.200") == ReferenceDecision("pass", "excluded", "p")
    assert reference.classify(PAY_1, "203.0.113.5").action == "redirect"


def test_excluded_cidr_before_a_rule_of_the_same_prefix_in_one_policy() -> None:
    policy = cilium("p", ["203.0.113.0/24"], excluded=["203.0.113.0/24"])
    assert classifier([policy]).classify(PAY_1, "203.0.113.5") == ReferenceDecision("pass", "excluded", "p")


def test_an_excluded_cidr_of_another_policy_competes_as_a_prefix() -> None:
    # The exclusion of "a" is the longest prefix, so it decides for a's pods, even
    # though "b" also selects the pod with a rule covering the destination.
    a = cilium("a", ["203.0.113.0/24"], excluded=["203.0.113.0/28"])
    b = cilium("b", ["203.0.113.0/26"])
    reference = classifier([a, b])
    assert reference.classify(PAY_1, "203.0.113.5") == ReferenceDecision("pass", "excluded", "a")
    assert reference.classify(PAY_1, "203.0.113.50").policy == "b"


def test_rule_pass_and_rule_drop() -> None:
    policy = native(
        "n",
        [
            rule("203.0.113.0/24", action=RuleAction.PASS),
            rule("198.51.100.0/24", action=RuleAction.DROP),
            rule("0.0.0.0/0", gateways=[GatewaySpec(node_selector=GATEWAY_NODES)]),
        ],
    )
    reference = classifier([policy])
    assert reference.classify(PAY_1, "203.0.113.5") == ReferenceDecision("pass", "rule_pass", "n")
    assert reference.classify(PAY_1, "198.51.100.5") == ReferenceDecision("drop", "rule_drop", "n")
    assert reference.classify(PAY_1, "8.8.8.8").reason == "gateway"


def test_no_usable_gateway_drops() -> None:
    nowhere = cilium("nowhere", ["203.0.113.0/24"], gateway=GatewaySpec(node_selector=match("absent", "x")))
    assert classifier([nowhere]).classify(PAY_1, "203.0.113.5") == ReferenceDecision(
        "drop", "no_gateway", "nowhere"
    )
    # A node that is not in the inventory (only an endpoint names node-c) is no gateway.
    ghost = cilium(
        "ghost",
        ["203.0.113.0/24"],
        gateway=GatewaySpec(node_selector=match("kubernetes.io/hostname", "node-c")),
    )
    assert classifier([ghost]).classify(PAY_1, "203.0.113.5").reason == "no_gateway"


def test_a_winner_without_gateways_does_not_fall_through_to_a_shorter_prefix() -> None:
    narrow = cilium("narrow", ["203.0.113.0/24"], gateway=GatewaySpec(node_selector=match("absent", "x")))
    broad = cilium("broad", ["203.0.0.0/16"])
    reference = classifier([narrow, broad])
    assert reference.classify(PAY_1, "203.0.113.5") == ReferenceDecision("drop", "no_gateway", "narrow")
    assert reference.classify(PAY_1, "203.0.1.5").policy == "broad"


# --- Order -----------------------------------------------------------------------------


def test_the_longest_prefix_wins_over_priority_and_name() -> None:
    long = native("zz-long", [rule("203.0.113.0/24", action=RuleAction.DROP)], priority=100)
    short = native("aa-short", [rule("203.0.0.0/16", action=RuleAction.PASS)], priority=-100)
    reference = classifier([short, long])
    assert reference.classify(PAY_1, "203.0.113.5") == ReferenceDecision("drop", "rule_drop", "zz-long")
    assert reference.classify(PAY_1, "203.0.7.5") == ReferenceDecision("pass", "rule_pass", "aa-short")


def test_within_one_policy_the_longest_rule_prefix_wins() -> None:
    policy = native(
        "n", [rule("203.0.0.0/16", action=RuleAction.DROP), rule("203.0.113.0/24", action=RuleAction.PASS)]
    )
    reference = classifier([policy])
    assert reference.classify(PAY_1, "203.0.113.5").reason == "rule_pass"
    assert reference.classify(PAY_1, "203.0.114.5").reason == "rule_drop"


def test_the_lowest_priority_wins_among_equal_prefixes() -> None:
    low = native("b-low", [rule("203.0.113.0/24", action=RuleAction.DROP)], priority=-1)
    high = native("a-high", [rule("203.0.113.0/24", action=RuleAction.PASS)], priority=5)
    assert classifier([high, low]).classify(PAY_1, "203.0.113.5").policy == "b-low"


def test_the_name_decides_among_equal_prefixes_and_priorities() -> None:
    beta = native("beta", [rule("203.0.113.0/24", action=RuleAction.DROP)])
    alpha = native("alpha", [rule("203.0.113.0/24", action=RuleAction.PASS)])
    assert classifier([beta, alpha]).classify(PAY_1, "203.0.113.5") == ReferenceDecision(
        "pass", "rule_pass", "alpha"
    )
    # Names compare as strings, code point by code point.
    upper = native("Zed", [rule("203.0.113.0/24", action=RuleAction.DROP)])
    assert classifier([alpha, upper]).classify(PAY_1, "203.0.113.5").policy == "Zed"


def test_the_kind_decides_among_equal_names() -> None:
    cilium_policy = cilium("same", ["203.0.113.0/24"])
    native_policy = native("same", [rule("203.0.113.0/24", action=RuleAction.DROP)])
    calico_policy = Policy(
        "same",
        AnnotationSelection("same"),
        (rule("203.0.113.0/24", action=RuleAction.PASS),),
        origin=origin(CALICO, "same"),
    )
    pay = (Endpoint("pay-1", "payments", "node-a", (ip(PAY_1),), {}, {CALICO_POLICY_ANNOTATION: "same"}),)
    assert classifier([native_policy, cilium_policy]).classify(PAY_1, "203.0.113.5").reason == "gateway"
    assert classifier([native_policy, calico_policy], endpoints=pay).classify(
        PAY_1, "203.0.113.5"
    ).reason == ("rule_pass")


def test_implicit_annotation_policies_come_after_an_equally_named_policy() -> None:
    annotated = (
        Endpoint("pay-1", "payments", "node-a", (ip(PAY_1),), {}, {CALICO_SELECTOR_ANNOTATION: "app == 'x'"}),
    )
    rival = native("calico-annotations:payments/pay-1", [rule("0.0.0.0/0", action=RuleAction.DROP)])
    reference = classifier([rival], endpoints=annotated)
    assert reference.classify(PAY_1, "203.0.113.5") == ReferenceDecision(
        "drop", "rule_drop", "calico-annotations:payments/pay-1"
    )
    found = reference.candidates(PAY_1, "203.0.113.5")
    assert [c.policy for c in found] == ["calico-annotations:payments/pay-1"] * 2


# --- Selection ----------------------------------------------------------------------------


def test_source_terms_namespace_and_node_selectors() -> None:
    by_namespace = cilium("ns", ["203.0.113.0/24"], namespaces=match("team", "payments"))
    reference = classifier([by_namespace])
    assert reference.classify(PAY_1, "203.0.113.5").policy == "ns"
    assert reference.classify(PAY_2, "203.0.113.5").policy == "ns"
    assert reference.classify(WEB_1, "203.0.113.5").reason == "no_policy"

    by_node = cilium("node", ["203.0.113.0/24"], nodes=match("kubernetes.io/hostname", "node-a"))
    reference = classifier([by_node])
    assert reference.classify(PAY_1, "203.0.113.5").policy == "node"
    assert reference.classify(WEB_1, "203.0.113.5").policy == "node"
    assert reference.classify(PAY_2, "203.0.113.5").reason == "no_policy"


def test_automatic_labels_select() -> None:
    cilium_ns = cilium("a", ["203.0.113.0/24"], pods=match("io.cilium.k8s.namespace.labels.team", "web"))
    k8s_name = cilium("b", ["198.51.100.0/24"], namespaces=match("kubernetes.io/metadata.name", "payments"))
    # batch-1's namespace and node are not listed: it has only the automatic labels.
    unlisted = cilium("c", ["192.0.0.0/24"], pods=match("io.kubernetes.pod.namespace", "batch"))
    reference = classifier([cilium_ns, k8s_name, unlisted])
    assert reference.classify(WEB_1, "203.0.113.5").policy == "a"
    assert reference.classify(PAY_1, "203.0.113.5").reason == "no_policy"
    assert reference.classify(PAY_2, "198.51.100.5").policy == "b"
    assert reference.classify(BATCH_1, "192.0.0.5").policy == "c"


def test_selection_is_an_or_of_terms() -> None:
    policy = Policy(
        "two",
        (SourceTerm(pods=match("app", "web")), SourceTerm(nodes=match("zone", "b"))),
        (rule("203.0.113.0/24", action=RuleAction.DROP),),
        origin=origin(NATIVE, "two"),
    )
    reference = classifier([policy])
    assert reference.classify(WEB_1, "203.0.113.5").policy == "two"
    assert reference.classify(PAY_2, "203.0.113.5").policy == "two"
    assert reference.classify(PAY_1, "203.0.113.5").reason == "no_policy"


def test_a_policy_with_no_terms_selects_nothing() -> None:
    policy = Policy("none", (), (rule("0.0.0.0/0", action=RuleAction.DROP),), origin=origin(NATIVE, "none"))
    assert classifier([policy]).classify(PAY_1, "203.0.113.5").reason == "no_policy"


# --- Gateways ---------------------------------------------------------------------------------


def test_cilium_uses_the_first_matching_node_by_name() -> None:
    reference = classifier([cilium("p", ["203.0.113.0/24"])])
    for dst in destinations("203.0.113.0/24", 50):
        assert reference.classify(PAY_1, dst) == redirect("p", "gw-1", "192.0.2.1")


def test_node_gateways_of_every_matching_node_share_the_flows() -> None:
    policy = native("n", [rule("203.0.113.0/24", gateways=[GatewaySpec(node_selector=GATEWAY_NODES)])])
    reference = classifier([policy])
    chosen = Counter(
        reference.classify(PAY_1, dst).gateway_node for dst in destinations("203.0.113.0/24", 200)
    )
    assert set(chosen) == {"gw-1", "gw-2"}
    assert min(chosen.values()) > 50


def test_ipv6_packets_use_ipv6_egress_ips() -> None:
    reference = classifier([cilium("p6", ["2001:db8:100::/48"])])
    assert reference.classify(PAY_1_V6, "2001:db8:100::7") == redirect("p6", "gw-1", "2001:db8::1")
    assert reference.classify(PAY_1, "203.0.113.7") == ReferenceDecision("pass", "no_policy")


def test_cilium_first_node_without_an_address_of_the_family_gives_no_gateway() -> None:
    policy = cilium(
        "v4only",
        ["0.0.0.0/0", "::/0"],
        gateway=GatewaySpec(node_selector=match("v4only", "true"), first_node_only=True),
    )
    reference = classifier([policy])
    assert reference.classify(PAY_1, "203.0.113.7") == redirect("v4only", "gw-0", "198.51.100.1")
    # gw-9 has an IPv6 address, but gw-0 (first by name) is the gateway.
    assert reference.classify(PAY_1_V6, "2001:db8:100::7") == ReferenceDecision(
        "drop", "no_gateway", "v4only"
    )


def test_local_node_snats() -> None:
    policy = cilium("p", ["203.0.113.0/24"])
    assert classifier([policy], local_node="gw-1").classify(PAY_1, "203.0.113.7") == ReferenceDecision(
        "snat", "gateway", "p", "gw-1", "192.0.2.1"
    )
    assert classifier([policy], local_node="gw-2").classify(PAY_1, "203.0.113.7").action == "redirect"
    assert classifier([policy], local_node="node-a").classify(PAY_1, "203.0.113.7").action == "redirect"


def test_interface_egress_ips() -> None:
    spec = GatewaySpec(node_selector=GATEWAY_NODES, interface="eth1")
    reference = classifier([native("i", [rule("0.0.0.0/0", "::/0", gateways=[spec])])])
    # gw-2 has no eth1: only gw-1, with eth1's first address of each family.
    for dst in destinations("203.0.113.0/24", 20):
        assert reference.classify(PAY_1, dst) == redirect("i", "gw-1", "192.0.2.101")
    assert reference.classify(PAY_1_V6, "2001:db8:100::7") == redirect("i", "gw-1", "2001:db8::101")


def test_explicit_egress_ips_and_no_fallback_for_the_other_family() -> None:
    spec = GatewaySpec(node_selector=GATEWAY_NODES, first_node_only=True, egress_ips=(ip("192.0.2.10"),))
    reference = classifier([cilium("e", ["0.0.0.0/0", "::/0"], gateway=spec)])
    assert reference.classify(PAY_1, "203.0.113.7") == redirect("e", "gw-1", "192.0.2.10")
    # An egressIP is given, so the node's own IPv6 address is not used.
    assert reference.classify(PAY_1_V6, "2001:db8:100::7") == ReferenceDecision("drop", "no_gateway", "e")


def test_identical_gateways_count_once() -> None:
    first = GatewaySpec(node_selector=match("kubernetes.io/hostname", "gw-1"))
    twice = GatewaySpec(node_selector=GATEWAY_NODES, egress_ips=(ip("192.0.2.1"),))
    reference = classifier([native("d", [rule("0.0.0.0/0", gateways=[first, twice])])])
    usable = reference.usable_gateways("d", 0, 4, PAY_1)
    # gw-1 reaches 192.0.2.1 twice (its address, and the explicit egress IP): once. gw-2 would
    # carry the same egress IP, which stays with the first node by name.
    assert [(g.node, str(g.egress_ip)) for g in usable] == [("gw-1", "192.0.2.1")]


def test_usable_gateways_are_ordered_by_node_then_egress_ip() -> None:
    specs = [
        GatewaySpec(node_selector=GATEWAY_NODES, egress_ips=(ip("192.0.2.20"),)),
        GatewaySpec(node_selector=GATEWAY_NODES, egress_ips=(ip("192.0.2.3"),)),
        GatewaySpec(pod_selector=RED_PODS, namespace_selector=MATCH_ALL),
    ]
    reference = classifier([native("o", [rule("0.0.0.0/0", gateways=specs)])])
    usable = [(g.node, str(g.egress_ip)) for g in reference.usable_gateways("o", 0, 4, PAY_1)]
    assert usable == [
        ("gw-1", "10.244.9.1"),
        ("gw-1", "192.0.2.3"),  # numerically before .20 (as text it would come after)
        ("gw-1", "192.0.2.20"),
        ("gw-2", "10.244.1.99"),
        # gw-2 192.0.2.3 and 192.0.2.20: those egress IPs stay with gw-1, first by name.
        ("node-b", "10.244.9.2"),
    ]


def test_pod_gateways_default_to_the_client_namespace() -> None:
    spec = GatewaySpec(pod_selector=RED_PODS)
    reference = classifier([native("pods", [rule("0.0.0.0/0", gateways=[spec])])])
    for dst in destinations("203.0.113.0/24", 20):
        assert reference.classify(PAY_1, dst) == redirect("pods", "gw-2", "10.244.1.99")
    # No red pod in "web".
    assert reference.classify(WEB_1, "203.0.113.7") == ReferenceDecision("drop", "no_gateway", "pods")


def test_pod_gateways_in_selected_namespaces_and_their_family() -> None:
    spec = GatewaySpec(pod_selector=RED_PODS, namespace_selector=match("role", "egress"))
    reference = classifier([native("pods", [rule("0.0.0.0/0", "::/0", gateways=[spec])])])
    chosen = {reference.classify(WEB_1, dst) for dst in destinations("203.0.113.0/24", 100)}
    assert chosen == {redirect("pods", "gw-1", "10.244.9.1"), redirect("pods", "node-b", "10.244.9.2")}
    # Only egw-red-1 has an IPv6 address.
    assert reference.classify(WEB_1_V6, "2001:db8:100::7") == redirect("pods", "gw-1", "fd00:10:244:9::1")


def test_prefer_node_local() -> None:
    spec = GatewaySpec(pod_selector=RED_PODS, namespace_selector=match("role", "egress"))
    reference = classifier([native("pnl", [rule("0.0.0.0/0", gateways=[spec], prefer_node_local=True)])])
    # pay-2 runs on node-b, where egw-red-2 runs: only that one.
    for dst in destinations("203.0.113.0/24", 50):
        assert reference.classify(PAY_2, dst) == redirect("pnl", "node-b", "10.244.9.2")
    # pay-1's node (node-a) has none: all of them.
    chosen = {reference.classify(PAY_1, dst).gateway_node for dst in destinations("203.0.113.0/24", 100)}
    assert chosen == {"gw-1", "node-b"}


def test_max_gateways_is_a_per_source_subset_by_score() -> None:
    specs = [GatewaySpec(node_selector=GATEWAY_NODES), GatewaySpec(node_selector=match("v4only", "true"))]
    reference = classifier([native("m", [rule("0.0.0.0/0", gateways=specs, max_gateways=2)])])
    usable = reference.usable_gateways("m", 0, 4, PAY_1)
    assert len(usable) == 4
    for source in (PAY_1, PAY_2, WEB_1):
        ranked = sorted(usable, key=lambda g: -score([ip(source)], g.node, g.egress_ip))
        subset = {g.node for g in ranked[:2]}
        chosen = {reference.classify(source, dst).gateway_node for dst in destinations("203.0.113.0/24", 100)}
        assert chosen == subset


def test_max_gateways_larger_than_the_pool_uses_all() -> None:
    spec = GatewaySpec(node_selector=GATEWAY_NODES)
    reference = classifier([native("m", [rule("0.0.0.0/0", gateways=[spec], max_gateways=5)])])
    chosen = {reference.classify(PAY_1, dst).gateway_node for dst in destinations("203.0.113.0/24", 100)}
    assert chosen == {"gw-1", "gw-2"}


def test_the_highest_score_carries_the_flow() -> None:
    spec = GatewaySpec(node_selector=GATEWAY_NODES)
    reference = classifier([native("r", [rule("0.0.0.0/0", "::/0", gateways=[spec])])])
    for src, dst, pool in (
        (PAY_1, "203.0.113.7", [("gw-1", "192.0.2.1"), ("gw-2", "192.0.2.2")]),
        (PAY_1_V6, "2001:db8:100::7", [("gw-1", "2001:db8::1"), ("gw-2", "2001:db8::2")]),
    ):
        best = max(pool, key=lambda g: independent_score([src, dst], *g))
        assert reference.classify(src, dst) == redirect("r", *best)


def test_removing_a_gateway_moves_only_its_flows() -> None:
    spec = GatewaySpec(node_selector=GATEWAY_NODES)
    nodes_without_gw2 = tuple(node for node in NODES if node.name != "gw-2")
    before = classifier([native("r", [rule("0.0.0.0/0", gateways=[spec])])])
    after = ReferenceClassifier(
        PolicySet(
            (native("r", [rule("0.0.0.0/0", gateways=[spec])]),),
            Inventory(NAMESPACES, nodes_without_gw2, ENDPOINTS, NETWORK),
        )
    )
    for dst in destinations("203.0.113.0/24", 100):
        if before.classify(PAY_1, dst).gateway_node == "gw-1":
            assert after.classify(PAY_1, dst).gateway_node == "gw-1"


# --- Calico annotations --------------------------------------------------------------------------


def calico_policy(name: str) -> Policy:
    return Policy(
        name,
        AnnotationSelection(name),
        (
            rule("198.51.100.0/24", action=RuleAction.PASS),
            rule(
                "0.0.0.0/0",
                gateways=[GatewaySpec(pod_selector=RED_PODS, namespace_selector=match("role", "egress"))],
            ),
        ),
        origin=origin(CALICO, name),
    )


def annotated_inventory(
    pod: Mapping[str, str], namespace: Mapping[str, str]
) -> tuple[list[Namespace], list[Endpoint]]:
    namespaces = [Namespace("payments", labels(team="payments"), dict(namespace)), *NAMESPACES[1:]]
    endpoints = [
        Endpoint("pay-1", "payments", "node-a", (ip(PAY_1), ip(PAY_1_V6)), labels(app="payment"), dict(pod)),
        *ENDPOINTS[1:],
    ]
    return namespaces, endpoints


def test_calico_policy_applies_through_the_pod_annotation() -> None:
    namespaces, endpoints = annotated_inventory({CALICO_POLICY_ANNOTATION: "egw"}, {})
    reference = classifier([calico_policy("egw")], namespaces=namespaces, endpoints=endpoints)
    assert reference.classify(PAY_1, "198.51.100.5") == ReferenceDecision("pass", "rule_pass", "egw")
    assert reference.classify(PAY_1, "203.0.113.5").policy == "egw"
    assert reference.classify(PAY_1, "203.0.113.5").reason == "gateway"
    # pay-2 (same namespace, no annotation) is not selected.
    assert reference.classify(PAY_2, "203.0.113.5").reason == "no_policy"


def test_calico_policy_applies_through_the_namespace_annotation() -> None:
    namespaces, endpoints = annotated_inventory({}, {CALICO_POLICY_ANNOTATION: "egw"})
    reference = classifier(
        [calico_policy("egw"), calico_policy("other")], namespaces=namespaces, endpoints=endpoints
    )
    assert reference.classify(PAY_1, "198.51.100.5").policy == "egw"
    assert reference.classify(PAY_2, "198.51.100.5").policy == "egw"
    assert reference.classify(WEB_1, "198.51.100.5").reason == "no_policy"


def test_the_pod_policy_annotation_beats_the_namespace_one() -> None:
    namespaces, endpoints = annotated_inventory(
        {CALICO_POLICY_ANNOTATION: "other"}, {CALICO_POLICY_ANNOTATION: "egw"}
    )
    reference = classifier(
        [calico_policy("egw"), calico_policy("other")], namespaces=namespaces, endpoints=endpoints
    )
    assert reference.classify(PAY_1, "198.51.100.5").policy == "other"
    assert reference.classify(PAY_2, "198.51.100.5").policy == "egw"


def test_selector_annotations_make_implicit_policies() -> None:
    namespaces, endpoints = annotated_inventory(
        {
            CALICO_SELECTOR_ANNOTATION: "egress-code == 'red'",
            CALICO_NAMESPACE_SELECTOR_ANNOTATION: "role == 'egress'",
        },
        {CALICO_SELECTOR_ANNOTATION: "egress-code == 'red'"},
    )
    reference = classifier([], namespaces=namespaces, endpoints=endpoints)
    # pay-1's own annotations: gateways in "egress", every destination of both families.
    mine = "calico-annotations:payments/pay-1"
    chosen = {reference.classify(PAY_1, dst) for dst in destinations("203.0.113.0/24", 100)}
    assert chosen == {redirect(mine, "gw-1", "10.244.9.1"), redirect(mine, "node-b", "10.244.9.2")}
    assert reference.classify(PAY_1_V6, "2001:db8:100::7") == redirect(mine, "gw-1", "fd00:10:244:9::1")
    # pay-2 inherits the namespace's: gateway pods in its own namespace (egw-pay).
    assert reference.classify(PAY_2, "203.0.113.7") == redirect(
        "calico-annotations:payments/*", "gw-2", "10.244.1.99"
    )
    # Internal destinations still pass.
    assert reference.classify(PAY_1, "10.244.2.5") == ReferenceDecision("pass", "cluster_internal")


def test_a_policy_annotation_anywhere_beats_selector_annotations() -> None:
    namespaces, endpoints = annotated_inventory(
        {CALICO_SELECTOR_ANNOTATION: "egress-code == 'red'"}, {CALICO_POLICY_ANNOTATION: "egw"}
    )
    reference = classifier([calico_policy("egw")], namespaces=namespaces, endpoints=endpoints)
    assert reference.classify(PAY_1, "203.0.113.7").policy == "egw"
    assert reference.classify(PAY_1, "198.51.100.7").reason == "rule_pass"


def test_an_empty_selector_annotation_is_all() -> None:
    namespaces, endpoints = annotated_inventory({CALICO_SELECTOR_ANNOTATION: ""}, {})
    reference = classifier([], namespaces=namespaces, endpoints=endpoints)
    # Every pod of "payments" is a gateway pod of the implicit policy. A policy never selects
    # its own gateway pods (their traffic must not loop through gateways), so nobody is left.
    policy = next(entry.policy for entry in reference.entries if entry.name.startswith("calico-annotations:"))
    assert policy.rules[0].gateways[0].pod_selector == MATCH_ALL
    assert reference.classify(PAY_1, "203.0.113.7") == ReferenceDecision("pass", "no_policy")


# --- The score --------------------------------------------------------------------------------


def independent_score(addresses: Sequence[str], node: str, egress_ip: str) -> int:
    """docs/policy.md's score, written again from the text without the reference's code."""
    mask = 0xFFFF_FFFF_FFFF_FFFF

    def finalise(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = int.from_bytes(
        hashlib.blake2b(f"{node}/{egress_ip}".encode("ascii"), digest_size=8).digest(), "little"
    )
    for text in addresses:
        address = ipaddress.ip_address(text)
        value = int(address)
        words = [0, value] if address.version == 4 else [value >> 64, value & mask]
        for word in words:
            h = finalise(h ^ word)
    return h


def test_mix64_is_splitmix64s_finaliser() -> None:
    # splitmix64 seeded with 0: its first outputs are the finaliser of k * golden gamma.
    gamma = 0x9E3779B97F4A7C15
    assert mix64(gamma) == 0xE220A8397B1DCDAF
    assert mix64(2 * gamma & 0xFFFF_FFFF_FFFF_FFFF) == 0x6E789E6AA1B965F4
    assert mix64(0) == 0


def test_address_words() -> None:
    assert address_words(ip("203.0.113.7")) == (0, 0xCB007107)
    assert address_words(ip("2001:db8::1:2")) == (0x20010DB800000000, 0x0000000000010002)


def test_gateway_id_is_little_endian_blake2b() -> None:
    digest = hashlib.blake2b(b"gw-1/192.0.2.1", digest_size=8).digest()
    assert gateway_id("gw-1", ip("192.0.2.1")) == int.from_bytes(digest, "little")
    # IPv6 egress IPs are written in their compressed form.
    digest6 = hashlib.blake2b(b"gw-1/2001:db8::1", digest_size=8).digest()
    assert gateway_id("gw-1", ip("2001:0db8:0000::0001")) == int.from_bytes(digest6, "little")


@pytest.mark.parametrize(
    ("addresses", "node", "egress_ip"),
    [
        (["10.244.1.5"], "gw-1", "192.0.2.1"),
        (["10.244.1.5", "203.0.113.7"], "gw-1", "192.0.2.1"),
        (["10.244.1.5", "203.0.113.7"], "gw-2", "192.0.2.2"),
        (["fd00:10:244:1::5", "2001:db8:100::7"], "gw-1", "2001:db8::1"),
        ([], "node", "198.51.100.1"),
    ],
)
def test_score_matches_the_written_definition(addresses: list[str], node: str, egress_ip: str) -> None:
    expected = independent_score(addresses, node, egress_ip)
    assert score([ip(a) for a in addresses], node, ip(egress_ip)) == expected


def test_score_pinned_values() -> None:
    # Computed once from the definition; a change here changes which gateway every flow uses.
    assert score([ip("10.244.1.5"), ip("203.0.113.7")], "gw-1", ip("192.0.2.1")) == SCORE_GW1
    assert score([ip("fd00:10:244:1::5"), ip("2001:db8:100::7")], "gw-1", ip("2001:db8::1")) == SCORE_GW1_V6


SCORE_GW1 = 14434015650245125608
SCORE_GW1_V6 = 9686068346118789275


# --- API details ------------------------------------------------------------------------------------


def test_address_forms_and_families() -> None:
    reference = classifier([cilium("p", ["203.0.113.0/24"])])
    expected = reference.classify(PAY_1, "203.0.113.7")
    assert reference.classify(ip(PAY_1), ip("203.0.113.7")) == expected
    assert reference.classify(int(ip(PAY_1)), int(ip("203.0.113.7"))) == expected
    assert reference.classify(ip(PAY_1).packed, ip("203.0.113.7").packed) == expected
    assert reference.classify_many([int(ip(PAY_1)), int(ip("203.0.113.7"))]) == [expected]
    with pytest.raises(ValueError, match="different families"):
        reference.classify(PAY_1, "2001:db8::7")


# --- Hypothesis: generated policy sets ---------------------------------------------------------------
#
# Small worlds where everything collides: a few label keys and values, namespaces, nodes
# and pods, and destination prefixes inside one /24 (and one IPv6 /120) so that
# prefixes nest and repeat across policies. Shared with tests/test_classifier.py.

LABEL_KEYS = ("app", "tier", "team", "egress-gateway")
LABEL_VALUES = ("a", "b", "c", "true")
NAMESPACE_NAMES = ("alpha", "beta", "gamma")
NODE_NAMES = ("n0", "n1", "n2", "n3")
POLICY_NAMES = ("p0", "p1", "p2", "p3", "p4", "q", "calico-annotations:alpha/*")
DST4 = net("203.0.113.0/24")
DST6 = net("2001:db8:ff::/120")
KINDS = (CILIUM, CALICO, NATIVE)

label_maps = st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(LABEL_VALUES), max_size=3)


def _selectors() -> st.SearchStrategy[Selector]:
    """Selector ASTs over the small label vocabulary."""
    leaves = st.one_of(
        st.builds(
            LabelIn,
            st.sampled_from(LABEL_KEYS),
            st.frozensets(st.sampled_from(LABEL_VALUES), min_size=1, max_size=2),
        ),
        st.builds(HasLabel, st.sampled_from(LABEL_KEYS)),
        st.builds(
            LabelMatch,
            st.sampled_from(LABEL_KEYS),
            st.sampled_from(list(MatchOp)),
            st.sampled_from(("", "t", "a")),
        ),
        st.just(MATCH_ALL),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(Not, inner),
            st.builds(And, st.lists(inner, max_size=3).map(tuple)),
            st.builds(Or, st.lists(inner, max_size=3).map(tuple)),
        ),
        max_leaves=4,
    )


SELECTORS = _selectors()
OPTIONAL_SELECTORS = st.one_of(st.none(), SELECTORS)


@st.composite
def networks4(draw: st.DrawFn) -> IPNetwork:
    length = draw(st.one_of(st.integers(24, 32), st.sampled_from((0, 8, 16))))
    if length < 24:
        return DST4.supernet(new_prefix=length)
    offset = draw(st.integers(0, 255))
    return ipaddress.ip_network((int(DST4.network_address) + offset, length), strict=False)


@st.composite
def networks6(draw: st.DrawFn) -> IPNetwork:
    length = draw(st.one_of(st.integers(120, 128), st.sampled_from((0, 32, 64))))
    if length < 120:
        return DST6.supernet(new_prefix=length)
    offset = draw(st.integers(0, 255))
    return ipaddress.ip_network((int(DST6.network_address) + offset, length), strict=False)


NETWORKS = st.one_of(networks4(), networks4(), networks6())


@st.composite
def gateway_specs(draw: st.DrawFn) -> GatewaySpec:
    if draw(st.booleans()):
        return GatewaySpec(
            pod_selector=draw(SELECTORS),
            namespace_selector=draw(OPTIONAL_SELECTORS),
        )
    egress: tuple[IPAddress, ...] = ()
    interface = None
    choice = draw(st.integers(0, 2))
    if choice == 1:
        egress = tuple(
            draw(
                st.lists(
                    st.sampled_from((ip("192.0.2.200"), ip("192.0.2.201"), ip("2001:db8::200"))),
                    max_size=2,
                    unique_by=lambda a: a.version,
                )
            )
        )
    elif choice == 2:
        interface = draw(st.sampled_from(("eth1", "eth2")))
    return GatewaySpec(
        node_selector=draw(SELECTORS),
        first_node_only=draw(st.booleans()),
        egress_ips=egress,
        interface=interface,
    )


@st.composite
def rules(draw: st.DrawFn, used: set[IPNetwork]) -> Rule:
    destinations = draw(st.lists(NETWORKS, min_size=1, max_size=3, unique=True))
    destinations = [d for d in destinations if d not in used] or []
    used.update(destinations)
    action = draw(
        st.sampled_from((RuleAction.REDIRECT, RuleAction.REDIRECT, RuleAction.PASS, RuleAction.DROP))
    )
    gateways = (
        draw(st.lists(gateway_specs(), min_size=1, max_size=3)) if action is RuleAction.REDIRECT else []
    )
    return Rule(
        tuple(destinations),
        action,
        tuple(gateways),
        prefer_node_local=draw(st.booleans()),
        max_gateways=draw(st.sampled_from((0, 0, 1, 2))),
    )


@st.composite
def policies(draw: st.DrawFn, name: str) -> Policy:
    kind = draw(st.sampled_from(KINDS))
    used: set[IPNetwork] = set()
    policy_rules = [r for r in draw(st.lists(rules(used), min_size=1, max_size=3)) if r.destinations]
    excluded = tuple(draw(st.lists(NETWORKS, max_size=2, unique=True)))
    selection: tuple[SourceTerm, ...] | AnnotationSelection
    if kind == CALICO:
        selection = AnnotationSelection(name)
    else:
        terms = draw(
            st.lists(
                st.builds(SourceTerm, OPTIONAL_SELECTORS, OPTIONAL_SELECTORS, OPTIONAL_SELECTORS),
                min_size=1,
                max_size=2,
            )
        )
        selection = tuple(terms)
    return Policy(
        name,
        selection,
        tuple(policy_rules),
        excluded=excluded,
        priority=draw(st.integers(-1, 1)) if kind == NATIVE else 0,
        origin=origin(kind, name),
    )


def calico_annotations() -> st.SearchStrategy[dict[str, str]]:
    calico_selectors = st.sampled_from(
        ("", "app == 'a'", "has(tier)", "egress-gateway == 'true' || app in {'b', 'c'}")
    )
    return st.fixed_dictionaries(
        {},
        optional={
            CALICO_POLICY_ANNOTATION: st.sampled_from(POLICY_NAMES[:3]),
            CALICO_SELECTOR_ANNOTATION: calico_selectors,
            CALICO_NAMESPACE_SELECTOR_ANNOTATION: st.sampled_from(("", "all()", "team == 'a'")),
        },
    )


@st.composite
def policy_sets(draw: st.DrawFn, with_annotations: bool = True) -> PolicySet:
    """A small, collision-rich PolicySet: v4 and v6 pods, nodes with addresses and
    interfaces, internal CIDRs overlapping policy prefixes, unique policy names."""
    no_annotations: st.SearchStrategy[dict[str, str]] = st.just({})
    namespace_annotations = calico_annotations() if with_annotations else no_annotations
    namespaces = tuple(
        Namespace(name, draw(label_maps), draw(namespace_annotations))
        for name in draw(st.lists(st.sampled_from(NAMESPACE_NAMES), max_size=3, unique=True))
    )
    nodes = []
    for index, name in enumerate(draw(st.lists(st.sampled_from(NODE_NAMES), max_size=4, unique=True))):
        addresses = draw(
            st.lists(
                st.sampled_from((ip(f"192.0.2.{index + 1}"), ip(f"2001:db8::{index + 1}"))),
                max_size=2,
                unique=True,
            )
        )
        interfaces = draw(
            st.dictionaries(
                st.sampled_from(("eth1", "eth2")),
                st.lists(
                    st.sampled_from(
                        (
                            ip(f"192.0.2.{index + 101}"),
                            ip(f"192.0.2.{index + 111}"),
                            ip(f"2001:db8::{index + 101}"),
                        )
                    ),
                    max_size=3,
                    unique=True,
                ).map(tuple),
                max_size=2,
            )
        )
        nodes.append(Node(name, draw(label_maps), tuple(addresses), interfaces))
    endpoints = []
    pod_annotations = calico_annotations() if with_annotations else no_annotations
    for index in range(draw(st.integers(0, 7))):
        ips: list[IPAddress] = [ip(f"10.0.0.{index + 1}")] if draw(st.integers(0, 4)) else []
        if draw(st.booleans()) or not ips:
            ips.append(ip(f"fd00::{index + 1:x}"))
        endpoints.append(
            Endpoint(
                f"pod-{index}",
                draw(st.sampled_from(NAMESPACE_NAMES)),
                draw(st.sampled_from((*NODE_NAMES, "unlisted"))),
                tuple(ips),
                draw(label_maps),
                draw(pod_annotations),
            )
        )
    network = ClusterNetwork(
        pod_cidrs=(net("10.0.0.0/24"), net("fd00::/120")),
        internal_cidrs=tuple(
            draw(
                st.lists(
                    st.sampled_from((net("203.0.113.240/28"), net("2001:db8:ff::f0/124"))),
                    max_size=2,
                    unique=True,
                )
            )
        ),
    )
    names = draw(st.lists(st.sampled_from(POLICY_NAMES), max_size=5, unique=True))
    policy_list = tuple(policy for policy in (draw(policies(name)) for name in names) if policy.rules)
    return PolicySet(policy_list, Inventory(namespaces, tuple(nodes), tuple(endpoints), network))


@st.composite
def packets(draw: st.DrawFn, policy_set: PolicySet) -> tuple[IPAddress, IPAddress]:
    """A (src, dst) pair of one family: mostly a pod to a destination in the policies'
    range, sometimes a non-endpoint source or an internal destination."""
    endpoint_ips = [address for endpoint in policy_set.inventory.endpoints for address in endpoint.ips]
    version = draw(st.sampled_from((4, 4, 6)))
    own = [a for a in endpoint_ips if a.version == version]
    src: IPAddress
    dst: IPAddress
    if own and draw(st.integers(0, 5)) > 0:
        src = draw(st.sampled_from(own))
    else:
        src = ip("10.0.0.200") if version == 4 else ip("fd00::c8")
    base = DST4 if version == 4 else DST6
    choice = draw(st.integers(0, 9))
    if choice == 0 and own:
        dst = draw(st.sampled_from(own))
    elif choice == 1:
        dst = ip("198.18.0.1") if version == 4 else ip("2001:db9::1")
    else:
        dst = base.network_address + draw(st.integers(0, 255))
    return src, dst


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_indexed_lookup_agrees_with_the_linear_scan(data: st.DataObject) -> None:
    policy_set = data.draw(policy_sets(with_annotations=False))
    reference = ReferenceClassifier(policy_set, local_node=data.draw(st.sampled_from((None, *NODE_NAMES))))
    for _ in range(25):
        src, dst = data.draw(packets(policy_set))
        decision = reference.classify(src, dst)
        found = reference.candidates(src, dst)
        if decision.reason in ("not_an_endpoint", "cluster_internal"):
            continue
        if not found:
            assert decision == ReferenceDecision("pass", "no_policy")
            continue
        winner = found[0]
        assert decision.policy == winner.policy
        assert (decision.reason == "excluded") == (winner.rule is None)
        if decision.reason == "gateway":
            assert decision.action == (
                "snat" if decision.gateway_node == reference.local_node else "redirect"
            )


# --- Hypothesis: the Kubernetes LabelSelector reading --------------------------------------------------

K8S_KEYS = ("app", "tier", "example.com/team")
K8S_VALUES = ("a", "b", "c", "")


@st.composite
def k8s_selectors(draw: st.DrawFn) -> dict[str, Any]:
    """Valid Kubernetes LabelSelector dicts over a small vocabulary."""
    selector: dict[str, Any] = {}
    if draw(st.booleans()):
        selector["matchLabels"] = draw(
            st.dictionaries(st.sampled_from(K8S_KEYS), st.sampled_from(K8S_VALUES), max_size=3)
        )
    if draw(st.booleans()):
        expressions = []
        for _ in range(draw(st.integers(0, 3))):
            operator = draw(st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")))
            expression: dict[str, Any] = {"key": draw(st.sampled_from(K8S_KEYS)), "operator": operator}
            if operator in ("In", "NotIn"):
                expression["values"] = draw(st.lists(st.sampled_from(K8S_VALUES), min_size=1, max_size=3))
            expressions.append(expression)
        selector["matchExpressions"] = expressions
    return selector


k8s_labels = st.dictionaries(st.sampled_from(K8S_KEYS), st.sampled_from(K8S_VALUES), max_size=3)


@settings(max_examples=150, deadline=None)
@given(k8s_selectors(), st.lists(k8s_labels, min_size=1, max_size=5))
def test_parsed_label_selectors_agree_with_the_kubernetes_rules(
    selector: dict[str, Any], label_sets: list[dict[str, str]]
) -> None:
    from egresscore.policy.loader import parse_label_selector

    parsed = parse_label_selector(selector, "spec.selectors[0].podSelector")
    for candidate in label_sets:
        assert evaluate(parsed, candidate) == k8s_selector_matches(selector, candidate), (selector, candidate)


def test_k8s_selector_rules_by_hand() -> None:
    pod = {"app": "web", "tier": "front"}
    assert k8s_selector_matches({}, pod)
    assert k8s_selector_matches({}, {})
    assert k8s_selector_matches({"matchLabels": {"app": "web"}}, pod)
    assert not k8s_selector_matches({"matchLabels": {"app": "web", "tier": "back"}}, pod)
    assert not k8s_selector_matches({"matchLabels": {"team": ""}}, pod)
    assert k8s_selector_matches({"matchLabels": {"team": ""}}, {"team": ""})

    def expression(operator: str, key: str, *values: str) -> dict[str, Any]:
        found: dict[str, Any] = {"key": key, "operator": operator}
        if values:
            found["values"] = list(values)
        return {"matchExpressions": [found]}

    assert k8s_selector_matches(expression("In", "app", "web", "api"), pod)
    assert not k8s_selector_matches(expression("In", "team", "x"), pod)
    assert k8s_selector_matches(expression("NotIn", "team", "x"), pod)  # the key is missing
    assert not k8s_selector_matches(expression("NotIn", "app", "web"), pod)
    assert k8s_selector_matches(expression("Exists", "tier"), pod)
    assert not k8s_selector_matches(expression("Exists", "team"), pod)
    assert k8s_selector_matches(expression("DoesNotExist", "team"), pod)
    assert not k8s_selector_matches(expression("DoesNotExist", "app"), pod)
    both = {"matchLabels": {"app": "web"}, **expression("Exists", "team")}
    assert not k8s_selector_matches(both, pod)
    with pytest.raises(ValueError, match="unknown"):
        k8s_selector_matches(expression("Gt", "app", "1"), pod)


def test_evaluate_by_hand() -> None:
    pod = {"app": "web", "tier": "front"}
    assert evaluate(MATCH_ALL, {})
    assert not evaluate(Or(()), pod)
    assert evaluate(match("app", "web", "api"), pod)
    assert not evaluate(match("team", "x"), pod)
    assert evaluate(Not(match("team", "x")), pod)
    assert evaluate(HasLabel("tier"), pod)
    assert evaluate(LabelMatch("tier", MatchOp.STARTS_WITH, "fr"), pod)
    assert evaluate(LabelMatch("tier", MatchOp.ENDS_WITH, "nt"), pod)
    assert evaluate(LabelMatch("tier", MatchOp.CONTAINS, "ron"), pod)
    assert not evaluate(LabelMatch("team", MatchOp.CONTAINS, ""), pod)  # needs the label
    assert evaluate(And((HasLabel("app"), Or((HasLabel("x"), match("tier", "front"))))), pod)
    assert not evaluate(And((HasLabel("app"), Not(HasLabel("tier")))), pod)
