"""The gateway role on real traffic (../shared/NETWORK_TESTS.md).

A client namespace (the pod 198.18.1.2) reaches an external host (203.0.113.10)
through the gateway namespace, where ``egresscore run --role gateway`` translates to
the egress IP 192.0.2.10, and a router whose side of the link to the external host
has a 1280-byte MTU (the external host's side keeps 1500, so TCP to it needs path MTU
discovery through the gateway: a broken one stalls the transfers). Every assertion is
about what the external servers recorded, what the client received, or what is left
in the gateway's namespace.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from network_lab import GatewayRun, require_network, shorten_kernel_timeouts, write_gateway_config

from egresscore.agent.gateway import split_ports
from egresscore.netlab import GatewayTopology, Lab, checksum_errors, nstat
from egresscore.netlab.peers import read_records

pytestmark = pytest.mark.network

EGRESS = GatewayTopology.EGRESS_IP
EXTERNAL = GatewayTopology.EXTERNAL_IP


@dataclass
class Site:
    lab: Lab
    topology: GatewayTopology
    agent: GatewayRun
    tcp: str

    def load(self, *args: str, timeout: float = 60) -> dict[str, object]:
        result = self.lab.run(
            self.topology.client, sys.executable, "-m", "egresscore.netlab.load", *args,
            timeout=timeout,
        )  # fmt: skip
        return dict(json.loads(result.stdout))

    def server(self, kind: str, port: int) -> str:
        record = str(self.lab.workdir / f"{kind}-{port}.jsonl")
        self.lab.peer(self.topology.external, kind, bind=EXTERNAL, port=port, record=record)
        return record


def loss_counters(site: Site) -> dict[str, object]:
    """Where a lost connection's packets went: TCP drop counters and the queue's own."""
    found: dict[str, object] = {}
    for ns in (site.topology.client, site.topology.gateway, site.topology.external):
        counters = nstat(site.lab, ns)
        wanted = ("Drop", "Listen", "Retrans", "PAWS")
        found[ns] = {k: v for k, v in counters.items() if v and any(w in k for w in wanted)}
    queues = site.lab.run(site.topology.gateway, "cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
    found["nfnetlink_queue"] = queues.stdout
    return found


def build_site(offloads: bool, tcp: str) -> tuple[Lab, GatewayTopology, GatewayRun]:
    lab = Lab()
    try:
        topology = GatewayTopology(lab, router_mtu=1280, offloads=offloads)
        shorten_kernel_timeouts(lab, topology.gateway)
        config = write_gateway_config(lab, extra=f"  tcp_translation: {tcp}\n")
        agent = GatewayRun(lab, topology.gateway, config)
    except BaseException:
        lab.close()
        raise
    return lab, topology, agent


# TCP handed to the kernel (the default) with offloads on and off, and TCP rewritten in
# user space (tcp_translation: queue), whose GSO and partial-checksum path offloads exercise.
@pytest.fixture(
    scope="module",
    params=[(True, "kernel"), (False, "kernel"), (True, "queue"), (False, "queue")],
    ids=[
        "offloads-on-tcp-kernel",
        "offloads-off-tcp-kernel",
        "offloads-on-tcp-queue",
        "offloads-off-tcp-queue",
    ],
)
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    require_network()
    lab, topology, agent = build_site(*request.param)
    try:
        yield Site(lab, topology, agent, request.param[1])
        assert agent.stop() == 0
    finally:
        lab.close()


def test_http_requests_leave_with_the_egress_ip(site: Site) -> None:
    record = site.server("http", 8080)
    result = site.load("http", "--url", f"http://{EXTERNAL}:8080/", "--count", "20", "--concurrency", "4")
    assert result["ok"] == 20, result
    peers = {r["peer"] for r in read_records(record)}
    assert peers == {EGRESS}
    # A large answer crosses the 1280-byte link: TCP's MSS and the gateway's GSO path.
    result = site.load("http", "--url", f"http://{EXTERNAL}:8080/bytes?n=5000000", "--count", "2")
    assert result["ok"] == 2, result


def test_a_long_iperf3_stream_is_translated(site: Site) -> None:
    # The client sends: its 1460-byte segments meet the router's 1280-byte link, so this
    # also proves that the router's "fragmentation needed" about a TCP segment reaches
    # the client through the gateway.
    log = site.lab.workdir / "iperf3-server.json"
    server = site.lab.spawn(
        site.topology.external, ["iperf3", "-s", "-1", "-J", "-B", EXTERNAL, "-p", "5201"], log=log.name
    )
    time.sleep(0.3)
    client = site.lab.run(
        site.topology.client, "iperf3", "-c", EXTERNAL, "-p", "5201", "-t", "3", "-J", timeout=30
    )
    result = json.loads(client.stdout)
    assert result["end"]["sum_received"]["bytes"] > 10_000_000
    server.wait(10)
    seen = json.loads(log.read_text())
    assert [c["remote_host"] for c in seen["start"]["connected"]] == [EGRESS]


def test_udp_requests_get_their_answers(site: Site) -> None:
    record = site.server("udp-echo", 7000)
    result = site.load("udp-echo", "--host", EXTERNAL, "--port", "7000", "--count", "20")
    assert result["replies"] == 20, result
    records = read_records(record)
    assert len(records) == 20
    assert {r["peer"] for r in records} == {EGRESS}


def test_icmp_echo_is_translated_both_ways(site: Site) -> None:
    record = site.server("icmp", 0)
    result = site.lab.run(
        site.topology.client, "ping", "-c", "3", "-i", "0.2", "-W", "2", EXTERNAL, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 received" in result.stdout
    seen = read_records(record)
    assert len(seen) >= 3
    assert {r["peer"] for r in seen} == {EGRESS}


def test_fragmentation_needed_reaches_the_client(site: Site) -> None:
    # 1400 bytes with DF set do not fit the router's 1280-byte link: the router's ICMP
    # "fragmentation needed" goes to the egress IP, and the gateway must translate it
    # (outer destination and the quoted packet) back to the client.
    result = site.lab.run(
        site.topology.client, "ping", "-M", "do", "-s", "1400", "-c", "2", "-i", "0.3", "-W", "2", EXTERNAL,
        check=False,
    )  # fmt: skip
    assert (
        "mtu = 1280" in result.stdout + result.stderr
        or "message too long" in (result.stdout + result.stderr).lower()
    )
    route = site.lab.run(site.topology.client, "ip", "route", "get", EXTERNAL).stdout
    assert "mtu 1280" in route, route
    # The same for UDP: a too-large datagram's error quotes a UDP port.
    site.lab.run(site.topology.client, "ip", "route", "flush", "cache")
    assert "mtu 1280" not in site.lab.run(site.topology.client, "ip", "route", "get", EXTERNAL).stdout
    # The socket must still be open when the error arrives: the kernel applies a UDP
    # error to the socket it is about, and learns the path MTU then.
    site.load(
        "udp-echo", "--host", EXTERNAL, "--port", "7001", "--size", "1400", "--count", "1", "--timeout", "1"
    )
    deadline = time.monotonic() + 5
    while "mtu 1280" not in site.lab.run(site.topology.client, "ip", "route", "get", EXTERNAL).stdout:
        assert time.monotonic() < deadline, "no path MTU learned from a UDP datagram's ICMP error"
        time.sleep(0.1)


def test_no_checksum_errors_on_either_end(site: Site) -> None:
    record = site.server("http", 8081)
    result = site.load("http", "--url", f"http://{EXTERNAL}:8081/bytes?n=2000000", "--count", "5")
    assert result["ok"] == 5
    assert read_records(record)
    for ns in (site.topology.external, site.topology.client):
        errors = checksum_errors(site.lab, ns)
        assert errors, "nstat reported no checksum counters"
        assert all(value == 0 for value in errors.values()), (ns, errors)


def test_many_short_connections_and_no_leaked_entries(site: Site) -> None:
    record = site.server("tcp-sink", 9000)
    # Every connection is answered within the load's 3 s bound: the egress port of a new
    # flow is its pod's port (folded into the worker's range), so an external TIME_WAIT
    # socket only meets the next connection from the same client port, which it accepts
    # (docs/snat.md).
    result = site.load(
        "connections", "--host", EXTERNAL, "--port", "9000", "--duration", "3", "--concurrency", "32"
    )
    assert result["failures"] == 0, (result, loss_counters(site))
    assert int(result["connections"]) > 200, result  # type: ignore[call-overload]
    time.sleep(0.5)
    site.lab.stop(site.lab.processes[-1])
    totals = read_records(record)
    assert [(r["peer"], r["connections"]) for r in totals] == [(EGRESS, result["connections"])]
    # Closed connections leave the table once their kernel conntrack entries end (TIME_WAIT
    # is 1 s in this namespace). The kernel removes expired entries, and sends their
    # destroy events, lazily (its garbage collector may wait up to a minute); listing the
    # table removes them at once.
    deadline = time.monotonic() + 15
    while True:
        site.lab.run(site.topology.gateway, "conntrack", "-L", check=False)
        entries = sum(status["entries"] for status in site.agent.status())
        if entries == 0:
            break
        assert time.monotonic() < deadline, f"{entries} SNAT entries left: {site.agent.status()}"
        time.sleep(0.3)
    counters = [status["datapath"] for status in site.agent.status()]
    assert sum(c["outbound_snat_drop"] for c in counters) == 0
    handed = sum(c["tcp_handed_to_kernel"] for c in counters)
    if site.tcp == "kernel":
        # Each connection's first packet went through a worker; the kernel did the rest.
        assert handed >= int(result["connections"])  # type: ignore[call-overload]
        assert sum(c["kernel_failed"] for c in counters) == 0
    else:
        assert handed == 0


def test_a_pod_no_policy_selects_is_left_to_the_node(site: Site) -> None:
    # 198.18.1.3 is no endpoint of the inventory: the classifier passes its flows. With
    # TCP in the kernel the worker accepts the SYN with the pass mark and the node's own
    # masquerade applies, as for any pod without a policy: the external host sees the
    # node's address. With every TCP packet in user space the flow is untracked and
    # leaves as it is (docs/agent.md), so nothing comes back to it.
    record = site.server("http", 8082)
    site.lab.run(site.topology.client, "ip", "address", "add", "198.18.1.3/24", "dev", "c0", check=False)
    script = (
        "import http.client, sys\n"
        "c = http.client.HTTPConnection(sys.argv[1], 8082, timeout=3, source_address=('198.18.1.3', 0))\n"
        "c.request('GET', '/'); print(c.getresponse().status)\n"
    )
    result = site.lab.run(site.topology.client, sys.executable, "-c", script, EXTERNAL, check=False)
    peers = [r["peer"] for r in read_records(record)]
    if site.tcp == "kernel":
        assert result.stdout.strip() == "200", result.stderr
        assert peers == [GatewayTopology.GATEWAY_UPLINK_IP]
        deadline = time.monotonic() + 5  # the workers write their status every 0.2 s
        while sum(status["datapath"]["tcp_passed"] for status in site.agent.status()) < 1:
            assert time.monotonic() < deadline, site.agent.status()
            time.sleep(0.1)
    else:
        assert result.returncode != 0
        assert peers == []


# A client reusing its port: the first connection ends with a reset (no TIME_WAIT on
# either host), the second opens at once from the same address and port. With TCP in
# the kernel its SYN reaches the worker before conntrack, the worker deletes the first
# connection's closed entry and creates the second's with the same egress port; the
# deleted entry's destroy event comes after, and must not free that port: a third
# connection, from another pod with the same source port, would be given the port the
# second one still uses, the kernel would refuse the clashing entry, and it would never
# connect. With TCP in user space the table itself reopens the closed flow.
PORT_REUSE_CLIENT = """
import json, socket, struct, sys, time
host, port, source_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def connect(address):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, source_port))
    sock.settimeout(3)
    sock.connect((host, port))
    return sock
