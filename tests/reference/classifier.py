"""A plain-Python oracle for the compiled classifier (``egresscore.policy.compiler``).

This is docs/policy.md "The decision" and "Choosing a gateway" written out in Python,
step by step, with dicts, sets, ``ipaddress`` and ``hashlib``; the compiled
``Classifier`` is tested against it, and the benchmarks use it as the pure-Python
baseline, so it does the obvious work but not absurd work:

- at construction: the endpoints by IP (a dict), the cluster-internal destinations
  (a dict per prefix length of masked networks), the policies that select each
  endpoint (a set per endpoint, from :func:`reference.selectors.evaluate`, run on the
  pods that carry a label value the selector requires), and the
  candidates of each destination prefix (a dict per prefix length, each list already
  in the order of docs/policy.md, so the first candidate whose policy selects the
  source wins);
- per packet: one dict lookup for the source, one masked lookup per prefix length for
  the destination (longest first), then the gateway choice with the exact ``score``.

:meth:`ReferenceClassifier.candidates` is the same step 3 and 4 by a linear scan over
every policy with ``ipaddress`` containment and one ``sorted``; the tests check that
the indexed path agrees with it.

Calico's annotations become implicit policies here, as docs/policy.md says
("Each distinct effective choice becomes one implicit policy named
``calico-annotations:<namespace>/<pod or *>``"): see :func:`effective_annotation`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    Policy,
    PolicySet,
    Rule,
    RuleAction,
)
from egresscore.policy.selector import And, LabelIn, Or, Selector

from .selectors import evaluate

__all__ = [
    "ACTIONS",
    "IMPLICIT_KIND",
    "KIND_ORDER",
    "REASONS",
    "AnnotationChoice",
    "Candidate",
    "ReferenceClassifier",
    "ReferenceDecision",
    "ReferenceGateway",
    "address_words",
    "effective_annotation",
    "gateway_id",
    "mix64",
    "score",
]

#: The decision's actions and reasons, as the lower-case names of the compiled
#: ``Action`` and ``Reason`` enums.
ACTIONS = ("pass", "redirect", "snat", "drop")
REASONS = (
    "not_an_endpoint",
    "cluster_internal",
    "no_policy",
    "excluded",
    "rule_pass",
    "rule_drop",
    "no_gateway",
    "gateway",
)

#: docs/policy.md, "Order" 3: after the name, the kind, in this order; implicit
#: annotation policies come last.
KIND_ORDER = {"CiliumEgressGatewayPolicy": 0, "EgressGatewayPolicy": 1, "EgressPolicy": 2}
IMPLICIT_KIND = "calico-annotations"
IMPLICIT_PREFIX = "calico-annotations:"
MISSING_POLICY_PREFIX = "calico-missing-policy:"

_MASK64 = (1 << 64) - 1
_BITS = {4: 32, 6: 128}
_EVERYTHING = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


# --- The score (docs/policy.md, "Choosing a gateway") -----------------------------------


def mix64(x: int) -> int:
    """splitmix64's finaliser, mod 2^64, exactly as docs/policy.md writes it."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x


def address_words(address: IPAddress) -> tuple[int, int]:
    """``words(a)``: IPv4 ``[0, a]``; IPv6 the two big-endian halves of its 16 bytes."""
    packed = address.packed
    if len(packed) == 4:
        return 0, int.from_bytes(packed, "big")
    return int.from_bytes(packed[:8], "big"), int.from_bytes(packed[8:], "big")


