"""A small Kubernetes-like cluster from network namespaces: nodes with pods, a gateway
node, a router and an external host (the node role's tests, benchmark and demo).

::

    pods      pa1 198.18.16.2  pa2 198.18.16.3      pb1 198.18.17.2  pb2 198.18.17.3
                    \\ cni0 198.18.16.1 /                 \\ cni0 198.18.17.1 /
    nodes       node-a "na"  n0 198.18.0.1          node-b "nb"  n0 198.18.0.2
                          \\                           /
    underlay     bridge br0 in "sw", 198.18.0.0/24 ------- gw-1 "gw" n0 198.18.0.3
    (a switch)   router: br0 198.18.0.254 | r1 203.0.113.1/24, 198.51.100.1/24
                                     |
    external    "ex" e0 203.0.113.10, .100 and .200 (/24), 198.51.100.10 (/24)

- Each node routes the other nodes' pod CIDRs over the underlay (like a CNI in
  host-gateway mode) and masquerades its pods' traffic leaving the cluster to its own
  address, as a CNI does: a flow that leaves a node untranslated shows up at the external
  host with that node's address (198.18.0.1 or .2).
- The router routes the egress IPs (192.0.2.0/24) to the gateway node and knows no
  pod CIDR, as the Internet knows none: a packet with a pod's source gets no answer.
- With ``gateway_pod``, the gateway node runs a pod too (pg1 198.18.18.2), for ``--role
  both``.

Addresses: RFC 2544's 198.18.0.0/15 inside the cluster, RFC 5737's 192.0.2.0/24 for
egress IPs and 203.0.113.0/24 and 198.51.100.0/24 outside. Every name has the lab's
per-run prefix; nothing is created in the caller's own namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from egresscore.netlab.namespaces import Lab

__all__ = ["ClusterTopology", "Pod", "cilium_policy", "inventory_document"]


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod of the lab cluster: its namespace in the lab, its node, address and labels."""

    key: str  # the lab namespace's role name, e.g. "pa1"
    name: str  # the Kubernetes pod name
    namespace: str  # the Kubernetes namespace
    node: str  # the Kubernetes node name
    ip: str
    labels: tuple[tuple[str, str], ...]


