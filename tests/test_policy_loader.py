"""The policy loaders: every format into the exact model, every fault at its file, document and path."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from egresscore.errors import PolicyError, PolicyErrorGroup
from egresscore.policy.calico_selector import SelectorSyntaxError, parse_calico_selector
from egresscore.policy.loader import (
    calico_annotation_selectors,
    load_files,
    load_texts,
    parse_label_selector,
    validate_files,
)
from egresscore.policy.model import (
    AnnotationSelection,
    ClusterNetwork,
    Endpoint,
    GatewaySpec,
    Namespace,
    Node,
    Origin,
    Policy,
    PolicySet,
    Rule,
    RuleAction,
    SourceTerm,
)
from egresscore.policy.selector import MATCH_ALL, And, HasLabel, LabelIn, Not, Selector

DATA = Path(__file__).resolve().parent / "data" / "policies"
SOURCE = "test.yaml"
DELETE = object()


def ips(*texts: str) -> tuple[IPv4Address | IPv6Address, ...]:
    return tuple(ip_address(text) for text in texts)


def nets(*texts: str) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(text) for text in texts)


def eq(key: str, value: str) -> Selector:
    return LabelIn(key, frozenset({value}))


def calico(text: str) -> Selector:
    return parse_calico_selector(text)


def syntax_error(text: str) -> str:
    """The Calico parser's own message for ``text``, which the loader keeps."""
    with pytest.raises(SelectorSyntaxError) as info:
        parse_calico_selector(text)
    return str(info.value)


def patched(document: dict[str, Any], changes: dict[str, object]) -> dict[str, Any]:
    """A copy of ``document`` with each path (``spec.rules[0]["a.b/c"]``) set, or deleted."""
    result = copy.deepcopy(document)
    for path, value in changes.items():
        tokens: list[str | int] = []
        for name, index, quoted in re.findall(r'\.?([A-Za-z_][\w-]*)|\[(\d+)\]|\["([^"]*)"\]', path):
            tokens.append(int(index) if index else name or quoted)
        parent: Any = result
        for token in tokens[:-1]:
            parent = parent[token]
        if value is DELETE:
            del parent[tokens[-1]]
        else:
            parent[tokens[-1]] = value
    return result


def dump(documents: Sequence[object]) -> str:
    return "---\n".join(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False) for d in documents)


def load_errors(documents: Sequence[object], source: str = SOURCE) -> list[PolicyError]:
    with pytest.raises(PolicyErrorGroup) as info:
        load_texts([(source, dump(documents))])
    return info.value.errors


def load_valid(*documents: object) -> PolicySet:
    return load_texts([(SOURCE, dump(documents))])


# -- the example files ---------------------------------------------------------------------------

CILIUM_FILE = str(DATA / "cilium.yaml")
CALICO_FILE = str(DATA / "calico.yaml")
NATIVE_FILE = str(DATA / "native.yaml")
CLUSTER_FILE = str(DATA / "cluster.yaml")
KUBECTL_FILE = str(DATA / "kubectl-cluster.json")


def test_cilium_file_loads_into_the_model() -> None:
    policy_set = load_files([CILIUM_FILE])
    assert policy_set.policies == (
        Policy(
            name="egress-sample",
            selection=(
                SourceTerm(
                    pods=And((eq("app", "payment-processor"), eq("io.kubernetes.pod.namespace", "payments"))),
                    path="spec.selectors[0]",
                ),
            ),
            rules=(
                Rule(
                    destinations=nets("203.0.113.0/24"),
                    action=RuleAction.REDIRECT,
                    gateways=(
                        GatewaySpec(
                            path="spec.egressGateway",
                            node_selector=eq("egress-gateway", "true"),
                            first_node_only=True,
                            egress_ips=ips("192.0.2.10"),
                        ),
                    ),
                    path="spec.destinationCIDRs",
                ),
            ),
            excluded=nets("203.0.113.128/25"),
            priority=0,
            origin=Origin(
                CILIUM_FILE,
                "document 1 (CiliumEgressGatewayPolicy egress-sample)",
                "CiliumEgressGatewayPolicy",
                "egress-sample",
            ),
            excluded_path="spec.excludedCIDRs",
        ),
        Policy(
            name="frontend-partners",
            selection=(
                SourceTerm(
                    pods=LabelIn("app", frozenset({"frontend", "api"})),
                    namespaces=eq("kubernetes.io/metadata.name", "web"),
                    path="spec.selectors[0]",
                ),
                SourceTerm(
                    pods=eq("app", "batch"),
                    nodes=eq("topology.kubernetes.io/zone", "a"),
                    path="spec.selectors[1]",
                ),
            ),
            rules=(
                Rule(
                    destinations=nets("198.51.100.0/24", "2001:db8:100::/48"),
                    gateways=(
                        GatewaySpec(
                            path="spec.egressGateways[0]",
                            node_selector=eq("kubernetes.io/hostname", "gw-1"),
                            first_node_only=True,
                            interface="eth1",
                        ),
                        GatewaySpec(
                            path="spec.egressGateways[1]",
                            node_selector=eq("kubernetes.io/hostname", "gw-2"),
                            first_node_only=True,
                        ),
                    ),
                    path="spec.destinationCIDRs",
                ),
            ),
            origin=Origin(
                CILIUM_FILE,
                "document 2 (CiliumEgressGatewayPolicy frontend-partners)",
                "CiliumEgressGatewayPolicy",
                "frontend-partners",
            ),
        ),
    )
    assert policy_set.inventory.endpoints == ()


def test_calico_file_loads_into_the_model() -> None:
    (policy,) = load_files([CALICO_FILE]).policies
    in_egress = calico("projectcalico.org/name == 'egress'")
    assert policy == Policy(
        name="my-egwpolicy",
        selection=AnnotationSelection("my-egwpolicy"),
        rules=(
            Rule(nets("10.0.0.0/8"), RuleAction.PASS, path="spec.rules[0]", description="Local: no gateway"),
            Rule(
                nets("11.0.0.0/8"),
                RuleAction.REDIRECT,
                (
                    GatewaySpec(
                        path="spec.rules[1].gateway",
                        pod_selector=calico("egress-code == 'blue'"),
                        namespace_selector=in_egress,
                    ),
                ),
                max_gateways=2,
                path="spec.rules[1]",
            ),
            Rule(
                nets("0.0.0.0/0"),
                RuleAction.REDIRECT,
                (
                    GatewaySpec(
                        path="spec.rules[2].gateway",
                        pod_selector=calico("egress-code == 'red'"),
                        namespace_selector=in_egress,
                    ),
                ),
                prefer_node_local=True,
                path="spec.rules[2]",
                description="Gateway to internet",
            ),
        ),
        origin=Origin(
            CALICO_FILE,
            "document 1 (EgressGatewayPolicy my-egwpolicy)",
            "EgressGatewayPolicy",
            "my-egwpolicy",
        ),
    )


def test_native_file_loads_into_the_model() -> None:
    payments, quarantine = load_files([NATIVE_FILE]).policies
    assert payments == Policy(
        name="payments",
        selection=(
            SourceTerm(
                pods=eq("app", "payment-processor"),
                namespaces=calico("team == 'payments'"),
                path="spec.selectors[0]",
            ),
        ),
        rules=(
            Rule(
                destinations=nets("203.0.113.0/24", "2001:db8:100::/48"),
                action=RuleAction.REDIRECT,
                gateways=(
                    GatewaySpec(
                        path="spec.rules[0].egressGateways[0]",
                        node_selector=eq("egress-gateway", "true"),
                        egress_ips=ips("192.0.2.10", "2001:db8::10"),
                    ),
                    GatewaySpec(
                        path="spec.rules[0].egressGateways[1]",
                        node_selector=calico("kubernetes.io/hostname == 'gw-2'"),
                        interface="eth1",
                    ),
                    GatewaySpec(
                        path="spec.rules[0].egressGateways[2]",
                        pod_selector=calico("egress-code == 'red'"),
                        namespace_selector=calico("projectcalico.org/name == 'egress'"),
                    ),
                ),
                prefer_node_local=True,
                max_gateways=2,
                path="spec.rules[0]",
                description="partner API",
            ),
            Rule(nets("198.51.100.0/24"), RuleAction.PASS, path="spec.rules[1]"),
        ),
        excluded=nets("203.0.113.128/25"),
        priority=10,
        origin=Origin(NATIVE_FILE, "document 1 (EgressPolicy payments)", "EgressPolicy", "payments"),
    )
    assert quarantine == Policy(
        name="quarantine",
        selection=(
            SourceTerm(
                pods=And((Not(LabelIn("app", frozenset({"payment-processor"}))), HasLabel("quarantined"))),
                path="spec.selectors[0]",
            ),
        ),
        rules=(
            Rule(
                nets("0.0.0.0/0", "::/0"),
                RuleAction.DROP,
                path="spec.rules[0]",
                description="quarantined pods reach nothing outside the cluster",
            ),
        ),
        priority=-5,
        origin=Origin(NATIVE_FILE, "document 2 (EgressPolicy quarantine)", "EgressPolicy", "quarantine"),
    )


