"""Decisions the compiler makes beyond the plain policy order: fail closed on a missing
Calico policy, gateway pods never redirected by their own policy, one node per egress
IP, and the checks on its inputs. Each is compared with the reference classifier too."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from reference.classifier import ReferenceClassifier, decision_of

from egresscore.core.classifier import Action, Reason
from egresscore.errors import PolicyError
from egresscore.policy.compiler import compile_policies
from egresscore.policy.loader import load_texts
from egresscore.policy.model import (
    ClusterNetwork,
    Endpoint,
    GatewaySpec,
    Inventory,
    Node,
    Policy,
    PolicySet,
    Rule,
    SourceTerm,
)
from egresscore.policy.selector import MATCH_ALL, LabelIn

INVENTORY = """
apiVersion: egresscore.io/v1alpha1
kind: Inventory
spec:
  namespaces:
  - name: shop
    labels: {team: shop}
    annotations: {egress.projectcalico.org/egressGatewayPolicy: shop-egress}
  - {name: typo, annotations: {egress.projectcalico.org/egressGatewayPolicy: shop-egres}}
  nodes:
  - {name: node-a, addresses: ["192.0.2.1"]}
  - {name: gw-1, labels: {egress: "true"}, addresses: ["192.0.2.3"]}
  - {name: gw-2, labels: {egress: "true"}, addresses: ["192.0.2.4"]}
  endpoints:
  - {name: cart, namespace: shop, node: node-a, ips: ["10.244.1.5"], labels: {app: cart}}
  - {name: egw, namespace: shop, node: gw-1, ips: ["10.244.3.2"], labels: {egress-code: red}}
  - {name: lost, namespace: typo, node: node-a, ips: ["10.244.1.6"], labels: {app: lost}}
---
apiVersion: egresscore.io/v1alpha1
kind: ClusterNetwork
spec: {podCIDRs: ["10.244.0.0/16"]}
---
apiVersion: projectcalico.org/v3
kind: EgressGatewayPolicy
metadata: {name: shop-egress}
spec:
  rules:
  - gateway: {selector: "egress-code == 'red'"}
"""


def both(policy_set: PolicySet, src: str, dst: str, local_node: str | None = None) -> tuple[object, object]:
    compiled = compile_policies(policy_set, local_node).classify(src, dst)
    return decision_of(compiled), ReferenceClassifier(policy_set, local_node).classify(src, dst)


def test_a_missing_calico_policy_fails_closed() -> None:
    policy_set = load_texts([("cluster.yaml", INVENTORY)])
    decision = compile_policies(policy_set).classify("10.244.1.6", "203.0.113.7")
    assert (decision.action, decision.reason) == (Action.DROP, Reason.NO_GATEWAY)
    assert decision.policy == "calico-missing-policy:shop-egres"
    # Internal destinations still pass.
    assert compile_policies(policy_set).classify("10.244.1.6", "10.244.1.5").action is Action.PASS
    compiled, reference = both(policy_set, "10.244.1.6", "203.0.113.7")
    assert compiled == reference


def test_a_gateway_pod_is_not_redirected_by_its_own_policy() -> None:
    policy_set = load_texts([("cluster.yaml", INVENTORY)])
    classifier = compile_policies(policy_set)
    # The client goes through the gateway pod ...
    client = classifier.classify("10.244.1.5", "203.0.113.7")
    assert client.action is Action.REDIRECT and str(client.gateway.egress_ip) == "10.244.3.2"  # type: ignore[union-attr]
    # ... but the gateway pod, in the same annotated namespace, sends with its own IP.
    gateway = classifier.classify("10.244.3.2", "203.0.113.7")
    assert (gateway.action, gateway.reason) == (Action.PASS, Reason.NO_POLICY)
    assert (
        both(policy_set, "10.244.3.2", "203.0.113.7")[0] == both(policy_set, "10.244.3.2", "203.0.113.7")[1]
    )


def shared_ip_policy_set() -> PolicySet:
    gateways = GatewaySpec(
        node_selector=LabelIn("egress", frozenset({"true"})), egress_ips=(IPv4Address("192.0.2.10"),)
    )
    policy = Policy(
        "shared",
        (SourceTerm(pods=MATCH_ALL),),
        (Rule((IPv4Network("203.0.113.0/24"),), gateways=(gateways,)),),
    )
    nodes = (
        Node("gw-b", {"egress": "true"}, (IPv4Address("192.0.2.4"),)),
        Node("gw-a", {"egress": "true"}, (IPv4Address("192.0.2.3"),)),
    )
    endpoints = (Endpoint("p", "default", "gw-b", (IPv4Address("10.244.1.5"),)),)
    return PolicySet(
        (policy,), Inventory((), nodes, endpoints, ClusterNetwork((IPv4Network("10.244.0.0/16"),)))
    )


def test_an_egress_ip_stays_with_one_node() -> None:
    policy_set = shared_ip_policy_set()
    classifier = compile_policies(policy_set, local_node="gw-b")
    chosen = {classifier.classify("10.244.1.5", f"203.0.113.{i}").gateway for i in range(50)}
    # Both nodes match and both would carry 192.0.2.10: only gw-a, first by name, does.
    assert {(g.node, str(g.egress_ip)) for g in chosen if g} == {("gw-a", "192.0.2.10")}
    compiled, reference = both(policy_set, "10.244.1.5", "203.0.113.9", "gw-b")
    assert compiled == reference


def test_inputs_the_compiler_refuses() -> None:
    policy_set = shared_ip_policy_set()
    with pytest.raises(
        PolicyError, match="local node 'gw1' is not in the inventory: expected one of gw-a, gw-b"
    ):
        compile_policies(policy_set, local_node="gw1")
    inventory = policy_set.inventory
    twin = Endpoint("q", "default", "gw-a", (IPv4Address("10.244.1.5"),))
    doubled = PolicySet(policy_set.policies, Inventory((), inventory.nodes, (*inventory.endpoints, twin)))
    with pytest.raises(PolicyError, match=r"IP 10\.244\.1\.5 belongs to endpoints default/p and default/q"):
        compile_policies(doubled)


def test_cilium_namespace_name_label_on_pods() -> None:
    documents = (
        INVENTORY
        + """
