"""The namespace cluster of the node-role tests (egresscore.netlab.cluster) with its
agents running, and the helpers the tests share (../shared/NETWORK_TESTS.md: every
address from the documentation ranges, every generator bounded, every server stopped
by the lab, assertions on what the real servers recorded)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from network_lab import require_network

from egresscore.netlab import ClusterTopology, Lab, cilium_policy
from egresscore.netlab.agents import AgentRun, egresscore_command
from egresscore.netlab.peers import read_records

__all__ = ["Cluster", "cluster", "egresscore_command"]

EGRESS = ClusterTopology.EGRESS_IP
EXTERNAL = ClusterTopology.EXTERNAL_IP
NODE_A = ClusterTopology.NODE_IPS["node-a"]
NODE_B = ClusterTopology.NODE_IPS["node-b"]
GATEWAY_NODE = ClusterTopology.NODE_IPS["gw-1"]


class Cluster:
    """A lab cluster, its policy files and its agents (gateway on gw-1, node on node-a
    and node-b; ``gateway_role="both"`` runs both roles on gw-1, which then hosts pg1)."""

    def __init__(
        self,
        lab: Lab,
        *,
        gateway_role: str = "gateway",
        failure_mode: str = "closed",
        second_gateway: bool = False,
        policy: str | None = None,
    ) -> None:
        self.lab = lab
        self.topology = ClusterTopology(
            lab, gateway_pod=gateway_role == "both", second_gateway=second_gateway
        )
        self.work = lab.workdir
        self.gateway_role = gateway_role
        self.failure_mode = failure_mode
        self.files = ["inventory.yaml", "policy.yaml"]
        self.topology.write_inventory(self.work / "inventory.yaml")
        self.policy_path = self.work / "policy.yaml"
        self.policy_path.write_text(policy if policy is not None else cilium_policy())
        self.agents: dict[str, AgentRun] = {}
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    # -- agents -------------------------------------------------------------------------

    def config(self, node: str, extra: str = "", files: list[str] | None = None) -> Path:
        return self.topology.agent_config(
            self.work / f"{node}.yaml", node, files or self.files, failure_mode=self.failure_mode, extra=extra
        )

    def start(
        self, node: str, log_name: str | None = None, *, wait: bool = True, files: list[str] | None = None
    ) -> AgentRun:
        key = ClusterTopology.NODE_KEYS[node]
        role = {"gw-1": self.gateway_role, "gw-2": "gateway"}.get(node, "node")
        agent = AgentRun(
            self.lab,
            self.topology.ns[key],
            self.config(node, files=files),
            role,
            log_name or f"{node}.log",
            wait=wait,
        )
        self.agents[node] = agent
        return agent

    def start_all(self) -> None:
        for node in ("gw-1", "gw-2", "node-a", "node-b"):
            if node in self.topology.nodes:
                self.start(node)

    def stop_all(self) -> None:
        for agent in self.agents.values():
            if agent.process.poll() is None:
                assert agent.stop() == 0, agent.log_path.read_text()[-3000:]

    def wait_reloaded(self, generation: int, timeout: float = 20) -> None:
        """Every running agent (all of its roles) has applied policy ``generation``."""
        for agent in self.agents.values():
            if agent.process.poll() is None:
                agent.wait_for("reloaded", timeout, generation=generation)

    def write_policy(self, text: str) -> None:
        """Replace policy.yaml as a ConfigMap update does: a new file moved into place."""
        temporary = self.policy_path.with_name("policy.yaml.new")
        temporary.write_text(text)
        temporary.replace(self.policy_path)

    def relabel(self, labels: dict[str, dict[str, str]]) -> None:
        temporary = self.work / "inventory.yaml.new"
        self.topology.write_inventory(temporary, relabel=labels)
        temporary.replace(self.work / "inventory.yaml")

    # -- traffic ------------------------------------------------------------------------

    def server(self, kind: str, port: int, where: str = "ex", bind: str = "0.0.0.0") -> str:
        """Start a recording server; returns its record file."""
        record = str(self.work / f"{kind}-{where}-{port}-{len(self.servers)}.jsonl")
        self.servers[record] = self.lab.peer(
            self.topology.ns[where], kind, bind=bind, port=port, record=record, duration=300
        )
        return record

    def stop_server(self, record: str) -> list[dict[str, Any]]:
        """Stop the server writing ``record`` (sinks write their totals then); its records."""
        self.lab.stop(self.servers.pop(record))
        return read_records(record)

    def load(self, pod: str, *args: str, timeout: float = 60, check: bool = True) -> dict[str, Any]:
        result = self.lab.run(
            self.topology.ns[pod], sys.executable, "-m", "egresscore.netlab.load", *args,
            timeout=timeout, check=check,
        )  # fmt: skip
        return dict(json.loads(result.stdout)) if result.stdout.strip() else {"error": result.stderr}

    def fetch(
        self, pod: str, destination: str, record: str, port: int = 8080, timeout: float = 5
    ) -> str | None:
        """One HTTP request from ``pod``; the source address the server recorded for it
        (None: no answer). The path names the request, and the answer must carry it
        back (``--expect``): a reply delivered to another pod would not."""
        token = f"/{pod}/{destination}/{time.monotonic_ns()}"
        result = self.load(
            pod, "http", "--url", f"http://{destination}:{port}{token}", "--count", "1",
            "--timeout", str(timeout), "--expect", token, check=False,
        )  # fmt: skip
        if result.get("ok") != 1:
            return None
        seen = [r["peer"] for r in read_records(record) if r.get("path") == token]
        return seen[0] if seen else None

    def ns(self, key: str) -> str:
        return self.topology.ns[key]

    def host_state(self, node: str) -> dict[str, Any]:
        """What egresscore has in a node's namespace: chains, the slots' rules (priority
        100), the guard rules under them (101 and 102), the link."""
        ns = self.topology.ns[ClusterTopology.NODE_KEYS[node]]
        chains = [
            line for line in self.lab.run(ns, "iptables-save").stdout.splitlines() if "EGRESSCORE" in line
        ]
        rules = self.lab.run(ns, "ip", "rule").stdout.splitlines()
        link = self.lab.run(ns, "ip", "link", "show", "egc.vx", check=False).returncode == 0
        return {
            "chains": chains,
            "rules": [line for line in rules if line.startswith("100:")],
            "guard_rules": [line for line in rules if line.startswith(("101:", "102:"))],
            "link": link,
        }


@contextmanager
def cluster(**options: Any) -> Iterator[Cluster]:
    """A cluster with its agents started; everything is removed afterwards."""
    require_network()
    lab = Lab()
    try:
        built = Cluster(lab, **options)
        built.start_all()
        yield built
        built.stop_all()
    finally:
        lab.close()