def test_cluster_file_loads_into_the_inventory() -> None:
    inventory = load_files([CLUSTER_FILE]).inventory
    origin = Origin(CLUSTER_FILE, "document 1 (Inventory lab)", "Inventory", "lab")
    assert inventory.namespaces == (
        Namespace("payments", {"team": "payments"}, {}, origin),
        Namespace(
            "web", {"team": "web"}, {"egress.projectcalico.org/egressGatewayPolicy": "my-egwpolicy"}, origin
        ),
        Namespace("egress", {"purpose": "egress-gateways"}, {}, origin),
    )
    zone_a = {"topology.kubernetes.io/zone": "a"}
    zone_b = {"topology.kubernetes.io/zone": "b"}
    assert inventory.nodes == (
        Node("node-a", zone_a, ips("192.0.2.1", "2001:db8::1"), {}, origin),
        Node("node-b", zone_b, ips("192.0.2.2", "2001:db8::2"), {}, origin),
        Node(
            "gw-1",
            {"egress-gateway": "true", **zone_a},
            ips("192.0.2.3", "2001:db8::3"),
            {"eth1": ips("192.0.2.11", "2001:db8::11")},
            origin,
        ),
        Node(
            "gw-2",
            {"egress-gateway": "true", **zone_b},
            ips("192.0.2.4", "2001:db8::4"),
            {"eth1": ips("192.0.2.12")},
            origin,
        ),
    )
    legacy_annotations = {
        "egress.projectcalico.org/selector": "egress-code == 'red'",
        "egress.projectcalico.org/namespaceSelector": "projectcalico.org/name == 'egress'",
    }
    assert inventory.endpoints == (
        Endpoint(
            "pay-1",
            "payments",
            "node-a",
            ips("10.244.1.5", "fd00:10:244:1::5"),
            {"app": "payment-processor"},
            {},
            origin,
        ),
        Endpoint("pay-2", "payments", "node-b", ips("10.244.2.7"), {"app": "payment-processor"}, {}, origin),
        Endpoint(
            "frontend-1",
            "web",
            "node-a",
            ips("10.244.1.9"),
            {"app": "frontend", "app.kubernetes.io/name": "frontend"},
            {},
            origin,
        ),
        Endpoint(
            "legacy-1", "default", "node-b", ips("10.244.2.20"), {"app": "legacy"}, legacy_annotations, origin
        ),
        Endpoint("egw-red-1", "egress", "gw-1", ips("10.244.3.2"), {"egress-code": "red"}, {}, origin),
        Endpoint("egw-blue-1", "egress", "gw-2", ips("10.244.4.2"), {"egress-code": "blue"}, {}, origin),
    )
    assert inventory.network == ClusterNetwork(
        pod_cidrs=nets("10.244.0.0/16", "fd00:10:244::/48"),
        service_cidrs=nets("10.96.0.0/12"),
        internal_cidrs=nets("169.254.0.0/16"),
        origin=Origin(CLUSTER_FILE, "document 2 (ClusterNetwork)", "ClusterNetwork", ""),
    )


def test_kubectl_json_list_gives_the_same_cluster() -> None:
    """A ``kubectl get -o json`` List of the cluster in cluster.yaml: the same endpoints,
    nodes and namespaces; host-network, unscheduled and finished pods are skipped."""
    native = load_files([CLUSTER_FILE]).inventory
    kubectl = load_files([KUBECTL_FILE]).inventory
    document = "document 1 (List)"
    assert [(e.key, e.node, e.ips, e.labels, e.annotations) for e in kubectl.endpoints] == [
        (e.key, e.node, e.ips, e.labels, e.annotations) for e in native.endpoints
    ]
    assert {e.origin for e in kubectl.endpoints} == {
        Origin(KUBECTL_FILE, document, "Pod", e.name) for e in kubectl.endpoints
    }
    assert [(n.name, n.addresses) for n in kubectl.nodes] == [(n.name, n.addresses) for n in native.nodes]
    assert kubectl.nodes[2].labels == {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": "gw-1",
        "kubernetes.io/os": "linux",
        "egress-gateway": "true",
        "topology.kubernetes.io/zone": "a",
    }
    assert kubectl.nodes[0].origin == Origin(KUBECTL_FILE, document, "Node", "node-a")
    assert [n.name for n in kubectl.namespaces] == ["default", "payments", "web", "egress"]
    assert kubectl.namespaces[2] == Namespace(
        "web",
        {"kubernetes.io/metadata.name": "web", "team": "web"},
        {"egress.projectcalico.org/egressGatewayPolicy": "my-egwpolicy"},
        Origin(KUBECTL_FILE, document, "Namespace", "web"),
    )
    assert kubectl.network == ClusterNetwork()


def test_example_files_load_together_in_input_order() -> None:
    policy_set = load_files([CLUSTER_FILE, CILIUM_FILE, CALICO_FILE, NATIVE_FILE])
    assert [p.name for p in policy_set.policies] == [
        "egress-sample",
        "frontend-partners",
        "my-egwpolicy",
        "payments",
        "quarantine",
    ]
    assert len(policy_set.inventory.endpoints) == 6
    assert validate_files([CLUSTER_FILE, CILIUM_FILE, CALICO_FILE, NATIVE_FILE]) == []
    assert validate_files([Path(KUBECTL_FILE), Path(NATIVE_FILE)]) == []


def test_two_descriptions_of_one_cluster_are_duplicates() -> None:
    errors = validate_files([CLUSTER_FILE, KUBECTL_FILE])
    messages = [str(error) for error in errors]
    assert (
        f"{KUBECTL_FILE}: document 1 (List): items[1].metadata.name: duplicate namespace 'payments': "
        in messages[0]
    )
    assert f"first defined at {CLUSTER_FILE}, document 1 (Inventory lab), spec.namespaces[0]" in messages[0]
    assert {error.source for error in errors} == {KUBECTL_FILE}
    assert len(errors) == 3 + 4 + 6  # namespaces (not "default"), nodes, endpoints


# -- small valid documents ---------------------------------------------------------------------------

CILIUM: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumEgressGatewayPolicy",
    "metadata": {"name": "egress-sample"},
    "spec": {
        "selectors": [
            {
                "podSelector": {
                    "matchLabels": {"app": "payment-processor"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["a", "b"]},
                        {"key": "canary", "operator": "DoesNotExist"},
                    ],
                }
            }
        ],
        "destinationCIDRs": ["203.0.113.0/24"],
        "excludedCIDRs": ["203.0.113.128/25"],
        "egressGateway": {
            "nodeSelector": {"matchLabels": {"egress-gateway": "true"}},
            "egressIP": "192.0.2.10",
        },
    },
}
CALICO: dict[str, Any] = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "EgressGatewayPolicy",
    "metadata": {"name": "my-egwpolicy"},
    "spec": {
        "rules": [
            {"destination": {"cidr": "10.0.0.0/8"}, "description": "Local: no gateway"},
            {
                "destination": {"cidr": "11.0.0.0/8"},
                "gateway": {
                    "namespaceSelector": "all()",
                    "selector": "egress-code == 'blue'",
                    "maxNextHops": 2,
                },
            },
            {"gateway": {"selector": "egress-code == 'red'"}, "gatewayPreference": "PreferNodeLocal"},
        ]
    },
}
NATIVE: dict[str, Any] = {
    "apiVersion": "egresscore.io/v1alpha1",
    "kind": "EgressPolicy",
    "metadata": {"name": "payments"},
    "spec": {
        "priority": 0,
        "selectors": [
            {"podSelector": {"matchLabels": {"app": "payment-processor"}}, "namespaceSelector": "all()"}
        ],
        "excludedCIDRs": ["203.0.113.128/25"],
        "rules": [
            {
                "destinationCIDRs": ["203.0.113.0/24", "2001:db8:100::/48"],
                "action": "redirect",
                "egressGateways": [
                    {
                        "nodeSelector": {"matchLabels": {"egress-gateway": "true"}},
                        "egressIPs": ["192.0.2.10"],
                    },
                    {"podSelector": "egress-code == 'red'", "namespaceSelector": "all()"},
                ],
                "gatewayPreference": "None",
                "maxGateways": 0,
            },
            {"destinationCIDRs": ["198.51.100.0/24"], "action": "pass"},
        ],
    },
}
INVENTORY: dict[str, Any] = {
    "apiVersion": "egresscore.io/v1alpha1",
    "kind": "Inventory",
    "spec": {
        "namespaces": [{"name": "payments", "labels": {"team": "payments"}, "annotations": {}}],
        "nodes": [
            {
                "name": "node-a",
                "labels": {"zone": "a"},
                "addresses": ["192.0.2.1"],
                "interfaces": {"eth1": ["192.0.2.10"]},
            }
        ],
        "endpoints": [
            {
                "name": "pay-1",
                "namespace": "payments",
                "node": "node-a",
                "ips": ["10.244.1.5", "fd00::5"],
                "labels": {"app": "payment-processor"},
                "annotations": {},
            },
            {"name": "pay-2", "node": "node-a", "ips": ["10.244.1.6"]},
        ],
    },
}
NETWORK: dict[str, Any] = {
    "apiVersion": "egresscore.io/v1alpha1",
    "kind": "ClusterNetwork",
    "spec": {"podCIDRs": ["10.244.0.0/16"], "serviceCIDRs": ["10.96.0.0/12"], "internalCIDRs": []},
}
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web-1",
        "namespace": "web",
        "labels": {"app": "web"},
        "uid": "x",
        "annotations": {},
    },
    "spec": {"nodeName": "node-a", "containers": [{"name": "web", "image": "nginx"}]},
    "status": {
        "phase": "Running",
        "podIP": "10.244.1.7",
        "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}],
    },
}
NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-k", "labels": {"kubernetes.io/hostname": "node-k"}},
    "status": {
        "addresses": [
            {"type": "InternalIP", "address": "192.0.2.7"},
            {"type": "Hostname", "address": "node-k"},
            {"type": "ExternalIP", "address": "198.51.100.1"},
            {"type": "ExternalIP", "address": "192.0.2.7"},
        ]
    },
}
NAMESPACE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": "web", "labels": {"team": "web"}},
}


