"""The gateway agent's life on a host: clean stop, crash and replacement, restart with
established connections, and refusals that leave the host untouched
(../shared/NETWORK_TESTS.md: namespaces only, real peers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from network_lab import GatewayRun, egresscore_command, require_network, write_gateway_config

from egresscore.netlab import GatewayTopology, Lab
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

EGRESS = GatewayTopology.EGRESS_IP
EXTERNAL = GatewayTopology.EXTERNAL_IP


@pytest.fixture
def net() -> Iterator[tuple[Lab, GatewayTopology]]:
    require_network()
    lab = Lab()
    try:
        yield lab, GatewayTopology(lab)
    finally:
        lab.close()


def host_state(lab: Lab, topology: GatewayTopology) -> tuple[list[str], bool]:
    """The gateway namespace's egresscore rules, and whether the egress IP is on g1."""
    rules = [
        line
        for line in lab.run(topology.gateway, "iptables-save").stdout.splitlines()
        if "EGRESSCORE" in line
    ]
    addresses = lab.run(topology.gateway, "ip", "-4", "-o", "address", "show", "dev", "g1").stdout
    return rules, f"{EGRESS}/32" in addresses


def udp_sink(lab: Lab, topology: GatewayTopology, name: str) -> tuple[subprocess.Popen[bytes], str]:
    record = str(lab.workdir / f"{name}.jsonl")
    process = lab.peer(topology.external, "udp-sink", bind=EXTERNAL, port=7100, record=record, duration=60)
    return process, record


def send_udp(lab: Lab, topology: GatewayTopology, count: int = 50) -> None:
    lab.run(
        topology.client, sys.executable, "-m", "egresscore.netlab.load", "udp", "--host", EXTERNAL,
        "--port", "7100", "--count", str(count), "--rate", "500",
    )  # fmt: skip


def cleanup(lab: Lab, topology: GatewayTopology, config: Path) -> str:
    result = lab.run(topology.gateway, *egresscore_command(), "cleanup", "--role", "gateway", "--config",
                     str(config))  # fmt: skip
    return result.stdout


def test_sigterm_keeps_the_guard_in_place_until_cleanup(net: tuple[Lab, GatewayTopology]) -> None:
    lab, topology = net
    config = write_gateway_config(lab)
    agent = GatewayRun(lab, topology.gateway, config)
    sink, record = udp_sink(lab, topology, "before-stop")
    send_udp(lab, topology)
    assert agent.stop() == 0
    lab.stop(sink)
    assert [(r["peer"], r["datagrams"]) for r in read_records(record)] == [(EGRESS, 50)]
    assert agent.wait_for("stopped")["kept"] is True
    # failure_mode closed: the rules and the egress IP stay, and with no worker listening
    # the pod's new packets are dropped, not sent on with its own or the node's address.
    rules, has_address = host_state(lab, topology)
    assert rules and has_address
    sink, record = udp_sink(lab, topology, "while-stopped")
    send_udp(lab, topology)
    time.sleep(0.5)
    lab.stop(sink)
    assert read_records(record) == []
    assert all(status["state"] == "stopped" for status in agent.status())
    # Each worker saved its table for the next run.
    assert sorted(p.name for p in (config.parent / "state").glob("*.snapshot")) == [
        "snat-queue-0.snapshot",
        "snat-queue-1.snapshot",
    ]
    removed = cleanup(lab, topology, config)
    assert f"removed address {EGRESS} on g1" in removed and "removed iptables chains" in removed
    assert host_state(lab, topology) == ([], False)
    # Nothing left: a second cleanup says so.
    assert "nothing of egresscore's was left" in cleanup(lab, topology, config)


def test_sigterm_with_failure_mode_open_removes_every_rule_and_address(
    net: tuple[Lab, GatewayTopology],
) -> None:
    lab, topology = net
    config = write_gateway_config(lab, extra="failure_mode: open\n")
    agent = GatewayRun(lab, topology.gateway, config)
    rules, has_address = host_state(lab, topology)
    assert rules and has_address
    # Open: the queue rules carry --queue-bypass (no listener: accepted undecided).
    assert all("--queue-bypass" in line for line in rules if "NFQUEUE" in line)
    sink, record = udp_sink(lab, topology, "before-stop")
    send_udp(lab, topology)
    assert agent.stop() == 0
    lab.stop(sink)
    assert [(r["peer"], r["datagrams"]) for r in read_records(record)] == [(EGRESS, 50)]
    assert host_state(lab, topology) == ([], False)
    assert agent.wait_for("stopped")["kept"] is False


