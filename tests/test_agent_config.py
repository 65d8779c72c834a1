"""The agent's configuration file, the gateway plan and the iptables rules it renders
(no host is touched here; tests/test_gateway_network.py runs them for real)."""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
from pathlib import Path

import pytest

from egresscore.agent.config import ConfigError, load_config
from egresscore.agent.gateway import plan_gateway, split_ports
from egresscore.agent.iptables import CHAIN_PREFIX, GatewayRules, QueuePorts, find_owned, render

DATA = Path(__file__).parent / "data" / "agent"


def write_config(tmp_path: Path, text: str) -> Path:
    shutil.copy(DATA / "gateway-policies.yaml", tmp_path / "gateway-policies.yaml")
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_the_sample_configuration_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    path = write_config(tmp_path, (DATA / "gateway.yaml").read_text())
    config = load_config(path)
    assert config.node == "gw-1"
    assert config.policies == (tmp_path / "gateway-policies.yaml",)
    assert config.gateway.interface == "g1"
    assert (config.gateway.first_queue, config.gateway.queue_count) == (0, 2)
    assert config.failure_mode == "closed" and config.fail_closed  # fail closed unless asked
    assert config.state_dir == Path("/run/egresscore-test")


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("policies: [a.yaml]\n", "node", "required"),
        ("node: gw-1\n", "policies", "non-empty list"),
        ("node: gw-1\npolicies: [a.yaml]\nnodes: 1\n", "nodes", "unknown field"),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {queues: {count: 0}}\n",
            "gateway.queues.count",
            "from 1 to 64",
        ),
        ("node: gw-1\npolicies: [a.yaml]\ngateway: {mark: 3}\n", "gateway.mark", "single bit"),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {interface: 'eth0; rm'}\n",
            "gateway.interface",
            "interface name",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {port_range: [2000, 1000]}\n",
            "gateway.port_range[1]",
            "2000",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {timeouts: {tcp_forever: 1}}\n",
            "gateway.timeouts.tcp_forever",
            "unknown",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {fail_open: true}\n",
            "gateway.fail_open",
            "moved: the top-level failure_mode",
        ),
        ("node: gw-1\npolicies: [a.yaml]\nfailure_mode: maybe\n", "failure_mode", "closed, open"),
        ("node: gw-1\npolicies: [a.yaml]\ntunnel: {vni: 16777216}\n", "tunnel.vni", "from 1 to 16777215"),
        (
            "node: gw-1\npolicies: [a.yaml]\ntunnel: {local_address: 203.0.113.300}\n",
            "tunnel.local_address",
            "IPv4",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\nredirect: {pod_interfaces: ['cali+', 'veth 0']}\n",
            "redirect.pod_interfaces[1]",
            "interface name or prefix",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\nredirect: {mark_mask: 0x50000000}\n",
            "redirect.mark_mask",
            "contiguous",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\nredirect: {route_table_base: 254}\n",
            "redirect.route_table_base",
            "256",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\nredirect: {unknown_sources: ignore}\n",
            "redirect.unknown_sources",
            "drop, pass",
        ),
        (
            "node: gw-1\npolicies: [a.yaml]\ngateway: {port_range: [5000, 5000], queues: {count: 2}}\n",
            "gateway.port_range",
            "cannot be split",
        ),
    ],
)
def test_a_bad_field_is_named_with_what_was_expected(
    tmp_path: Path, text: str, path: str, message: str
) -> None:
    config_path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert caught.value.path == path
    assert caught.value.source == str(config_path)
    assert message in str(caught.value)


