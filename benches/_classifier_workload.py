"""A seeded, realistic cluster and policy set for the classifier benchmarks (docs/policy.md).

:func:`build_workload` makes the model objects directly (no YAML): about 50 namespaces
labelled by team and environment, about 20 nodes of which 2 to 4 are egress gateways,
pods labelled ``app``/``tier``/``team`` with an IPv4 address in 10.0.0.0/8 (some also an
IPv6 one in fd00::/8), and egress policies written as their users would write them:

- mostly Cilium ``CiliumEgressGatewayPolicy``: pods chosen by app, by app and tier, by
  team but not the databases, or by app in one namespace, sometimes with a namespace
  selector; one gateway group's first node (``egressGateway``), with the node's address,
  an ``egressIP`` or an ``interface``; a few use ``egressGateways`` (several groups);
- some native ``EgressPolicy``: a priority, a redirect rule through every gateway node
  (some capped by ``maxGateways`` or preferring the local node), and small ``pass`` and
  ``drop`` rules.

Each policy has about ``prefixes / policies`` destination CIDRs of mixed lengths (/8 to
/32, mostly /16 to /28), some shared with or nested in other policies' CIDRs, and a few
``excludedCIDRs`` inside its own. Destinations are random IPv4 prefixes that overlap none
of the cluster's own ranges (pods 10.0.0.0/8, services 172.20.0.0/16, nodes
192.168.0.0/16, gateways 192.0.2.0/24 and 198.51.100.0/24), loopback, 0.0.0.0/8 or
224.0.0.0/3 (multicast and reserved): synthetic data that is never sent anywhere.

:func:`make_pairs` then draws (source, destination) pairs that follow the real path:
about half of the sources are pods some policy selects, sending mostly into one of
that policy's CIDRs; the rest are unselected pods and non-endpoints.

Everything comes from ``random.Random(seed)``: the same arguments give the same
PolicySet and the same pairs on every machine.
"""

from __future__ import annotations

import ipaddress
import random
from array import array
from collections.abc import Mapping, Sequence
from typing import Final

from egresscore.policy.model import (
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
from egresscore.policy.selector import And, HasLabel, LabelIn, LabelMatch, Not, Or, Selector

__all__ = ["build_workload", "make_pairs", "selected_endpoints"]

NAMESPACE_COUNT: Final = 50
NODE_COUNT: Final = 20
V6_ENDPOINT_SHARE: Final = 0.3
V6_POLICY_SHARE: Final = 0.05
NATIVE_POLICY_SHARE: Final = 0.2

TEAMS: Final = (
    "payments",
    "checkout",
    "search",
    "identity",
    "billing",
    "logistics",
    "catalog",
    "analytics",
    "messaging",
    "platform",
    "fraud",
    "support",
)
ENVIRONMENTS: Final = ("prod", "prod", "staging", "dev")
TIERS: Final = ("frontend", "backend", "worker", "db", "cache")
APP_COUNT: Final = 60
GATEWAY_LABEL: Final = "egress-gateway"
GROUP_LABEL: Final = "egress-group"

POD_CIDRS: Final = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
SERVICE_CIDRS: Final = (ipaddress.ip_network("172.20.0.0/16"),)
# Destinations overlap none of these: the cluster's own ranges and special IPv4 blocks.
RESERVED_V4: Final = tuple(
    ipaddress.IPv4Network(text)
    for text in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "127.0.0.0/8",
        "172.20.0.0/16",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.51.100.0/24",
        "224.0.0.0/3",
    )
)
V6_DESTINATIONS: Final = ipaddress.IPv6Network("2000::/3")
RESERVED_V6: Final = (ipaddress.IPv6Network("2001:db8::/32"),)

ORIGIN_SOURCE: Final = "benches/_classifier_workload.py"


def _origin(kind: str, name: str, index: int) -> Origin:
    return Origin(ORIGIN_SOURCE, f"document {index + 1} ({kind} {name})", kind, name)


def _one(key: str, *values: str) -> LabelIn:
    return LabelIn(key, frozenset(values))


# --- The inventory ---------------------------------------------------------------------------


def _namespaces(rng: random.Random) -> tuple[Namespace, ...]:
    return tuple(
        Namespace(
            f"{TEAMS[i % len(TEAMS)]}-{i // len(TEAMS)}",
            {"team": TEAMS[i % len(TEAMS)], "env": rng.choice(ENVIRONMENTS)},
        )
        for i in range(NAMESPACE_COUNT)
    )