def gateway_id(node: str, egress_ip: IPAddress) -> int:
    """``id(g)``: the 8-byte BLAKE2b of ``"<node>/<egress IP>"``, read little-endian.

    The egress IP is written as ``str()`` writes it (RFC 5952 for IPv6)."""
    digest = hashlib.blake2b(f"{node}/{egress_ip}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def score(addresses: Sequence[IPAddress], node: str, egress_ip: IPAddress) -> int:
    """``score(addresses, g)`` for the gateway (``node``, ``egress_ip``)."""
    h = gateway_id(node, egress_ip)
    for address in addresses:
        for word in address_words(address):
            h = mix64(h ^ word)
    return h


def _score_words(gid: int, words: Iterable[int]) -> int:
    h = gid
    for word in words:
        h = mix64(h ^ word)
    return h


def _int_words(version: int, value: int) -> tuple[int, int]:
    if version == 4:
        return 0, value
    return value >> 64, value & _MASK64


# --- Values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferenceDecision:
    """The answer for one packet, in plain values.

    ``action`` is one of :data:`ACTIONS`, ``reason`` one of :data:`REASONS`;
    ``policy`` is the deciding policy's name (None for not_an_endpoint,
    cluster_internal and no_policy); ``gateway_node`` and ``egress_ip`` (as text) are
    set for redirect and snat."""

    action: str
    reason: str
    policy: str | None = None
    gateway_node: str | None = None
    egress_ip: str | None = None


@dataclass(frozen=True, slots=True, order=True)
class ReferenceGateway:
    """A usable gateway of one family. Ordered by (node name, egress IP), the order of
    docs/policy.md (egress IPs of one family compare as numbers)."""

    node: str
    egress_ip: IPAddress
    gid: int = field(compare=False)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (policy, prefix) pair of step 3. ``rule`` is None for an excluded CIDR."""

    prefix: IPNetwork
    policy: str
    rule: int | None
    sort_key: tuple[Any, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class AnnotationChoice:
    """A pod's effective Calico annotation choice.

    Either ``policy_name`` (the effective ``egressGatewayPolicy``), or the selector
    annotations (``selector``, ``namespace_selector``: their text, None when absent),
    read from the pod itself (``from_pod``) or from its namespace."""

    policy_name: str | None
    selector: str | None = None
    namespace_selector: str | None = None
    from_pod: bool = False


def effective_annotation(endpoint: Endpoint, namespace: Namespace) -> AnnotationChoice | None:
    """The Calico annotation choice in force for ``endpoint`` (None: no annotation).

    docs/policy.md: "The ``egressGatewayPolicy`` annotation, when present on the pod or
    its namespace, takes precedence over the selector annotations; a pod's own
    annotations take precedence over its namespace's." Read literally:

    1. ``egressGatewayPolicy`` on the pod, else on its namespace: that policy, and the
       selector annotations are ignored wherever they are;
    2. else the pod's selector annotations if it has either of them (both are then
       taken from the pod: the pair is one choice), else the namespace's.

    Empty values, where docs/policy.md says nothing, are read as Calico (Go, where a
    missing map key reads as "") reads them, and as
    ``egresscore.policy.loader.calico_annotation_selectors`` documents: an empty
    ``egressGatewayPolicy`` is no annotation; an empty (or blank) ``namespaceSelector``
    is the client's own namespace (``namespace_selector`` None); an empty ``selector``
    is ``all()``, as every empty Calico expression.
    """
    pod, space = endpoint.annotations, namespace.annotations
    if pod.get(CALICO_POLICY_ANNOTATION):
        return AnnotationChoice(policy_name=pod[CALICO_POLICY_ANNOTATION], from_pod=True)
    if space.get(CALICO_POLICY_ANNOTATION):
        return AnnotationChoice(policy_name=space[CALICO_POLICY_ANNOTATION])
    for source, from_pod in ((pod, True), (space, False)):
        if CALICO_SELECTOR_ANNOTATION in source or CALICO_NAMESPACE_SELECTOR_ANNOTATION in source:
            namespace_selector = source.get(CALICO_NAMESPACE_SELECTOR_ANNOTATION)
            return AnnotationChoice(
                policy_name=None,
                selector=source.get(CALICO_SELECTOR_ANNOTATION),
                namespace_selector=namespace_selector
                if namespace_selector and namespace_selector.strip()
                else None,
                from_pod=from_pod,
            )
    return None


def _parse_calico(text: str, path: str) -> Selector:
    # Imported here: the Calico parser is its own module, and only annotation policies
    # need it.
    from egresscore.policy.calico_selector import SelectorSyntaxError, parse_calico_selector

    try:
        return parse_calico_selector(text)
    except SelectorSyntaxError as error:
        raise ValueError(f"{path}: {error}") from error


def _to_address(value: object) -> IPAddress:
    """Text, an ``ipaddress`` address, packed bytes, or an int (an IPv4 address)."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if isinstance(value, int):
        return ipaddress.IPv4Address(value)
    if isinstance(value, str | bytes):
        return ipaddress.ip_address(value)
    raise TypeError(f"not an address: {value!r}")