def test_small_documents_load() -> None:
    policy_set = load_valid(CILIUM, CALICO, NATIVE, INVENTORY, NETWORK, POD, NODE, NAMESPACE)
    cilium, calico_policy, native = policy_set.policies
    assert cilium.selection == (
        SourceTerm(
            pods=And(
                (
                    eq("app", "payment-processor"),
                    LabelIn("tier", frozenset({"a", "b"})),
                    Not(HasLabel("canary")),
                )
            ),
            path="spec.selectors[0]",
        ),
    )
    assert calico_policy.rules[1].gateways[0].namespace_selector == MATCH_ALL
    assert calico_policy.rules[2].gateways[0].namespace_selector is None
    assert native.rules[0].gateways[1] == GatewaySpec(
        path="spec.rules[0].egressGateways[1]",
        pod_selector=calico("egress-code == 'red'"),
        namespace_selector=MATCH_ALL,
    )
    inventory = policy_set.inventory
    assert [e.key for e in inventory.endpoints] == ["payments/pay-1", "default/pay-2", "web/web-1"]
    assert inventory.endpoints[2] == Endpoint(
        "web-1",
        "web",
        "node-a",
        ips("10.244.1.7", "fd00::7"),
        {"app": "web"},
        {},
        Origin(SOURCE, "document 6 (Pod web-1)", "Pod", "web-1"),
    )
    assert inventory.nodes[1] == Node(
        "node-k",
        {"kubernetes.io/hostname": "node-k"},
        ips("192.0.2.7", "198.51.100.1"),
        {},
        Origin(SOURCE, "document 7 (Node node-k)", "Node", "node-k"),
    )
    assert inventory.namespaces[1] == Namespace(
        "web", {"team": "web"}, {}, Origin(SOURCE, "document 8 (Namespace web)", "Namespace", "web")
    )
    assert inventory.network == ClusterNetwork(
        nets("10.244.0.0/16"),
        nets("10.96.0.0/12"),
        (),
        Origin(SOURCE, "document 5 (ClusterNetwork)", "ClusterNetwork", ""),
    )


# -- invalid documents: each fault at its exact document and path -------------------------------------

C = "document 1 (CiliumEgressGatewayPolicy egress-sample)"
K = "document 1 (EgressGatewayPolicy my-egwpolicy)"
N = "document 1 (EgressPolicy payments)"
INV = "document 1 (Inventory)"
NET = "document 1 (ClusterNetwork)"
POD_DOC = "document 1 (Pod web-1)"
NODE_DOC = "document 1 (Node node-k)"
NS_DOC = "document 1 (Namespace web)"
CILIUM_FIELDS = "expected one of destinationCIDRs, egressGateway, egressGateways, excludedCIDRs, selectors"
SELECTOR_FIELDS = "expected one of matchExpressions, matchLabels"
OPERATORS = "expected one of In, NotIn, Exists, DoesNotExist"
SEL = "spec.selectors[0].podSelector"
GW = "spec.egressGateway"
RULE = "spec.rules[0]"
NGW = "spec.rules[0].egressGateways"
EP = "spec.endpoints[0]"
CALICO_SELECTOR = '["egress.projectcalico.org/selector"]'
CALICO_NAMESPACE_SELECTOR = '["egress.projectcalico.org/namespaceSelector"]'
CALICO_POLICY = '["egress.projectcalico.org/egressGatewayPolicy"]'
BAD_EXPRESSION = "egress-code == "

Expected = list[tuple[str, str, str]]

