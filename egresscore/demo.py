"""The demonstration behind ``make demo``: the whole path on a cluster of namespaces.

It builds the lab cluster of egresscore.netlab.cluster (two nodes with two pods each,
a gateway node, a router and an external host running a recording HTTP server), loads
a Cilium-format policy ("pods with app=payment-processor sending to 203.0.113.0/24,
except 203.0.113.128/25, leave through gw-1 with 192.0.2.10"), runs ``egresscore run
--role gateway`` on the gateway and ``--role node`` on both nodes, sends real HTTP
requests from every pod to three destinations, and prints which source address the
external server saw for each. Then it stops the agents and removes everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from egresscore.netlab import ClusterTopology, Lab, cilium_policy
from egresscore.netlab.agents import AgentRun
from egresscore.netlab.peers import read_records

__all__ = ["DemoRow", "run_cluster_demo", "run_demo"]

PORT = 8080


@dataclass(frozen=True, slots=True)
class DemoRow:
    pod: str
    labels: str
    node_ip: str
    destination: str
    seen: str  # the source address the external server recorded, or "no answer"
    expected: str

    @property
    def verdict(self) -> str:
        return (
            "egress IP"
            if self.seen == ClusterTopology.EGRESS_IP
            else "node IP"
            if self.seen == self.node_ip
            else "?"
        )


def _destinations() -> list[tuple[str, str]]:
    topology = ClusterTopology
    return [
        (topology.EXTERNAL_IP, "in destinationCIDRs"),
        (topology.EXCLUDED_IP, "in excludedCIDRs"),
        (topology.OTHER_IP, "outside the policy"),
    ]


def run_cluster_demo(echo: Callable[[str], object] = print) -> list[DemoRow]:
    """Build, run, measure and tear down the demo cluster; returns the table's rows."""
    if os.geteuid() != 0:
        raise PermissionError("the demo builds network namespaces: run it as root (make demo does)")
    rows: list[DemoRow] = []
    lab = Lab()
    with lab:
        echo("building the cluster: 2 nodes x 2 pods, gateway node gw-1, router, external host ...")
        topology = ClusterTopology(lab)
        work = lab.workdir
        topology.write_inventory(work / "inventory.yaml")
        (work / "policy.yaml").write_text(cilium_policy())
        files = ["inventory.yaml", "policy.yaml"]
        echo("policy (CiliumEgressGatewayPolicy):")
        for line in cilium_policy().splitlines():
            echo(f"    {line}")
        agents = [
            AgentRun(lab, topology.ns["gw"], topology.agent_config(work / "gw-1.yaml", "gw-1", files),
                     "gateway", "gw-1.log"),
        ]  # fmt: skip
        for node in ("node-a", "node-b"):
            key = ClusterTopology.NODE_KEYS[node]
            config = topology.agent_config(work / f"{node}.yaml", node, files)
            agents.append(AgentRun(lab, topology.ns[key], config, "node", f"{node}.log"))
        echo("agents running: egresscore run --role gateway on gw-1, --role node on node-a and node-b")
        record = work / "http.jsonl"
        server = lab.peer(topology.ns["ex"], "http", bind="0.0.0.0", port=PORT, record=record)
        for pod in topology.pods:
            for destination, why in _destinations():
                token = f"/demo/{pod.key}/{destination}"
                result = lab.run(
                    topology.ns[pod.key], sys.executable, "-m", "egresscore.netlab.load", "http",
                    "--url", f"http://{destination}:{PORT}{token}", "--count", "1", "--timeout", "5",
                    "--expect", token, check=False, timeout=30,
                )  # fmt: skip
                ok = result.returncode == 0 and json.loads(result.stdout or "{}").get("ok") == 1
                seen = [r["peer"] for r in read_records(str(record)) if r.get("path") == token]
                selected = dict(pod.labels).get("app") == "payment-processor"
                expected = (
                    ClusterTopology.EGRESS_IP
                    if selected and why == "in destinationCIDRs"
                    else topology.node_ip_of(pod)
                )
                labels = ",".join(f"{k}={v}" for k, v in pod.labels)
                rows.append(
                    DemoRow(
                        pod.name,
                        labels,
                        topology.node_ip_of(pod),
                        f"{destination} ({why})",
                        seen[0] if ok and seen else "no answer",
                        expected,
                    )
                )
        counters = _node_counters(agents[1:])
        for agent in agents:
            agent.stop()
        lab.stop(server)
    _print_table(rows, echo)
    echo("")
    decided = ", ".join(
        f"{key} {value}" for key, value in counters.items() if value and key != "queue_packets"
    )
    echo(
        f"node workers (both nodes): {counters.get('queue_packets', 0)} packets queued, one per connection "
        f"to a policy destination ({decided}); the connections' other packets stayed in the kernel"
    )
    wrong = [row for row in rows if row.seen != row.expected]
    echo("all sources as the policy says" if not wrong else f"{len(wrong)} source(s) differ from the policy")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    left = [line.split()[0] for line in listed.splitlines() if line.startswith(lab.prefix)]
    if left:
        raise RuntimeError(f"namespaces of the demo are left behind: {', '.join(left)}")
    echo(f"torn down: the demo's namespaces ({lab.prefix}*) and all the rules, routes and links in them")
    return rows


def _node_counters(agents: list[AgentRun]) -> dict[str, int]:
    totals: dict[str, int] = {}
    time.sleep(0.3)  # one status interval
    for agent in agents:
        for status in agent.status():
            for key in ("queue_packets", "passed", "redirected", "unknown_source_drop", "no_gateway_drop"):
                totals[key] = totals.get(key, 0) + int(status.get("datapath", {}).get(key, 0))
    return totals


def _print_table(rows: list[DemoRow], echo: Callable[[str], object]) -> None:
    echo("")
    header = (
        f"{'pod':<12} {'labels':<22} {'destination':<36} {'source seen by the server':<26} {'expected':<14}"
    )
    echo(header.rstrip())
    echo("-" * len(header.rstrip()))
    for row in rows:
        mark = "ok" if row.seen == row.expected else "WRONG"
        seen = f"{row.seen} ({row.verdict})" if row.seen != "no answer" else row.seen
        echo(f"{row.pod:<12} {row.labels:<22} {row.destination:<36} {seen:<26} {row.expected:<14} {mark}")


def run_demo(echo: Callable[[str], object] = print) -> None:
    """``egresscore demo``: the cluster demonstration; exits non-zero when a source was wrong."""
    rows = run_cluster_demo(echo)
    if any(row.seen != row.expected for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    run_demo()
