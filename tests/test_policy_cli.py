"""`egresscore explain` and `egresscore policy validate` on the example files."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from egresscore.cli import main

DATA = Path(__file__).resolve().parent / "data" / "policies"
FILES = [DATA / name for name in ("cluster.yaml", "cilium.yaml", "calico.yaml", "native.yaml")]


def explain(*args: str) -> list[str]:
    options = [part for path in FILES for part in ("-f", str(path))]
    result = CliRunner().invoke(main, ["explain", *options, *args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_validate_accepts_the_examples() -> None:
    result = CliRunner().invoke(main, ["policy", "validate", *map(str, FILES)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: 5 policies")
    assert "6 endpoints" in result.output


def test_validate_prints_every_error_with_its_location(tmp_path: Path) -> None:
    first = tmp_path / "first.yaml"
    first.write_text(
        "apiVersion: cilium.io/v2\n"
        "kind: CiliumEgressGatewayPolicy\n"
        "metadata: {name: one}\n"
        "spec:\n"
        "  selectors:\n"
        "  - podSelector:\n"
        "      matchExpressions:\n"
        "      - {key: app, operator: Equals, values: [x]}\n"
        "  destinationCIDRs: ['203.0.113.0/24']\n"
        "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.10}\n"
    )
    second = tmp_path / "second.yaml"
    second.write_text(
        "apiVersion: egresscore.io/v1alpha1\n"
        "kind: EgressPolicy\n"
        "metadata: {name: two}\n"
        "spec:\n"
        "  selectors: [{podSelector: \"app == 'x' &&\"}]\n"
        "  rules: [{destinationCIDRs: ['198.51.100.7/24'], action: pass}]\n"
    )
    result = CliRunner().invoke(main, ["policy", "validate", str(first), str(second)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    operator = next(line for line in lines if "operator" in line)
    assert operator.startswith(f"{first}: document 1 (CiliumEgressGatewayPolicy one): ")
    assert "spec.selectors[0].podSelector.matchExpressions[0].operator" in operator
    assert "In, NotIn, Exists, DoesNotExist" in operator
    selector = next(line for line in lines if "spec.selectors[0].podSelector" in line and str(second) in line)
    assert "position" in selector
    cidr = next(line for line in lines if "spec.rules[0].destinationCIDRs[0]" in line)
    assert "198.51.100.0/24" in cidr
    assert "3 error(s) in 2 file(s)" in result.output


def test_explain_redirect_names_policy_selector_prefix_and_gateway() -> None:
    lines = explain("10.244.1.5", "203.0.113.7")
    text = "\n".join(lines)
    assert lines[0] == "packet 10.244.1.5 -> 203.0.113.7"
    assert "source: endpoint payments/pay-1 on node node-a" in text
    assert "policy egress-sample (CiliumEgressGatewayPolicy" in text
    assert "spec.selectors[0] matches" in text
    # Both policies list 203.0.113.0/24: priority 0 (Cilium) before priority 10 (native).
    candidates = [line for line in lines if "203.0.113.0/24  policy" in line]
    assert candidates[0].lstrip().startswith("-> 203.0.113.0/24  policy egress-sample")
    assert "policy payments (priority 10)" in candidates[1]
    assert lines[-2] == "decision: REDIRECT to gateway node gw-1, egress IP 192.0.2.10"
    assert lines[-1].startswith("decided by policy egress-sample")


def test_explain_on_the_gateway_node_is_snat() -> None:
    lines = explain("--node", "gw-1", "10.244.1.5", "203.0.113.7")
    assert "decision: SNAT here (this node, gw-1, is the gateway), egress IP 192.0.2.10" in lines


@pytest.mark.parametrize(
    ("src", "dst", "decision"),
    [
        ("10.244.1.5", "203.0.113.200", "decision: PASS (excluded CIDR)"),
        ("10.244.1.5", "10.244.2.7", "decision: PASS (cluster-internal destination)"),
        ("10.244.1.5", "192.0.2.4", "decision: PASS (cluster-internal destination)"),
        ("192.0.2.200", "203.0.113.7", "decision: PASS (the source is not an endpoint)"),
        ("10.244.1.5", "198.51.100.7", "decision: PASS (the rule goes direct)"),
        ("10.244.1.5", "8.8.8.8", "decision: PASS (no policy applies)"),
    ],
)
def test_explain_pass_reasons(src: str, dst: str, decision: str) -> None:
    assert decision in explain(src, dst)


def test_explain_calico_annotation_policy_uses_the_gateway_pod() -> None:
    text = "\n".join(explain("10.244.2.20", "203.0.113.7"))
    assert "calico-annotations:default/legacy-1" in text
    assert "decision: REDIRECT to gateway node gw-1, egress IP 10.244.3.2" in text


def test_explain_reports_bad_addresses_and_bad_files(tmp_path: Path) -> None:
    options = [part for path in FILES for part in ("-f", str(path))]
    result = CliRunner().invoke(main, ["explain", *options, "10.244.1.5", "203.0.113.999"])
    assert result.exit_code != 0
    assert "destination '203.0.113.999' is not an IPv4 or IPv6 address" in result.output
    result = CliRunner().invoke(main, ["explain", *options, "10.244.1.5", "2001:db8::1"])
    assert result.exit_code != 0
    assert "expected two addresses of one family" in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: x}\nspec: {}\n"
    )
    result = CliRunner().invoke(main, ["explain", "-f", str(broken), "10.244.1.5", "203.0.113.7"])
    assert result.exit_code != 0
    assert f"{broken}: document 1 (CiliumEgressGatewayPolicy x)" in result.output
    assert "decision:" not in result.output
