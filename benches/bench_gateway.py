"""The gateway on real traffic against its peers, in one run and one namespace topology.

Peers, each given the same client -> gateway -> router -> external path
(egresscore.netlab.GatewayTopology, with the node's masquerade rule in place):

- ``kernel-snat``: the kernel alone, an iptables SNAT rule to the egress IP.
- ``egresscore``: ``egresscore run --role gateway``, two queues, TCP handed to the
  kernel's conntrack (the default).
- ``egresscore-queue``: the same with ``tcp_translation: queue`` (every TCP packet
  rewritten in user space, GSO super-packets and batch verdicts).
- ``netfilterqueue``: the ``netfilterqueue`` package's per-packet Python callback with
  the same rules and SNAT table (benches/_nfq_package_gateway.py).

Metrics: TCP Gbit/s with one iperf3 stream and with four, new TCP connections per
second (egresscore.netlab.load, 32 at a time), 64-byte UDP datagrams per second with
their loss, and the gateway processes' CPU time per packet they were handed. Every
measurement also checks that the external host saw the egress IP; a wrong answer fails
the benchmark, slowness never does. Results and the ratios are printed after the run
(benches/conftest.py, "gateway").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from network_lab import (
    GatewayRun,
    require_network,
    shorten_kernel_timeouts,
    write_gateway_config,
)

from egresscore.netlab import GatewayTopology, Lab
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

EGRESS = GatewayTopology.EGRESS_IP
EXTERNAL = GatewayTopology.EXTERNAL_IP
PEERS = ("kernel-snat", "egresscore", "egresscore-queue", "netfilterqueue")
BASELINE = Path(__file__).resolve().parent / "_nfq_package_gateway.py"
TICKS = os.sysconf("SC_CLK_TCK")


def durations(config: pytest.Config) -> dict[str, float]:
    quick = bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")
    if os.environ.get("EGRESSCORE_BENCH_SIZES") in ("quick", "full"):
        quick = os.environ["EGRESSCORE_BENCH_SIZES"] == "quick"
    return {"tcp": 1.0, "conn": 1.0, "udp": 20000} if quick else {"tcp": 5.0, "conn": 5.0, "udp": 200000}


class Gateway:
    """One peer running in the gateway namespace, with its CPU and packet accounting."""

    def __init__(self, lab: Lab, topology: GatewayTopology, peer: str) -> None:
        self.lab, self.topology, self.peer = lab, topology, peer
        self.agent: GatewayRun | None = None
        self.baseline: subprocess.Popen[bytes] | None = None
        if peer == "kernel-snat":
            topology.kernel_snat()
        elif peer in ("egresscore", "egresscore-queue"):
            tcp = "kernel" if peer == "egresscore" else "queue"
            # A fresh state directory: no status file or snapshot of the previous peer.
            shutil.rmtree(lab.workdir / "state", ignore_errors=True)
            config = write_gateway_config(lab, queues=2, extra=f"  tcp_translation: {tcp}\n")
            self.agent = GatewayRun(lab, topology.gateway, config, f"{peer}.log")
        else:
            config = write_gateway_config(lab, queues=1)
            self.baseline = lab.spawn(
                topology.gateway, [sys.executable, str(BASELINE), str(config)], stdout=subprocess.PIPE
            )
            assert self.baseline.stdout is not None
            assert self.baseline.stdout.readline().strip() == b"ready"

    def pids(self) -> list[int]:
        if self.agent is not None:
            main = self.agent.process.pid
            children = Path(f"/proc/{main}/task/{main}/children").read_text().split()
            return [main, *map(int, children)]
        if self.baseline is not None:
            return [self.baseline.pid]
        return []

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / TICKS

    def packets(self) -> int | None:
        """Packets the peer's user space was handed so far (None: the kernel alone)."""
        if self.agent is not None:
            return sum(int(status["datapath"]["queue_packets"]) for status in self.agent.status())
        if self.baseline is not None:
            rules = self.lab.run(self.topology.gateway, "iptables-save", "-c").stdout
            return sum(
                int(line[1:].split(":")[0])
                for line in rules.splitlines()
                if "NFQUEUE" in line and line[0] == "["
            )
        return None

    def stop(self) -> None:
        if self.peer == "kernel-snat":
            self.topology.remove_kernel_snat()
        elif self.agent is not None:
            assert self.agent.stop() == 0
        elif self.baseline is not None:
            self.baseline.send_signal(signal.SIGTERM)
            self.baseline.wait(20)


@pytest.fixture(scope="module")
def topology() -> Iterator[tuple[Lab, GatewayTopology]]:
    require_network()
    lab = Lab()
    try:
        topology = GatewayTopology(lab)
        shorten_kernel_timeouts(lab, topology.gateway)
        yield lab, topology
    finally:
        lab.close()


@pytest.fixture(scope="module", params=PEERS)
def gateway(request: pytest.FixtureRequest, topology: tuple[Lab, GatewayTopology]) -> Iterator[Gateway]:
    lab, topo = topology
    running = Gateway(lab, topo, request.param)
    try:
        yield running
    finally:
        running.stop()


def record(config: pytest.Config, peer: str, metric: str, values: dict[str, Any]) -> None:
    from conftest import GATEWAY_RESULTS

    config.stash.setdefault(GATEWAY_RESULTS, {}).setdefault(metric, {})[peer] = values