first = connect("198.18.1.2")
first.sendall(b"a" * 1000)
time.sleep(0.2)
first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
first.close()
second = connect("198.18.1.2")
second.sendall(b"b" * 2000)
print("second", flush=True)
sys.stdin.readline()  # the test lets the gateway read the first entry's destroy event
try:
    third = connect("198.18.1.4")
    third.sendall(b"c" * 4000)
    outcome = "connected"
except OSError as error:
    outcome = str(error)
second.sendall(b"b" * 2000)
time.sleep(0.3)
print(json.dumps({"third": outcome}), flush=True)
"""


def test_a_reused_client_port_keeps_its_egress_port(site: Site) -> None:
    record = site.server("tcp-stream", 9020)
    server = site.lab.processes[-1]
    site.lab.run(site.topology.client, "ip", "address", "add", "198.18.1.4/24", "dev", "c0", check=False)
    events = sum(s["datapath"].get("kernel_destroy_events", 0) for s in site.agent.status())
    client = site.lab.spawn(
        site.topology.client, [sys.executable, "-c", PORT_REUSE_CLIENT, EXTERNAL, "9020", "40123"],
        stdin=-1, stdout=-1,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().strip() == b"second", client.stdout.read()
    if site.tcp == "kernel":
        # The first connection's entry was deleted (a destroy event) and the gateway
        # read it: the workers write their status every 0.2 s.
        deadline = time.monotonic() + 5
        while sum(s["datapath"].get("kernel_destroy_events", 0) for s in site.agent.status()) <= events:
            assert time.monotonic() < deadline, site.agent.status()
            time.sleep(0.1)
    client.stdin.write(b"\n")
    client.stdin.flush()
    outcome = json.loads(client.stdout.readline())
    assert client.wait(10) == 0
    assert outcome == {"third": "connected"}
    site.lab.stop(server)
    received = read_records(record)
    assert {r["peer"] for r in received} == {EGRESS}
    assert sum(int(r["bytes"]) for r in received) == 1000 + 2000 + 4000 + 2000


def test_egress_ports_follow_the_pods_ports(site: Site) -> None:
    # The SNAT table's first choice is the pod's port, folded into the worker's range when
    # outside it (docs/snat.md): what the external server saw as the client's port. Every
    # flow of one address pair reaches one worker, whichever the queue hash picked.
    record = site.server("http", 8083)
    script = (
        "import http.client, sys\n"
        "for port in (20000, 50000):\n"
        "    source = ('198.18.1.2', port)\n"
        "    c = http.client.HTTPConnection(sys.argv[1], 8083, timeout=3, source_address=source)\n"
        "    c.request('GET', f'/{port}'); assert c.getresponse().status == 200; c.close()\n"
    )
    site.lab.run(site.topology.client, sys.executable, "-c", script, EXTERNAL)
    seen = {r["path"]: (r["peer"], r["peer_port"]) for r in read_records(record)}
    ranges = split_ports(1024, 65535, 2)

    def folded(port: int, low: int, high: int) -> int:
        return low + (port - low) % (high - low + 1)

    expected = [{f"/{p}": (EGRESS, folded(p, low, high)) for p in (20000, 50000)} for low, high in ranges]
    assert seen in expected, (seen, ranges)
