"""The node role over time on the namespace cluster: policies added, changed and removed
while traffic runs; no leak through agent restarts, crashes and reloads (a packet
capture on the external host is the witness); stop, cleanup and failure modes; a bad
policy file; a node that is its own gateway (``--role both``).
../shared/NETWORK_TESTS.md applies: namespaces only, bounded generators, real peers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dpkt
import pytest
from cluster_lab import EGRESS, EXTERNAL, GATEWAY_NODE, NODE_A, NODE_B, Cluster, cluster, egresscore_command
from network_lab import require_network

from egresscore.netlab import ClusterTopology, Lab, cilium_policy
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

OTHER = ClusterTopology.OTHER_IP
NOBODY = cilium_policy("reporting-egress", app="reporting")  # selects no pod of the cluster


class Capture:
    """tcpdump on the external host: every IPv4 packet arriving for ``host``."""

    def __init__(self, site: Cluster, host: str) -> None:
        self.site = site
        self.path = site.work / f"capture-{time.monotonic_ns()}.pcap"
        self.process = site.lab.spawn(
            site.ns("ex"),
            [
                "tcpdump",
                "-i",
                "e0",
                "-n",
                "-U",
                "-Z",
                "root",
                "-w",
                str(self.path),
                "ip",
                "and",
                "dst",
                "host",
                host,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # tcpdump says "listening on e0" on stderr once the capture runs.
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        assert b"listening" in line, line

    def sources(self) -> dict[str, int]:
        self.site.lab.stop(self.process)
        counts: dict[str, int] = {}
        with open(self.path, "rb") as handle:
            for _timestamp, frame in dpkt.pcap.Reader(handle):
                packet = dpkt.ethernet.Ethernet(frame).data
                if isinstance(packet, dpkt.ip.IP):
                    source = ".".join(str(b) for b in packet.src)
                    counts[source] = counts.get(source, 0) + 1
        return counts


def background(site: Cluster, pod: str, *args: str) -> subprocess.Popen[bytes]:
    return site.lab.spawn(
        site.ns(pod), [sys.executable, "-m", "egresscore.netlab.load", *args], stdout=subprocess.PIPE
    )


def result_of(process: subprocess.Popen[bytes], timeout: float = 90) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    return dict(json.loads(out))


def test_no_selected_packet_leaves_with_another_address_through_restarts_crashes_and_reloads() -> None:
    with cluster() as site:
        sink = site.server("tcp-sink", 9300, bind=EXTERNAL)
        site.server("udp-echo", 9301, bind=EXTERNAL)
        capture = Capture(site, EXTERNAL)
        # Both selected pods open new connections and new UDP flows all along (bounded).
        generators = [
            background(site, pod, "connections", "--host", EXTERNAL, "--port", "9300", "--duration", "16",
                       "--concurrency", "4", "--timeout", "2")
            for pod in ("pa1", "pb1")
        ] + [
            background(site, pod, "latency", "--protocol", "udp", "--host", EXTERNAL, "--port", "9301",
                       "--count", "1500", "--pause", "0.01", "--timeout", "0.5")
            for pod in ("pa1", "pb1")
        ]  # fmt: skip
        time.sleep(1)
        # A reload that changes the policies (a second policy) but not what these pods get.
        site.write_policy(cilium_policy() + "---\n" + NOBODY)
        site.wait_reloaded(2)
        for step, node in enumerate(("node-a", "node-b", "gw-1")):
            site.agents[node].stop()  # a clean restart
            time.sleep(0.7)
            site.start(node, f"{node}-restart.log")
            time.sleep(0.7)
            site.agents[node].crash()  # a crash: no cleanup at all
            time.sleep(0.7)
            site.start(node, f"{node}-after-crash-{step}.log")
            time.sleep(0.7)
        results = [result_of(p) for p in generators]
        seen = capture.sources()
        # The witness: every packet of the selected pods to the policy destination that
        # reached the external host carried the egress IP; none the nodes' addresses.
        assert set(seen) == {EGRESS}, seen
        assert seen[EGRESS] > 200
        connected = sum(int(r["connections"]) for r in results[:2])
        assert connected > 100, results
        assert sum(int(r["count"]) for r in results[2:]) > 500, [r["count"] for r in results[2:]]
        assert {r["peer"] for r in site.stop_server(sink)} == {EGRESS}
        # After all that, a new flow goes through at once.
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS


def iperf3_server(site: Cluster, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = site.work / f"iperf3-server-{port}.json"
    server = site.lab.spawn(
        site.ns("ex"), ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", str(port)], log=log.name
    )
    time.sleep(0.3)
    return server, log


def iperf3_stream(site: Cluster, pod: str, port: int, seconds: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = site.work / f"iperf3-client-{port}.json"
    client = site.lab.spawn(
        site.ns(pod),
        ["iperf3", "-c", EXTERNAL, "-p", str(port), "-t", str(seconds), "-b", "50M", "-i", "1", "-J"],
        log=log.name,
    )
    return client, log


def finished_stream(client: subprocess.Popen[bytes], log: Path, server_log: Path) -> tuple[list[int], str]:
    """The per-second byte counts of a finished stream, and the source its server saw."""
    assert client.wait(60) == 0, log.read_text()[-2000:]
    result = json.loads(log.read_text())
    intervals = [int(interval["sum"]["bytes"]) for interval in result["intervals"]]
    for _ in range(50):
        if server_log.stat().st_size:
            break
        time.sleep(0.1)
    connected = json.loads(server_log.read_text())["start"]["connected"]
    return intervals, connected[0]["remote_host"]


def test_policies_added_changed_and_removed_apply_to_new_flows_at_once_and_streams_keep_going() -> None:
    require_network()
    lab = Lab()
    try:
        site = Cluster(lab)
        site.policy_path.write_text(NOBODY)
        site.start_all()
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record) == NODE_A
        # A stream that starts before any policy selects its pod.
        server_1, server_log_1 = iperf3_server(site, 5301)
        stream_1, log_1 = iperf3_stream(site, "pa1", 5301, 14)
        time.sleep(1.5)

        # Added: new flows of the selected pods leave through the gateway at once.
        site.write_policy(cilium_policy())
        site.wait_reloaded(2)
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        assert site.fetch("pb1", EXTERNAL, record) == EGRESS
        assert site.fetch("pa2", EXTERNAL, record) == NODE_A
        assert site.fetch("pa1", OTHER, record) == NODE_A
        server_2, server_log_2 = iperf3_server(site, 5302)
        stream_2, log_2 = iperf3_stream(site, "pa1", 5302, 10)
        time.sleep(1.5)

        # Changed: a second destination CIDR, and another pod selected by its labels.
        site.write_policy(cilium_policy(destinations=("203.0.113.0/24", "198.51.100.0/24")))
        site.wait_reloaded(3)
        assert site.fetch("pa1", OTHER, record) == EGRESS
        site.relabel({"pa2": {"app": "payment-processor"}})
        site.wait_reloaded(4)
        assert site.fetch("pa2", EXTERNAL, record) == EGRESS
        time.sleep(1.5)

        # Removed, every policy: new flows go their normal way again; the gateway's slot is
        # retired, not removed, while the stream it carries lives.
        site.write_policy("# no egress policies\n")
        site.wait_reloaded(5)
        assert site.fetch("pa1", EXTERNAL, record) == NODE_A
        assert site.fetch("pa2", EXTERNAL, record) == NODE_A

        # Both streams ran through every change, each with the address its first packet got.
        intervals_1, seen_1 = finished_stream(stream_1, log_1, server_log_1)
        intervals_2, seen_2 = finished_stream(stream_2, log_2, server_log_2)
        server_1.wait(10)
        server_2.wait(10)
        assert seen_1 == NODE_A and seen_2 == EGRESS
        assert all(count > 0 for count in intervals_1), intervals_1
        assert all(count > 0 for count in intervals_2), intervals_2
        retired = site.agents["node-a"].wait_for("slot_retired")
        assert retired["endpoint"] == GATEWAY_NODE
        site.stop_all()
    finally:
        lab.close()


def test_a_bad_policy_file_keeps_the_policies_in_force_and_says_where_it_is_wrong() -> None:
    with cluster() as site:
        record = site.server("http", 8080)
        site.write_policy(cilium_policy().replace("egressIP:", "egressIp:"))
        for node in ("node-a", "gw-1"):
            failed = site.agents[node].wait_for("reload_failed")
            assert failed["generation"] == 1
            assert any(
                "policy.yaml" in error
                and "CiliumEgressGatewayPolicy payments-egress" in error
                and "spec.egressGateway.egressIp: unknown field" in error
                for error in failed["errors"]
            ), failed
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        assert site.fetch("pb1", EXTERNAL, record) == EGRESS
        site.write_policy(cilium_policy(destinations=("203.0.113.0/24", "198.51.100.0/24")))
        site.wait_reloaded(2)
        assert site.fetch("pa1", OTHER, record) == EGRESS


def test_a_stopped_node_agent_holds_selected_flows_and_cleanup_removes_everything() -> None:
    with cluster() as site:
        record = site.server("http", 8080)
        server, server_log = iperf3_server(site, 5303)
        stream, log = iperf3_stream(site, "pa1", 5303, 6)
        time.sleep(1)
        agent = site.agents["node-a"]
        assert agent.stop() == 0
        assert agent.wait_for("stopped", role="node")["kept"] is True
        # Stopped, failure_mode closed: the rules stay and no worker answers, so a new flow
        # to a policy destination is held (dropped) rather than masqueraded...
        assert site.fetch("pa1", EXTERNAL, record, timeout=2) is None
        assert [r for r in read_records(record) if r["peer"] == NODE_A and "/pa1/" in r["path"]] == []
        # ...while traffic to other destinations, and decided flows, go on.
        assert site.fetch("pa1", OTHER, record) == NODE_A
        time.sleep(1)
        site.start("node-a", "node-a-2.log")
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        intervals, seen = finished_stream(stream, log, server_log)
        server.wait(10)
        assert seen == EGRESS and all(count > 0 for count in intervals), intervals
        assert site.agents["node-a"].stop() == 0
        state = site.host_state("node-a")
        assert state["chains"] and state["rules"] and len(state["guard_rules"]) == 2 and state["link"]
        config = site.work / "node-a.yaml"
        cleaned = site.lab.run(
            site.ns("na"), *egresscore_command(), "cleanup", "--role", "node", "--config", str(config)
        )
        assert "removed iptables chains EGRESSCORE-NODE-*" in cleaned.stdout
        assert "removed link egc.vx" in cleaned.stdout
        assert site.host_state("node-a") == {"chains": [], "rules": [], "guard_rules": [], "link": False}
        # Without egresscore the pod's flows take the node's address: nothing holds them.
        assert site.fetch("pa1", EXTERNAL, record) == NODE_A


def test_failure_mode_open_removes_everything_on_stop() -> None:
    with cluster(failure_mode="open") as site:
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        chains = site.host_state("node-a")["chains"]
        assert all("--queue-bypass" in line for line in chains if "NFQUEUE" in line)
        assert site.agents["node-a"].stop() == 0
        assert site.host_state("node-a") == {"chains": [], "rules": [], "guard_rules": [], "link": False}
        # Open: with no agent the pod leaves with its node's address rather than not at all.
        assert site.fetch("pa1", EXTERNAL, record) == NODE_A
        assert site.fetch("pb1", EXTERNAL, record) == EGRESS


def test_a_bad_policy_at_start_and_a_second_agent_change_nothing() -> None:
    with cluster() as site:
        node = site.agents["node-a"]
        before = site.host_state("node-a")
        config = str(site.work / "node-a.yaml")
        second = site.lab.run(
            site.ns("na"), *egresscore_command(), "run", "--role", "node", "--config", config, check=False
        )
        assert second.returncode == 1
        assert f"another egresscore node agent (pid {node.process.pid})" in second.stderr
        assert site.host_state("node-a") == before
        assert node.stop() == 0
        # A fresh node with a broken policy file: refused, nothing on the host.
        site.lab.run(site.ns("na"), *egresscore_command(), "cleanup", "--config", config)
        site.write_policy(cilium_policy().replace("203.0.113.0/24", "203.0.113.0/33"))
        refused = site.lab.run(
            site.ns("na"), *egresscore_command(), "run", "--role", "node", "--config", config, check=False
        )
        assert refused.returncode == 1
        failed = [json.loads(line) for line in refused.stderr.splitlines() if '"failed"' in line]
        assert failed and "policy.yaml" in failed[0]["error"] and "203.0.113.0/33" in failed[0]["error"]
        assert site.host_state("node-a") == {"chains": [], "rules": [], "guard_rules": [], "link": False}


SECOND_EGRESS = ClusterTopology.SECOND_EGRESS_IP
# gw-1's own payment pods send 203.0.113.0/26 through gw-2: a part of gw-1's own
# destination, so that local pods' flows to gw-2 pass through gw-1's gateway rules first.
TWO_GATEWAYS = (
    cilium_policy()
    + "---\n"
    + cilium_policy(
        "gw-1-pods-via-gw-2",
        destinations=("203.0.113.0/26",),
        excluded=(),
        egress_ip=SECOND_EGRESS,
        gateway_label="second-gateway",
        on_node="gw-1",
    )
)


def test_a_node_that_is_its_own_gateway_translates_its_pods_and_serves_the_others() -> None:
    with cluster(gateway_role="both", second_gateway=True, policy=TWO_GATEWAYS) as site:
        record = site.server("http", 8080)
        second = ClusterTopology.SECOND_EXTERNAL_IP
        # pg1 runs on gw-1 itself: its flows are translated there, without a tunnel...
        assert site.fetch("pg1", second, record) == EGRESS
        assert site.fetch("pg1", ClusterTopology.EXCLUDED_IP, record) == GATEWAY_NODE
        assert site.fetch("pg1", OTHER, record) == GATEWAY_NODE
        # ...and those another gateway serves go through the tunnel to gw-2.
        assert site.fetch("pg1", EXTERNAL, record) == SECOND_EGRESS
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS  # that policy selects gw-1's pods only
        # The other nodes' pods still come through the tunnel.
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        assert site.fetch("pb2", EXTERNAL, record) == NODE_B
        echo = site.server("udp-echo", 7201, bind=second)
        result = site.load("pg1", "udp-echo", "--host", second, "--port", "7201", "--count", "10")
        assert result == {"sent": 10, "replies": 10}
        assert {r["peer"] for r in read_records(echo)} == {EGRESS}
        remote_echo = site.server("udp-echo", 7202, bind=EXTERNAL)
        result = site.load("pg1", "udp-echo", "--host", EXTERNAL, "--port", "7202", "--count", "10")
        assert result == {"sent": 10, "replies": 10}
        assert {r["peer"] for r in read_records(remote_echo)} == {SECOND_EGRESS}
        # A bulk TCP transfer through the tunnel to gw-2: the tunnel's outer packets carry
        # the marks of the packets inside, and the gateway role here must let them be.
        result = site.load("pg1", "http", "--url", f"http://{EXTERNAL}:8080/bytes?n=5000000", "--count", "1")
        assert result["ok"] == 1, result


def test_the_status_command_reads_the_workers() -> None:
    with cluster() as site:
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        time.sleep(0.4)
        status = site.lab.run(
            site.ns("na"), *egresscore_command(), "status", "--config", str(site.work / "node-a.yaml")
        )
        assert "node queue 100: running" in status.stdout
        assert "redirected: 1" in status.stdout


def test_a_retired_gateway_slot_is_freed_once_its_last_connection_is_gone() -> None:
    with cluster() as site:
        # Short conntrack timeouts on node-a, so that closed connections go within seconds.
        for key, value in (("time_wait", "1"), ("close", "1"), ("fin_wait", "1"), ("last_ack", "1")):
            site.lab.sysctl(site.ns("na"), f"net.netfilter.nf_conntrack_tcp_timeout_{key}", value)
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record) == EGRESS
        assert site.host_state("node-a")["rules"]
        site.write_policy("# no egress policies\n")
        site.wait_reloaded(2)
        agent = site.agents["node-a"]
        assert agent.wait_for("slot_retired")["endpoint"] == GATEWAY_NODE
        # Checked every 10 s: once no connection carries the slot's mark, its rule and table go.
        freed = agent.wait_for("slot_freed", timeout=40)
        assert freed["endpoint"] == GATEWAY_NODE
        assert site.host_state("node-a")["rules"] == []
        table = site.lab.run(site.ns("na"), "ip", "route", "show", "table", "2100", check=False)
        assert table.stdout.strip() == ""


def test_a_flow_redirected_to_a_node_that_runs_no_gateway_is_dropped_there() -> None:
    # node-b runs the node role only; a policy that names it as a gateway makes node-a
    # tunnel pa1's flows to it. node-b must not forward them under its masquerade.
    to_node_b = cilium_policy().replace(
        'matchLabels: {egress-gateway: "true"}', "matchLabels: {kubernetes.io/hostname: node-b}"
    )
    with cluster(policy=to_node_b) as site:
        record = site.server("http", 8080)
        assert site.fetch("pa1", EXTERNAL, record, timeout=2) is None
        assert read_records(record) == []
        dropped = site.lab.run(
            site.ns("nb"), "iptables", "-t", "mangle", "-L", "EGRESSCORE-NODE-FWD", "-v", "-x", "-n"
        )
        tunnel_drop = next(
            line for line in dropped.stdout.splitlines() if "egc.vx" in line and "DROP" in line
        )
        assert int(tunnel_drop.split()[0]) > 0  # what node-a sent did arrive, and stopped here
        assert site.fetch("pa2", EXTERNAL, record) == NODE_A  # the unselected pod is untouched


def test_a_gateway_whose_policies_disagree_with_the_nodes_drops_what_it_cannot_translate() -> None:
    with cluster() as site:
        # gw-1 restarts with an inventory that does not list pa1 yet (its copy lags behind
        # node-a's): node-a still tunnels pa1's flows to it, gw-1 would pass them.
        inventory = (site.work / "inventory.yaml").read_text()
        lagging = "\n".join(line for line in inventory.splitlines() if "payments-a," not in line) + "\n"
        (site.work / "inventory-gw.yaml").write_text(lagging)
        assert site.agents["gw-1"].stop() == 0
        gateway = site.start("gw-1", "gw-1-lagging.log", files=["inventory-gw.yaml", "policy.yaml"])
        record = site.server("http", 8080)
        echo = site.server("udp-echo", 7203, bind=EXTERNAL)
        # Neither a TCP nor a UDP flow of pa1 leaves: not untranslated, not masqueraded.
        assert site.fetch("pa1", EXTERNAL, record, timeout=2) is None
        result = site.load(
            "pa1", "udp-echo", "--host", EXTERNAL, "--port", "7203", "--count", "3", "--timeout", "0.5"
        )
        assert result["replies"] == 0
        assert read_records(record) == [] and read_records(echo) == []
        time.sleep(0.4)
        disagreements = sum(int(status["datapath"]["tunnel_disagreement"]) for status in gateway.status())
        assert disagreements >= 2
        assert site.fetch("pb1", EXTERNAL, record) == EGRESS  # the gateway knows pb1