INVALID: list[Any] = [
    # Cilium: unknown fields at every depth
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDR": ["203.0.113.0/24"], "spec.destinationCIDRs": DELETE})],
        [
            (C, "spec.destinationCIDR", f"unknown field 'destinationCIDR': {CILIUM_FIELDS}"),
            (
                C,
                "spec.destinationCIDRs",
                "required field 'destinationCIDRs' is missing: expected a non-empty list",
            ),
        ],
        id="cilium-unknown-spec-field",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors[0].podselector": {}})],
        [
            (
                C,
                "spec.selectors[0].podselector",
                "expected one of namespaceSelector, nodeSelector, podSelector",
            )
        ],
        id="cilium-unknown-selector-entry-field",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabel": {"a": "b"}})],
        [(C, f"{SEL}.matchLabel", f"unknown field 'matchLabel': {SELECTOR_FIELDS}")],
        id="cilium-unknown-label-selector-field",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[1].value": ["x"]})],
        [
            (
                C,
                f"{SEL}.matchExpressions[1].value",
                "unknown field 'value': expected one of key, operator, values",
            )
        ],
        id="cilium-unknown-requirement-field",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.egressIp": "192.0.2.10"})],
        [
            (
                C,
                f"{GW}.egressIp",
                "unknown field 'egressIp': expected one of egressIP, interface, nodeSelector",
            )
        ],
        id="cilium-unknown-gateway-field",
    ),
    pytest.param(
        [patched(CILIUM, {"sepc": {}})],
        [(C, "sepc", "unknown field 'sepc': expected one of apiVersion, kind, metadata, spec, status")],
        id="cilium-unknown-top-level-field",
    ),
    pytest.param(
        [patched(CILIUM, {"metadata": {"nmae": "egress-sample"}})],
        [
            (
                "document 1 (CiliumEgressGatewayPolicy)",
                "metadata.nmae",
                "unknown field 'nmae': expected one of annotations",
            ),
            ("document 1 (CiliumEgressGatewayPolicy)", "metadata.name", "required field 'name' is missing"),
        ],
        id="cilium-unknown-metadata-field",
    ),
    # Cilium: names and types
    pytest.param(
        [patched(CILIUM, {"metadata.name": ""})],
        [
            (
                "document 1 (CiliumEgressGatewayPolicy)",
                "metadata.name",
                "expected a name (a non-empty string), got an empty string",
            )
        ],
        id="cilium-empty-name",
    ),
    pytest.param(
        [patched(CILIUM, {"metadata.name": 5})],
        [("document 1 (CiliumEgressGatewayPolicy)", "metadata.name", "got an integer (5): put it in quotes")],
        id="cilium-number-name",
    ),
    pytest.param(
        [patched(CILIUM, {"metadata": DELETE})],
        [("document 1 (CiliumEgressGatewayPolicy)", "metadata", "required field 'metadata' is missing")],
        id="cilium-no-metadata",
    ),
    pytest.param(
        [patched(CILIUM, {"spec": None})],
        [(C, "spec", "expected a spec mapping, got null")],
        id="cilium-null-spec",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors": []})],
        [
            (
                C,
                "spec.selectors",
                "expected a non-empty list of selectors (podSelector, namespaceSelector, nodeSelector), "
                "got an empty list",
            )
        ],
        id="cilium-empty-selectors",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors": {"podSelector": {}}})],
        [(C, "spec.selectors", "got a mapping")],
        id="cilium-selectors-mapping",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors[0]": "app == 'x'"})],
        [
            (
                C,
                "spec.selectors[0]",
                "expected a selector mapping (podSelector, namespaceSelector, nodeSelector), got a string",
            )
        ],
        id="cilium-selector-entry-string",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors[0].podSelector": ["app"]})],
        [
            (
                C,
                SEL,
                "expected a LabelSelector mapping (matchLabels, matchExpressions) "
                "or a Calico selector expression, got a list",
            )
        ],
        id="cilium-selector-list",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors[0].nodeSelector": BAD_EXPRESSION})],
        [(C, "spec.selectors[0].nodeSelector", syntax_error(BAD_EXPRESSION))],
        id="cilium-selector-expression-syntax",
    ),
    # CIDRs
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs": "203.0.113.0/24"})],
        [
            (
                C,
                "spec.destinationCIDRs",
                "expected a non-empty list of CIDR strings, got a string ('203.0.113.0/24')",
            )
        ],
        id="cidrs-string",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.excludedCIDRs": {"cidr": "203.0.113.128/25"}})],
        [(C, "spec.excludedCIDRs", "expected a list of CIDR strings, got a mapping")],
        id="cidrs-mapping",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs": []})],
        [(C, "spec.destinationCIDRs", "expected a non-empty list of CIDR strings, got an empty list")],
        id="cidrs-empty",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs[0]": "203.0.113.7/24"})],
        [
            (
                C,
                "spec.destinationCIDRs[0]",
                "'203.0.113.7/24' has host bits set: expected the network address 203.0.113.0/24",
            )
        ],
        id="cidr-host-bits",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.excludedCIDRs[0]": "2001:db8::1/32"})],
        [
            (
                C,
                "spec.excludedCIDRs[0]",
                "'2001:db8::1/32' has host bits set: expected the network address 2001:db8::/32",
            )
        ],
        id="cidr-host-bits-ipv6",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs[0]": "203.0.113.0/33"})],
        [(C, "spec.destinationCIDRs[0]", "expected a prefix length from 0 to 32 for IPv4, got '33'")],
        id="cidr-length-out-of-range",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs[0]": "203.0.113.7"})],
        [(C, "spec.destinationCIDRs[0]", "expected an address and a prefix length, such as 203.0.113.7/32")],
        id="cidr-without-length",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs[0]": "203.0.113.0/255.255.255.0"})],
        [(C, "spec.destinationCIDRs[0]", "expected a prefix length from 0 to 32")],
        id="cidr-netmask",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs[0]": "example.com/24"})],
        [(C, "spec.destinationCIDRs[0]", "'example.com' is not an IPv4 or IPv6 address")],
        id="cidr-not-an-address",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs": [None, 24]})],
        [
            (C, "spec.destinationCIDRs[0]", "expected a CIDR string, got null"),
            (C, "spec.destinationCIDRs[1]", "expected a CIDR string, got an integer (24)"),
        ],
        id="cidr-wrong-types",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.destinationCIDRs": ["203.0.113.0/24", "203.0.113.0/24"]})],
        [
            (
                C,
                "spec.destinationCIDRs[1]",
                "duplicate destination 203.0.113.0/24: already at spec.destinationCIDRs[0]",
            )
        ],
        id="cidr-duplicate",
    ),
    # LabelSelectors
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[1].operator": "Equals"})],
        [(C, f"{SEL}.matchExpressions[1].operator", f"unknown operator 'Equals': {OPERATORS}")],
        id="selector-unknown-operator",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0].values": DELETE})],
        [(C, f"{SEL}.matchExpressions[0].values", "required field 'values' is missing: operator In needs")],
        id="selector-in-without-values",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0]": {"key": "tier", "operator": "NotIn", "values": []}})],
        [
            (
                C,
                f"{SEL}.matchExpressions[0].values",
                "operator NotIn needs a non-empty list of values, got an empty list",
            )
        ],
        id="selector-notin-empty-values",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[1].values": ["x"]})],
        [(C, f"{SEL}.matchExpressions[1].values", "operator DoesNotExist takes no values")],
        id="selector-doesnotexist-with-values",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0]": {"operator": "Exists"}})],
        [(C, f"{SEL}.matchExpressions[0].key", "required field 'key' is missing: expected a label key")],
        id="selector-requirement-without-key",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0].values": "a"})],
        [
            (
                C,
                f"{SEL}.matchExpressions[0].values",
                "expected a list of label value strings, got a string ('a')",
            )
        ],
        id="selector-values-string",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0].values[1]": "has space"})],
        [(C, f"{SEL}.matchExpressions[0].values[1]", "invalid label value 'has space'")],
        id="selector-bad-value",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions": {"key": "tier"}})],
        [
            (
                C,
                f"{SEL}.matchExpressions",
                "expected a list of label selector requirements (key, operator, values), got a mapping",
            )
        ],
        id="selector-expressions-mapping",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.nodeSelector.matchLabels": {"egress-gateway": True}})],
        [
            (
                C,
                f'{GW}.nodeSelector.matchLabels["egress-gateway"]',
                "expected a label value string, got a boolean (true): put it in quotes",
            )
        ],
        id="selector-boolean-label-value",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": None})],
        [(C, f"{SEL}.matchLabels", "expected a mapping of label keys to values, got null")],
        id="selector-null-match-labels",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": {"app/name/x": "a"}})],
        [(C, f'{SEL}.matchLabels["app/name/x"]', "label key 'app/name/x' has more than one '/'")],
        id="label-key-two-slashes",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": {"Example.com/app": "a"}})],
        [
            (
                C,
                f'{SEL}.matchLabels["Example.com/app"]',
                "has an invalid prefix 'Example.com': expected a DNS subdomain",
            )
        ],
        id="label-key-bad-prefix",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": {"/app": "a"}})],
        [(C, f'{SEL}.matchLabels["/app"]', "label key '/app' has an empty prefix")],
        id="label-key-empty-prefix",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": {"-app": "a", "example.com/": "b", "x" * 64: "c"}})],
        [
            (C, f'{SEL}.matchLabels["-app"]', "invalid label key '-app': expected 1 to 63 letters, digits"),
            (C, f'{SEL}.matchLabels["example.com/"]', "label key 'example.com/' has an invalid name ''"),
            (C, f"{SEL}.matchLabels.{'x' * 64}", "invalid label key"),
        ],
        id="label-key-bad-names",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchLabels": {"app": "x" * 64}})],
        [(C, f"{SEL}.matchLabels.app", "invalid label value 'xxxx")],
        id="label-value-too-long",
    ),
    pytest.param(
        [patched(CILIUM, {f"{SEL}.matchExpressions[0].key": "a b"})],
        [(C, f"{SEL}.matchExpressions[0].key", "invalid label key 'a b'")],
        id="label-key-in-requirement",
    ),
    pytest.param(
        [
            "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: egress-sample}\n"
            "spec: {selectors: [{podSelector: {matchLabels: {1: x}}}], destinationCIDRs: [10.0.0.0/8], "
            "egressGateway: {nodeSelector: {}}}\n"
        ],
        [(C, f"{SEL}.matchLabels", "keys must be strings, got an integer (1) as a key")],
        id="label-key-not-a-string",
    ),
    # Cilium gateways
    pytest.param(
        [patched(CILIUM, {"spec.egressGateways": [{"nodeSelector": {}}]})],
        [(C, "spec.egressGateways", "set either egressGateway or egressGateways, not both")],
        id="cilium-both-gateway-forms",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.egressGateway": DELETE})],
        [
            (
                C,
                GW,
                "required field 'egressGateway' is missing: "
                "expected egressGateway (one gateway) or egressGateways",
            )
        ],
        id="cilium-no-gateway",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.egressGateway": DELETE, "spec.egressGateways": []})],
        [
            (
                C,
                "spec.egressGateways",
                "expected a non-empty list of gateways (nodeSelector, egressIP or interface), "
                "got an empty list",
            )
        ],
        id="cilium-empty-gateways",
    ),
    pytest.param(
        [
            patched(
                CILIUM,
                {
                    "spec.egressGateway": DELETE,
                    "spec.egressGateways": [{"nodeSelector": {}}, {"egressIP": "192.0.2.9"}],
                },
            )
        ],
        [(C, "spec.egressGateways[1].nodeSelector", "required field 'nodeSelector' is missing")],
        id="cilium-gateway-without-node-selector",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.egressIP": "192.0.2.300"})],
        [(C, f"{GW}.egressIP", "'192.0.2.300' is not an IP address: expected an IPv4 or IPv6 address")],
        id="cilium-bad-egress-ip",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.egressIP": "192.0.2.10/32"})],
        [(C, f"{GW}.egressIP", "expected an address without a prefix length")],
        id="cilium-egress-ip-with-length",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.interface": "eth1"})],
        [(C, f"{GW}.interface", "set at most one of egressIP and interface")],
        id="cilium-egress-ip-and-interface",
    ),
    pytest.param(
        [patched(CILIUM, {f"{GW}.egressIP": DELETE, f"{GW}.interface": "a-very-long-interface"})],
        [
            (
                C,
                f"{GW}.interface",
                "invalid interface name 'a-very-long-interface': expected 1 to 15 characters",
            )
        ],
        id="cilium-bad-interface",
    ),
    pytest.param(
        [patched(CILIUM, {GW: "gw-1"})],
        [(C, GW, "expected a gateway mapping (nodeSelector, egressIP or interface), got a string ('gw-1')")],
        id="cilium-gateway-string",
    ),
    # Calico
    pytest.param(
        [patched(CALICO, {"spec.rule": []})],
        [(K, "spec.rule", "unknown field 'rule': expected one of rules")],
        id="calico-unknown-spec-field",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules": []})],
        [(K, "spec.rules", "expected a non-empty list of rules")],
        id="calico-no-rules",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[0].destinations": {}})],
        [
            (
                K,
                "spec.rules[0].destinations",
                "expected one of description, destination, gateway, gatewayPreference",
            )
        ],
        id="calico-unknown-rule-field",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[0].destination": {"cidrs": ["10.0.0.0/8"]}})],
        [
            (K, "spec.rules[0].destination.cidrs", "unknown field 'cidrs': expected one of cidr"),
            (K, "spec.rules[0].destination.cidr", "required field 'cidr' is missing: expected a CIDR string"),
        ],
        id="calico-unknown-destination-field",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[0].destination.cidr": "10.1.2.3/8"})],
        [(K, "spec.rules[0].destination.cidr", "has host bits set: expected the network address 10.0.0.0/8")],
        id="calico-host-bits",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].destination.cidr": "10.0.0.0/8"})],
        [
            (
                K,
                "spec.rules[1].destination.cidr",
                "duplicate destination 10.0.0.0/8: spec.rules[0] has it already",
            )
        ],
        id="calico-duplicate-destination",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].destination": DELETE})],
        [(K, "spec.rules[2]", "duplicate destination 0.0.0.0/0: spec.rules[1] has it already")],
        id="calico-duplicate-default-destination",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.selector": {"matchLabels": {"a": "b"}}})],
        [
            (
                K,
                "spec.rules[1].gateway.selector",
                "expected a Calico selector expression string, got a mapping",
            )
        ],
        id="calico-selector-mapping",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.selector": BAD_EXPRESSION})],
        [(K, "spec.rules[1].gateway.selector", syntax_error(BAD_EXPRESSION))],
        id="calico-selector-syntax",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.namespaceSelector": BAD_EXPRESSION})],
        [(K, "spec.rules[1].gateway.namespaceSelector", syntax_error(BAD_EXPRESSION))],
        id="calico-namespace-selector-syntax",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.selector": DELETE})],
        [(K, "spec.rules[1].gateway.selector", "required field 'selector' is missing")],
        id="calico-gateway-without-selector",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.maxNextHops": -1})],
        [
            (
                K,
                "spec.rules[1].gateway.maxNextHops",
                "-1 is out of range: expected an integer from 0 to 2147483647",
            )
        ],
        id="calico-negative-max-next-hops",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.maxNextHops": "2"})],
        [
            (
                K,
                "spec.rules[1].gateway.maxNextHops",
                "expected an integer from 0 to 2147483647, got a string ('2')",
            )
        ],
        id="calico-string-max-next-hops",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[2].gatewayPreference": "Local"})],
        [
            (
                K,
                "spec.rules[2].gatewayPreference",
                "unknown gatewayPreference 'Local': expected one of None, PreferNodeLocal",
            )
        ],
        id="calico-unknown-preference",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[1].gateway.maxHops": 2})],
        [(K, "spec.rules[1].gateway.maxHops", "expected one of maxNextHops, namespaceSelector, selector")],
        id="calico-unknown-gateway-field",
    ),
    pytest.param(
        [patched(CALICO, {"spec.rules[0].description": 7})],
        [(K, "spec.rules[0].description", "expected a string, got an integer (7)")],
        id="calico-description-number",
    ),
    # Native policies
    pytest.param(
        [patched(NATIVE, {"spec.priority": 2**31})],
        [
            (
                N,
                "spec.priority",
                "2147483648 is out of range: expected an integer from -2147483648 to 2147483647",
            )
        ],
        id="native-priority-range",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.priority": True})],
        [(N, "spec.priority", "got a boolean (true)")],
        id="native-priority-boolean",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.priority": 1.5})],
        [(N, "spec.priority", "got a number (1.5)")],
        id="native-priority-float",
    ),
    pytest.param(
        [patched(NATIVE, {f"{RULE}.action": "forward"})],
        [(N, f"{RULE}.action", "unknown action 'forward': expected one of redirect, pass, drop")],
        id="native-unknown-action",
    ),
    pytest.param(
        [patched(NATIVE, {f"{RULE}.egressGateways": DELETE})],
        [(N, NGW, "required field 'egressGateways' is missing: expected a non-empty list of gateways")],
        id="native-redirect-without-gateways",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.rules[1].egressGateways": [], "spec.rules[1].maxGateways": 1})],
        [
            (
                N,
                "spec.rules[1].egressGateways",
                "a pass rule takes no egressGateways: only redirect rules have gateways",
            ),
            (N, "spec.rules[1].maxGateways", "a pass rule takes no maxGateways"),
        ],
        id="native-pass-with-gateways",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.rules[1].action": "drop", "spec.rules[1].gatewayPreference": "None"})],
        [(N, "spec.rules[1].gatewayPreference", "a drop rule takes no gatewayPreference")],
        id="native-drop-with-preference",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].podSelector": {}})],
        [
            (
                N,
                f"{NGW}[0].podSelector",
                "set either nodeSelector (node gateways) or podSelector (gateway pods), not both",
            )
        ],
        id="native-gateway-both-selectors",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0]": {"egressIPs": ["192.0.2.10"]}})],
        [(N, f"{NGW}[0]", "a gateway needs nodeSelector (node gateways) or podSelector (gateway pods)")],
        id="native-gateway-no-selector",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].namespaceSelector": {}})],
        [(N, f"{NGW}[0].namespaceSelector", "namespaceSelector is only for gateway pods (podSelector)")],
        id="native-node-gateway-namespace-selector",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[1].egressIPs": ["192.0.2.10"], f"{NGW}[1].interface": "eth1"})],
        [
            (N, f"{NGW}[1].egressIPs", "egressIPs is only for node gateways: gateway pods use their own IPs"),
            (N, f"{NGW}[1].interface", "interface is only for node gateways"),
        ],
        id="native-pod-gateway-egress-ips",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].egressIPs": ["192.0.2.10", "2001:db8::10", "192.0.2.11"]})],
        [
            (
                N,
                f"{NGW}[0].egressIPs[2]",
                f"192.0.2.11 is a second IPv4 address (the first is 192.0.2.10 at {NGW}[0].egressIPs[0]): "
                "expected at most one address per family",
            )
        ],
        id="native-two-ipv4-egress-ips",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].interface": "eth1"})],
        [(N, f"{NGW}[0].interface", "set at most one of egressIPs and interface")],
        id="native-egress-ips-and-interface",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].egressIPs": "192.0.2.10"})],
        [(N, f"{NGW}[0].egressIPs", "expected a list of IP address strings, got a string ('192.0.2.10')")],
        id="native-egress-ips-string",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.rules[1].destinationCIDRs": ["198.51.100.0/24", "203.0.113.0/24"]})],
        [
            (
                N,
                "spec.rules[1].destinationCIDRs[1]",
                "duplicate destination 203.0.113.0/24: already at spec.rules[0].destinationCIDRs[0]",
            )
        ],
        id="native-duplicate-destination-across-rules",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].interfaces": ["eth1"]})],
        [
            (
                N,
                f"{NGW}[0].interfaces",
                "unknown field 'interfaces': expected one of egressIPs, interface, namespaceSelector",
            )
        ],
        id="native-unknown-gateway-field",
    ),
    pytest.param(
        [patched(NATIVE, {f"{RULE}.maxGateway": 1})],
        [
            (
                N,
                f"{RULE}.maxGateway",
                "unknown field 'maxGateway': expected one of action, description, destinationCIDRs",
            )
        ],
        id="native-unknown-rule-field",
    ),
    pytest.param(
        [patched(NATIVE, {"spec.rules": DELETE, "spec.selectors": DELETE})],
        [
            (N, "spec.selectors", "required field 'selectors' is missing"),
            (N, "spec.rules", "required field 'rules' is missing"),
        ],
        id="native-missing-required",
    ),
    pytest.param(
        [patched(NATIVE, {f"{NGW}[0].nodeSelector": 3})],
        [(N, f"{NGW}[0].nodeSelector", "got an integer (3)")],
        id="native-selector-number",
    ),
    pytest.param(
        [patched(NATIVE, {f"{RULE}.maxGateways": -2, f"{RULE}.gatewayPreference": "none"})],
        [
            (N, f"{RULE}.gatewayPreference", "unknown gatewayPreference 'none'"),
            (N, f"{RULE}.maxGateways", "-2 is out of range"),
        ],
        id="native-bad-gateway-options",
    ),
    pytest.param(
        [patched(NATIVE, {"status": {}, "extra": 1})],
        [(N, "extra", "unknown field 'extra'")],
        id="native-unknown-top-level-field",
    ),
    # Inventory
    pytest.param(
        [patched(INVENTORY, {"spec.pods": []})],
        [(INV, "spec.pods", "unknown field 'pods': expected one of endpoints, namespaces, nodes")],
        id="inventory-unknown-field",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.ip": "10.0.0.1"})],
        [
            (
                INV,
                f"{EP}.ip",
                "unknown field 'ip': expected one of annotations, ips, labels, name, namespace, node",
            )
        ],
        id="inventory-unknown-endpoint-field",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.node": DELETE, f"{EP}.ips": DELETE})],
        [
            (INV, f"{EP}.node", "required field 'node' is missing"),
            (INV, f"{EP}.ips", "required field 'ips' is missing"),
        ],
        id="inventory-endpoint-missing-fields",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.ips": ["10.244.1.5", "10.244.1.50"]})],
        [
            (
                INV,
                f"{EP}.ips[1]",
                "10.244.1.50 is a second IPv4 address (the first is 10.244.1.5 at spec.endpoints[0].ips[0])",
            )
        ],
        id="inventory-two-ipv4",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.ips": ["fd00::5", "fd00::6"]})],
        [(INV, f"{EP}.ips[1]", "fd00::6 is a second IPv6 address")],
        id="inventory-two-ipv6",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.ips": []})],
        [(INV, f"{EP}.ips", "expected a non-empty list of IP address strings, got an empty list")],
        id="inventory-no-ips",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.ips[0]": "10.244.1"})],
        [(INV, f"{EP}.ips[0]", "'10.244.1' is not an IP address")],
        id="inventory-bad-ip",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.labels": {"app.kubernetes.io/name": "ok", "app": "not ok"}})],
        [(INV, f"{EP}.labels.app", "invalid label value 'not ok'")],
        id="inventory-bad-label",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.labels": ["app=x"]})],
        [(INV, f"{EP}.labels", "expected a mapping of label keys to values, got a list")],
        id="inventory-labels-list",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.namespace": ""})],
        [(INV, f"{EP}.namespace", "expected a namespace name (a non-empty string), got an empty string")],
        id="inventory-empty-namespace",
    ),
    pytest.param(
        [patched(INVENTORY, {"spec.namespaces[0].name": None})],
        [(INV, "spec.namespaces[0].name", "expected a namespace name (a non-empty string), got null")],
        id="inventory-null-namespace-name",
    ),
    pytest.param(
        [patched(INVENTORY, {"spec.nodes[0].addresses": "192.0.2.1"})],
        [(INV, "spec.nodes[0].addresses", "expected a list of IP address strings, got a string")],
        id="inventory-node-addresses-string",
    ),
    pytest.param(
        [
            patched(
                INVENTORY,
                {"spec.nodes[0].interfaces": {"eth/1": ["192.0.2.10"], "eth2": ["x"], "eth3": "192.0.2.3"}},
            )
        ],
        [
            (INV, 'spec.nodes[0].interfaces["eth/1"]', "invalid interface name 'eth/1'"),
            (INV, "spec.nodes[0].interfaces.eth2[0]", "'x' is not an IP address"),
            (INV, "spec.nodes[0].interfaces.eth3", "expected a list of IP address strings, got a string"),
        ],
        id="inventory-bad-interfaces",
    ),
    pytest.param(
        [patched(INVENTORY, {"spec.endpoints": {"pay-1": {}}})],
        [(INV, "spec.endpoints", "expected a list of endpoints mappings, got a mapping")],
        id="inventory-endpoints-mapping",
    ),
    # Calico annotations
    pytest.param(
        [patched(INVENTORY, {f"{EP}.annotations": {"egress.projectcalico.org/selector": BAD_EXPRESSION}})],
        [(INV, f"{EP}.annotations{CALICO_SELECTOR}", syntax_error(BAD_EXPRESSION))],
        id="annotation-selector-syntax",
    ),
    pytest.param(
        [
            patched(
                INVENTORY,
                {
                    "spec.namespaces[0].annotations": {
                        "egress.projectcalico.org/namespaceSelector": BAD_EXPRESSION
                    }
                },
            )
        ],
        [(INV, f"spec.namespaces[0].annotations{CALICO_NAMESPACE_SELECTOR}", syntax_error(BAD_EXPRESSION))],
        id="annotation-namespace-selector-syntax",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.annotations": {"egress.projectcalico.org/egressGatewayPolicy": " "}})],
        [
            (
                INV,
                f"{EP}.annotations{CALICO_POLICY}",
                "expected the name of an EgressGatewayPolicy, got an empty string",
            )
        ],
        id="annotation-empty-policy",
    ),
    pytest.param(
        [patched(INVENTORY, {f"{EP}.annotations": {"egress.projectcalico.org/selector": 42}})],
        [
            (
                INV,
                f"{EP}.annotations{CALICO_SELECTOR}",
                "expected an annotation value string, got an integer (42)",
            )
        ],
        id="annotation-number",
    ),
    pytest.param(
        [patched(POD, {"metadata.annotations": {"egress.projectcalico.org/selector": BAD_EXPRESSION}})],
        [(POD_DOC, f"metadata.annotations{CALICO_SELECTOR}", syntax_error(BAD_EXPRESSION))],
        id="annotation-pod-selector-syntax",
    ),
    pytest.param(
        [
            patched(
                NAMESPACE,
                {"metadata.annotations": {"egress.projectcalico.org/namespaceSelector": BAD_EXPRESSION}},
            )
        ],
        [(NS_DOC, f"metadata.annotations{CALICO_NAMESPACE_SELECTOR}", syntax_error(BAD_EXPRESSION))],
        id="annotation-namespace-object-syntax",
    ),
    # Duplicates
    pytest.param(
        [patched(INVENTORY, {"spec.namespaces": [{"name": "payments"}, {"name": "payments"}]})],
        [
            (
                INV,
                "spec.namespaces[1].name",
                f"duplicate namespace 'payments': first defined at {SOURCE}, {INV}, spec.namespaces[0]",
            )
        ],
        id="duplicate-namespace",
    ),
    pytest.param(
        [INVENTORY, patched(NODE, {"metadata.name": "node-a"})],
        [
            (
                "document 2 (Node node-a)",
                "metadata.name",
                f"duplicate node 'node-a': first defined at {SOURCE}, {INV}, spec.nodes[0]",
            )
        ],
        id="duplicate-node",
    ),
    pytest.param(
        [INVENTORY, patched(POD, {"metadata.name": "pay-1", "metadata.namespace": "payments"})],
        [
            (
                "document 2 (Pod pay-1)",
                "metadata.name",
                f"duplicate endpoint 'payments/pay-1': first defined at {SOURCE}, {INV}, spec.endpoints[0]",
            )
        ],
        id="duplicate-endpoint",
    ),
    pytest.param(
        [patched(INVENTORY, {"spec.endpoints[1].ips": ["10.244.1.5"]})],
        [
            (
                INV,
                "spec.endpoints[1].ips[0]",
                f"10.244.1.5 is already the IP of endpoint 'payments/pay-1' "
                f"({SOURCE}, {INV}, spec.endpoints[0].ips[0])",
            )
        ],
        id="duplicate-ip",
    ),
    pytest.param(
        [CILIUM, CILIUM],
        [
            (
                "document 2 (CiliumEgressGatewayPolicy egress-sample)",
                "metadata.name",
                f"duplicate CiliumEgressGatewayPolicy 'egress-sample': first defined at {SOURCE}, {C}",
            )
        ],
        id="duplicate-policy",
    ),
    pytest.param(
        [NETWORK, NETWORK],
        [("document 2 (ClusterNetwork)", "", f"a second ClusterNetwork: the first is at {SOURCE}, {NET}")],
        id="duplicate-cluster-network",
    ),
    # ClusterNetwork
    pytest.param(
        [patched(NETWORK, {"spec.podCIDR": ["10.244.0.0/16"]})],
        [
            (
                NET,
                "spec.podCIDR",
                "unknown field 'podCIDR': expected one of internalCIDRs, podCIDRs, serviceCIDRs",
            )
        ],
        id="network-unknown-field",
    ),
    pytest.param(
        [patched(NETWORK, {"spec.serviceCIDRs[0]": "10.96.0.1/12"})],
        [(NET, "spec.serviceCIDRs[0]", "expected the network address 10.96.0.0/12")],
        id="network-host-bits",
    ),
    pytest.param(
        [patched(NETWORK, {"spec": DELETE})],
        [(NET, "spec", "required field 'spec' is missing")],
        id="network-without-spec",
    ),
    # Kubernetes objects
    pytest.param(
        [patched(POD, {"metadata.name": DELETE})],
        [("document 1 (Pod)", "metadata.name", "required field 'name' is missing")],
        id="pod-without-name",
    ),
    pytest.param(
        [patched(POD, {"metadata.labels": {"app": "web server"}})],
        [(POD_DOC, "metadata.labels.app", "invalid label value 'web server'")],
        id="pod-bad-label",
    ),
    pytest.param(
        [patched(POD, {"status.podIPs": DELETE, "status.podIP": "10.244.1.300"})],
        [(POD_DOC, "status.podIP", "'10.244.1.300' is not an IP address")],
        id="pod-bad-ip",
    ),
    pytest.param(
        [patched(POD, {"status.podIPs": [{"ip": "10.244.1.7"}, {"ip": "10.244.1.8"}]})],
        [(POD_DOC, "status.podIPs[1].ip", "10.244.1.8 is a second IPv4 address")],
        id="pod-two-ipv4",
    ),
    pytest.param(
        [patched(POD, {"spec.hostNetwork": "yes"})],
        [(POD_DOC, "spec.hostNetwork", "expected true or false, got a string ('yes')")],
        id="pod-host-network-string",
    ),
    pytest.param(
        [patched(NODE, {"status.addresses[0].address": "192.0.2"})],
        [(NODE_DOC, "status.addresses[0].address", "'192.0.2' is not an IP address")],
        id="node-bad-address",
    ),
    pytest.param(
        [patched(NODE, {"apiVersion": "v2"})],
        [(NODE_DOC, "apiVersion", "unsupported apiVersion 'v2' for kind Node: expected v1")],
        id="node-wrong-api-version",
    ),
    pytest.param(
        [patched(NAMESPACE, {"metadata.labels": "team=web"})],
        [(NS_DOC, "metadata.labels", "expected a mapping of label keys to values, got a string")],
        id="namespace-labels-string",
    ),
    pytest.param(
        [
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [NAMESPACE, patched(POD, {"metadata.name": ""}), NAMESPACE],
            }
        ],
        [
            (
                "document 1 (List)",
                "items[1].metadata.name",
                "expected a name (a non-empty string), got an empty string",
            ),
            (
                "document 1 (List)",
                "items[2].metadata.name",
                "duplicate namespace 'web': first defined at test.yaml, document 1 (List), items[0]",
            ),
        ],
        id="list-items",
    ),
    pytest.param(
        [
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [{"apiVersion": "v1", "kind": "List", "items": [CILIUM, 5]}],
            }
        ],
        [
            (
                "document 1 (List)",
                "items[0].items[1]",
                "expected an object mapping with apiVersion and kind, got an integer (5)",
            )
        ],
        id="list-nested",
    ),
    pytest.param(
        [{"apiVersion": "v1", "kind": "List", "items": {"a": NAMESPACE}}],
        [("document 1 (List)", "items", "expected a list of Kubernetes objects, got a mapping")],
        id="list-items-mapping",
    ),
    pytest.param(
        ["items: &loop [{apiVersion: v1, kind: List, items: *loop}]\napiVersion: v1\nkind: List\n"],
        [("document 1 (List)", "items[0].items[0].items", "Lists nested more than 2 deep")],
        id="list-self-reference",
    ),
    # Kinds and documents
    pytest.param(
        [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}],
        [
            (
                "document 1 (Deployment web)",
                "kind",
                "unsupported kind 'Deployment': expected one of CiliumEgressGatewayPolicy (cilium.io/v2)",
            )
        ],
        id="unknown-kind",
    ),
    pytest.param(
        [patched(CILIUM, {"apiVersion": "cilium.io/v1"})],
        [
            (
                C,
                "apiVersion",
                "unsupported apiVersion 'cilium.io/v1' for kind CiliumEgressGatewayPolicy: "
                "expected cilium.io/v2",
            )
        ],
        id="wrong-api-version",
    ),
    pytest.param(
        [patched(CILIUM, {"kind": DELETE})],
        [("document 1", "kind", "required field 'kind' is missing: expected one of")],
        id="missing-kind",
    ),
    pytest.param(
        [patched(CILIUM, {"apiVersion": DELETE})],
        [(C, "apiVersion", "required field 'apiVersion' is missing: expected cilium.io/v2")],
        id="missing-api-version",
    ),
    pytest.param(
        [patched(CILIUM, {"kind": ["CiliumEgressGatewayPolicy"]})],
        [("document 1", "kind", "expected a kind name, got a list")],
        id="kind-list",
    ),
    pytest.param(
        ["- a\n- b\n"],
        [("document 1", "", "expected an object mapping with apiVersion and kind, got a list")],
        id="document-list",
    ),
    pytest.param(
        ["just text\n"],
        [("document 1", "", "got a string ('just text')")],
        id="document-string",
    ),
    pytest.param(
        [patched(CILIUM, {"spec.selectors": []}), NAMESPACE, patched(NATIVE, {"spec.priority": "high"})],
        [
            (C, "spec.selectors", "got an empty list"),
            ("document 3 (EgressPolicy payments)", "spec.priority", "got a string ('high')"),
        ],
        id="errors-in-several-documents",
    ),
]