def test_yaml_errors_say_where_and_tags_are_not_executed(tmp_path: Path) -> None:
    path = write_config(tmp_path, "node: [unclosed\n")
    with pytest.raises(ConfigError, match=r"line 2, column 1: not valid YAML"):
        load_config(path)
    path.write_text("node: !!python/object/apply:os.system ['true']\npolicies: [a.yaml]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_ports_split_into_contiguous_covering_ranges() -> None:
    assert split_ports(1024, 65535, 1) == [(1024, 65535)]
    assert split_ports(1024, 65535, 2) == [(1024, 33279), (33280, 65535)]
    ranges = split_ports(1000, 1010, 3)
    assert ranges == [(1000, 1003), (1004, 1007), (1008, 1010)]


def test_the_plan_takes_egress_ips_and_destinations_from_the_policies(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, (DATA / "gateway.yaml").read_text()))
    plan = plan_gateway(config)
    assert plan.egress_ips == (ipaddress.IPv4Address("192.0.2.10"),)
    assert plan.destinations == (ipaddress.IPv4Network("203.0.113.0/24"),)
    # One gateway in the classifier, and it is this node's: index 0 of the table.
    assert plan.egress_of_gateway == (0,)
    decision = plan.compiler.classifier.classify("198.18.1.2", "203.0.113.10")
    assert decision.action.name == "SNAT"


def test_another_node_gets_no_egress_ips(tmp_path: Path) -> None:
    text = (DATA / "gateway.yaml").read_text().replace("node: gw-1", "node: node-a")
    plan = plan_gateway(load_config(write_config(tmp_path, text)))
    assert plan.egress_ips == ()
    assert plan.destinations == ()
    assert plan.egress_of_gateway == (None,)


def rules(queues: int) -> GatewayRules:
    return GatewayRules(
        egress_ips=(ipaddress.IPv4Address("192.0.2.10"),),
        destinations=(ipaddress.IPv4Network("203.0.113.0/24"),),
        queues=tuple(
            QueuePorts(q, low, high) for q, (low, high) in enumerate(split_ports(1024, 65535, queues))
        ),
        mark=0x400000,
    )


def test_rules_queue_replies_by_port_range_and_pods_by_balance() -> None:
    tables = render(rules(2))
    raw, mangle = tables["raw"], tables["mangle"]
    pre, reply, select = CHAIN_PREFIX + "PRE", CHAIN_PREFIX + "REPLY", CHAIN_PREFIX + "SELECT"
    # One rule per egress IP and per destination in the entry chain.
    assert [line for line in raw if line.startswith(f"-A {pre} ")] == [
        f"-A {pre} -d 192.0.2.10/32 -g {reply}",
        f"-A {pre} -d 203.0.113.0/24 -g {select}",
    ]
    # Replies are untracked before they are queued, each port range to its own worker.
    assert raw.index(f"-A {reply} -j CT --notrack") < next(
        i for i, line in enumerate(raw) if "NFQUEUE" in line
    )
    assert f"-A {reply} -p tcp --dport 1024:33279 -j NFQUEUE --queue-num 0" in raw
    assert f"-A {reply} -p udp --dport 33280:65535 -j NFQUEUE --queue-num 1" in raw
    # Never a bypass: with no worker listening, policy packets are dropped, not leaked.
    assert all("bypass" not in line for line in raw + mangle)
    assert (
        mangle[-1] == f"-A {CHAIN_PREFIX}POST -m mark --mark 0x400000/0x400000 -j NFQUEUE --queue-balance 0:1"
    )


def test_one_queue_needs_no_port_matches() -> None:
    tables = render(rules(1))
    assert not any("--dport" in line or "u32" in line for line in tables["raw"])
    assert tables["mangle"][-1].endswith("-j NFQUEUE --queue-num 0")


def test_owned_rules_are_found_by_chain_name_only() -> None:
    saved = """*raw
:PREROUTING ACCEPT [0:0]
:EGRESSCORE-GW-PRE - [0:0]
:CALI-PREROUTING - [0:0]
-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-GW-PRE
-A PREROUTING -j CALI-PREROUTING
-A EGRESSCORE-GW-PRE -d 192.0.2.10/32 -j CT --notrack
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -j MASQUERADE
COMMIT
"""
    owned = find_owned(saved)
    assert owned == {
        "raw": (["-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-GW-PRE"], ["EGRESSCORE-GW-PRE"])
    }