def test_a_crashed_run_fails_closed_and_the_next_one_replaces_its_leftovers(
    net: tuple[Lab, GatewayTopology],
) -> None:
    lab, topology = net
    config = write_gateway_config(lab)
    first = GatewayRun(lab, topology.gateway, config, "first.log")
    first.crash()
    rules, has_address = host_state(lab, topology)
    assert rules and has_address  # nothing cleaned up: SIGKILL
    # No worker listens and the rules have no bypass: the pod's packets are dropped, not
    # sent on untranslated. The external sink sees nothing at all.
    sink, record = udp_sink(lab, topology, "while-crashed")
    send_udp(lab, topology)
    time.sleep(0.5)
    lab.stop(sink)
    assert read_records(record) == []
    second = GatewayRun(lab, topology.gateway, config, "second.log")
    adopted = second.wait_for("adopted_leftovers")
    assert adopted["iptables_rules"] is True
    assert adopted["addresses"] == [f"{EGRESS} on g1"] and adopted["removed_addresses"] == []
    sink, record = udp_sink(lab, topology, "after-restart")
    send_udp(lab, topology)
    time.sleep(0.5)
    lab.stop(sink)
    assert [(r["peer"], r["datagrams"]) for r in read_records(record)] == [(EGRESS, 50)]
    # One jump per chain it owns (raw PREROUTING, mangle FORWARD and POSTROUTING, nat
    # POSTROUTING): the leftovers were replaced, not doubled.
    jumps = [
        line
        for line in host_state(lab, topology)[0]
        if line.split()[1] in ("PREROUTING", "FORWARD", "POSTROUTING")
    ]
    assert len(jumps) == 4 and len(set(jumps)) == 4, jumps
    assert second.stop() == 0
    cleanup(lab, topology, config)
    assert host_state(lab, topology) == ([], False)


def test_an_iperf3_transfer_survives_a_restart_of_the_gateway(net: tuple[Lab, GatewayTopology]) -> None:
    lab, topology = net
    config = write_gateway_config(lab)
    first = GatewayRun(lab, topology.gateway, config, "first.log")
    server_log = lab.workdir / "iperf3-server.json"
    server = lab.spawn(
        topology.external, ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", "5202"], log=server_log.name
    )
    time.sleep(0.3)
    client_log = lab.workdir / "iperf3-client.json"
    client = lab.spawn(
        topology.client,
        ["iperf3", "-c", EXTERNAL, "-p", "5202", "-t", "9", "-i", "1", "-J"],
        log=client_log.name,
    )
    time.sleep(2.5)
    assert first.stop() == 0
    restarted_at = time.monotonic()
    second = GatewayRun(lab, topology.gateway, config, "second.log")
    restored = sum(
        int(event["restored"]) for event in second.events() if event.get("event") == "worker_ready"
    )
    assert restored >= 1
    assert client.wait(40) == 0, client_log.read_text()[-2000:]
    result = json.loads(client_log.read_text())
    intervals = [interval["sum"]["bytes"] for interval in result["intervals"]]
    # Bytes moved before the restart, and again in the last seconds, on the same connection.
    assert intervals[0] > 0
    assert intervals[-1] > 0, intervals
    assert time.monotonic() > restarted_at
    assert result["end"].get("sum_received", {}).get("bytes", 0) > 0, json.dumps(result)[-3000:]
    server.wait(10)
    assert [c["remote_host"] for c in json.loads(server_log.read_text())["start"]["connected"]] == [EGRESS]
    assert second.stop() == 0


def test_a_bad_policy_file_stops_the_start_before_the_host_changes(net: tuple[Lab, GatewayTopology]) -> None:
    lab, topology = net
    config = write_gateway_config(lab)
    policies = lab.workdir / "gateway-policies.yaml"
    policies.write_text(policies.read_text().replace("egressIP: 192.0.2.10", "egressIP: 192.0.2.300"))
    result = lab.run(
        topology.gateway,
        *egresscore_command(),
        "run",
        "--role",
        "gateway",
        "--config",
        str(config),
        check=False,
    )
    assert result.returncode == 1
    failed = [json.loads(line) for line in result.stderr.splitlines() if '"failed"' in line]
    assert failed and "gateway-policies.yaml" in failed[0]["error"] and "192.0.2.300" in failed[0]["error"]
    assert host_state(lab, topology) == ([], False)


