"""Compile a PolicySet into the Cython classifier (docs/policy.md, "The decision").

The compiler does everything that does not depend on the packet: it evaluates every
selector once over interned labels (``egresscore.core.selector``), turns policies into
selection units (one per policy; one per policy and client namespace where Calico
gateway pods default to the client's namespace), resolves every rule's gateways per
family, and lays out the destination prefixes with their candidates in precedence
order. The classifier then only looks up two addresses and walks a short chain.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from egresscore.core.classifier import (
    RULE_DROP,
    RULE_PASS,
    RULE_REDIRECT,
    Classifier,
    Gateway,
)
from egresscore.core.selector import (
    OP_AND,
    OP_KEY,
    OP_NOT,
    OP_OR,
    OP_PAIRS,
    Bitset,
    LabelIndex,
)
from egresscore.errors import PolicyError
from egresscore.policy.loader import calico_annotation_selectors
from egresscore.policy.model import (
    CALICO_NAMESPACE_SELECTOR_ANNOTATION,
    CALICO_POLICY_ANNOTATION,
    CALICO_SELECTOR_ANNOTATION,
    AnnotationSelection,
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
from egresscore.policy.selector import MATCH_ALL, And, HasLabel, LabelIn, LabelMatch, Not, Or, Selector

__all__ = ["Compiler", "Unit", "compile_policies", "gateway_id", "match_selector"]

NO_INDEX = 0xFFFFFFFF

#: The kind of the implicit policies made from Calico's selector annotations.
IMPLICIT_KIND = "CalicoAnnotations"
#: Tie-break of equal names across formats (docs/policy.md, "Order").
KIND_ORDER = {"CiliumEgressGatewayPolicy": 0, "EgressGatewayPolicy": 1, "EgressPolicy": 2, IMPLICIT_KIND: 3}

_RULE_ACTIONS = {RuleAction.REDIRECT: RULE_REDIRECT, RuleAction.PASS: RULE_PASS, RuleAction.DROP: RULE_DROP}
_ALL_V4 = IPv4Network("0.0.0.0/0")
_ALL_V6 = IPv6Network("::/0")


def gateway_id(node: str, egress_ip: IPAddress) -> int:
    """The gateway's identity in the flow score: BLAKE2b-64 of ``node/egress IP``."""
    digest = hashlib.blake2b(f"{node}/{egress_ip}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def selector_program(index: LabelIndex, selector: Selector) -> list[int]:
    """The stack program (egresscore.core.selector) that evaluates ``selector``."""
    code: list[int] = []

    def emit(node: Selector) -> None:
        if isinstance(node, LabelIn):
            ids = [index.pair_id(node.key, value) for value in sorted(node.values)]
            ids = [i for i in ids if i >= 0]
            code.extend((OP_PAIRS, len(ids), *ids))
        elif isinstance(node, HasLabel):
            key_id = index.key_id(node.key)
            code.extend((OP_KEY, key_id) if key_id >= 0 else (OP_PAIRS, 0))
        elif isinstance(node, LabelMatch):
            ids = [pair for value, pair in index.values(node.key) if node.op.test(value, node.operand)]
            code.extend((OP_PAIRS, len(ids), *ids))
        elif isinstance(node, Not):
            emit(node.operand)
            code.append(OP_NOT)
        elif isinstance(node, And | Or):
            for operand in node.operands:
                emit(operand)
            code.extend((OP_AND if isinstance(node, And) else OP_OR, len(node.operands)))
        else:  # pragma: no cover - the Selector union is closed
            raise TypeError(f"not a selector: {node!r}")

    emit(selector)
    return code


def match_selector(selector: Selector, labels: Sequence[Mapping[str, str]]) -> list[int]:
    """Indices of the label sets ``selector`` matches, evaluated by the compiled core."""
    index = LabelIndex(labels)
    return list(index.evaluate(selector_program(index, selector)))


@dataclass(slots=True)
class Unit:
    """A selection unit: a policy, restricted to one client namespace when its
    gateways depend on it."""

    policy: Policy
    members: Bitset
    namespace: str | None = None
    # The compiled rule index (into Compiler.rules) of each of the policy's rules.
    rule_indices: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CompiledRule:
    """A policy rule for one unit, with its usable gateways resolved per family."""

    unit: int
    rule: Rule
    gateways: tuple[tuple[int, ...], tuple[int, ...]]  # gateway indices, IPv4 then IPv6


def _sort_key(policy: Policy) -> tuple[int, str, int]:
    kind = policy.origin.kind if policy.origin else ""
    return (policy.priority, policy.name, KIND_ORDER.get(kind, 2))


def namespace_origin(compiler: Compiler, name: str) -> Origin | None:
    """Where the namespace ``name`` was defined (None for one only endpoints name)."""
    return compiler.namespaces[compiler.namespace_index[name]].origin


def _first_of_family(addresses: Iterable[IPAddress], version: int) -> IPAddress | None:
    for address in addresses:
        if address.version == version:
            return address
    return None


class Compiler:
    """One compilation: the classifier plus what ``explain`` needs to say why."""

    def __init__(self, policy_set: PolicySet, local_node: str | None = None) -> None:
        self.policy_set = policy_set
        self.local_node = local_node
        inventory = policy_set.inventory
        self.inventory = inventory
        self._index_inventory(inventory)
        if local_node is not None and local_node not in self.node_index:
            raise PolicyError(
                f"local node {local_node!r} is not in the inventory: expected one of "
                f"{', '.join(sorted(self.node_index)) or '(no nodes)'}"
            )
        self._selector_cache: dict[tuple[str, Selector], Bitset] = {}
        self.units: list[Unit] = []
        self.rules: list[CompiledRule] = []
        self.gateways: list[Gateway] = []
        self._gateway_index: dict[tuple[str, IPAddress], int] = {}
        self._resolved: dict[tuple[GatewaySpec, str | None], tuple[list[int], list[int]]] = {}
        self._build_units(policy_set.policies)
        self._build_rules()
        self.classifier = self._build_classifier()

    # -- inventory ------------------------------------------------------------------

    def _index_inventory(self, inventory: Inventory) -> None:
        namespaces = {ns.name: ns for ns in inventory.namespaces}
        for endpoint in inventory.endpoints:
            namespaces.setdefault(endpoint.namespace, Namespace(endpoint.namespace))
        self.namespaces: list[Namespace] = list(namespaces.values())
        self.namespace_index = {ns.name: i for i, ns in enumerate(self.namespaces)}

        nodes = {node.name: node for node in inventory.nodes}
        self.listed_nodes = set(nodes)
        for endpoint in inventory.endpoints:
            nodes.setdefault(endpoint.node, Node(endpoint.node))
        self.nodes: list[Node] = list(nodes.values())
        self.node_index = {node.name: i for i, node in enumerate(self.nodes)}

        self.endpoints: list[Endpoint] = list(inventory.endpoints)
        owners: dict[IPAddress, Endpoint] = {}
        for endpoint in self.endpoints:
            for address in endpoint.ips:
                other = owners.setdefault(address, endpoint)
                if other is not endpoint:
                    raise PolicyError(
                        f"IP {address} belongs to endpoints {other.key} and {endpoint.key}: "
                        "expected each IP on one endpoint (a source must name one pod)",
                        source=endpoint.origin.source if endpoint.origin else "",
                        document=endpoint.origin.document if endpoint.origin else "",
                    )
        self.endpoint_namespace = array("I", (self.namespace_index[e.namespace] for e in self.endpoints))
        self.endpoint_node = array("I", (self.node_index[e.node] for e in self.endpoints))
        self.pod_index = LabelIndex(
            [Inventory.pod_labels(e, namespaces[e.namespace]) for e in self.endpoints]
        )
        self.namespace_label_index = LabelIndex([Inventory.namespace_labels(ns) for ns in self.namespaces])
        self.node_label_index = LabelIndex([Inventory.node_labels(node) for node in self.nodes])

    def _evaluate(self, domain: str, selector: Selector) -> Bitset:
        key = (domain, selector)
        cached = self._selector_cache.get(key)
        if cached is None:
            index = {
                "pod": self.pod_index,
                "namespace": self.namespace_label_index,
                "node": self.node_label_index,
            }[domain]
            cached = index.evaluate(selector_program(index, selector))
            self._selector_cache[key] = cached
        return cached

    def pods_selected(self, selector: Selector | None, domain: str) -> Bitset:
        """The endpoints a selector over pods, their namespaces or their nodes selects."""
        if selector is None:
            selector = MATCH_ALL
        result = self._evaluate(domain, selector)
        if domain == "namespace":
            return result.expand(self.endpoint_namespace)
        if domain == "node":
            return result.expand(self.endpoint_node)
        return result

    def term_members(self, term: SourceTerm) -> Bitset:
        members = self.pods_selected(term.pods, "pod")
        if term.namespaces is not None:
            members = members & self.pods_selected(term.namespaces, "namespace")
        if term.nodes is not None:
            members = members & self.pods_selected(term.nodes, "node")
        return members

    # -- Calico annotations ---------------------------------------------------------

    def calico_choice(self, endpoint: Endpoint) -> tuple[str, ...] | None:
        """The endpoint's effective Calico egress annotation: ``("policy", name)``,
        ``("selector", origin)`` (origin: the pod's name, or ``*`` for its
        namespace's annotations) or None. The policy
        annotation (pod, then namespace) comes before the selector annotations (pod,
        then namespace)."""
        namespace = self.namespaces[self.namespace_index[endpoint.namespace]]
        for notes in (endpoint.annotations, namespace.annotations):
            name = notes.get(CALICO_POLICY_ANNOTATION)
            if name:
                return ("policy", name)
        for notes, origin in ((endpoint.annotations, endpoint.name), (namespace.annotations, "*")):
            if CALICO_SELECTOR_ANNOTATION in notes or CALICO_NAMESPACE_SELECTOR_ANNOTATION in notes:
                return ("selector", origin)
        return None

    def _annotation_policies(self) -> tuple[dict[str, list[int]], list[tuple[Policy, list[int]]]]:
        by_policy: dict[str, list[int]] = {}
        implicit: dict[tuple[str, str], tuple[Policy, list[int]]] = {}
        for e, endpoint in enumerate(self.endpoints):
            choice = self.calico_choice(endpoint)
            if choice is None:
                continue
            if choice[0] == "policy":
                by_policy.setdefault(choice[1], []).append(e)
                continue
            origin = choice[1]
            key = (endpoint.namespace, origin)
            if key not in implicit:
                holder = (
                    endpoint if origin != "*" else self.namespaces[self.namespace_index[endpoint.namespace]]
                )
                pods, namespaces = calico_annotation_selectors(holder.annotations)
                gateway = GatewaySpec(
                    path=f"annotations[{CALICO_SELECTOR_ANNOTATION!r}]",
                    pod_selector=MATCH_ALL if pods is None else pods,
                    namespace_selector=namespaces,
                )
                name = f"calico-annotations:{endpoint.namespace}/{origin}"
                where = endpoint.origin if origin != "*" else namespace_origin(self, endpoint.namespace)
                policy = Policy(
                    name=name,
                    selection=(),
                    rules=(Rule(destinations=(_ALL_V4, _ALL_V6), gateways=(gateway,), path="annotations"),),
                    origin=Origin(
                        source=where.source if where else "",
                        document=where.document if where else "",
                        kind=IMPLICIT_KIND,
                        name=name,
                    ),
                )
                implicit[key] = (policy, [])
            implicit[key][1].append(e)
        return by_policy, list(implicit.values())

    # -- units ----------------------------------------------------------------------

    def _build_units(self, policies: Iterable[Policy]) -> None:
        annotated, implicit = self._annotation_policies()
        count = len(self.endpoints)
        candidates: list[tuple[Policy, Bitset]] = []
        for policy in policies:
            if isinstance(policy.selection, AnnotationSelection):
                members = Bitset.from_indices(count, annotated.get(policy.selection.policy_name, ()))
            else:
                members = Bitset.from_indices(count, ())
                for term in policy.selection:
                    members = members | self.term_members(term)
            candidates.append((policy, members))
        for policy, indices in implicit:
            candidates.append((policy, Bitset.from_indices(count, indices)))
        loaded = {
            p.selection.policy_name for p, _ in candidates if isinstance(p.selection, AnnotationSelection)
        }
        for name in sorted(set(annotated) - loaded):
            # Fail closed: a pod told to use a policy that does not exist (a typo, or a
            # policy not applied yet) is selected with no gateway, so its traffic is
            # dropped rather than sent out with the node's IP.
            missing = Policy(
                name=f"calico-missing-policy:{name}",
                selection=(),
                rules=(Rule(destinations=(_ALL_V4, _ALL_V6), gateways=(), path="annotations"),),
                origin=Origin(source="", document="", kind=IMPLICIT_KIND, name=name),
            )
            candidates.append((missing, Bitset.from_indices(count, annotated[name])))
        candidates.sort(key=lambda item: _sort_key(item[0]))
        for policy, members in candidates:
            needs_namespace = any(
                spec.selects_pods and spec.namespace_selector is None
                for rule in policy.rules
                for spec in rule.gateways
            )
            if not needs_namespace:
                self.units.append(Unit(policy, members))
                continue
            by_namespace: dict[str, list[int]] = {}
            for e in members:
                by_namespace.setdefault(self.endpoints[e].namespace, []).append(e)
            for namespace in sorted(by_namespace):
                self.units.append(
                    Unit(policy, Bitset.from_indices(count, by_namespace[namespace]), namespace)
                )
        for unit in self.units:
            unit.members = self._without_own_gateways(unit)

    def _without_own_gateways(self, unit: Unit) -> Bitset:
        """The unit's members less the pods its redirect rules use as gateway pods: a
        gateway pod's own traffic (which carries the egress IP already) must not be
        sent through gateways again, or two gateways would forward to each other."""
        gateways: Bitset | None = None
        for rule in unit.policy.rules:
            if rule.action is not RuleAction.REDIRECT:
                continue
            for spec in rule.gateways:
                if spec.selects_pods:
                    pods = self.gateway_pods(spec, unit.namespace)
                    gateways = pods if gateways is None else gateways | pods
        if gateways is None or not len(gateways):
            return unit.members
        return Bitset.from_indices(len(self.endpoints), [e for e in unit.members if e not in gateways])

    # -- gateways -------------------------------------------------------------------

    def _gateway(self, node: str, egress_ip: IPAddress) -> int:
        key = (node, egress_ip)
        index = self._gateway_index.get(key)
        if index is None:
            index = len(self.gateways)
            self._gateway_index[key] = index
            self.gateways.append(Gateway(node, egress_ip))
        return index

    def gateway_pods(self, spec: GatewaySpec, client_namespace: str | None) -> Bitset:
        """The endpoints a pod-gateway entry selects for clients in ``client_namespace``
        (Calico: the client's own namespace when the entry has no namespace selector)."""
        assert spec.pod_selector is not None
        pods = self.pods_selected(spec.pod_selector, "pod")
        if spec.namespace_selector is not None:
            return pods & self.pods_selected(spec.namespace_selector, "namespace")
        return Bitset.from_indices(
            len(self.endpoints), [e for e in pods if self.endpoints[e].namespace == client_namespace]
        )

    def resolve(self, spec: GatewaySpec, client_namespace: str | None) -> tuple[list[int], list[int]]:
        """Gateway indices for IPv4 and IPv6 of one gateway entry."""
        key = (spec, client_namespace)
        cached = self._resolved.get(key)
        if cached is not None:
            return cached
        found: list[tuple[str, IPAddress]] = []
        if spec.selects_pods:
            for e in self.gateway_pods(spec, client_namespace):
                endpoint = self.endpoints[e]
                found.extend((endpoint.node, ip) for ip in endpoint.ips)
        elif spec.node_selector is not None:
            selected = self._evaluate("node", spec.node_selector)
            names = sorted(self.nodes[i].name for i in selected if self.nodes[i].name in self.listed_nodes)
            if spec.first_node_only:
                names = names[:1]
            for name in names:
                node = self.nodes[self.node_index[name]]
                for version in (4, 6):
                    ip: IPAddress | None
                    if spec.egress_ips:
                        ip = _first_of_family(spec.egress_ips, version)
                    elif spec.interface is not None:
                        ip = _first_of_family(node.interfaces.get(spec.interface, ()), version)
                    else:
                        ip = _first_of_family(node.addresses, version)
                    if ip is not None:
                        found.append((name, ip))
        result = (
            [self._gateway(n, ip) for n, ip in sorted({(n, ip) for n, ip in found if ip.version == 4})],
            [self._gateway(n, ip) for n, ip in sorted({(n, ip) for n, ip in found if ip.version == 6})],
        )
        self._resolved[key] = result
        return result

    def _build_rules(self) -> None:
        for u, unit in enumerate(self.units):
            for rule in unit.policy.rules:
                v4: list[int] = []
                v6: list[int] = []
                if rule.action is RuleAction.REDIRECT:
                    for spec in rule.gateways:
                        four, six = self.resolve(spec, unit.namespace)
                        v4.extend(four)
                        v6.extend(six)
                unit.rule_indices.append(len(self.rules))
                self.rules.append(CompiledRule(u, rule, (self._usable(v4), self._usable(v6))))

    def _usable(self, indices: list[int]) -> tuple[int, ...]:
        """One rule's gateways in (node, egress IP) order, each once. An egress IP that
        several nodes would carry (egressIPs on a nodeSelector matching several nodes)
        stays with the first of them by name: replies to it can reach only one node."""
        usable: list[int] = []
        taken: set[IPAddress] = set()
        for g in sorted(set(indices), key=lambda g: (self.gateways[g].node, self.gateways[g].egress_ip)):
            if self.gateways[g].egress_ip not in taken:
                taken.add(self.gateways[g].egress_ip)
                usable.append(g)
        return tuple(usable)

    # -- destinations ---------------------------------------------------------------

    def internal_destinations(self) -> list[IPNetwork | IPAddress]:
        """The cluster-internal destinations: ClusterNetwork CIDRs, node addresses
        and endpoint IPs."""
        inventory = self.inventory
        internal: list[IPNetwork | IPAddress] = list(inventory.network.cidrs)
        for node in inventory.nodes:
            internal.extend(node.addresses)
        for endpoint in inventory.endpoints:
            internal.extend(endpoint.ips)
        return internal

    def _build_classifier(self) -> Classifier:
        # Destinations in precedence order: units are sorted by (priority, name,
        # kind), and within a unit its excluded CIDRs come before its rules. The
        # core sorts them by prefix, keeping this order among equal prefixes.
        destinations: list[tuple[IPNetwork, int, int]] = []
        for u, unit in enumerate(self.units):
            destinations.extend((network, u, -1) for network in unit.policy.excluded)
            for rule, index in zip(unit.policy.rules, unit.rule_indices, strict=True):
                destinations.extend((network, u, index) for network in rule.destinations)
        addresses = [(ip, e) for e, endpoint in enumerate(self.endpoints) for ip in endpoint.ips]
        members = [unit.members for unit in self.units]
        names = [unit.policy.name for unit in self.units]
        rules = [
            (
                _RULE_ACTIONS[compiled.rule.action],
                compiled.rule.prefer_node_local,
                compiled.rule.max_gateways,
                list(compiled.gateways[0]),
                list(compiled.gateways[1]),
            )
            for compiled in self.rules
        ]
        local = self.local_node
        gateways = [
            (gateway_id(g.node, g.egress_ip), self.node_index.get(g.node, NO_INDEX), g.node == local, g)
            for g in self.gateways
        ]
        return Classifier._build(
            addresses,
            self.endpoint_node,
            names,
            members,
            destinations,
            self.internal_destinations(),
            rules,
            gateways,
        )


def compile_policies(policy_set: PolicySet, local_node: str | None = None) -> Classifier:
    """Compile ``policy_set`` for the node ``local_node`` (decisions whose gateway is
    that node are SNAT; with None, every gateway decision is REDIRECT)."""
    return Compiler(policy_set, local_node).classifier
