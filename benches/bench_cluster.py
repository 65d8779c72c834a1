"""The whole path on real traffic, pod -> node -> tunnel -> gateway -> external host, against its peers.

Each peer gets a cluster of its own, built the same way (egresscore.netlab.ClusterTopology: nodes
node-a and node-b with two pods each, the gateway node gw-1, a router and the external host, the
CNI's masquerade on every node), and every measurement sends from pod pa1 (198.18.16.2,
app=payment-processor, on node-a) to the external host 203.0.113.10:

- ``egresscore``: ``egresscore run --role gateway`` on gw-1 and ``--role node`` on node-a and
  node-b, with the Cilium policy of the lab (egresscore.netlab.cilium_policy: payment-processor
  pods to 203.0.113.0/24 leave through gw-1 with the egress IP 192.0.2.10).
- ``kernel-gateway``: the same path from kernel parts alone, no egresscore process (the
  "kernel-only egress gateway" of DESIGN.md): on node-a egresscore's VXLAN link (same name, VNI,
  port and MAC addresses), its neighbour and forwarding entries for gw-1, its routing table and
  ``ip rule``, an iptables rule marking pa1's packets to 203.0.113.0/24 with the redirect mark, and
  a nat rule keeping the CNI's masquerade off them; on gw-1 the VXLAN link with its address and
  loose reverse-path filtering, the egress IP on n0 and an iptables SNAT rule to it. The targets
  are egresscore against this peer.
- ``direct``: no egress gateway at all; pa1's flows leave node-a under the CNI's masquerade with
  the node's address. Context only: it has no target.

Metrics: TCP Gbit/s with one iperf3 stream; new TCP connections per second
(egresscore.netlab.load, 32 at a time, against a ``tcp-sink``); the first-packet latency of new
flows (``load latency``: a TCP connect's SYN to SYN-ACK against a ``tcp-sink``, and a UDP request
from a new socket to a ``udp-echo``), median and 90th percentile in microseconds. For egresscore,
every measurement also reads the CPU time of the node and gateway agents' processes
(/proc/PID/stat of each agent and its workers) and the packets their queues were handed (the
workers' status files), for the CPU time per queued packet. Every measurement checks that the
external host saw the expected source, the egress IP through a gateway and node-a's address for
``direct``; a wrong answer fails the benchmark, slowness never does. Results, egresscore's ratios
to each peer, its added first-packet latency over the kernel gateway and the targets are printed
after the run (benches/conftest.py, "cluster").
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from network_lab import require_network, shorten_kernel_timeouts

from egresscore.agent.config import RedirectConfig, TunnelConfig
from egresscore.agent.tunnel import vtep_mac
from egresscore.netlab import ClusterTopology, Lab, cilium_policy
from egresscore.netlab.agents import AgentRun
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

PEERS = ("kernel-gateway", "egresscore", "direct")
ROLES = ("node", "gateway")
EGRESS = ClusterTopology.EGRESS_IP
EXTERNAL = ClusterTopology.EXTERNAL_IP
NODE_IP = ClusterTopology.NODE_IPS["node-a"]
GATEWAY_IP = ClusterTopology.NODE_IPS["gw-1"]
POD = ClusterTopology.PODS[0]  # pa1, app=payment-processor, on node-a
PODS = ClusterTopology.CLUSTER_POD_CIDR
# The source the external host must see for each peer's flows from pa1.
EXPECTED_SOURCE = {"egresscore": EGRESS, "kernel-gateway": EGRESS, "direct": NODE_IP}
# The kernel gateway copies egresscore's defaults: tunnel link, routing table, rule and mark.
TUNNEL = TunnelConfig()
REDIRECT = RedirectConfig()
TICKS = os.sysconf("SC_CLK_TCK")
# Rounds of a timed run: each round measures every peer once.
ROUNDS = 3


def durations(config: pytest.Config) -> dict[str, float]:
    quick = bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")
    if os.environ.get("EGRESSCORE_BENCH_SIZES") in ("quick", "full"):
        quick = os.environ["EGRESSCORE_BENCH_SIZES"] == "quick"
    return {"tcp": 1.0, "conn": 1.0, "latency": 50} if quick else {"tcp": 5.0, "conn": 5.0, "latency": 300}


def build_kernel_gateway(lab: Lab, topology: ClusterTopology) -> None:
    """node-a redirects pa1's flows to 203.0.113.0/24 through a VXLAN tunnel to gw-1, which
    translates them to the egress IP: egresscore's path, with the kernel making every decision."""
    node, gateway = topology.ns["na"], topology.ns["gw"]
    device, mark, mask = TUNNEL.device, REDIRECT.slot_value(0), REDIRECT.mark_mask
    table, flag = str(REDIRECT.route_table_base), REDIRECT.redirect_flag()
    for ns, local in ((node, NODE_IP), (gateway, GATEWAY_IP)):
        lab.run(ns, "ip", "link", "add", device, "type", "vxlan", "id", str(TUNNEL.vni), "dstport",
                str(TUNNEL.port), "local", local, "dev", "n0", "nolearning")  # fmt: skip
        lab.run(ns, "ip", "link", "set", device, "address", vtep_mac(ipaddress.IPv4Address(local)), "up")
    peer_mac = vtep_mac(ipaddress.IPv4Address(GATEWAY_IP))
    lab.run(node, "bridge", "fdb", "append", peer_mac, "dev", device, "dst", GATEWAY_IP, "permanent")
    lab.run(node, "ip", "neigh", "replace", GATEWAY_IP, "lladdr", peer_mac, "dev", device, "nud", "permanent")
    lab.run(node, "ip", "route", "add", "default", "via", GATEWAY_IP, "dev", device, "onlink", "table", table)
    # The tunnel's outer packets inherit the inner packet's mark: thrown back to the main table.
    lab.run(node, "ip", "route", "add", "throw", f"{GATEWAY_IP}/32", "table", table)
    lab.run(node, "ip", "rule", "add", "fwmark", f"0x{mark:x}/0x{mask:x}", "lookup", table,
            "priority", str(REDIRECT.rule_priority))  # fmt: skip
    lab.run(node, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", "cni0", "-s", POD.ip,
            "-d", "203.0.113.0/24", "-j", "MARK", "--set-xmark", f"0x{mark:x}/0x{mask:x}")  # fmt: skip
    # Redirected flows keep the pod's address into the tunnel: the CNI's masquerade is skipped.
    lab.run(node, "iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-m", "mark",
            "--mark", f"0x{flag:x}/0x{flag:x}", "-j", "ACCEPT")  # fmt: skip
    # Decapsulated packets arrive on the link: it needs an address and loose reverse-path
    # filtering (the pods' addresses are routed through the underlay, not the tunnel).
    lab.run(gateway, "ip", "address", "add", ClusterTopology.TUNNEL_ADDRESS, "dev", device, "scope", "link")
    lab.sysctl(gateway, f"net.ipv4.conf.{device.replace('.', '/')}.rp_filter", "2")
    lab.address(gateway, "n0", f"{EGRESS}/32")
    lab.run(gateway, "iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-s", PODS,
            "-d", "203.0.113.0/24", "-j", "SNAT", "--to-source", EGRESS)  # fmt: skip


