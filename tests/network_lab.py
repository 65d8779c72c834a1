"""Shared pieces of the tests that move packets (../shared/NETWORK_TESTS.md).

``require_network()`` skips a test when root, a tool or the kernel's NFQUEUE is
missing, except in CI (the environment variable CI is set), where that is a failure:
a skipped network test must not pass a CI run unnoticed. ``GatewayRun`` starts
``egresscore run --role gateway`` in a lab's gateway namespace and stops it
(egresscore.netlab.agents.AgentRun runs any role).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from egresscore.netlab import Lab
from egresscore.netlab.agents import AgentRun, egresscore_command

__all__ = [
    "GatewayRun",
    "egresscore_command",
    "require_network",
    "shorten_kernel_timeouts",
    "write_gateway_config",
]

DATA = Path(__file__).parent / "data" / "agent"
TOOLS = (
    "ip",
    "iptables",
    "iptables-restore",
    "iperf3",
    "ethtool",
    "nstat",
    "ping",
    "sysctl",
    "conntrack",
    "tcpdump",
)
_checked: str | None = None


def _missing() -> str:
    if os.geteuid() != 0:
        return "network tests need root (network namespaces, iptables, NFQUEUE)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"network tests need {', '.join(absent)} (make system-deps installs them)"
    with Lab() as lab:
        ns = lab.namespace("probe")
        result = lab.run(
            ns, "iptables", "-t", "raw", "-A", "PREROUTING", "-j", "NFQUEUE", "--queue-num", "9", check=False
        )
        if result.returncode != 0:
            return f"the kernel has no iptables NFQUEUE target: {result.stderr.strip()}"
    return ""


def require_network() -> None:
    global _checked
    if _checked is None:
        _checked = _missing()
    if _checked:
        if os.environ.get("CI"):
            pytest.fail(f"network test cannot run in CI: {_checked}")
        pytest.skip(_checked)


def write_gateway_config(lab: Lab, *, queues: int = 2, extra: str = "") -> Path:
    """The test gateway's configuration in the lab's directory, with short timeouts so
    that finished flows leave the table within seconds."""
    shutil.copy(DATA / "gateway-policies.yaml", lab.workdir / "gateway-policies.yaml")
    path = lab.workdir / "gateway.yaml"
    path.write_text(
        f"""node: gw-1
policies: [gateway-policies.yaml]
state_dir: state
status_interval: 0.2
gateway:
  interface: g1
  queues: {{first: 0, count: {queues}}}
  timeouts: {{tcp_syn_sent: 3, tcp_syn_recv: 3, tcp_fin_wait: 2, tcp_close_wait: 2, tcp_last_ack: 2,
             tcp_time_wait: 1, tcp_close: 1, udp_unreplied: 2, udp_replied: 2, icmp: 2}}
{extra}"""
    )
    return path


# The kernel's conntrack timeouts of a closing TCP connection, shortened in the gateway's
# namespace like the SNAT table's, so that the entries of finished flows go within seconds.
SHORT_KERNEL_TIMEOUTS = {
    "net.netfilter.nf_conntrack_tcp_timeout_fin_wait": "2",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait": "2",
    "net.netfilter.nf_conntrack_tcp_timeout_last_ack": "2",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "1",
    "net.netfilter.nf_conntrack_tcp_timeout_close": "1",
}


def shorten_kernel_timeouts(lab: Lab, namespace: str) -> None:
    for key, value in SHORT_KERNEL_TIMEOUTS.items():
        lab.sysctl(namespace, key, value)


class GatewayRun(AgentRun):
    """One ``egresscore run --role gateway`` process in the lab's gateway namespace."""

    def __init__(self, lab: Lab, namespace: str, config: Path, log_name: str = "agent.log") -> None:
        super().__init__(lab, namespace, config, "gateway", log_name)