# --- The classifier -------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A policy as the classifier sees it: the model policy (or an implicit one), its
    precedence after the prefix, and the endpoints it selects (indices)."""

    position: int
    policy: Policy
    kind_rank: int
    selected: frozenset[int]

    @property
    def name(self) -> str:
        return self.policy.name

    def precedence(self) -> tuple[int, str, int, int]:
        """docs/policy.md "Order" 2 and 3: priority, name, kind; then the position in
        the policy set, so that even duplicate names order deterministically."""
        return self.policy.priority, self.policy.name, self.kind_rank, self.position


class ReferenceClassifier:
    """``classify(src, dst)`` as docs/policy.md defines it, in plain Python.

    ``local_node`` is the node the classifier answers for: a chosen gateway on it
    gives ``snat``, any other ``redirect``."""

    def __init__(self, policy_set: PolicySet, local_node: str | None = None) -> None:
        self.policy_set = policy_set
        self.local_node = local_node
        inventory = policy_set.inventory
        self.inventory = inventory
        self.endpoints: tuple[Endpoint, ...] = inventory.endpoints

        # Labels as the selectors see them (model.Inventory adds the automatic ones).
        self._namespaces = {namespace.name: namespace for namespace in inventory.namespaces}
        self._nodes = {node.name: node for node in inventory.nodes}
        self._endpoint_namespace = [self._namespace(ep.namespace) for ep in self.endpoints]
        self._pod_labels = [
            Inventory.pod_labels(ep, namespace)
            for ep, namespace in zip(self.endpoints, self._endpoint_namespace, strict=True)
        ]
        self._namespace_labels = {
            ns.name: Inventory.namespace_labels(ns) for ns in self._endpoint_namespace
        } | {ns.name: Inventory.namespace_labels(ns) for ns in inventory.namespaces}
        self._pods_by_label: dict[tuple[str, str], list[int]] = {}
        for index, pod_labels in enumerate(self._pod_labels):
            for pair in pod_labels.items():
                self._pods_by_label.setdefault(pair, []).append(index)
        self._node_labels = {
            name: Inventory.node_labels(self._nodes.get(name) or Node(name))
            for name in {ep.node for ep in self.endpoints} | set(self._nodes)
        }

        # Step 1: endpoints by IP. An IP belongs to at most one endpoint; the first wins.
        self._endpoint_by_ip: dict[tuple[int, int], int] = {}
        for index, endpoint in enumerate(self.endpoints):
            for ip in endpoint.ips:
                self._endpoint_by_ip.setdefault((ip.version, int(ip)), index)

        # Step 2: cluster-internal destinations.
        internal: list[IPNetwork] = list(inventory.network.cidrs)
        for node in inventory.nodes:
            internal.extend(ipaddress.ip_network(address) for address in node.addresses)
        for endpoint in self.endpoints:
            internal.extend(ipaddress.ip_network(ip) for ip in endpoint.ips)
        self._internal = self._index_networks((network, True) for network in internal)

        # Step 3: the policies, explicit and implicit, and whom they select.
        self.entries: list[_Entry] = []
        for policy in policy_set.policies:
            selected = self._without_own_gateways(policy, self._select(policy))
            self.entries.append(_Entry(len(self.entries), policy, self._kind_rank(policy), selected))
        self.entries.extend(self._implicit_entries())
        self.entries.extend(self._missing_policy_entries())
        self._entries_of_endpoint: list[set[int]] = [set() for _ in self.endpoints]
        for entry in self.entries:
            for index in entry.selected:
                self._entries_of_endpoint[index].add(entry.position)

        # Steps 3 and 4: per prefix, its candidates in precedence order.
        unsorted: dict[int, dict[int, dict[int, list[tuple[tuple[Any, ...], int, int | None]]]]] = {
            4: {},
            6: {},
        }
        for entry in self.entries:
            for network, rule_index in self._prefixes(entry.policy):
                # "within one policy and one prefix, an excluded CIDR before a rule"
                key = (*entry.precedence(), 0 if rule_index is None else 1, rule_index or 0)
                by_length = unsorted[network.version].setdefault(network.prefixlen, {})
                by_length.setdefault(int(network.network_address), []).append(
                    (key, entry.position, rule_index)
                )
        self._candidates: dict[int, list[tuple[int, int, dict[int, list[tuple[int, int | None]]]]]] = {}
        for version, lengths in unsorted.items():
            self._candidates[version] = [
                (
                    length,
                    _mask(version, length),
                    {
                        network: [(position, rule) for _, position, rule in sorted(found)]
                        for network, found in networks.items()
                    },
                )
                for length, networks in sorted(lengths.items(), reverse=True)
            ]

        self._gateway_cache: dict[tuple[int, int, int, str], list[ReferenceGateway]] = {}
        self._gid_cache: dict[tuple[str, IPAddress], int] = {}

    # -- construction helpers ----------------------------------------------------------

    def _namespace(self, name: str) -> Namespace:
        # "An endpoint may name a namespace or node that is not listed; it then has only
        # the automatic labels for it."
        return self._namespaces.get(name) or Namespace(name)

    @staticmethod
    def _kind_rank(policy: Policy) -> int:
        kind = policy.origin.kind if policy.origin is not None else ""
        if kind in KIND_ORDER:
            return KIND_ORDER[kind]
        # A model policy built without an origin: annotation-selected ones are Calico's,
        # the rest are read as native.
        if isinstance(policy.selection, AnnotationSelection):
            return KIND_ORDER["EgressGatewayPolicy"]
        return KIND_ORDER["EgressPolicy"]

    def _select(self, policy: Policy) -> frozenset[int]:
        """The endpoints ``policy`` selects (indices into ``self.endpoints``)."""
        selected: set[int] = set()
        if isinstance(policy.selection, AnnotationSelection):
            for index, endpoint in enumerate(self.endpoints):
                choice = effective_annotation(endpoint, self._endpoint_namespace[index])
                if choice is not None and choice.policy_name == policy.selection.policy_name:
                    selected.add(index)
            return frozenset(selected)
        # "a pod is selected when it matches every part of at least one entry"; a
        # missing part does not restrict.
        for term in policy.selection:
            for index in self._pods_worth_evaluating(term.pods):
                endpoint = self.endpoints[index]
                if term.pods is not None and not evaluate(term.pods, self._pod_labels[index]):
                    continue
                if term.namespaces is not None and not evaluate(
                    term.namespaces, self._namespace_labels[endpoint.namespace]
                ):
                    continue
                if term.nodes is not None and not evaluate(term.nodes, self._node_labels[endpoint.node]):
                    continue
                selected.add(index)
        return frozenset(selected)

    def _pods_worth_evaluating(self, selector: Selector | None) -> Iterable[int]:
        """The endpoints that can match ``selector``: all of them, or, when the
        selector requires some label values, those that have one.

        Only a speed-up (every endpoint returned is still evaluated in full): a
        ``LabelIn`` matches only pods with one of its (key, value) pairs, an ``And``
        only pods that one of its operands can match, an ``Or`` only pods that one of
        them can match."""
        possible = None if selector is None else self._possible(selector)
        return range(len(self.endpoints)) if possible is None else sorted(possible)

    def _possible(self, selector: Selector) -> set[int] | None:
        if isinstance(selector, LabelIn):
            return {
                i for value in selector.values for i in self._pods_by_label.get((selector.key, value), ())
            }
        if isinstance(selector, And):
            for operand in selector.operands:
                possible = self._possible(operand)
                if possible is not None:
                    return possible
            return None
        if isinstance(selector, Or):
            union: set[int] = set()
            for operand in selector.operands:
                possible = self._possible(operand)
                if possible is None:
                    return None
                union |= possible
            return union
        return None

    def _implicit_entries(self) -> list[_Entry]:
        """One implicit policy per distinct effective selector-annotation choice: every
        non-internal destination of both families, through the gateway pods selected."""
        members: dict[str, list[int]] = {}
        choices: dict[str, tuple[AnnotationChoice, str]] = {}
        for index, endpoint in enumerate(self.endpoints):
            choice = effective_annotation(endpoint, self._endpoint_namespace[index])
            if choice is None or choice.policy_name is not None:
                continue
            owner = endpoint.name if choice.from_pod else "*"
            name = f"{IMPLICIT_PREFIX}{endpoint.namespace}/{owner}"
            members.setdefault(name, []).append(index)
            where = (
                f"pod {endpoint.key}" if choice.from_pod else f"namespace {endpoint.namespace}"
            ) + " metadata.annotations"
            choices[name] = (choice, where)
        entries: list[_Entry] = []
        for name in sorted(members):
            choice, where = choices[name]
            pods = _parse_calico(choice.selector or "", f'{where}["{CALICO_SELECTOR_ANNOTATION}"]')
            namespaces = (
                None
                if choice.namespace_selector is None
                else _parse_calico(
                    choice.namespace_selector, f'{where}["{CALICO_NAMESPACE_SELECTOR_ANNOTATION}"]'
                )
            )
            rule = Rule(
                destinations=_EVERYTHING,
                action=RuleAction.REDIRECT,
                gateways=(GatewaySpec(pod_selector=pods, namespace_selector=namespaces),),
            )
            policy = Policy(name=name, selection=(), rules=(rule,))
            selected = self._without_own_gateways(policy, frozenset(members[name]))
            entries.append(_Entry(len(self.entries) + len(entries), policy, len(KIND_ORDER), selected))
        return entries

    def _missing_policy_entries(self) -> list[_Entry]:
        """docs/policy.md: a pod whose effective egressGatewayPolicy annotation names no
        loaded EgressGatewayPolicy is selected, with no gateway: its traffic to every
        non-internal destination is dropped, never sent with the node's IP."""
        loaded = {
            policy.selection.policy_name
            for policy in self.policy_set.policies
            if isinstance(policy.selection, AnnotationSelection)
        }
        members: dict[str, list[int]] = {}
        for index, endpoint in enumerate(self.endpoints):
            choice = effective_annotation(endpoint, self._endpoint_namespace[index])
            if choice is not None and choice.policy_name is not None and choice.policy_name not in loaded:
                members.setdefault(choice.policy_name, []).append(index)
        entries: list[_Entry] = []
        for name in sorted(members):
            rule = Rule(destinations=_EVERYTHING, action=RuleAction.REDIRECT, gateways=())
            policy = Policy(name=f"{MISSING_POLICY_PREFIX}{name}", selection=(), rules=(rule,))
            position = len(self.entries) + len(entries)
            entries.append(_Entry(position, policy, len(KIND_ORDER), frozenset(members[name])))
        return entries

    def _without_own_gateways(self, policy: Policy, selected: frozenset[int]) -> frozenset[int]:
        """docs/policy.md: a pod that one of the policy's redirect rules would use as a
        gateway pod (for itself as the client) is not selected by that policy."""
        specs = [
            spec
            for rule in policy.rules
            if rule.action is RuleAction.REDIRECT
            for spec in rule.gateways
            if spec.pod_selector is not None
        ]
        if not specs:
            return selected
        kept = set()
        for index in selected:
            endpoint = self.endpoints[index]
            own_gateway = any(
                evaluate(spec.pod_selector, self._pod_labels[index])  # type: ignore[arg-type]
                and (
                    spec.namespace_selector is None
                    or evaluate(spec.namespace_selector, self._namespace_labels[endpoint.namespace])
                )
                for spec in specs
            )
            if not own_gateway:
                kept.add(index)
        return frozenset(kept)

    @staticmethod
    def _prefixes(policy: Policy) -> list[tuple[IPNetwork, int | None]]:
        """Every (prefix, rule index or None for excluded) of ``policy``."""
        found: list[tuple[IPNetwork, int | None]] = [(network, None) for network in policy.excluded]
        for rule_index, rule in enumerate(policy.rules):
            found.extend((network, rule_index) for network in rule.destinations)
        return found

    @staticmethod
    def _index_networks(
        networks: Iterable[tuple[IPNetwork, bool]],
    ) -> dict[int, list[tuple[int, dict[int, bool]]]]:
        by_version: dict[int, dict[int, dict[int, bool]]] = {4: {}, 6: {}}
        for network, value in networks:
            lengths = by_version[network.version]
            lengths.setdefault(network.prefixlen, {})[int(network.network_address)] = value
        return {
            version: [
                (_mask(version, length), networks)
                for length, networks in sorted(lengths.items(), reverse=True)
            ]
            for version, lengths in by_version.items()
        }

    # -- the decision ------------------------------------------------------------------

    def classify(self, src: object, dst: object) -> ReferenceDecision:
        """The decision for a packet from ``src`` to ``dst`` (text, ``ipaddress``
        objects, packed bytes, or ints meaning IPv4), both of one family."""
        source, destination = _to_address(src), _to_address(dst)
        if source.version != destination.version:
            raise ValueError(f"source {src!r} and destination {dst!r} are of different families")
        return self._decide(source.version, int(source), int(destination))

    def classify_many(self, pairs: Sequence[int] | array[int]) -> list[ReferenceDecision]:
        """Decisions for interleaved host-order IPv4 (src, dst) pairs (``array('I')``)."""
        decide = self._decide
        return [decide(4, pairs[i], pairs[i + 1]) for i in range(0, len(pairs) - 1, 2)]

    def is_internal(self, destination: object) -> bool:
        """Step 2: whether ``destination`` is cluster-internal."""
        address = _to_address(destination)
        return self._is_internal(address.version, int(address))

    def _is_internal(self, version: int, value: int) -> bool:
        return any(value & mask in networks for mask, networks in self._internal[version])

    def _decide(self, version: int, src: int, dst: int) -> ReferenceDecision:
        # 1. Source.
        endpoint_index = self._endpoint_by_ip.get((version, src))
        if endpoint_index is None:
            return ReferenceDecision("pass", "not_an_endpoint")
        # 2. Cluster-internal destinations.
        if self._is_internal(version, dst):
            return ReferenceDecision("pass", "cluster_internal")
        # 3 and 4. The first candidate, longest prefix first, whose policy selects the source.
        selecting = self._entries_of_endpoint[endpoint_index]
        winner: tuple[int, int | None] | None = None
        if selecting:
            for _, mask, networks in self._candidates[version]:
                for position, rule_index in networks.get(dst & mask, ()):
                    if position in selecting:
                        winner = (position, rule_index)
                        break
                if winner is not None:
                    break
        if winner is None:
            return ReferenceDecision("pass", "no_policy")
        # 5. Action of the winner.
        entry = self.entries[winner[0]]
        if winner[1] is None:
            return ReferenceDecision("pass", "excluded", entry.name)
        rule = entry.policy.rules[winner[1]]
        if rule.action is RuleAction.PASS:
            return ReferenceDecision("pass", "rule_pass", entry.name)
        if rule.action is RuleAction.DROP:
            return ReferenceDecision("drop", "rule_drop", entry.name)
        gateway = self._choose_gateway(entry, winner[1], version, endpoint_index, src, dst)
        if gateway is None:
            return ReferenceDecision("drop", "no_gateway", entry.name)
        action = "snat" if gateway.node == self.local_node else "redirect"
        return ReferenceDecision(action, "gateway", entry.name, gateway.node, str(gateway.egress_ip))

    def candidates(self, src: object, dst: object) -> list[Candidate]:
        """Steps 3 and 4 by a linear scan: every (policy, prefix) that selects ``src``
        and contains ``dst``, in precedence order (the first decides). Empty when
        ``src`` is not an endpoint. Internal destinations are not filtered out."""
        source, destination = _to_address(src), _to_address(dst)
        endpoint_index = self._endpoint_by_ip.get((source.version, int(source)))
        if endpoint_index is None:
            return []
        found = []
        for entry in self.entries:
            if endpoint_index not in entry.selected:
                continue
            for network, rule_index in self._prefixes(entry.policy):
                if network.version == destination.version and destination in network:
                    key = (
                        -network.prefixlen,
                        *entry.precedence(),
                        0 if rule_index is None else 1,
                        rule_index or 0,
                    )
                    found.append(Candidate(network, entry.name, rule_index, key))
        return sorted(found, key=lambda candidate: candidate.sort_key)

    # -- gateways ----------------------------------------------------------------------

    def usable_gateways(
        self, policy_name: str, rule_index: int, version: int, src: object
    ) -> list[ReferenceGateway]:
        """The usable gateways of a rule for packets of ``version`` from endpoint ``src``,
        in (node name, egress IP) order; before PreferNodeLocal and maxGateways."""
        source = _to_address(src)
        endpoint_index = self._endpoint_by_ip[(source.version, int(source))]
        for entry in self.entries:
            if entry.name == policy_name:
                return list(self._usable(entry, rule_index, version, endpoint_index))
        raise KeyError(policy_name)

    def _usable(
        self, entry: _Entry, rule_index: int, version: int, endpoint_index: int
    ) -> list[ReferenceGateway]:
        client = self.endpoints[endpoint_index]
        # Only pod gateways without a namespace selector depend on the client, through
        # its namespace.
        key = (entry.position, rule_index, version, client.namespace)
        cached = self._gateway_cache.get(key)
        if cached is not None:
            return cached
        pairs: set[tuple[str, IPAddress]] = set()
        for spec in entry.policy.rules[rule_index].gateways:
            if spec.pod_selector is not None:
                pairs.update(self._pod_gateways(spec, version, client))
            else:
                pairs.update(self._node_gateways(spec, version))
        # "Identical (node, egress IP) pairs count once", in (node name, egress IP) order;
        # an egress IP that several nodes would carry stays with the first of them.
        usable = []
        taken: set[IPAddress] = set()
        for gateway in sorted(ReferenceGateway(node, ip, self._gid(node, ip)) for node, ip in pairs):
            if gateway.egress_ip not in taken:
                taken.add(gateway.egress_ip)
                usable.append(gateway)
        self._gateway_cache[key] = usable
        return usable

    def _gid(self, node: str, ip: IPAddress) -> int:
        gid = self._gid_cache.get((node, ip))
        if gid is None:
            gid = self._gid_cache[(node, ip)] = gateway_id(node, ip)
        return gid

    def _node_gateways(self, spec: GatewaySpec, version: int) -> list[tuple[str, IPAddress]]:
        if spec.node_selector is None:
            return []
        # Only nodes of the inventory can be gateways: a node that is not listed has no
        # addresses and no interfaces.
        selector = spec.node_selector
        matching = sorted(
            (node for node in self.inventory.nodes if evaluate(selector, self._node_labels[node.name])),
            key=lambda node: node.name,
        )
        if spec.first_node_only:
            # Cilium's egressGateway: the first matching node by name is the gateway,
            # whether or not it has an egress IP of this family.
            matching = matching[:1]
        found = []
        for node in matching:
            if spec.egress_ips:
                addresses: Sequence[IPAddress] = spec.egress_ips
            elif spec.interface is not None:
                # An interface the node does not have gives no gateway.
                addresses = node.interfaces.get(spec.interface, ())
            else:
                addresses = node.addresses
            of_family = [address for address in addresses if address.version == version]
            if of_family:
                found.append((node.name, of_family[0]))
        return found

    def _pod_gateways(self, spec: GatewaySpec, version: int, client: Endpoint) -> list[tuple[str, IPAddress]]:
        assert spec.pod_selector is not None
        found = []
        for index, endpoint in enumerate(self.endpoints):
            if spec.namespace_selector is None:
                # Calico: the client pod's own namespace.
                if endpoint.namespace != client.namespace:
                    continue
            elif not evaluate(spec.namespace_selector, self._namespace_labels[endpoint.namespace]):
                continue
            if not evaluate(spec.pod_selector, self._pod_labels[index]):
                continue
            of_family = [ip for ip in endpoint.ips if ip.version == version]
            if of_family:
                found.append((endpoint.node, of_family[0]))
        return found

    def _choose_gateway(
        self, entry: _Entry, rule_index: int, version: int, endpoint_index: int, src: int, dst: int
    ) -> ReferenceGateway | None:
        rule = entry.policy.rules[rule_index]
        usable = self._usable(entry, rule_index, version, endpoint_index)
        if rule.prefer_node_local:
            home = self.endpoints[endpoint_index].node
            local = [gateway for gateway in usable if gateway.node == home]
            if local:
                usable = local
        src_words = _int_words(version, src)
        if 0 < rule.max_gateways < len(usable):
            # The per-source subset: the N highest score([src], g); equal scores go to
            # the gateway first in order (its position breaks the tie).
            ranked = sorted(range(len(usable)), key=lambda i: (-_score_words(usable[i].gid, src_words), i))
            usable = [usable[i] for i in sorted(ranked[: rule.max_gateways])]
        # Rendezvous: the highest score([src, dst], g); max() keeps the first of equals.
        words = (*src_words, *_int_words(version, dst))
        best: ReferenceGateway | None = None
        best_score = -1
        for gateway in usable:
            value = _score_words(gateway.gid, words)
            if value > best_score:
                best, best_score = gateway, value
        return best


def _mask(version: int, length: int) -> int:
    bits = _BITS[version]
    return ((1 << length) - 1) << (bits - length)


def decision_of(compiled: Any) -> ReferenceDecision:
    """A compiled ``Decision`` in the reference's terms, for comparisons."""
    gateway = compiled.gateway
    return ReferenceDecision(
        compiled.action.name.lower(),
        compiled.reason.name.lower(),
        compiled.policy,
        None if gateway is None else gateway.node,
        None if gateway is None else str(gateway.egress_ip),
    )