def _nodes(rng: random.Random) -> tuple[tuple[Node, ...], list[str]]:
    """The nodes, and the names of the gateway nodes (labelled ``egress-gateway=true``,
    in two ``egress-group`` groups, with addresses in the documentation ranges)."""
    gateway_count = rng.randint(2, 4)
    gateway_names = [f"gw-{i}" for i in range(gateway_count)]
    nodes = []
    for i, name in enumerate(gateway_names):
        block = "192.0.2" if i % 2 == 0 else "198.51.100"
        nodes.append(
            Node(
                name,
                {GATEWAY_LABEL: "true", GROUP_LABEL: f"g{i % 2}", "topology.kubernetes.io/zone": f"z{i % 3}"},
                (ipaddress.ip_address(f"{block}.{10 + i}"), ipaddress.ip_address(f"2001:db8::{10 + i:x}")),
                {
                    "eth1": (
                        ipaddress.ip_address(f"{block}.{100 + i}"),
                        ipaddress.ip_address(f"2001:db8:1::{100 + i:x}"),
                    )
                },
            )
        )
    for i in range(NODE_COUNT - gateway_count):
        nodes.append(
            Node(
                f"node-{i:02d}",
                {"topology.kubernetes.io/zone": f"z{i % 3}", "node.kubernetes.io/instance-type": "m5.xlarge"},
                (ipaddress.ip_address(f"192.168.0.{i + 1}"), ipaddress.ip_address(f"2001:db8:ff::{i + 1:x}")),
            )
        )
    return tuple(nodes), gateway_names


def _endpoints(
    rng: random.Random, count: int, namespaces: Sequence[Namespace], worker_nodes: Sequence[str]
) -> tuple[Endpoint, ...]:
    # Distinct addresses in 10.0.0.0/8 (not the network or broadcast address).
    offsets = rng.sample(range(1, (1 << 24) - 1), count)
    endpoints = []
    for i, offset in enumerate(offsets):
        namespace = rng.choice(namespaces)
        app = f"app-{rng.randrange(APP_COUNT):02d}"
        labels = {"app": app, "tier": rng.choice(TIERS), "team": namespace.labels["team"]}
        if rng.random() < 0.2:
            labels["version"] = f"v{rng.randint(1, 3)}"
        ips: tuple[IPAddress, ...] = (ipaddress.IPv4Address((10 << 24) | offset),)
        if rng.random() < V6_ENDPOINT_SHARE:
            ips += (ipaddress.IPv6Address((0xFD00 << 112) | offset),)
        endpoints.append(Endpoint(f"{app}-{i}", namespace.name, rng.choice(worker_nodes), ips, labels))
    return tuple(endpoints)


# --- Destinations -----------------------------------------------------------------------------