def measured(gateway: Gateway, work: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``work()``, with the peer's CPU time and packets over it."""
    cpu, packets = gateway.cpu_seconds(), gateway.packets()
    result = work()
    extra: dict[str, Any] = {}
    if packets is not None:
        handed = (gateway.packets() or 0) - packets
        used = gateway.cpu_seconds() - cpu
        extra = {
            "cpu_seconds": used,
            "packets_handed": handed,
            "us_per_packet": used / handed * 1e6 if handed else None,
        }
    return result, extra


def iperf3(gateway: Gateway, streams: int, seconds: float, port: int) -> dict[str, Any]:
    lab, topo = gateway.lab, gateway.topology
    log = lab.workdir / f"iperf3-{gateway.peer}-{port}.json"
    server = lab.spawn(
        topo.external, ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", str(port)], log=log.name
    )
    time.sleep(0.3)
    client = lab.run(
        topo.client, "iperf3", "-c", EXTERNAL, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J",
        timeout=seconds + 30,
    )  # fmt: skip
    server.wait(15)
    seen = {c["remote_host"] for c in json.loads(log.read_text())["start"]["connected"]}
    assert seen == {EGRESS}, f"{gateway.peer}: the external host saw {seen}"
    return dict(json.loads(client.stdout)["end"]["sum_received"])


@pytest.mark.parametrize("streams", [1, 4], ids=["tcp-1", "tcp-4"])
def test_tcp_throughput(
    benchmark: Any, gateway: Gateway, streams: int, request: pytest.FixtureRequest
) -> None:
    seconds = durations(request.config)["tcp"]
    port = 5300 + streams
    result, extra = measured(gateway, lambda: benchmark.pedantic(
        iperf3, args=(gateway, streams, seconds, port), rounds=1, iterations=1))  # fmt: skip
    gbps = result["bits_per_second"] / 1e9
    benchmark.extra_info.update({"peer": gateway.peer, "value": gbps, "unit": "Gbit/s", **extra})
    record(request.config, gateway.peer, f"tcp-{streams}", {"value": gbps, "unit": "Gbit/s", **extra})


def connections(gateway: Gateway, seconds: float) -> dict[str, Any]:
    lab, topo = gateway.lab, gateway.topology
    record_path = str(lab.workdir / f"sink-{gateway.peer}.jsonl")
    sink = lab.peer(
        topo.external, "tcp-sink", bind=EXTERNAL, port=9100, record=record_path, duration=seconds + 60
    )
    result = lab.run(
        topo.client, sys.executable, "-m", "egresscore.netlab.load", "connections", "--host", EXTERNAL,
        "--port", "9100", "--duration", str(seconds), "--concurrency", "32", timeout=seconds + 30,
    )  # fmt: skip
    lab.stop(sink)
    peers = {r["peer"] for r in read_records(record_path)}
    assert peers == {EGRESS}, f"{gateway.peer}: the external host saw {peers}"
    return dict(json.loads(result.stdout))


def test_new_connections_per_second(benchmark: Any, gateway: Gateway, request: pytest.FixtureRequest) -> None:
    seconds = durations(request.config)["conn"]
    result, extra = measured(gateway, lambda: benchmark.pedantic(
        connections, args=(gateway, seconds), rounds=1, iterations=1))  # fmt: skip
    values = {"value": result["rate"], "unit": "conn/s", "failures": result["failures"], **extra}
    benchmark.extra_info.update({"peer": gateway.peer, **values})
    record(request.config, gateway.peer, "conn", values)
    # Let the closed connections' conntrack and SNAT entries go before the next measurement.
    time.sleep(2)


def small_udp(gateway: Gateway, count: int) -> dict[str, Any]:
    lab, topo = gateway.lab, gateway.topology
    record_path = str(lab.workdir / f"udp-{gateway.peer}.jsonl")
    sink = lab.peer(topo.external, "udp-sink", bind=EXTERNAL, port=9200, record=record_path)
    sent = json.loads(
        lab.run(
            topo.client, sys.executable, "-m", "egresscore.netlab.load", "udp", "--host", EXTERNAL,
            "--port", "9200", "--size", "64", "--count", str(count), timeout=120,
        ).stdout
    )  # fmt: skip
    time.sleep(1.0)
    lab.stop(sink)
    totals = read_records(record_path)
    assert {r["peer"] for r in totals} <= {EGRESS}, f"{gateway.peer}: the external host saw {totals}"
    received = sum(int(r["datagrams"]) for r in totals)
    return {"sent": sent["sent"], "rate": sent["rate"], "received": received}


def test_small_udp_packets_per_second(
    benchmark: Any, gateway: Gateway, request: pytest.FixtureRequest
) -> None:
    count = int(durations(request.config)["udp"])
    result, extra = measured(gateway, lambda: benchmark.pedantic(
        small_udp, args=(gateway, count), rounds=1, iterations=1))  # fmt: skip
    loss = 1 - result["received"] / result["sent"] if result["sent"] else 1.0
    values = {"value": result["rate"], "unit": "pkt/s sent", "received": result["received"],
              "sent": result["sent"], "loss": loss, **extra}  # fmt: skip
    benchmark.extra_info.update({"peer": gateway.peer, **values})
    record(request.config, gateway.peer, "udp64", values)
    assert result["received"] > 0, f"{gateway.peer}: no datagram arrived"