@pytest.mark.parametrize(("documents", "expected"), INVALID)
def test_invalid_documents_report_every_fault_where_it_is(
    documents: list[object], expected: Expected
) -> None:
    errors = load_errors(documents)
    assert [(e.source, e.document, e.path) for e in errors] == [(SOURCE, d, p) for d, p, _ in expected]
    for error, (_document, _path, fragment) in zip(errors, expected, strict=True):
        assert fragment in str(error)


# -- files, syntax and safety ------------------------------------------------------------------------


def test_errors_from_several_files_are_reported_together(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text(dump([patched(CILIUM, {"spec.destinationCIDRs[0]": "203.0.113.7/24"})]))
    second = tmp_path / "second.json"
    second.write_text(json.dumps(patched(INVENTORY, {f"{EP}.ips[0]": "bad"})))
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyErrorGroup) as info:
        load_files([first, missing, second])
    group = info.value
    assert [(e.source, e.document, e.path) for e in group.errors] == [
        (str(first), C, "spec.destinationCIDRs[0]"),
        (str(missing), "", ""),
        (str(second), INV, f"{EP}.ips[0]"),
    ]
    assert "cannot read the file: No such file or directory" in str(group.errors[1])
    assert str(group) == f"{group.errors[0]} (and 2 more errors)"
    assert (group.source, group.document, group.path) == (str(first), C, "spec.destinationCIDRs[0]")
    assert [str(e) for e in validate_files([first, missing, second])] == [str(e) for e in group.errors]