def test_a_bad_configuration_is_reported_with_its_field(net: tuple[Lab, GatewayTopology]) -> None:
    lab, topology = net
    config = write_gateway_config(lab, extra="  queue_count: 2\n")
    result = lab.run(
        topology.gateway,
        *egresscore_command(),
        "run",
        "--role",
        "gateway",
        "--config",
        str(config),
        check=False,
    )
    assert result.returncode == 1
    assert "gateway.queue_count: unknown field" in result.stderr
    assert host_state(lab, topology) == ([], False)


def test_a_second_agent_on_the_same_state_is_refused(net: tuple[Lab, GatewayTopology]) -> None:
    lab, topology = net
    config = write_gateway_config(lab)
    first = GatewayRun(lab, topology.gateway, config, "first.log")
    result = lab.run(
        topology.gateway,
        *egresscore_command(),
        "run",
        "--role",
        "gateway",
        "--config",
        str(config),
        check=False,
    )
    assert result.returncode == 1
    assert f"another egresscore gateway (pid {first.process.pid})" in result.stderr
    # Another state directory does not make a second gateway in the same namespace safe.
    other = config.with_name("other.yaml")
    other.write_text(config.read_text().replace("state_dir: state", "state_dir: other-state"))
    result = lab.run(
        topology.gateway,
        *egresscore_command(),
        "run",
        "--role",
        "gateway",
        "--config",
        str(other),
        check=False,
    )
    assert result.returncode == 1
    assert "another egresscore gateway is running in this network namespace" in result.stderr
    # The refused agent removed nothing of the running one's.
    rules, has_address = host_state(lab, topology)
    assert rules and has_address
    assert first.stop() == 0


def test_a_tcp_flow_older_than_the_gateway_is_cut_not_left_masqueraded(
    net: tuple[Lab, GatewayTopology],
) -> None:
    # Before egresscore runs, the pod's stream leaves with the node's address (the CNI's
    # masquerade made its conntrack entry). Once the gateway runs, the stream belongs to a
    # policy; its entry is no worker's, so the guard drops it instead of letting it go on
    # masqueraded (conntrack's own entry has a source NAT too: only the connmark tells).
    lab, topology = net
    record = str(lab.workdir / "stream.jsonl")
    server = lab.peer(topology.external, "tcp-stream", bind=EXTERNAL, port=7300, record=record, duration=60)
    client = lab.python(
        topology.client, "egresscore.netlab.load", "stream", "--host", EXTERNAL, "--port", "7300",
        "--duration", "6", stdout=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.5)
    started = time.monotonic()
    agent = GatewayRun(lab, topology.gateway, write_gateway_config(lab))
    elapsed = time.monotonic() - started
    out, _ = client.communicate(timeout=30)
    assert json.loads(out)["stalls"] > 0  # the stream stopped getting through
    lab.stop(server)
    seconds = [r for r in read_records(record) if r["bytes"]]
    assert {r["peer"] for r in seconds} == {GatewayTopology.GATEWAY_UPLINK_IP}
    # Bytes arrived in the first second (before the gateway); none once it ran.
    assert seconds[0]["second"] <= 1
    assert max(r["second"] for r in seconds) <= 2 + elapsed, seconds
    assert agent.stop() == 0


def test_workers_of_a_killed_agent_exit_and_free_its_lock(net: tuple[Lab, GatewayTopology]) -> None:
    # SIGKILL of the agent alone (the OOM killer picks one process): its workers must not
    # go on with stale policies, nor keep the namespace's lock from the next agent.
    lab, topology = net
    config = write_gateway_config(lab)
    first = GatewayRun(lab, topology.gateway, config, "first.log")
    main = first.process.pid
    workers = [int(pid) for pid in Path(f"/proc/{main}/task/{main}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(main, signal.SIGKILL)
    first.process.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    alive = [
        pid
        for pid in workers
        if Path(f"/proc/{pid}/stat").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    assert alive == [], "workers outlived their agent"
    second = GatewayRun(lab, topology.gateway, config, "second.log")
    sink, record = udp_sink(lab, topology, "after-kill")
    send_udp(lab, topology)
    time.sleep(0.5)
    lab.stop(sink)
    assert [(r["peer"], r["datagrams"]) for r in read_records(record)] == [(EGRESS, 50)]
    assert second.stop() == 0
