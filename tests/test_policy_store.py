"""Reloads never half-apply; gateway choice is stable when gateways come and go."""

from __future__ import annotations

import shutil
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from egresscore.core.classifier import Action, Reason
from egresscore.errors import PolicyErrorGroup
from egresscore.policy.compiler import compile_policies
from egresscore.policy.model import (
    ClusterNetwork,
    Endpoint,
    GatewaySpec,
    Inventory,
    Node,
    Policy,
    PolicySet,
    Rule,
    SourceTerm,
)
from egresscore.policy.selector import LabelIn
from egresscore.policy.store import PolicyStore

DATA = Path(__file__).resolve().parent / "data" / "policies"


def copy_examples(directory: Path) -> list[Path]:
    paths = []
    for name in ("cluster.yaml", "cilium.yaml", "calico.yaml", "native.yaml"):
        shutil.copy(DATA / name, directory / name)
        paths.append(directory / name)
    return paths


def test_a_bad_reload_keeps_the_snapshot_in_force(tmp_path: Path) -> None:
    files = copy_examples(tmp_path)
    store = PolicyStore(files)
    first = store.current
    assert first.generation == 1
    assert store.classifier.classify("10.244.1.5", "203.0.113.7").action is Action.REDIRECT

    cilium = tmp_path / "cilium.yaml"
    good = cilium.read_text()
    # A typo in one policy and a broken CIDR in another file: both reported, neither applied.
    cilium.write_text(good.replace("destinationCIDRs", "destinationCIDR", 1))
    native = tmp_path / "native.yaml"
    native_text = native.read_text()
    native.write_text(native_text.replace('"198.51.100.0/24"', '"198.51.100.1/24"'))
    with pytest.raises(PolicyErrorGroup) as caught:
        store.reload()
    assert len(caught.value.errors) >= 2
    assert {error.source for error in caught.value.errors} == {str(cilium), str(native)}
    assert store.current is first
    assert store.classifier.classify("10.244.1.5", "203.0.113.7").action is Action.REDIRECT

    # Fixed, with the policy's CIDR moved: the new snapshot applies at once.
    assert store.classifier.classify("10.244.1.5", "203.0.113.100").policy == "egress-sample"
    cilium.write_text(good.replace('["203.0.113.0/24"]', '["203.0.113.0/26"]', 1))
    native.write_text(native_text)
    second = store.reload()
    assert second.generation == 2 and store.current is second
    decision = store.classifier.classify("10.244.1.5", "203.0.113.100")
    # egress-sample no longer covers .100; the native policy's /24 does.
    assert (decision.action, decision.reason, decision.policy) == (
        Action.REDIRECT,
        Reason.GATEWAY,
        "payments",
    )


def test_the_first_load_must_succeed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: x}\nspec: {}\n"
    )
    with pytest.raises(PolicyErrorGroup, match="spec"):
        PolicyStore([bad])


def gateway_policy_set(gateway_names: list[str]) -> PolicySet:
    nodes = [Node("worker", addresses=(IPv4Address("192.0.2.1"),))]
    # Each gateway keeps its address whichever others exist: its identity is (node, egress IP).
    addresses = {"gw-a": "192.0.2.10", "gw-b": "192.0.2.11", "gw-c": "192.0.2.12", "gw-d": "192.0.2.13"}
    nodes += [Node(name, {"egress": "true"}, (IPv4Address(addresses[name]),)) for name in gateway_names]
    endpoints = tuple(
        Endpoint(
            f"pod-{i}", "default", "worker", (IPv4Address(f"10.1.{i // 250}.{i % 250 + 1}"),), {"app": "a"}
        )
        for i in range(500)
    )
    policy = Policy(
        "spread",
        (SourceTerm(pods=LabelIn("app", frozenset({"a"}))),),
        (
            Rule(
                (IPv4Network("203.0.113.0/24"),),
                gateways=(GatewaySpec(node_selector=LabelIn("egress", frozenset({"true"}))),),
            ),
        ),
    )
    network = ClusterNetwork(pod_cidrs=(IPv4Network("10.0.0.0/8"),))
    return PolicySet((policy,), Inventory((), tuple(nodes), endpoints, network))


def test_removing_a_gateway_moves_only_its_own_flows() -> None:
    before = compile_policies(gateway_policy_set(["gw-a", "gw-b", "gw-c", "gw-d"]))
    after = compile_policies(gateway_policy_set(["gw-a", "gw-b", "gw-d"]))
    flows = [(f"10.1.{i // 250}.{i % 250 + 1}", f"203.0.113.{i % 200}") for i in range(500)]
    chosen_before = {flow: before.classify(*flow).gateway for flow in flows}
    chosen_after = {flow: after.classify(*flow).gateway for flow in flows}
    used = {gateway.node for gateway in chosen_before.values() if gateway}
    assert used == {"gw-a", "gw-b", "gw-c", "gw-d"}, "500 flows should reach every gateway"
    for flow, gateway in chosen_before.items():
        assert gateway is not None and chosen_after[flow] is not None
        if gateway.node != "gw-c":
            assert chosen_after[flow] == gateway, (
                f"{flow} moved from {gateway.node} though it was not removed"
            )
        else:
            assert chosen_after[flow].node != "gw-c"
    # And the same inputs give the same answer from a second, independent compile.
    again = compile_policies(gateway_policy_set(["gw-a", "gw-b", "gw-c", "gw-d"]))
    assert all(again.classify(*flow).gateway == chosen_before[flow] for flow in flows)