def test_a_single_error_is_still_a_group() -> None:
    with pytest.raises(PolicyErrorGroup) as info:
        load_texts([(SOURCE, dump([patched(NETWORK, {"spec.podCIDRs": None})]))])
    assert len(info.value.errors) == 1
    assert str(info.value) == f"{SOURCE}: {NET}: spec.podCIDRs: expected a list of CIDR strings, got null"
    assert isinstance(info.value, PolicyError)
    assert isinstance(info.value, ValueError)


def test_unreadable_files(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"kind: Namespace\nmetadata: {name: caf\xe9}\n")
    errors = validate_files([tmp_path, latin1])
    assert [(e.source, e.document, e.path) for e in errors] == [
        (str(tmp_path), "", ""),
        (str(latin1), "", ""),
    ]
    assert "cannot read the file: Is a directory" in str(errors[0])
    assert "the file is not UTF-8 text: invalid continuation byte at line 2 (byte 36)" in str(errors[1])


def test_yaml_syntax_error_names_line_and_column_and_earlier_documents_still_count() -> None:
    text = (
        dump([patched(NAMESPACE, {"metadata.labels": {"team": "bad value"}})])
        + "---\nkind: Pod\nmetadata: {name: [x}\n"
    )
    with pytest.raises(PolicyErrorGroup) as info:
        load_texts([(SOURCE, text)])
    first, second = info.value.errors
    assert (first.document, first.path) == (NS_DOC, "metadata.labels.team")
    assert (second.source, second.document, second.path) == (SOURCE, "document 2", "")
    line = text.count("\n")  # the last line is the bad one
    assert re.search(rf"invalid YAML at line {line}, column \d+: .*flow sequence", str(second))


