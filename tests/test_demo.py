"""``make demo`` (``egresscore demo``): the whole path on the namespace cluster, as a
newcomer runs it. The table it prints comes from what the external server recorded."""

from __future__ import annotations

import subprocess

import pytest
from network_lab import require_network

from egresscore.netlab.agents import egresscore_command

pytestmark = pytest.mark.network


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_the_demo_shows_each_pods_source_and_leaves_nothing_behind() -> None:
    require_network()
    before = namespaces()
    result = subprocess.run([*egresscore_command(), "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        line.split() for line in result.stdout.splitlines() if line.startswith(("payments-", "frontend-"))
    ]
    assert len(rows) == 12, result.stdout
    # payments pods to the policy CIDR: the egress IP; everything else: their node's IP.
    seen = {(row[0], row[2]): row[5] for row in rows}
    assert seen[("payments-a", "203.0.113.10")] == "192.0.2.10"
    assert seen[("payments-b", "203.0.113.10")] == "192.0.2.10"
    assert seen[("payments-a", "203.0.113.200")] == "198.18.0.1"  # excludedCIDRs
    assert seen[("frontend-b", "203.0.113.10")] == "198.18.0.2"  # not selected
    assert all(row[-1] == "ok" for row in rows), result.stdout
    assert "all sources as the policy says" in result.stdout
    assert namespaces() == before
