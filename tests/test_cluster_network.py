"""The whole path on the namespace cluster: pods on two nodes, redirected through the
VXLAN tunnel to gw-1, translated to the egress IP 192.0.2.10 (egresscore.netlab.cluster;
../shared/NETWORK_TESTS.md). Every assertion is on what a real server recorded, what a
client received, or what the kernel holds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_lab import EGRESS, EXTERNAL, GATEWAY_NODE, NODE_A, NODE_B, Cluster, cluster

from egresscore.netlab import ClusterTopology
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

EXCLUDED = ClusterTopology.EXCLUDED_IP
OTHER = ClusterTopology.OTHER_IP


@pytest.fixture(scope="module")
def site() -> Iterator[Cluster]:
    with cluster() as built:
        yield built


@pytest.fixture(scope="module")
def http_record(site: Cluster) -> str:
    """An HTTP server on the external host, on all three of its addresses."""
    return site.server("http", 8080)


def node_counters(site: Cluster, node: str) -> dict[str, Any]:
    time.sleep(0.3)  # one status interval
    return dict(site.agents[node].status()[0]["datapath"])


@pytest.mark.parametrize(
    ("pod", "destination", "expected"),
    [
        ("pa1", EXTERNAL, EGRESS),  # selected, in destinationCIDRs
        ("pb1", EXTERNAL, EGRESS),  # the same policy on the other node
        ("pa1", EXCLUDED, NODE_A),  # inside excludedCIDRs
        ("pb1", OTHER, NODE_B),  # outside destinationCIDRs
        ("pa2", EXTERNAL, NODE_A),  # not selected (app=frontend)
        ("pb2", EXTERNAL, NODE_B),
        ("pb2", EXCLUDED, NODE_B),
    ],
)
def test_the_external_server_sees_the_address_the_policy_gives(
    site: Cluster, http_record: str, pod: str, destination: str, expected: str
) -> None:
    assert site.fetch(pod, destination, http_record) == expected


def test_udp_and_icmp_of_selected_pods_leave_with_the_egress_ip(site: Cluster) -> None:
    echo = site.server("udp-echo", 7200, bind=EXTERNAL)
    for pod in ("pa1", "pb1"):
        result = site.load(
            pod, "udp-echo", "--host", EXTERNAL, "--port", "7200", "--count", "20", "--size", "64"
        )
        assert result == {"sent": 20, "replies": 20}, (pod, result)
    assert {r["peer"] for r in read_records(echo)} == {EGRESS}
    icmp = site.server("icmp", 0, bind=EXTERNAL)
    ping = site.lab.run(site.ns("pa1"), "ping", "-c", "3", "-i", "0.2", "-W", "2", EXTERNAL, check=False)
    assert ping.returncode == 0, ping.stdout
    assert {r["peer"] for r in read_records(icmp)} == {EGRESS}
    # An unselected pod's ping goes its normal way: the node's masquerade.
    site.lab.run(site.ns("pa2"), "ping", "-c", "2", "-i", "0.2", "-W", "2", EXTERNAL)
    assert {r["peer"] for r in read_records(icmp)} == {EGRESS, NODE_A}


def test_pod_to_pod_and_pod_to_node_traffic_is_untouched(site: Cluster) -> None:
    # Servers in a pod on the other node, a pod on the same node, and node-b itself; the
    # client is a selected pod. They all see the pod's own address.
    on_pod_b = site.server("http", 8081, where="pb2")
    on_pod_a = site.server("http", 8081, where="pa2")
    on_node_b = site.server("http", 8081, where="nb")
    pa1 = site.topology.pod("pa1").ip
    assert site.fetch("pa1", site.topology.pod("pb2").ip, on_pod_b, port=8081) == pa1
    assert site.fetch("pa1", site.topology.pod("pa2").ip, on_pod_a, port=8081) == pa1
    assert site.fetch("pa1", NODE_B, on_node_b, port=8081) == pa1


def test_two_pods_on_two_nodes_share_the_egress_ip_and_replies_reach_the_right_pod(site: Cluster) -> None:
    record = site.server("http", 8082)
    results: dict[str, dict[str, Any]] = {}

    def requests(pod: str) -> None:
        # Each answer repeats its request's path, which names the pod: --expect fails any
        # answer that reached the other pod.
        results[pod] = site.load(
            pod, "http", "--url", f"http://{EXTERNAL}:8082/from/{pod}", "--count", "60", "--concurrency", "6",
            "--expect", f"/from/{pod}",
        )  # fmt: skip

    threads = [threading.Thread(target=requests, args=(pod,)) for pod in ("pa1", "pb1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert results["pa1"]["ok"] == 60 and results["pb1"]["ok"] == 60, results
    seen = {(r["path"], r["peer"]) for r in read_records(record)}
    assert seen == {("/from/pa1", EGRESS), ("/from/pb1", EGRESS)}


def test_a_flow_is_decided_once_and_its_bulk_never_reaches_user_space(site: Cluster) -> None:
    before = node_counters(site, "node-a")
    record = site.server("http", 8083)
    result = site.load("pa1", "http", "--url", f"http://{EXTERNAL}:8083/bytes?n=20000000", "--count", "1")
    assert result["ok"] == 1, result
    assert {r["peer"] for r in read_records(record)} == {EGRESS}
    after = node_counters(site, "node-a")
    # One redirect decision for the connection; of its thousands of packets, only the
    # first (and a retransmitted SYN at most) reached the node's queue.
    assert after["redirected"] - before["redirected"] == 1
    assert after["queue_packets"] - before["queue_packets"] <= 2


def test_tcp_through_the_tunnel_fits_its_mtu_both_ways(site: Cluster) -> None:
    # The pod sends full-size segments towards the external host: the node clamps the
    # MSS to the tunnel's MTU, so they fit it without fragmentation or loss.
    log = site.work / "iperf3-mtu.json"
    server = site.lab.spawn(
        site.ns("ex"), ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", "5210"], log=log.name
    )
    time.sleep(0.3)
    client = site.lab.run(site.ns("pa1"), "iperf3", "-c", EXTERNAL, "-p", "5210", "-t", "2", "-J", timeout=30)
    server.wait(10)
    sent = json.loads(client.stdout)
    assert sent["end"]["sum_received"]["bytes"] > 10_000_000
    assert [c["remote_host"] for c in json.loads(log.read_text())["start"]["connected"]] == [EGRESS]
    mtu = int(site.lab.run(site.ns("na"), "cat", "/sys/class/net/egc.vx/mtu").stdout)
    assert mtu == 1450
    # Reversed (-R): the external host sends to the pod through the gateway.
    server = site.lab.spawn(site.ns("ex"), ["iperf3", "-s", "-1", "-B", EXTERNAL, "-p", "5211"])
    time.sleep(0.3)
    reverse = site.lab.run(
        site.ns("pa1"), "iperf3", "-c", EXTERNAL, "-p", "5211", "-t", "2", "-R", "-J", timeout=30
    )
    server.wait(10)
    assert json.loads(reverse.stdout)["end"]["sum_received"]["bytes"] > 10_000_000


def test_the_gateway_node_itself_is_not_redirected(site: Cluster) -> None:
    # gw-1's own address is a cluster destination: a selected pod reaches it directly.
    record = site.server("http", 8084, where="gw")
    assert site.fetch("pa1", GATEWAY_NODE, record, port=8084) == site.topology.pod("pa1").ip