def test_yaml_tab_indentation_error() -> None:
    errors = validate_texts([("tabs.yaml", "kind: Namespace\nmetadata:\n\tname: web\n")])
    assert [(e.document, e.path) for e in errors] == [("document 1", "")]
    assert "invalid YAML at line 3, column 1: found character '\\t' that cannot start any token" in str(
        errors[0]
    )


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!python/object:egresscore.policy.model.Namespace {name: x}",
    ],
)
def test_python_tags_are_refused(tag: str) -> None:
    text = f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {tag}\n"
    errors = validate_texts([(SOURCE, text)])
    assert [(e.document, e.path) for e in errors] == [("document 1", "")]
    assert "invalid YAML at line 4, column 9: could not determine a constructor for the tag" in str(errors[0])
    assert "tags such as !!python/object are refused" in str(errors[0])


def test_json_syntax_error_names_line_and_column() -> None:
    errors = validate_texts(
        [("cluster.json", '{\n  "kind": "Namespace",\n  "metadata": {"name": "web",}\n}\n')]
    )
    assert [(e.source, e.document, e.path) for e in errors] == [("cluster.json", "document 1", "")]
    assert "invalid JSON at line 3, column 30: Expecting property name enclosed in double quotes" in str(
        errors[0]
    )


def test_json_is_read_from_yaml_sources_too() -> None:
    policy_set = load_texts([("cluster.yaml", json.dumps(NAMESPACE))])
    assert [n.name for n in policy_set.inventory.namespaces] == ["web"]


def test_empty_files_and_documents_load_as_nothing_and_keep_their_numbers() -> None:
    assert load_texts([("empty.yaml", ""), ("comments.yaml", "# nothing\n")]) == PolicySet()
    errors = validate_texts([(SOURCE, "---\n---\n" + dump([patched(NAMESPACE, {"metadata.name": ""})]))])
    assert [(e.document, e.path) for e in errors] == [("document 2 (Namespace)", "metadata.name")]


def test_yaml_list_of_kubernetes_objects() -> None:
    text = dump(
        [
            {
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": ""},
                "items": [NAMESPACE, POD, CILIUM],
            }
        ]
    )
    policy_set = load_texts([(SOURCE, text)])
    assert [p.name for p in policy_set.policies] == ["egress-sample"]
    assert policy_set.policies[0].origin == Origin(
        SOURCE, "document 1 (List)", "CiliumEgressGatewayPolicy", "egress-sample"
    )
    assert policy_set.policies[0].selection[0].path == "items[2].spec.selectors[0]"  # type: ignore[index]
    assert policy_set.policies[0].rules[0].gateways[0].path == "items[2].spec.egressGateway"
    assert policy_set.policies[0].excluded_path == "items[2].spec.excludedCIDRs"
    assert [e.key for e in policy_set.inventory.endpoints] == ["web/web-1"]
    assert load_texts([(SOURCE, "apiVersion: v1\nkind: List\nitems: []\n")]) == PolicySet()


# -- Kubernetes objects ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"spec.hostNetwork": True},
        {"status.podIPs": DELETE, "status.podIP": DELETE},
        {"status.podIPs": [], "status.podIP": None},
        {"status.phase": "Succeeded"},
        {"status.phase": "Failed"},
    ],
    ids=["host-network", "no-ip", "empty-ips", "succeeded", "failed"],
)
def test_pods_that_cannot_be_redirected_are_skipped(changes: dict[str, object]) -> None:
    assert (
        load_valid(INVENTORY, patched(POD, changes)).inventory.endpoints
        == load_valid(INVENTORY).inventory.endpoints
    )