---
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: by-namespace-name}
spec:
  selectors:
  - podSelector:
      matchLabels: {io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: shop, app: cart}
  destinationCIDRs: ["198.51.100.0/24"]
  egressGateway: {nodeSelector: {matchLabels: {egress: "true"}}, egressIP: 192.0.2.10}
"""
    )
    decision = compile_policies(load_texts([("all.yaml", documents)])).classify("10.244.1.5", "198.51.100.7")
    assert decision.policy == "by-namespace-name" and decision.action is Action.REDIRECT


def test_many_policies_on_one_prefix_use_the_unit_bitmaps() -> None:
    """80 policies (more than 64 units, lists far past the 8-entry bitmap threshold) all
    listing 0.0.0.0/0 and some longer prefixes, with random selections and priorities."""
    rng = random.Random(5)
    nodes = tuple(Node(f"gw-{i}", {"egress": "true"}, (IPv4Address(f"192.0.2.{10 + i}"),)) for i in range(3))
    endpoints = tuple(
        Endpoint(f"p{i}", "default", "gw-0", (IPv4Address(f"10.244.0.{i + 1}"),), {"group": f"g{i % 12}"})
        for i in range(120)
    )
    gateways = (GatewaySpec(node_selector=LabelIn("egress", frozenset({"true"}))),)
    policies = []
    for i in range(80):
        groups = frozenset(f"g{rng.randrange(12)}" for _ in range(2))
        prefixes = [IPv4Network("0.0.0.0/0"), IPv4Network(f"203.0.113.{rng.randrange(4) * 64}/26")]
        policies.append(
            Policy(
                f"policy-{i:02d}",
                (SourceTerm(pods=LabelIn("group", groups)),),
                (Rule(tuple(prefixes), gateways=gateways),),
                excluded=(IPv4Network(f"203.0.113.{rng.randrange(64) * 4}/30"),) if i % 7 == 0 else (),
                priority=rng.randrange(-2, 3),
            )
        )
    policy_set = PolicySet(
        tuple(policies), Inventory((), nodes, endpoints, ClusterNetwork((IPv4Network("10.244.0.0/16"),)))
    )
    classifier = compile_policies(policy_set, local_node="gw-1")
    reference = ReferenceClassifier(policy_set, "gw-1")
    for _ in range(600):
        src = f"10.244.0.{rng.randrange(1, 121)}"
        dst = f"203.0.113.{rng.randrange(256)}" if rng.random() < 0.7 else f"198.51.100.{rng.randrange(256)}"
        assert decision_of(classifier.classify(src, dst)) == reference.classify(src, dst), (src, dst)