class Cluster:
    """One peer on a cluster of its own, with the agents' CPU and packet accounting."""

    def __init__(self, lab: Lab, peer: str) -> None:
        self.lab, self.peer = lab, peer
        self.topology = ClusterTopology(lab)
        self.pod = self.topology.ns[POD.key]
        self.external = self.topology.ns["ex"]
        self.agents: dict[str, list[AgentRun]] = {role: [] for role in ROLES}
        # Closed connections leave the kernel's tables within seconds, on every peer alike.
        for key in ("na", "nb", "gw"):
            shorten_kernel_timeouts(lab, self.topology.ns[key])
        if peer == "kernel-gateway":
            build_kernel_gateway(lab, self.topology)
        elif peer == "egresscore":
            work = lab.workdir
            self.topology.write_inventory(work / "inventory.yaml")
            (work / "policy.yaml").write_text(cilium_policy())
            files = ["inventory.yaml", "policy.yaml"]
            for node, role in (("gw-1", "gateway"), ("node-a", "node"), ("node-b", "node")):
                config = self.topology.agent_config(work / f"{node}.yaml", node, files)
                namespace = self.topology.ns[ClusterTopology.NODE_KEYS[node]]
                self.agents[role].append(AgentRun(lab, namespace, config, role, f"{node}.log"))

    def pids(self, role: str) -> list[int]:
        pids = []
        for agent in self.agents[role]:
            main = agent.process.pid
            children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
            pids += [main, *map(int, children)]
        return pids

    def cpu_seconds(self, role: str) -> float:
        total = 0
        for pid in self.pids(role):
            # A short-lived helper (iptables-restore) may be gone between the listing and here.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / TICKS

    def queued(self, role: str, since: float) -> int:
        """Packets the role's queues were handed, from status files written after ``since``
        (a worker writes its status every 0.2 s)."""
        deadline = time.monotonic() + 5
        while True:
            statuses = [status for agent in self.agents[role] for status in agent.status()]
            if all(float(status["time"]) >= since for status in statuses) or time.monotonic() > deadline:
                return sum(int(status["datapath"]["queue_packets"]) for status in statuses)
            time.sleep(0.05)

    def stop(self) -> None:
        codes = {agent.log_path.name: agent.stop() for role in ROLES for agent in self.agents[role]}
        assert all(code == 0 for code in codes.values()), f"{self.peer}: agents' exit codes {codes}"


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, Cluster]]:
    """All three peers at once, each on a cluster of its own (their names and namespaces
    differ, their addresses are the same): the measurements alternate between them."""
    require_network()
    labs: list[Lab] = []
    built: dict[str, Cluster] = {}
    try:
        for peer in PEERS:
            lab = Lab()
            labs.append(lab)
            built[peer] = Cluster(lab, peer)
        yield built
    finally:
        try:
            for running in built.values():
                running.stop()
        finally:
            for lab in labs:
                lab.close()


