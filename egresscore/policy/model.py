"""The policy and endpoint model: what documents become before they are compiled.

Every loader (Cilium, Calico, native, and later a Kubernetes watch) produces these
frozen values, and the compiler (``egresscore.policy.compiler``) reads nothing else.
Field paths (``path``) point back into the document a value came from, so that
``egresscore explain`` can say which part of which file made a decision.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from egresscore.policy.selector import Selector

__all__ = [
    "AnnotationSelection",
    "ClusterNetwork",
    "Endpoint",
    "GatewaySpec",
    "IPAddress",
    "IPNetwork",
    "Inventory",
    "Namespace",
    "Node",
    "Origin",
    "Policy",
    "PolicySet",
    "Rule",
    "RuleAction",
    "SourceTerm",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Labels the systems we read add to objects on their own; the model adds them too
#: (see ``Inventory.pod_labels`` and friends), so selectors written against them work.
CILIUM_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CILIUM_NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
KUBERNETES_NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
KUBERNETES_HOSTNAME_LABEL = "kubernetes.io/hostname"
CALICO_NAMESPACE_NAME_LABEL = "projectcalico.org/name"
CALICO_POD_NAMESPACE_LABEL = "projectcalico.org/namespace"

#: Calico's pod and namespace annotations for egress gateways.
CALICO_SELECTOR_ANNOTATION = "egress.projectcalico.org/selector"
CALICO_NAMESPACE_SELECTOR_ANNOTATION = "egress.projectcalico.org/namespaceSelector"
CALICO_POLICY_ANNOTATION = "egress.projectcalico.org/egressGatewayPolicy"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value was read: file, document (index and description), kind and name."""

    source: str
    document: str
    kind: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class Node:
    """A cluster node. ``addresses`` are its own IPs (cluster-internal destinations);
    ``interfaces`` maps interface names to their IPs, for gateways that name an
    interface instead of an egress IP."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[IPAddress, ...] = ()
    interfaces: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A pod: where it runs, its IPs (v4 and v6), labels and annotations."""

    name: str
    namespace: str
    node: str
    ips: tuple[IPAddress, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    origin: Origin | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ClusterNetwork:
    """Cluster-internal destinations: traffic to these always passes untouched.

    Node addresses and endpoint IPs are internal too, without being listed here."""

    pod_cidrs: tuple[IPNetwork, ...] = ()
    service_cidrs: tuple[IPNetwork, ...] = ()
    internal_cidrs: tuple[IPNetwork, ...] = ()
    origin: Origin | None = None

    @property
    def cidrs(self) -> tuple[IPNetwork, ...]:
        return self.pod_cidrs + self.service_cidrs + self.internal_cidrs


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything the policies select from. Names are unique per kind (endpoints per
    namespace); an endpoint may name a namespace or node that is not listed (it then
    has no namespace or node labels beyond the automatic ones)."""

    namespaces: tuple[Namespace, ...] = ()
    nodes: tuple[Node, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    network: ClusterNetwork = field(default_factory=ClusterNetwork)

    def namespace(self, name: str) -> Namespace:
        for namespace in self.namespaces:
            if namespace.name == name:
                return namespace
        return Namespace(name)

    def node(self, name: str) -> Node | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    @staticmethod
    def namespace_labels(namespace: Namespace) -> dict[str, str]:
        """The labels namespace selectors see: the namespace's own, plus the name
        labels Kubernetes (``kubernetes.io/metadata.name``) and Calico
        (``projectcalico.org/name``) add."""
        labels = dict(namespace.labels)
        labels[KUBERNETES_NAMESPACE_NAME_LABEL] = namespace.name
        labels[CALICO_NAMESPACE_NAME_LABEL] = namespace.name
        return labels

    @staticmethod
    def pod_labels(endpoint: Endpoint, namespace: Namespace) -> dict[str, str]:
        """The labels pod selectors see: the pod's own, plus the namespace labels
        Cilium adds (``io.kubernetes.pod.namespace`` and
        ``io.cilium.k8s.namespace.labels.<key>``) and Calico's
        ``projectcalico.org/namespace``."""
        labels = dict(endpoint.labels)
        # The namespace's labels as Kubernetes has them, kubernetes.io/metadata.name
        # included (the API server sets it on every namespace).
        namespace_labels = dict(namespace.labels)
        namespace_labels[KUBERNETES_NAMESPACE_NAME_LABEL] = namespace.name
        for key, value in namespace_labels.items():
            labels[CILIUM_NAMESPACE_LABELS_PREFIX + key] = value
        labels[CILIUM_NAMESPACE_LABEL] = endpoint.namespace
        labels[CALICO_POD_NAMESPACE_LABEL] = endpoint.namespace
        return labels

    @staticmethod
    def node_labels(node: Node) -> dict[str, str]:
        """The labels node selectors see: the node's own, and
        ``kubernetes.io/hostname`` (the node name) unless the node sets it."""
        labels = dict(node.labels)
        labels.setdefault(KUBERNETES_HOSTNAME_LABEL, node.name)
        return labels


class RuleAction(enum.Enum):
    """What a policy rule does with the traffic it selects."""

    REDIRECT = "redirect"  # through one of the rule's gateways (drop if none is usable)
    PASS = "pass"  # untouched: Calico's rules without a gateway, native "pass"
    DROP = "drop"  # dropped and counted


@dataclass(frozen=True, slots=True)
class SourceTerm:
    """One entry of a policy's selector list: the pods matching all of its parts.
    A part that is ``None`` does not restrict (any namespace, any node)."""

    pods: Selector | None = None
    namespaces: Selector | None = None
    nodes: Selector | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class AnnotationSelection:
    """Calico: the policy applies to pods whose effective
    ``egress.projectcalico.org/egressGatewayPolicy`` annotation (the pod's own, else
    its namespace's) names it."""

    policy_name: str


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """Which gateways a rule may use, and with which egress IP.

    Node gateways (Cilium, native ``nodeSelector``): the nodes matching
    ``node_selector``; with ``first_node_only`` (Cilium's ``egressGateway``) only the
    first of them by name. The egress IP is ``egress_ips`` (at most one per family),
    else the addresses of ``interface`` on that node, else the node's first address
    of each family.

    Pod gateways (Calico, native ``podSelector``): the pods matching ``pod_selector``
    in namespaces matching ``namespace_selector`` (``None``: the client pod's own
    namespace, as Calico does); the egress IPs are the gateway pod's IPs and the
    gateway node is the node it runs on.
    """

    path: str = ""
    node_selector: Selector | None = None
    first_node_only: bool = False
    egress_ips: tuple[IPAddress, ...] = ()
    interface: str | None = None
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None

    @property
    def selects_pods(self) -> bool:
        return self.pod_selector is not None


@dataclass(frozen=True, slots=True)
class Rule:
    """Destinations and what to do with them. Within a policy, the rule with the
    longest destination prefix that contains the destination applies."""

    destinations: tuple[IPNetwork, ...]
    action: RuleAction = RuleAction.REDIRECT
    gateways: tuple[GatewaySpec, ...] = ()
    prefer_node_local: bool = False  # Calico gatewayPreference: PreferNodeLocal
    max_gateways: int = 0  # Calico maxNextHops; 0 means all usable gateways
    path: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """One egress policy, whatever format it was written in.

    Among the policies that select a pod, the one with the longest destination prefix
    containing the destination decides (an excluded CIDR counts as a prefix whose
    action is pass); then the lowest ``priority``; then the name."""

    name: str
    selection: tuple[SourceTerm, ...] | AnnotationSelection
    rules: tuple[Rule, ...]
    excluded: tuple[IPNetwork, ...] = ()
    priority: int = 0
    origin: Origin | None = None
    excluded_path: str = "spec.excludedCIDRs"


@dataclass(frozen=True, slots=True)
class PolicySet:
    """What a set of files holds: policies and the inventory they select from."""

    policies: tuple[Policy, ...] = ()
    inventory: Inventory = field(default_factory=Inventory)