def test_tcp_translation_is_checked(tmp_path: Path) -> None:
    path = write_config(tmp_path, "node: gw-1\npolicies: [a.yaml]\ngateway: {tcp_translation: magic}\n")
    with pytest.raises(ConfigError, match="expected one of kernel, queue") as caught:
        load_config(path)
    assert caught.value.path == "gateway.tcp_translation"
    path.write_text("node: gw-1\npolicies: [a.yaml]\ngateway: {tcp_translation: queue}\n")
    assert load_config(path).gateway.tcp_translation == "queue"
    path.write_text("node: gw-1\npolicies: [a.yaml]\n")
    assert load_config(path).gateway.tcp_translation == "kernel"


def test_tcp_in_the_kernel_queues_first_packets_only_and_fails_closed() -> None:
    base = rules(2)
    kernel = GatewayRules(base.egress_ips, base.destinations, base.queues, base.mark, tcp_in_kernel=True)
    tables = render(kernel)
    raw, mangle = tables["raw"], tables["mangle"]
    reply, select, tcp = CHAIN_PREFIX + "REPLY", CHAIN_PREFIX + "SELECT", CHAIN_PREFIX + "TCP"
    # TCP replies stay with the kernel's conntrack, ahead of the untracking rule.
    assert raw.index(f"-A {reply} -p tcp -j RETURN") < raw.index(f"-A {reply} -j CT --notrack")
    # So do ICMP errors quoting TCP (path MTU discovery of kernel-translated flows).
    quoting_tcp = f'-A {reply} -p icmp -m u32 --u32 "0>>22&0x3C@16>>16&0xFF=6" -j RETURN'
    assert raw.index(quoting_tcp) < raw.index(f"-A {reply} -j CT --notrack")
    assert not any("-p tcp --dport" in line for line in raw)
    # Every TCP packet is marked; only a SYN goes on to a worker, before conntrack.
    assert raw.index(f"-A {select} -p tcp -g {tcp}") < raw.index(f"-A {select} -j CT --notrack")
    chain = [line for line in raw if line.startswith(f"-A {tcp} ")]
    assert chain[0] == f"-A {tcp} -j MARK --set-xmark 0x800000/0x800000"
    assert chain[1] == f"-A {tcp} -p tcp ! --syn -j RETURN"
    assert chain[-1] == f"-A {tcp} -j NFQUEUE --queue-balance 0:1"
    # A pod's TCP packet whose connection has no worker-made NAT and no pass mark: dropped.
    assert (
        f"-A {CHAIN_PREFIX}POST -m mark --mark 0x800000/0x800000 -m connmark --mark 0x0/0x1400000 -j DROP"
        in mangle
    )
    assert tables["nat"] == [f":{CHAIN_PREFIX}NAT - [0:0]"]
    # The three mark bits are distinct.
    assert len(set(kernel.marks())) == 3


def test_applying_removes_jumps_an_older_version_made(monkeypatch: pytest.MonkeyPatch) -> None:
    from egresscore.agent import iptables

    # An older gateway jumped to REMEMBER from mangle PREROUTING; this one jumps from FORWARD.
    saved = """*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:EGRESSCORE-GW-REMEMBER - [0:0]
-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-GW-REMEMBER
COMMIT
"""
    sent: list[str] = []
    monkeypatch.setattr(
        iptables, "_run", lambda argv, text_in=None: saved if text_in is None else sent.append(text_in) or ""
    )
    iptables.apply(dataclasses.replace(rules(1), tcp_in_kernel=True))
    assert "-D PREROUTING -m comment --comment egresscore -j EGRESSCORE-GW-REMEMBER" in sent[0]
    assert '-I FORWARD 1 -m comment --comment "egresscore" -j EGRESSCORE-GW-REMEMBER' in sent[0]
