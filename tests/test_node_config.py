"""The node role's configuration, plan and rules, computed without touching a host
(tests/test_cluster_network.py runs them for real)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egresscore.agent.config import ConfigError, RedirectConfig, check_role, load_config
from egresscore.agent.iptables import NODE_PREFIX, NodeRules, find_owned, render_node
from egresscore.agent.node import plan_node
from egresscore.agent.tunnel import vtep_mac
from egresscore.netlab import ClusterTopology, cilium_policy, inventory_document
from egresscore.policy import load_files
from egresscore.policy.compiler import Compiler

NODE_CONFIG = """node: node-a
policies: [inventory.yaml, policy.yaml]
tunnel:
  underlay_interface: eth0
  endpoints: {gw-9: 198.18.0.99}
redirect:
  pod_interfaces: [cni0, cali+]
"""


def write(tmp_path: Path, text: str = NODE_CONFIG, policy: str | None = None) -> Path:
    (tmp_path / "inventory.yaml").write_text(inventory_document(ClusterTopology.PODS, {}))
    (tmp_path / "policy.yaml").write_text(policy if policy is not None else cilium_policy())
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_a_node_configuration_loads_with_its_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    assert config.tunnel is not None and config.tunnel.underlay_interface == "eth0"
    assert (config.tunnel.device, config.tunnel.vni, config.tunnel.port) == ("egc.vx", 3692, 4789)
    assert config.tunnel.endpoints == {"gw-9": ipaddress.IPv4Address("198.18.0.99")}
    assert config.redirect.pod_interfaces == ("cni0", "cali+")
    assert (config.redirect.first_queue, config.redirect.queue_count) == (100, 1)
    assert config.fail_closed and config.redirect.unknown_sources == "drop"
    check_role(config, "node")


@pytest.mark.parametrize(
    ("text", "role", "path"),
    [
        (
            "node: node-a\npolicies: [p.yaml]\nredirect: {pod_interfaces: [cni0]}\n",
            "node",
            "tunnel.underlay_interface",
        ),
        (
            "node: node-a\npolicies: [p.yaml]\ntunnel: {underlay_interface: eth0}\n",
            "node",
            "redirect.pod_interfaces",
        ),
        (
            NODE_CONFIG + "gateway: {mark: 0x10000000}\n",
            "both",
            "redirect.mark_mask",
        ),
        (
            NODE_CONFIG.replace("pod_interfaces", "queues: {first: 0}\n  pod_interfaces"),
            "both",
            "redirect.queues",
        ),
    ],
)
def test_a_role_says_what_it_misses(tmp_path: Path, text: str, role: str, path: str) -> None:
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as caught:
        check_role(config, role)
    assert caught.value.path == path
    assert "expected" in str(caught.value) or "required" in str(caught.value)


def test_the_mark_field_holds_pass_local_and_one_value_per_gateway() -> None:
    redirect = RedirectConfig()  # mask 0x7e000000: six bits
    values = [redirect.slot_value(s) for s in range(redirect.slot_count())]
    assert redirect.slot_count() == 32 and len(set(values)) == 32
    assert all(v & redirect.mark_mask == v and v & redirect.redirect_flag() for v in values)
    assert redirect.pass_value() not in values and redirect.local_value() not in values
    assert not redirect.pass_value() & redirect.redirect_flag()
    assert not redirect.local_value() & redirect.redirect_flag()


def test_the_plan_queues_every_policy_destination_and_tunnels_to_gateway_nodes(tmp_path: Path) -> None:
    policy = cilium_policy(destinations=("203.0.113.0/25", "203.0.113.128/25", "2001:db8:5::/48"))
    config = load_config(write(tmp_path, policy=policy))
    compiler = Compiler(load_files(config.policies), "node-a")
    plan = plan_node(config, compiler)
    # Adjacent prefixes collapse into one rule; IPv6 destinations are queued too (and
    # their redirects dropped: fail closed, the gateway translates IPv4 only so far).
    assert [str(n) for n in plan.destinations] == ["203.0.113.0/24", "2001:db8:5::/48"]
    assert set(plan.endpoints) == {ipaddress.IPv4Address("198.18.0.3")}
    assert plan.unreachable == () and not plan.local_gateway
    on_gateway = load_config(write(tmp_path, NODE_CONFIG.replace("node: node-a", "node: gw-1"), policy))
    plan_on_gateway = plan_node(on_gateway, Compiler(load_files(config.policies), "gw-1"))
    assert plan_on_gateway.local_gateway and plan_on_gateway.endpoints == (None,)


def test_a_gateway_without_an_address_is_unreachable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    inventory = (tmp_path / "inventory.yaml").read_text().replace("addresses: [198.18.0.3]", "addresses: []")
    (tmp_path / "inventory.yaml").write_text(inventory)
    plan = plan_node(config, Compiler(load_files(config.policies), "node-a"))
    assert plan.unreachable == ("gw-1",) and plan.endpoints == (None,)


def rules(**overrides: object) -> NodeRules:
    values: dict[str, object] = {
        "pod_interfaces": ("cni0", "cali+"),
        "destinations": (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:5::/48")),
        "first_queue": 100,
        "queue_count": 1,
        "mark_mask": 0x7E000000,
        "redirect_flag": 0x40000000,
        "mss": 1410,
    }
    values.update(overrides)
    return NodeRules(**values)  # type: ignore[arg-type]


def test_node_rules_restore_the_decision_before_queueing_undecided_flows() -> None:
    mangle = render_node(rules())["mangle"]
    pod = NODE_PREFIX + "POD"
    restore = mangle.index(f"-A {pod} -j CONNMARK --restore-mark --nfmask 0x7e000000 --ctmask 0x7e000000")
    decided = mangle.index(f"-A {pod} -m mark ! --mark 0x0/0x7e000000 -j RETURN")
    queue = mangle.index(f"-A {pod} -d 203.0.113.0/24 -j NFQUEUE --queue-num 100")
    assert restore < decided < queue
    assert f"-A {NODE_PREFIX}PRE -i cali+ -g {pod}" in mangle
    # IPv4 rules hold IPv4 destinations only; no bypass unless failure_mode is open.
    assert not any("2001:db8" in line or "bypass" in line for line in mangle)
    assert any(
        line.endswith("--queue-num 100 --queue-bypass") for line in render_node(rules(bypass=True))["mangle"]
    )


def test_node_rules_save_decisions_clamp_mss_and_skip_masquerade() -> None:
    tables = render_node(rules())
    fwd = [line for line in tables["mangle"] if line.startswith(f"-A {NODE_PREFIX}FWD")]
    assert "--save-mark" in fwd[0] and "-m connmark --mark 0x0/0x7e000000" in fwd[0]
    assert fwd[1].endswith("-j TCPMSS --set-mss 1410")
    assert tables["nat"][-1] == f"-A {NODE_PREFIX}NAT -m mark --mark 0x40000000/0x40000000 -j ACCEPT"
    v6 = render_node(rules(), 6)["mangle"]
    assert f"-A {NODE_PREFIX}POD -d 2001:db8:5::/48 -j NFQUEUE --queue-num 100" in v6
    assert v6[-1].endswith("--set-mss 1390")  # 20 bytes more of IPv6 header
    assert not any("TCPMSS" in line for line in render_node(rules(mss=None))["mangle"])


def test_node_and_gateway_chains_are_told_apart_by_prefix() -> None:
    saved = """*mangle
:PREROUTING ACCEPT [0:0]
:EGRESSCORE-NODE-PRE - [0:0]
:EGRESSCORE-GW-REMEMBER - [0:0]
-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-NODE-PRE
-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-GW-REMEMBER
COMMIT
"""
    assert find_owned(saved, prefix=NODE_PREFIX) == {
        "mangle": (
            ["-A PREROUTING -m comment --comment egresscore -j EGRESSCORE-NODE-PRE"],
            ["EGRESSCORE-NODE-PRE"],
        )
    }


def test_tunnel_macs_are_local_unicast_and_unique_per_address() -> None:
    mac = vtep_mac(ipaddress.IPv4Address("198.18.0.3"))
    assert mac == "0a:ec:c6:12:00:03"
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast (IEEE 802)
    assert vtep_mac(ipaddress.IPv4Address("198.18.0.4")) != mac