def rounds(config: pytest.Config) -> int:
    return 1 if durations(config)["tcp"] < 2 else ROUNDS


def interleaved(
    config: pytest.Config,
    clusters: dict[str, Cluster],
    metric: str,
    work: Callable[[Cluster], dict[str, Any]],
) -> None:
    """``rounds`` rounds, each measuring every peer once, in an order that alternates from
    round to round (the machines drift: a ratio is taken within a round, then the median
    of the rounds' ratios is reported)."""
    for number in range(rounds(config)):
        order = PEERS if number % 2 == 0 else tuple(reversed(PEERS))
        for peer in order:
            cluster = clusters[peer]
            result, extra = measured(cluster, lambda cluster=cluster: work(cluster))  # type: ignore[misc]
            record(config, peer, metric, {**result, **extra})


def record(config: pytest.Config, peer: str, metric: str, values: dict[str, Any]) -> None:
    from conftest import CLUSTER_RESULTS

    config.stash.setdefault(CLUSTER_RESULTS, {}).setdefault(metric, {}).setdefault(peer, []).append(values)


def measured(cluster: Cluster, work: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``work()``, with the agents' CPU time and queued packets over it (none without agents)."""
    if not any(cluster.agents.values()):
        return work(), {}
    now = time.time()
    packets = {role: cluster.queued(role, now) for role in ROLES}
    cpu = {role: cluster.cpu_seconds(role) for role in ROLES}
    result = work()
    cpu = {role: cluster.cpu_seconds(role) - cpu[role] for role in ROLES}
    now = time.time()
    queued = {role: cluster.queued(role, now) - packets[role] for role in ROLES}
    used, handed = sum(cpu.values()), sum(queued.values())
    extra: dict[str, Any] = {
        "cpu_seconds": used,
        "packets_handed": handed,
        "us_per_packet": used / handed * 1e6 if handed else None,
    }
    for role in ROLES:
        extra[f"{role}_cpu_seconds"], extra[f"{role}_packets_handed"] = cpu[role], queued[role]
    return result, extra


def expect_source(cluster: Cluster, seen: set[str]) -> None:
    expected = EXPECTED_SOURCE[cluster.peer]
    assert seen == {expected}, f"{cluster.peer}: the external host saw {seen}, expected {expected}"


SERVERS = itertools.count()


def started_server(cluster: Cluster, kind: str, port: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A recording server on the external host, and its record file (one per start)."""
    record_path = cluster.lab.workdir / f"{name}-{next(SERVERS)}.jsonl"
    return cluster.lab.peer(cluster.external, kind, bind=EXTERNAL, port=port, record=record_path), record_path


def load(cluster: Cluster, mode: str, *args: str, timeout: float) -> dict[str, Any]:
    result = cluster.lab.run(
        cluster.pod, sys.executable, "-m", "egresscore.netlab.load", mode, "--host", EXTERNAL, *args,
        timeout=timeout,
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def iperf3(cluster: Cluster, seconds: float) -> dict[str, Any]:
    lab = cluster.lab
    log = lab.workdir / f"iperf3-{cluster.peer}-{next(SERVERS)}.json"
    server = lab.spawn(cluster.external, ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", "5201"],
                       log=log.name)  # fmt: skip
    time.sleep(0.3)
    client = lab.run(cluster.pod, "iperf3", "-c", EXTERNAL, "-p", "5201", "-t", str(seconds), "-J",
                     timeout=seconds + 30)  # fmt: skip
    server.wait(15)
    expect_source(cluster, {c["remote_host"] for c in json.loads(log.read_text())["start"]["connected"]})
    end = json.loads(client.stdout)["end"]
    return {"bits_per_second": end["sum_received"]["bits_per_second"],
            "retransmits": end["sum_sent"].get("retransmits", 0)}  # fmt: skip


def test_tcp_throughput(benchmark: Any, clusters: dict[str, Cluster], request: pytest.FixtureRequest) -> None:
    seconds = durations(request.config)["tcp"]

    def work(cluster: Cluster) -> dict[str, Any]:
        result = iperf3(cluster, seconds)
        return {
            "value": result["bits_per_second"] / 1e9,
            "unit": "Gbit/s",
            "retransmits": result["retransmits"],
        }

    benchmark.pedantic(interleaved, args=(request.config, clusters, "tcp-1", work), rounds=1, iterations=1)


def first_packets(cluster: Cluster, protocol: str, count: int) -> dict[str, Any]:
    kind = "tcp-sink" if protocol == "tcp" else "udp-echo"
    server, record_path = started_server(cluster, kind, 9300, f"latency-{protocol}-{cluster.peer}")
    result = load(cluster, "latency", "--port", "9300", "--protocol", protocol, "--count", str(count),
                  timeout=count * 2.5 + 30)  # fmt: skip
    cluster.lab.stop(server)
    expect_source(cluster, {r["peer"] for r in read_records(str(record_path))})
    assert result["count"], f"{cluster.peer}: no {protocol} flow got its answer ({result['failures']} failed)"
    return result


# Before the connection rate: the latencies are taken with the kernel's and the gateway's tables
# free of the thousands of closed connections that measurement leaves.
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_first_packet_latency(
    benchmark: Any, clusters: dict[str, Cluster], protocol: str, request: pytest.FixtureRequest
) -> None:
    count = int(durations(request.config)["latency"])

    def work(cluster: Cluster) -> dict[str, Any]:
        result = first_packets(cluster, protocol, count)
        return {"value": result["median_us"], "unit": "us median", "p90_us": result["p90_us"],
                "flows": result["count"], "failures": result["failures"]}  # fmt: skip

    benchmark.pedantic(
        interleaved, args=(request.config, clusters, f"latency-{protocol}", work), rounds=1, iterations=1
    )


def connections(cluster: Cluster, seconds: float) -> dict[str, Any]:
    sink, record_path = started_server(cluster, "tcp-sink", 9100, f"sink-{cluster.peer}")
    result = load(cluster, "connections", "--port", "9100", "--duration", str(seconds), "--concurrency", "32",
                  timeout=seconds + 30)  # fmt: skip
    cluster.lab.stop(sink)
    expect_source(cluster, {r["peer"] for r in read_records(str(record_path))})
    return result


def test_new_connections_per_second(
    benchmark: Any, clusters: dict[str, Cluster], request: pytest.FixtureRequest
) -> None:
    seconds = durations(request.config)["conn"]

    def work(cluster: Cluster) -> dict[str, Any]:
        result = connections(cluster, seconds)
        # Let the closed connections' conntrack and SNAT entries go before the next one.
        time.sleep(2)
        return {"value": result["rate"], "unit": "conn/s", "failures": result["failures"]}

    benchmark.pedantic(interleaved, args=(request.config, clusters, "conn", work), rounds=1, iterations=1)
