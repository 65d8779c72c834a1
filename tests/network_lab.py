"""Shared pieces of the tests that move packets (../shared/NETWORK_TESTS.md).

``require_network()`` skips a test when root, a tool or the kernel's NFQUEUE is
missing, except in CI (the environment variable CI is set), where that is a failure:
a skipped network test must not pass a CI run unnoticed. ``GatewayRun`` starts
``egresscore run --role gateway`` in a lab's gateway namespace and stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from egresscore.netlab import Lab

DATA = Path(__file__).parent / "data" / "agent"
TOOLS = ("ip", "iptables", "iptables-restore", "iperf3", "ethtool", "nstat", "ping", "sysctl", "conntrack")
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


def egresscore_command() -> list[str]:
    script = Path(sys.executable).parent / "egresscore"
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from egresscore.cli import main; main()"]
    )


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


class GatewayRun:
    """One ``egresscore run --role gateway`` process in the lab's gateway namespace."""

    def __init__(self, lab: Lab, namespace: str, config: Path, log_name: str = "agent.log") -> None:
        self.lab = lab
        self.config = config
        self.log_path = lab.workdir / log_name
        self.log_path.touch()
        self.offset = self.log_path.stat().st_size
        # A process group of its own, so that a test can kill main and workers at once.
        self.process = lab.spawn(
            namespace,
            [*egresscore_command(), "run", "--role", "gateway", "--config", str(config)],
            log=log_name,
            start_new_session=True,
        )
        self.wait_for("started")

    def events(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text()[self.offset :]
        result = []
        for line in text.splitlines():
            try:
                result.append(json.loads(line))
            except ValueError:
                continue
        return result

    def wait_for(self, event: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record.get("event") == event:
                    return record
            if self.process.poll() is not None and event not in ("stopped", "failed"):
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {event!r} event; the agent's log:\n{self.log_path.read_text()[self.offset :]}"
        )

    def stop(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise

    def crash(self) -> None:
        """SIGKILL the agent and its workers: nothing gets cleaned up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def status(self) -> list[dict[str, Any]]:
        state = self.config.parent / "state"
        return [json.loads(path.read_text()) for path in sorted(state.glob("status-queue-*.json"))]