class ClusterTopology:
    """Build the cluster in ``lab``; ``.ns[key]`` is the lab namespace of a node, pod,
    the router ("sw") or the external host ("ex")."""

    UNDERLAY = "198.18.0.0/24"
    ROUTER_IP = "198.18.0.254"
    NODE_IPS: ClassVar[dict[str, str]] = {
        "node-a": "198.18.0.1",
        "node-b": "198.18.0.2",
        "gw-1": "198.18.0.3",
        "gw-2": "198.18.0.4",
    }
    NODE_KEYS: ClassVar[dict[str, str]] = {"node-a": "na", "node-b": "nb", "gw-1": "gw", "gw-2": "g2"}
    POD_CIDRS: ClassVar[dict[str, str]] = {
        "node-a": "198.18.16.0/24",
        "node-b": "198.18.17.0/24",
        "gw-1": "198.18.18.0/24",
        "gw-2": "198.18.19.0/24",
    }
    CLUSTER_POD_CIDR = "198.18.16.0/20"
    EGRESS_IP = "192.0.2.10"
    SECOND_EGRESS_IP = "192.0.2.11"  # gw-2's, with second_gateway
    EXTERNAL_IP = "203.0.113.10"  # inside the policy's destination CIDR
    EXCLUDED_IP = "203.0.113.200"  # inside its excludedCIDRs (203.0.113.128/25)
    OTHER_IP = "198.51.100.10"  # outside its destination CIDRs
    SECOND_EXTERNAL_IP = "203.0.113.100"  # inside the destination CIDR too, another /26
    # The tunnel's own address on the gateway (reverse-path filtering; see docs/agent.md).
    TUNNEL_ADDRESS = "198.19.255.1/32"
    PODS = (
        Pod("pa1", "payments-a", "payments", "node-a", "198.18.16.2", (("app", "payment-processor"),)),
        Pod("pa2", "frontend-a", "web", "node-a", "198.18.16.3", (("app", "frontend"),)),
        Pod("pb1", "payments-b", "payments", "node-b", "198.18.17.2", (("app", "payment-processor"),)),
        Pod("pb2", "frontend-b", "web", "node-b", "198.18.17.3", (("app", "frontend"),)),
    )
    GATEWAY_POD = Pod("pg1", "payments-g", "payments", "gw-1", "198.18.18.2", (("app", "payment-processor"),))

    def __init__(
        self, lab: Lab, *, offloads: bool = True, gateway_pod: bool = False, second_gateway: bool = False
    ) -> None:
        self.lab = lab
        self.pods = self.PODS + ((self.GATEWAY_POD,) if gateway_pod else ())
        self.nodes = ("node-a", "node-b", "gw-1") + (("gw-2",) if second_gateway else ())
        self.ns: dict[str, str] = {}
        node_keys = [self.NODE_KEYS[node] for node in self.nodes]
        for key in ("sw", *node_keys, "ex", *(pod.key for pod in self.pods)):
            self.ns[key] = lab.namespace(key)
        sw = self.ns["sw"]
        lab.run(sw, "ip", "link", "add", "br0", "type", "bridge")
        lab.run(sw, "ip", "link", "set", "br0", "up")
        lab.address(sw, "br0", f"{self.ROUTER_IP}/24")
        for node in self.nodes:
            key = self.NODE_KEYS[node]
            ns = self.ns[key]
            lab.veth(sw, f"p{key}", ns, "n0")
            lab.run(sw, "ip", "link", "set", f"p{key}", "master", "br0")
            lab.address(ns, "n0", f"{self.NODE_IPS[node]}/24")
            lab.route(ns, "default", self.ROUTER_IP)
            lab.sysctl(ns, "net.ipv4.ip_forward", "1")
            bridge = self.POD_CIDRS[node].rsplit(".", 1)[0] + ".1"
            lab.run(ns, "ip", "link", "add", "cni0", "type", "bridge")
            lab.run(ns, "ip", "link", "set", "cni0", "up")
            lab.address(ns, "cni0", f"{bridge}/24")
            for other in self.nodes:
                cidr = self.POD_CIDRS[other]
                if other != node:
                    lab.route(ns, cidr, self.NODE_IPS[other])
            # The CNI's masquerade: pods' traffic leaving the cluster takes the node's address.
            lab.run(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", self.CLUSTER_POD_CIDR,
                    "-d", "198.18.0.0/15", "-j", "RETURN")  # fmt: skip
            lab.run(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", self.CLUSTER_POD_CIDR,
                    "-o", "n0", "-j", "MASQUERADE")  # fmt: skip
        for pod in self.pods:
            node_ns, pod_ns = self.ns[self.NODE_KEYS[pod.node]], self.ns[pod.key]
            lab.veth(node_ns, f"v{pod.key}", pod_ns, "eth0")
            lab.run(node_ns, "ip", "link", "set", f"v{pod.key}", "master", "cni0")
            lab.address(pod_ns, "eth0", f"{pod.ip}/24")
            lab.route(pod_ns, "default", self.POD_CIDRS[pod.node].rsplit(".", 1)[0] + ".1")
        ex = self.ns["ex"]
        lab.veth(sw, "r1", ex, "e0")
        for cidr in ("203.0.113.1/24", "198.51.100.1/24"):
            lab.address(sw, "r1", cidr)
        for cidr in (
            f"{self.EXTERNAL_IP}/24",
            f"{self.SECOND_EXTERNAL_IP}/24",
            f"{self.EXCLUDED_IP}/24",
            f"{self.OTHER_IP}/24",
        ):
            lab.address(ex, "e0", cidr)
        lab.sysctl(sw, "net.ipv4.ip_forward", "1")
        lab.route(sw, "192.0.2.0/24", self.NODE_IPS["gw-1"])
        if second_gateway:
            lab.route(sw, f"{self.SECOND_EGRESS_IP}/32", self.NODE_IPS["gw-2"])
        lab.route(ex, "192.0.2.0/24", "203.0.113.1")
        lab.route(ex, self.UNDERLAY, "203.0.113.1")
        if not offloads:
            for key in self.ns:
                if key in node_keys:
                    lab.offloads(self.ns[key], "n0", False)

    def pod(self, key: str) -> Pod:
        return next(pod for pod in self.pods if pod.key == key)

    def node_ip_of(self, pod: Pod) -> str:
        return self.NODE_IPS[pod.node]

    def write_inventory(self, path: Path, *, relabel: dict[str, dict[str, str]] | None = None) -> Path:
        """The cluster's Inventory document (nodes, namespaces, pods) at ``path``;
        ``relabel`` replaces the labels of pods by key."""
        path.write_text(inventory_document(self.pods, relabel or {}, self.nodes))
        return path

    def agent_config(
        self,
        path: Path,
        node: str,
        policies: list[str],
        *,
        failure_mode: str = "closed",
        extra: str = "",
        gateway_queues: int = 2,
    ) -> Path:
        """An agent configuration for ``node`` at ``path`` (its state in a directory of its own)."""
        state = path.with_suffix(".state")
        text = f"""node: {node}
policies: [{", ".join(policies)}]
state_dir: {state.name}
status_interval: 0.2
reload_interval: 0.2
failure_mode: {failure_mode}
tunnel:
  underlay_interface: n0
  address: {self.TUNNEL_ADDRESS}
redirect:
  pod_interfaces: [cni0]
gateway:
  interface: n0
  queues: {{first: 0, count: {gateway_queues}}}
  timeouts: {{tcp_syn_sent: 3, tcp_syn_recv: 3, tcp_fin_wait: 2, tcp_close_wait: 2, tcp_last_ack: 2,
             tcp_time_wait: 1, tcp_close: 1, udp_unreplied: 2, udp_replied: 2, icmp: 2}}
{extra}"""
        path.write_text(text)
        return path


