"""Why a packet gets its decision: the text behind ``egresscore explain``.

The decision itself always comes from the compiled classifier; this module only
retraces the steps of docs/policy.md in plain Python to name what made it: the
source endpoint, the policies that select it and through which selector term, the
candidate prefixes in precedence order, and the gateways the flow was hashed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address

from egresscore.core.classifier import Action, Decision, Reason
from egresscore.errors import InvalidAddressError
from egresscore.policy.compiler import CompiledRule, Compiler, Unit
from egresscore.policy.model import (
    CALICO_POLICY_ANNOTATION,
    AnnotationSelection,
    Endpoint,
    IPAddress,
    IPNetwork,
    Origin,
    PolicySet,
    SourceTerm,
)

__all__ = ["Explanation", "explain"]


@dataclass(slots=True)
class Explanation:
    """The decision and the lines that explain it."""

    decision: Decision
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _where(origin: Origin | None, path: str = "") -> str:
    parts = [origin.source, origin.document] if origin else []
    if path:
        parts.append(path)
    return ": ".join(part for part in parts if part)


def _labels(labels: object) -> str:
    if not isinstance(labels, dict) or not labels:
        return "no labels"
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _term_text(term: SourceTerm) -> str:
    parts = []
    for name, selector in (("pods", term.pods), ("namespaces", term.namespaces), ("nodes", term.nodes)):
        if selector is not None:
            parts.append(f"{name}: {selector}")
    return "; ".join(parts) or "every pod"


def _address(text: str, what: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError:
        raise InvalidAddressError(f"{what} {text!r} is not an IPv4 or IPv6 address") from None


class _Explainer:
    def __init__(self, compiler: Compiler, src: IPAddress, dst: IPAddress) -> None:
        self.compiler = compiler
        self.src = src
        self.dst = dst
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)

    def endpoint(self) -> tuple[int, Endpoint] | None:
        for index, endpoint in enumerate(self.compiler.endpoints):
            if self.src in endpoint.ips:
                return index, endpoint
        return None

    def internal_reason(self) -> str | None:
        inventory = self.compiler.inventory
        network = inventory.network
        for kind, cidrs in (
            ("pod CIDR", network.pod_cidrs),
            ("service CIDR", network.service_cidrs),
            ("internal CIDR", network.internal_cidrs),
        ):
            for cidr in cidrs:
                if self.dst.version == cidr.version and self.dst in cidr:
                    return f"inside the {kind} {cidr} ({_where(network.origin) or 'ClusterNetwork'})"
        for node in inventory.nodes:
            if self.dst in node.addresses:
                return f"an address of node {node.name}"
        for endpoint in inventory.endpoints:
            if self.dst in endpoint.ips:
                return f"the IP of endpoint {endpoint.key}"
        return None

    def selection(self, unit: Unit, endpoint_index: int, endpoint: Endpoint) -> str:
        policy = unit.policy
        selection = policy.selection
        if isinstance(selection, AnnotationSelection):
            own = endpoint.annotations.get(CALICO_POLICY_ANNOTATION)
            holder = f"pod {endpoint.key}" if own else f"namespace {endpoint.namespace}"
            return f"{holder} is annotated {CALICO_POLICY_ANNOTATION}={selection.policy_name}"
        if not selection and policy.name.startswith("calico-missing-policy:"):
            missing = policy.name.split(":", 1)[1]
            return (
                f"it is annotated {CALICO_POLICY_ANNOTATION}={missing}, which no loaded "
                "EgressGatewayPolicy defines: dropped, never sent with the node's IP"
            )
        if not selection:
            origin = policy.name.rsplit("/", 1)[-1]
            holder = f"namespace {endpoint.namespace}" if origin == "*" else f"pod {endpoint.key}"
            return f"the egress.projectcalico.org annotations of {holder}"
        for term in selection:
            if endpoint_index in self.compiler.term_members(term):
                return f"{term.path or 'selector'} matches ({_term_text(term)})"
        return "selected"  # pragma: no cover - the unit would not hold the endpoint

    def candidates(self, endpoint_index: int) -> list[tuple[int, int, IPNetwork, CompiledRule | None]]:
        """(prefix length, unit, prefix, rule or None for excluded) in precedence order."""
        found: list[tuple[int, int, int, IPNetwork, CompiledRule | None]] = []
        for u, unit in enumerate(self.compiler.units):
            if endpoint_index not in unit.members:
                continue
            seen: set[IPNetwork] = set()
            for network in unit.policy.excluded:
                if network.version == self.dst.version and self.dst in network and network not in seen:
                    seen.add(network)
                    found.append((-network.prefixlen, u, 0, network, None))
            for index in unit.rule_indices:
                compiled = self.compiler.rules[index]
                for network in compiled.rule.destinations:
                    if network.version == self.dst.version and self.dst in network and network not in seen:
                        seen.add(network)
                        found.append((-network.prefixlen, u, 1, network, compiled))
        found.sort(key=lambda item: item[:3])
        return [(-length, u, network, rule) for length, u, _, network, rule in found]

    def run(self, decision: Decision, unit_index: int) -> None:
        compiler = self.compiler
        self.say(f"packet {self.src} -> {self.dst}")
        match = self.endpoint()
        if match is None:
            self.say(f"source: {self.src} is not the IP of any endpoint, so no policy can select it")
            return
        endpoint_index, endpoint = match
        self.say(
            f"source: endpoint {endpoint.key} on node {endpoint.node} ({_labels(dict(endpoint.labels))})"
        )
        if decision.reason is Reason.CLUSTER_INTERNAL:
            self.say(f"destination: cluster-internal, {self.internal_reason()}: never redirected")
            return
        selecting = [(u, unit) for u, unit in enumerate(compiler.units) if endpoint_index in unit.members]
        if not selecting:
            self.say("policies: none selects this endpoint")
        for _, unit in selecting:
            policy = unit.policy
            kind = policy.origin.kind if policy.origin else "policy"
            where = _where(policy.origin)
            self.say(
                f"policy {policy.name} ({kind}{', ' + where if where else ''}) selects it: "
                f"{self.selection(unit, endpoint_index, endpoint)}"
            )
        candidates = self.candidates(endpoint_index)
        if not candidates:
            self.say(f"destination: no prefix of those policies contains {self.dst}")
        else:
            self.say("candidates, best first (longest prefix, then priority, then name):")
            for position, (_length, u, network, compiled) in enumerate(candidates):
                unit = compiler.units[u]
                if compiled is None:
                    what = f"excluded CIDR ({unit.policy.excluded_path}): pass"
                else:
                    action = compiled.rule.action.value
                    what = f"{compiled.rule.path or 'rule'}: {action}"
                marker = "->" if position == 0 else "  "
                policy = unit.policy
                self.say(f"  {marker} {network}  policy {policy.name} (priority {policy.priority}), {what}")
        if decision.reason is Reason.GATEWAY or decision.reason is Reason.NO_GATEWAY:
            compiled_rule = next(
                (rule for _, u, _, rule in candidates[:1] if rule is not None and u == unit_index), None
            )
            if compiled_rule is not None:
                family = 0 if self.dst.version == 4 else 1
                usable = [compiler.gateways[g] for g in compiled_rule.gateways[family]]
                if usable:
                    listed = ", ".join(f"{g.node} {g.egress_ip}" for g in usable)
                    self.say(f"usable IPv{self.dst.version} gateways of that rule: {listed}")
                    extra = []
                    if compiled_rule.rule.prefer_node_local:
                        extra.append("PreferNodeLocal")
                    if compiled_rule.rule.max_gateways:
                        extra.append(f"at most {compiled_rule.rule.max_gateways} per source")
                    how = f" ({', '.join(extra)})" if extra else ""
                    self.say(f"gateway chosen by rendezvous hash of (source, destination){how}")
                else:
                    self.say(
                        f"no usable IPv{self.dst.version} gateway: no selected node or gateway pod has "
                        f"an IPv{self.dst.version} egress IP"
                    )


def _decision_line(decision: Decision, local_node: str | None) -> str:
    gateway = decision.gateway
    if decision.action is Action.REDIRECT and gateway is not None:
        return f"decision: REDIRECT to gateway node {gateway.node}, egress IP {gateway.egress_ip}"
    if decision.action is Action.SNAT and gateway is not None:
        return f"decision: SNAT here (this node, {local_node}, is the gateway), egress IP {gateway.egress_ip}"
    why = {
        Reason.NOT_AN_ENDPOINT: "the source is not an endpoint",
        Reason.CLUSTER_INTERNAL: "cluster-internal destination",
        Reason.NO_POLICY: "no policy applies",
        Reason.EXCLUDED: "excluded CIDR",
        Reason.RULE_PASS: "the rule goes direct",
        Reason.RULE_DROP: "the rule drops",
        Reason.NO_GATEWAY: "selected, but no usable gateway (fail closed: never the node's IP)",
    }.get(decision.reason, decision.reason.name)
    return f"decision: {decision.action.name} ({why})"


def explain(policy_set: PolicySet, src: str, dst: str, local_node: str | None = None) -> Explanation:
    """Classify one packet and say why, step by step (docs/policy.md)."""
    source = _address(src, "source")
    destination = _address(dst, "destination")
    if source.version != destination.version:
        raise InvalidAddressError(
            f"source {src!r} is IPv{source.version} but destination {dst!r} is IPv{destination.version}: "
            "expected two addresses of one family"
        )
    compiler = Compiler(policy_set, local_node)
    decision = compiler.classifier.classify(source, destination)
    _, unit = compiler.classifier.classify_code(source, destination)
    explainer = _Explainer(compiler, source, destination)
    explainer.run(decision, unit)
    explainer.say(_decision_line(decision, local_node))
    if decision.policy is not None:
        unit_origin = compiler.units[unit].policy.origin if unit >= 0 else None
        where = _where(unit_origin)
        explainer.say(f"decided by policy {decision.policy}" + (f" ({where})" if where else ""))
    return Explanation(decision, explainer.lines)