def _v4_length(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.002:
        return 8
    if roll < 0.03:
        return rng.randint(9, 15)
    if roll < 0.90:
        return rng.randint(16, 28)
    return rng.randint(29, 32)


def _random_v4_prefix(rng: random.Random, length: int) -> ipaddress.IPv4Network:
    while True:
        address = rng.getrandbits(32)
        network = ipaddress.IPv4Network((address >> (32 - length) << (32 - length), length))
        if not any(network.overlaps(reserved) for reserved in RESERVED_V4):
            return network


def _random_v6_prefix(rng: random.Random) -> ipaddress.IPv6Network:
    length = rng.choice((32, 40, 48, 48, 56, 64))
    while True:
        address = int(V6_DESTINATIONS.network_address) | rng.getrandbits(125)
        network = ipaddress.IPv6Network((address >> (128 - length) << (128 - length), length))
        if not any(network.overlaps(reserved) for reserved in RESERVED_V6):
            return network


def _related_prefix(rng: random.Random, other: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """``other`` itself, one of its subnets or its supernet: CIDRs that overlap."""
    roll = rng.random()
    if roll < 0.4 or other.prefixlen >= 32:
        return other
    if roll < 0.8:
        length = min(32, other.prefixlen + rng.randint(1, 4))
        offset = rng.getrandbits(length - other.prefixlen) << (32 - length)
        return ipaddress.IPv4Network((int(other.network_address) + offset, length))
    if other.prefixlen > 8:
        candidate = other.supernet(new_prefix=max(8, other.prefixlen - rng.randint(1, 4)))
        if not any(candidate.overlaps(reserved) for reserved in RESERVED_V4):
            return candidate
    return other


def _destinations(
    rng: random.Random, count: int, shared: list[ipaddress.IPv4Network]
) -> list[ipaddress.IPv4Network]:
    """``count`` distinct IPv4 prefixes; about one in ten overlaps another policy's."""
    found: dict[ipaddress.IPv4Network, None] = {}
    attempts = 0
    while len(found) < count and attempts < count * 20:
        attempts += 1
        if shared and rng.random() < 0.1:
            network = _related_prefix(rng, rng.choice(shared))
        else:
            network = _random_v4_prefix(rng, _v4_length(rng))
        found[network] = None
    networks = list(found)
    shared.extend(networks[: max(1, len(networks) // 20)])
    return networks


def _excluded(rng: random.Random, destinations: Sequence[ipaddress.IPv4Network]) -> tuple[IPNetwork, ...]:
    """A few subnets of the policy's own destinations."""
    excluded: dict[IPNetwork, None] = {}
    for _ in range(rng.randint(0, 3)):
        parent = rng.choice(destinations)
        if parent.prefixlen >= 32:
            continue
        length = min(32, parent.prefixlen + rng.randint(1, 8))
        offset = rng.getrandbits(length - parent.prefixlen) << (32 - length)
        excluded[ipaddress.IPv4Network((int(parent.network_address) + offset, length))] = None
    return tuple(excluded)


# --- Policies -----------------------------------------------------------------------------------


def _source_term(rng: random.Random, namespaces: Sequence[Namespace], index: int) -> SourceTerm:
    app = _one("app", f"app-{rng.randrange(APP_COUNT):02d}")
    team = TEAMS[rng.randrange(len(TEAMS))]
    shape = rng.randrange(6)
    pods: Selector
    namespace_selector: Selector | None = None
    if shape == 0:
        pods = app
    elif shape == 1:
        pods = And((app, _one("tier", *rng.sample(TIERS, 2))))
    elif shape == 2:
        pods = And((_one("team", team), Not(_one("tier", "db")), HasLabel("app")))
    elif shape == 3:
        namespace = rng.choice(namespaces).name
        pods = And((app, _one("io.kubernetes.pod.namespace", namespace)))
    elif shape == 4:
        pods = Or((app, _one("app", f"app-{rng.randrange(APP_COUNT):02d}")))
        namespace_selector = _one("env", "prod")
    else:
        pods = And((app, Not(HasLabel("version"))))
        namespace_selector = _one("team", team) if rng.random() < 0.5 else None
    return SourceTerm(pods=pods, namespaces=namespace_selector, path=f"policy {index} spec.selectors[0]")


def _cilium_gateway(rng: random.Random, gateway_nodes: Sequence[Node]) -> GatewaySpec:
    group = rng.randrange(2)
    selector: Selector = And((_one(GATEWAY_LABEL, "true"), _one(GROUP_LABEL, f"g{group}")))
    roll = rng.random()
    if roll < 0.5:
        return GatewaySpec(node_selector=selector, first_node_only=True)
    if roll < 0.8:
        # egressIP: an address of the group's first node's interface.
        first = next(node for node in gateway_nodes if node.labels.get(GROUP_LABEL) == f"g{group}")
        return GatewaySpec(
            node_selector=selector, first_node_only=True, egress_ips=(first.interfaces["eth1"][0],)
        )
    return GatewaySpec(node_selector=selector, first_node_only=True, interface="eth1")


def _cilium_policy(
    rng: random.Random,
    index: int,
    destinations: list[IPNetwork],
    namespaces: Sequence[Namespace],
    gateway_nodes: Sequence[Node],
) -> Policy:
    name = f"egress-{index:05d}"
    v4 = [d for d in destinations if isinstance(d, ipaddress.IPv4Network)]
    gateways: tuple[GatewaySpec, ...] = (_cilium_gateway(rng, gateway_nodes),)
    if rng.random() < 0.1:
        # egressGateways: both groups share the flows.
        gateways = (*gateways, _cilium_gateway(rng, gateway_nodes))
    terms = tuple(_source_term(rng, namespaces, index) for _ in range(1 if rng.random() < 0.8 else 2))
    return Policy(
        name,
        terms,
        (Rule(tuple(destinations), RuleAction.REDIRECT, gateways, path="spec.destinationCIDRs"),),
        excluded=_excluded(rng, v4) if v4 and rng.random() < 0.3 else (),
        origin=_origin("CiliumEgressGatewayPolicy", name, index),
    )


def _native_policy(
    rng: random.Random, index: int, destinations: list[IPNetwork], namespaces: Sequence[Namespace]
) -> Policy:
    name = f"native-{index:05d}"
    v4 = [d for d in destinations if isinstance(d, ipaddress.IPv4Network)]
    # A few of its CIDRs pass, a few drop; the rest go through every gateway node.
    special = min(len(destinations) // 4, rng.randint(0, 4))
    passed, dropped, redirected = (
        destinations[:special],
        destinations[special : 2 * special],
        destinations[2 * special :],
    )
    rules = [
        Rule(
            tuple(redirected),
            RuleAction.REDIRECT,
            (GatewaySpec(node_selector=_one(GATEWAY_LABEL, "true")),),
            prefer_node_local=rng.random() < 0.2,
            max_gateways=rng.choice((0, 0, 0, 1, 2)),
            path="spec.rules[0]",
        )
    ]
    if passed:
        rules.append(Rule(tuple(passed), RuleAction.PASS, path="spec.rules[1]"))
    if dropped:
        rules.append(Rule(tuple(dropped), RuleAction.DROP, path="spec.rules[2]"))
    return Policy(
        name,
        (_source_term(rng, namespaces, index),),
        tuple(rules),
        excluded=_excluded(rng, v4) if v4 and rng.random() < 0.3 else (),
        priority=rng.choice((-1, 0, 0, 0, 1)),
        origin=_origin("EgressPolicy", name, index),
    )


def build_workload(
    policies: int = 1000, endpoints: int = 10000, prefixes: int = 100000, seed: int = 0
) -> PolicySet:
    """A PolicySet of ``policies`` policies with ``prefixes`` destination CIDRs in all
    (about ``prefixes / policies`` each) over ``endpoints`` pods (see the module docstring)."""
    rng = random.Random(seed)
    namespaces = _namespaces(rng)
    nodes, gateway_names = _nodes(rng)
    gateway_nodes = [node for node in nodes if node.name in gateway_names]
    worker_nodes = [node.name for node in nodes if node.name not in gateway_names]
    pods = _endpoints(rng, endpoints, namespaces, worker_nodes)

    shared: list[ipaddress.IPv4Network] = []
    policy_list = []
    base, extra = divmod(prefixes, max(policies, 1))
    for index in range(policies):
        count = base + (1 if index < extra else 0)
        destinations: list[IPNetwork] = []
        if rng.random() < V6_POLICY_SHARE and count > 1:
            v6_count = min(count - 1, rng.randint(1, 4))
            destinations.extend({_random_v6_prefix(rng): None for _ in range(v6_count)})
        destinations[:0] = _destinations(rng, max(1, count - len(destinations)), shared)
        if rng.random() < NATIVE_POLICY_SHARE:
            policy_list.append(_native_policy(rng, index, destinations, namespaces))
        else:
            policy_list.append(_cilium_policy(rng, index, destinations, namespaces, gateway_nodes))

    network = ClusterNetwork(pod_cidrs=POD_CIDRS, service_cidrs=SERVICE_CIDRS)
    return PolicySet(tuple(policy_list), Inventory(namespaces, nodes, pods, network))


# --- Pairs ---------------------------------------------------------------------------------------


def _matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    if isinstance(selector, LabelIn):
        return labels.get(selector.key) in selector.values
    if isinstance(selector, HasLabel):
        return selector.key in labels
    if isinstance(selector, LabelMatch):
        return selector.key in labels and selector.op.test(labels[selector.key], selector.operand)
    if isinstance(selector, Not):
        return not _matches(selector.operand, labels)
    if isinstance(selector, And):
        return all(_matches(operand, labels) for operand in selector.operands)
    return any(_matches(operand, labels) for operand in selector.operands)


def _candidates(selector: Selector, index: Mapping[tuple[str, str], list[int]]) -> set[int] | None:
    """Endpoints that may match ``selector`` (None: any), from a (key, value) index."""
    if isinstance(selector, LabelIn):
        return {e for value in selector.values for e in index.get((selector.key, value), ())}
    if isinstance(selector, And):
        for operand in selector.operands:
            found = _candidates(operand, index)
            if found is not None:
                return found
    if isinstance(selector, Or):
        union: set[int] = set()
        for operand in selector.operands:
            found = _candidates(operand, index)
            if found is None:
                return None
            union |= found
        return union
    return None


def selected_endpoints(policy_set: PolicySet) -> list[list[int]]:
    """For each policy with source terms, the indices of the endpoints it selects
    (policies selected through annotations select none here)."""
    inventory = policy_set.inventory
    namespaces = {namespace.name: namespace for namespace in inventory.namespaces}
    nodes = {node.name: node for node in inventory.nodes}
    pod_labels = [
        Inventory.pod_labels(endpoint, namespaces.get(endpoint.namespace) or Namespace(endpoint.namespace))
        for endpoint in inventory.endpoints
    ]
    index: dict[tuple[str, str], list[int]] = {}
    for position, labels in enumerate(pod_labels):
        for pair in labels.items():
            index.setdefault(pair, []).append(position)
    namespace_labels = {
        name: Inventory.namespace_labels(namespaces.get(name) or Namespace(name))
        for name in {endpoint.namespace for endpoint in inventory.endpoints}
    }
    selected = []
    for policy in policy_set.policies:
        chosen: set[int] = set()
        if isinstance(policy.selection, tuple):
            for term in policy.selection:
                pool = range(len(pod_labels)) if term.pods is None else _candidates(term.pods, index)
                for position in range(len(pod_labels)) if pool is None else pool:
                    endpoint = inventory.endpoints[position]
                    if term.pods is not None and not _matches(term.pods, pod_labels[position]):
                        continue
                    if term.namespaces is not None and not _matches(
                        term.namespaces, namespace_labels[endpoint.namespace]
                    ):
                        continue
                    if term.nodes is not None and not _matches(
                        term.nodes, Inventory.node_labels(nodes.get(endpoint.node) or Node(endpoint.node))
                    ):
                        continue
                    chosen.add(position)
        selected.append(sorted(chosen))
    return selected


def _v4(endpoint: Endpoint) -> int:
    return next(int(ip) for ip in endpoint.ips if ip.version == 4)


def _inside(rng: random.Random, network: ipaddress.IPv4Network) -> int:
    return int(network.network_address) + rng.getrandbits(32 - network.prefixlen)


def _public_v4(rng: random.Random) -> int:
    return int(_random_v4_prefix(rng, 32).network_address)


def make_pairs(policy_set: PolicySet, count: int, seed: int = 0) -> array[int]:
    """``count`` IPv4 (source, destination) pairs, interleaved host-order uint32s.

    About half of the sources are pods some policy selects; those send to an address
    inside one of that policy's IPv4 CIDRs 85% of the time, to another pod 5% and to a
    random outside address 10%. The other sources are unselected pods (80%) and
    non-endpoints (20%), sending into some policy's CIDR 70% of the time."""
    rng = random.Random(seed)
    endpoints = policy_set.inventory.endpoints
    selected = selected_endpoints(policy_set)
    v4_of_policy = [
        [d for rule in policy.rules for d in rule.destinations if isinstance(d, ipaddress.IPv4Network)]
        for policy in policy_set.policies
    ]
    policies_of: dict[int, list[int]] = {}
    for policy_index, members in enumerate(selected):
        if v4_of_policy[policy_index]:
            for member in members:
                policies_of.setdefault(member, []).append(policy_index)
    chosen = sorted(policies_of)
    unchosen = [i for i in range(len(endpoints)) if i not in policies_of]
    every_v4 = [d for found in v4_of_policy for d in found]
    endpoint_ips = {_v4(endpoint) for endpoint in endpoints}

    pairs = array("I")
    for _ in range(count):
        roll = rng.random()
        if chosen and (roll < 0.5 or not unchosen):
            source = rng.choice(chosen)
            src = _v4(endpoints[source])
            roll = rng.random()
            if roll < 0.85:
                dst = _inside(rng, rng.choice(v4_of_policy[rng.choice(policies_of[source])]))
            elif roll < 0.90:
                dst = _v4(rng.choice(endpoints))
            else:
                dst = _public_v4(rng)
        else:
            if unchosen and rng.random() < 0.8:
                src = _v4(endpoints[rng.choice(unchosen)])
            else:
                while True:
                    src = (10 << 24) | rng.getrandbits(24)
                    if src not in endpoint_ips:
                        break
            dst = _inside(rng, rng.choice(every_v4)) if every_v4 and rng.random() < 0.7 else _public_v4(rng)
        pairs.append(src)
        pairs.append(dst)
    return pairs