def inventory_document(
    pods: tuple[Pod, ...],
    relabel: dict[str, dict[str, str]],
    nodes: tuple[str, ...] = ("node-a", "node-b", "gw-1"),
) -> str:
    lines = [
        "# The lab cluster: nodes, namespaces and pods (egresscore.netlab.cluster).",
        "apiVersion: egresscore.io/v1alpha1",
        "kind: Inventory",
        "spec:",
        "  namespaces:",
        "  - {name: payments, labels: {team: payments}}",
        "  - {name: web, labels: {team: web}}",
        "  nodes:",
        f"  - {{name: node-a, addresses: [{ClusterTopology.NODE_IPS['node-a']}]}}",
        f"  - {{name: node-b, addresses: [{ClusterTopology.NODE_IPS['node-b']}]}}",
        "  - {name: gw-1, labels: {egress-gateway: 'true'}, "
        f"addresses: [{ClusterTopology.NODE_IPS['gw-1']}]}}",
    ]
    if "gw-2" in nodes:
        lines.append(
            "  - {name: gw-2, labels: {second-gateway: 'true'}, "
            f"addresses: [{ClusterTopology.NODE_IPS['gw-2']}]}}"
        )
    lines += [
        "  endpoints:",
    ]
    for pod in pods:
        labels = relabel.get(pod.key, dict(pod.labels))
        text = ", ".join(f"{k}: {v}" for k, v in labels.items())
        lines.append(
            f"  - {{name: {pod.name}, namespace: {pod.namespace}, node: {pod.node}, ips: [{pod.ip}], "
            f"labels: {{{text}}}}}"
        )
    lines += [
        "---",
        "apiVersion: egresscore.io/v1alpha1",
        "kind: ClusterNetwork",
        "spec:",
        f"  podCIDRs: [{ClusterTopology.CLUSTER_POD_CIDR}]",
    ]
    return "\n".join(lines) + "\n"


def cilium_policy(
    name: str = "payments-egress",
    *,
    destinations: tuple[str, ...] = ("203.0.113.0/24",),
    excluded: tuple[str, ...] = ("203.0.113.128/25",),
    egress_ip: str = ClusterTopology.EGRESS_IP,
    app: str = "payment-processor",
    gateway_label: str = "egress-gateway",
    on_node: str | None = None,
) -> str:
    """A CiliumEgressGatewayPolicy: pods with ``app`` (on node ``on_node`` only, when
    given) leave through the node labelled ``gateway_label`` (gw-1's) with ``egress_ip``."""
    node = f"\n    nodeSelector:\n      matchLabels: {{kubernetes.io/hostname: {on_node}}}" if on_node else ""
    return f"""apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata:
  name: {name}
spec:
  selectors:
  - podSelector:
      matchLabels: {{app: {app}}}{node}
  destinationCIDRs: [{", ".join(destinations)}]
  excludedCIDRs: [{", ".join(excluded)}]
  egressGateway:
    nodeSelector:
      matchLabels: {{{gateway_label}: "true"}}
    egressIP: {egress_ip}
"""