def test_pod_defaults_and_null_fields() -> None:
    pod = patched(
        POD,
        {
            "metadata.namespace": DELETE,
            "metadata.labels": None,
            "metadata.annotations": None,
            "spec": None,
            "status.podIPs": None,
        },
    )
    (endpoint,) = load_valid(pod).inventory.endpoints
    assert endpoint == Endpoint("web-1", "default", "", ips("10.244.1.7"), {}, {}, endpoint.origin)


def test_pod_and_namespace_annotations_are_kept_raw() -> None:
    annotations = {
        "egress.projectcalico.org/selector": "egress-code == 'red'",
        "egress.projectcalico.org/egressGatewayPolicy": "not-loaded-yet",
        "example.com/other": "anything at all",
    }
    policy_set = load_valid(
        patched(POD, {"metadata.annotations": annotations}),
        patched(NAMESPACE, {"metadata.annotations": annotations}),
    )
    assert policy_set.inventory.endpoints[0].annotations == annotations
    assert policy_set.inventory.namespaces[0].annotations == annotations


# -- selectors --------------------------------------------------------------------------------------


def test_parse_label_selector() -> None:
    assert parse_label_selector({}, "x") == MATCH_ALL
    assert parse_label_selector({"matchLabels": {}, "matchExpressions": []}, "x") == MATCH_ALL
    assert parse_label_selector({"matchLabels": {"a": "1"}}, "x") == eq("a", "1")
    assert parse_label_selector(
        {
            "matchLabels": {"a": "1", "b": ""},
            "matchExpressions": [
                {"key": "c", "operator": "In", "values": ["x", "y", "x"]},
                {"key": "d", "operator": "NotIn", "values": ["z"]},
                {"key": "e", "operator": "Exists", "values": []},
                {"key": "f", "operator": "DoesNotExist"},
            ],
        },
        "x",
    ) == And(
        (
            eq("a", "1"),
            eq("b", ""),
            LabelIn("c", frozenset({"x", "y"})),
            Not(LabelIn("d", frozenset({"z"}))),
            HasLabel("e"),
            Not(HasLabel("f")),
        )
    )
    assert parse_label_selector("has(tier)", "x") == calico("has(tier)")
    assert parse_label_selector("", "x") == calico("")


def test_parse_label_selector_errors() -> None:
    with pytest.raises(PolicyError) as info:
        parse_label_selector("app == 'x'", "spec.nodeSelector", allow_expression=False)
    assert str(info.value) == (
        "spec.nodeSelector: expected a LabelSelector mapping (matchLabels, matchExpressions), "
        "got a string (\"app == 'x'\")"
    )
    with pytest.raises(PolicyError) as info:
        parse_label_selector({"matchLabels": {"a": 1}}, "sel")
    assert (info.value.source, info.value.document, info.value.path) == ("", "", "sel.matchLabels.a")
    with pytest.raises(PolicyErrorGroup) as group:
        parse_label_selector(
            {"matchLabels": {"a": 1}, "matchExpressions": [{"key": "b", "operator": "Is"}]}, "sel"
        )
    assert [e.path for e in group.value.errors] == ["sel.matchLabels.a", "sel.matchExpressions[0].operator"]
    with pytest.raises(PolicyError) as info:
        parse_label_selector(BAD_EXPRESSION, "sel")
    assert str(info.value) == f"sel: invalid Calico selector: {syntax_error(BAD_EXPRESSION)}"


def test_calico_annotation_selectors() -> None:
    red, in_egress = "egress-code == 'red'", "projectcalico.org/name == 'egress'"
    assert calico_annotation_selectors({}) == (None, None)
    assert calico_annotation_selectors(
        {"egress.projectcalico.org/selector": red, "egress.projectcalico.org/namespaceSelector": in_egress}
    ) == (calico(red), calico(in_egress))
    assert calico_annotation_selectors(
        {"egress.projectcalico.org/selector": red, "egress.projectcalico.org/namespaceSelector": " "}
    ) == (calico(red), None)
    assert calico_annotation_selectors({"egress.projectcalico.org/selector": ""}) == (MATCH_ALL, None)
    with pytest.raises(PolicyError) as info:
        calico_annotation_selectors({"egress.projectcalico.org/namespaceSelector": BAD_EXPRESSION})
    assert info.value.path == f"metadata.annotations{CALICO_NAMESPACE_SELECTOR}"


def test_field_paths_quote_keys_that_are_not_plain_names() -> None:
    errors = validate_texts(
        [(SOURCE, dump([patched(NAMESPACE, {"metadata.labels": {"équipe": "x", "a_b": "ok y"}})]))]
    )
    assert [e.path for e in errors] == ['metadata.labels["équipe"]', "metadata.labels.a_b"]


def test_same_name_in_different_kinds_is_not_a_duplicate() -> None:
    renamed = patched(CALICO, {"metadata.name": "egress-sample"})
    native = patched(NATIVE, {"metadata.name": "egress-sample"})
    assert [p.origin.kind for p in load_valid(CILIUM, renamed, native).policies if p.origin] == [
        "CiliumEgressGatewayPolicy",
        "EgressGatewayPolicy",
        "EgressPolicy",
    ]


def test_a_document_with_an_error_adds_nothing_but_later_documents_are_checked() -> None:
    errors = validate_texts(
        [
            (
                SOURCE,
                dump(
                    [patched(INVENTORY, {f"{EP}.labels": None}), patched(INVENTORY, {"spec.namespaces": []})]
                ),
            )
        ]
    )
    # The second Inventory repeats pay-1 and node-a: the first definitions count even
    # though their document had an error elsewhere.
    assert [(e.document, e.path) for e in errors] == [
        (INV, f"{EP}.labels"),
        ("document 2 (Inventory)", "spec.nodes[0].name"),
        ("document 2 (Inventory)", "spec.endpoints[0].name"),
        ("document 2 (Inventory)", "spec.endpoints[1].name"),
    ]


def validate_texts(texts: list[tuple[str, str]]) -> list[PolicyError]:
    try:
        load_texts(texts)
    except PolicyErrorGroup as group:
        return group.errors
    return []


@pytest.mark.parametrize("entry", [{}, {"nodeSelector": {"matchLabels": {"zone": "a"}}}])
def test_a_cilium_selector_entry_needs_pods_or_namespaces(entry: dict[str, object]) -> None:
    document = patched(CILIUM, {"spec.selectors": [{"podSelector": {}}, entry]})
    (error,) = load_errors([document])
    assert error.path == "spec.selectors[1]"
    assert "expected a podSelector or a namespaceSelector" in str(error)
    # The native format keeps "no part: every pod".
    assert load_valid(patched(NATIVE, {"spec.selectors": [entry]})).policies


def test_cilium_label_source_prefixes() -> None:
    selector = {
        "matchLabels": {"k8s:io.kubernetes.pod.namespace": "payments", "any:app": "web"},
        "matchExpressions": [{"key": "k8s:tier", "operator": "Exists"}],
    }
    (policy,) = load_valid(patched(CILIUM, {"spec.selectors": [{"podSelector": selector}]})).policies
    assert isinstance(policy.selection, tuple)
    assert policy.selection[0].pods == And(
        (eq("io.kubernetes.pod.namespace", "payments"), eq("app", "web"), HasLabel("tier"))
    )
    bad = {"matchLabels": {"reserved:host": ""}}
    (error,) = load_errors([patched(CILIUM, {"spec.selectors": [{"podSelector": bad}]})])
    assert error.path == 'spec.selectors[0].podSelector.matchLabels["reserved:host"]'
    assert "names the label source 'reserved': expected 'k8s:' or 'any:'" in str(error)
    # Other formats have no label sources: the colon is an invalid key character there.
    native = patched(NATIVE, {"spec.selectors": [{"podSelector": {"matchLabels": {"k8s:app": "web"}}}]})
    (error,) = load_errors([native])
    assert "invalid label key 'k8s:app'" in str(error)


def test_alias_bombs_stop_early(tmp_path: Path) -> None:
    """A few kilobytes of YAML aliases that name the same pods 250,000 times."""
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "x0: &pod {apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 10.0.0.1}}\n"
        f"x1: &list {{apiVersion: v1, kind: List, items: [{', '.join(['*pod'] * 500)}]}}\n"
        f"apiVersion: v1\nkind: List\nitems: [{', '.join(['*list'] * 500)}]\n"
    )
    started = time.perf_counter()
    errors = validate_files([bomb])
    assert time.perf_counter() - started < 20
    assert "(YAML aliases that repeat the same data?)" in str(errors[-1])
    assert len(errors) <= 1002  # 1,000, "further errors not reported", and why the file was abandoned
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "x0: &l0 {apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 10.0.0.1}}\n"
        + "".join(
            f"x{d}: &l{d} {{apiVersion: v1, kind: List, items: [{', '.join([f'*l{d - 1}'] * 10)}]}}\n"
            for d in range(1, 6)
        )
        + "apiVersion: v1\nkind: List\nitems: [*l5]\n"
    )
    errors = validate_files([nested])
    assert any("Lists nested more than 2 deep" in str(error) for error in errors)


def test_errors_are_capped_at_one_thousand(tmp_path: Path) -> None:
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"---\napiVersion: cilium.io/v2\nkind: Nope{i}\n" for i in range(1500)))
    errors = validate_files([many])
    assert len(errors) == 1001
    assert str(errors[-1]).endswith("further errors not reported (at most 1000 are)")
