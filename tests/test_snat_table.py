"""Tests for the SNAT table, egresscore.core.snat_table.SnatTable (docs/snat.md).

Packets are built and read back with dpkt, an independent implementation, and every
checksum of a rewritten packet is verified here from scratch. The behaviour tests pin
the documented rules one at a time; the Hypothesis state machine at the end drives the
compiled table with random flows, replies, ICMP errors, closes and clock jumps, and
checks every verdict, every rewritten packet and the whole set of live entries against
the plain-Python oracle in tests/reference/snat_table.py.

Literal addresses come from the documentation ranges only (RFC 5737, RFC 2544's
198.18.0.0/15, RFC 3849's 2001:db8::/32).
"""

from __future__ import annotations

import ipaddress
import math
import re
import struct
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import dpkt
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path: the oracle is "reference".
from reference.snat_table import (
    ACK,
    DEFAULT_TIMEOUTS,
    FIN,
    ICMP,
    ICMPV6,
    IN,
    OUT,
    PSH,
    RST,
    SNAPSHOT_HEADER,
    SNAPSHOT_RECORD,
    SYN,
    TCP,
    UDP,
    Flow,
    OracleMismatch,
    ReferenceSnatTable,
    Reply,
    SnapshotRecord,
    State,
    Verdict,
    decode_snapshot,
    encode_snapshot,
    sort_key,
)

from egresscore.errors import SnapshotError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
A = ipaddress.ip_address


def core() -> ModuleType:
    """The compiled module. If the extension is not built this raises: a failure, never a skip."""
    from egresscore.core import snat_table

    return snat_table


def make_table(egress_ips: Iterable[object] = (), **options: Any) -> Any:
    return core().SnatTable(list(egress_ips) or [E4, E4B, E6], **options)


# --- addresses ---------------------------------------------------------------------------

E4, E4B = A("192.0.2.10"), A("192.0.2.11")
E6, E6B = A("2001:db8::10"), A("2001:db8::11")
POD4, POD4B = A("198.18.0.1"), A("198.18.0.2")
POD6, POD6B = A("2001:db8:1::1"), A("2001:db8:1::2")
R4, R4B = A("203.0.113.5"), A("203.0.113.6")
R6, R6B = A("2001:db8:ffff::5"), A("2001:db8:ffff::6")
ROUTER4, ROUTER6 = A("203.0.113.254"), A("2001:db8:ffff::fe")


# --- packets -----------------------------------------------------------------------------


def echo_protocol(address: Address) -> int:
    return ICMP if address.version == 4 else ICMPV6


def ip_packet(src: Address, dst: Address, protocol: int, payload: Any, *, ident: int = 0x4242) -> bytes:
    if src.version == 4:
        return bytes(dpkt.ip.IP(src=src.packed, dst=dst.packed, p=protocol, ttl=64, id=ident, data=payload))
    return bytes(
        dpkt.ip6.IP6(src=src.packed, dst=dst.packed, nxt=protocol, hlim=64, data=payload, plen=len(payload))
    )


def tcp_packet(
    src: Address, sport: int, dst: Address, dport: int, flags: int, payload: bytes = b"hi"
) -> bytes:
    segment = dpkt.tcp.TCP(
        sport=sport,
        dport=dport,
        seq=0x01020304,
        ack=0x0A0B0C0D if flags & ACK else 0,
        flags=flags,
        win=8192,
        data=payload,
    )
    return ip_packet(src, dst, TCP, segment)


def udp_packet(src: Address, sport: int, dst: Address, dport: int, payload: bytes = b"query") -> bytes:
    return ip_packet(src, dst, UDP, dpkt.udp.UDP(sport=sport, dport=dport, data=payload))


def echo_packet(src: Address, dst: Address, ident: int, *, reply: bool, seq: int = 7) -> bytes:
    if src.version == 4:
        message: Any = dpkt.icmp.ICMP(
            type=0 if reply else 8, code=0, data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=b"ping")
        )
    else:
        message = dpkt.icmp6.ICMP6(
            type=129 if reply else 128, code=0, data=dpkt.icmp6.ICMP6.Echo(id=ident, seq=seq, data=b"ping")
        )
    return ip_packet(src, dst, echo_protocol(src), message)


def icmp_error(src: Address, dst: Address, quote: bytes) -> bytes:
    """Destination unreachable (ICMPv4 type 3 code 1, ICMPv6 type 1 code 0) quoting ``quote``."""
    if src.version == 4:
        return ip_packet(src, dst, ICMP, dpkt.icmp.ICMP(type=3, code=1, data=b"\0\0\0\0" + quote))
    return ip_packet(src, dst, ICMPV6, dpkt.icmp6.ICMP6(type=1, code=0, data=b"\0\0\0\0" + quote))


def outbound_packet(flow: Flow) -> bytes:
    if flow.protocol == TCP:
        return tcp_packet(flow.pod_ip, flow.pod_port, flow.remote_ip, flow.remote_port, flow.tcp_flags)
    if flow.protocol == UDP:
        return udp_packet(flow.pod_ip, flow.pod_port, flow.remote_ip, flow.remote_port)
    return echo_packet(flow.pod_ip, flow.remote_ip, flow.pod_port, reply=False)


def inbound_packet(reply: Reply) -> bytes:
    if reply.protocol == TCP:
        return tcp_packet(
            reply.remote_ip, reply.remote_port, reply.egress_ip, reply.egress_port, reply.tcp_flags
        )
    if reply.protocol == UDP:
        return udp_packet(reply.remote_ip, reply.remote_port, reply.egress_ip, reply.egress_port)
    return echo_packet(reply.remote_ip, reply.egress_ip, reply.egress_port, reply=True)


@dataclass(frozen=True)
class Layout:
    """Where things are in one of the simple packets built here (no options, no extension headers)."""

    version: int
    src: slice
    dst: slice
    l4: int
    end: int
    protocol: int


def layout(packet: bytes | bytearray, start: int = 0) -> Layout:
    if packet[start] >> 4 == 4:
        header = (packet[start] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, start + 2)[0]
        return Layout(
            4,
            slice(start + 12, start + 16),
            slice(start + 16, start + 20),
            start + header,
            start + total,
            packet[start + 9],
        )
    payload = struct.unpack_from("!H", packet, start + 4)[0]
    return Layout(
        6,
        slice(start + 8, start + 24),
        slice(start + 24, start + 40),
        start + 40,
        start + 40 + payload,
        packet[start + 6],
    )


def l4_checksum_offset(protocol: int) -> int:
    return {TCP: 16, UDP: 6, ICMP: 2, ICMPV6: 2}[protocol]


def port_offsets(packet: bytes | bytearray, start: int = 0) -> tuple[int | None, int | None]:
    """Offsets of the source and destination "port" (an echo's identifier sits on its own side)."""
    lay = layout(packet, start)
    if lay.protocol in (TCP, UDP):
        return lay.l4, lay.l4 + 2
    icmp_type = packet[lay.l4]
    if icmp_type in (8, 128):  # echo request: the identifier is the source port
        return lay.l4 + 4, None
    if icmp_type in (0, 129):  # echo reply: the identifier is the destination port
        return None, lay.l4 + 4
    return None, None


def rewritten(
    packet: bytes,
    *,
    src: Address | None = None,
    sport: int | None = None,
    dst: Address | None = None,
    dport: int | None = None,
    start: int = 0,
) -> bytes:
    """``packet`` with fields replaced (checksums are not touched: compare with ``masked``)."""
    out = bytearray(packet)
    lay = layout(out, start)
    source_port, destination_port = port_offsets(out, start)
    if src is not None:
        out[lay.src] = src.packed
    if dst is not None:
        out[lay.dst] = dst.packed
    if sport is not None:
        assert source_port is not None
        struct.pack_into("!H", out, source_port, sport)
    if dport is not None:
        assert destination_port is not None
        struct.pack_into("!H", out, destination_port, dport)
    return bytes(out)


def masked(packet: bytes | bytearray, start: int = 0) -> bytes:
    """``packet`` with its IPv4 header checksum and L4 checksum zeroed (and those of a quote)."""
    out = bytearray(packet)
    lay = layout(out, start)
    if lay.version == 4:
        out[start + 10 : start + 12] = b"\0\0"
    checksum = lay.l4 + l4_checksum_offset(lay.protocol)
    if checksum + 2 <= len(out):
        out[checksum : checksum + 2] = b"\0\0"
    if lay.protocol in (ICMP, ICMPV6) and out[lay.l4] not in (0, 8, 129, 128):
        quote = lay.l4 + 8
        inner = bytes(masked(out[: lay.end], quote))
        out[quote : len(inner)] = inner[quote:]
    return bytes(out)


def with_checksums(packet: bytes) -> bytes:
    """``packet`` with its IPv4 header and L4 checksums computed afresh (by dpkt)."""
    ip: Any = dpkt.ip.IP(packet) if packet[0] >> 4 == 4 else dpkt.ip6.IP6(packet)
    if packet[0] >> 4 == 4:
        ip.sum = 0
    ip.data.sum = 0
    out = bytes(ip)
    assert_checksums_valid(out)
    return out


def ones_sum(data: bytes | bytearray) -> int:
    raw = bytes(data) + (b"\0" if len(data) % 2 else b"")
    total = sum(struct.unpack(f"!{len(raw) // 2}H", raw))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def assert_checksums_valid(packet: bytes | bytearray) -> None:
    """The IPv4 header checksum and the L4 checksum verify (an IPv4 UDP checksum of 0 means none)."""
    lay = layout(packet)
    if lay.version == 4:
        assert ones_sum(packet[: lay.l4]) == 0xFFFF, f"bad IPv4 header checksum in {bytes(packet).hex()}"
    segment = bytes(packet[lay.l4 : lay.end])
    if lay.protocol == ICMP:
        assert ones_sum(segment) == 0xFFFF, f"bad ICMP checksum in {bytes(packet).hex()}"
        return
    if lay.protocol == UDP and lay.version == 4 and segment[6:8] == b"\0\0":
        return
    if lay.version == 4:
        pseudo = (
            bytes(packet[lay.src])
            + bytes(packet[lay.dst])
            + struct.pack("!BBH", 0, lay.protocol, len(segment))
        )
    else:
        pseudo = (
            bytes(packet[lay.src])
            + bytes(packet[lay.dst])
            + struct.pack("!IxxxB", len(segment), lay.protocol)
        )
    assert ones_sum(pseudo + segment) == 0xFFFF, f"bad L4 checksum in {bytes(packet).hex()}"


def same_checksum(a: int, b: int) -> bool:
    """Equal, or the two one's-complement zeros."""
    return a == b or {a, b} == {0, 0xFFFF}


@dataclass(frozen=True)
class Parsed:
    src: Address
    dst: Address
    protocol: int
    sport: int
    dport: int


def parse(packet: bytes | bytearray) -> Parsed:
    """Read a packet back with dpkt."""
    raw = bytes(packet)
    ip: Any = dpkt.ip.IP(raw) if raw[0] >> 4 == 4 else dpkt.ip6.IP6(raw)
    protocol = ip.p if raw[0] >> 4 == 4 else ip.nxt
    segment = ip.data
    if protocol in (TCP, UDP):
        sport, dport = segment.sport, segment.dport
    elif segment.type in (8, 128):
        sport, dport = segment.data.id, 0
    elif segment.type in (0, 129):
        sport, dport = 0, segment.data.id
    else:
        sport = dport = 0
    return Parsed(A(ip.src), A(ip.dst), protocol, sport, dport)


def assert_rewritten(actual: bytes | bytearray, original: bytes, **fields: Any) -> None:
    """``actual`` is ``original`` with ``fields`` replaced and valid checksums; dpkt reads the fields back."""
    expected = rewritten(original, **fields)
    assert masked(actual) == masked(expected), f"\n{bytes(actual).hex()}\n{expected.hex()}"
    assert_checksums_valid(actual)
    parsed = parse(actual)
    if "src" in fields:
        assert parsed.src == fields["src"]
    if "dst" in fields:
        assert parsed.dst == fields["dst"]
    if "sport" in fields:
        assert parsed.sport == fields["sport"]
    if "dport" in fields:
        assert parsed.dport == fields["dport"]


# --- entries -----------------------------------------------------------------------------


def public(entry: Any) -> tuple[Any, ...]:
    assert isinstance(entry, core().SnatEntry), entry
    assert isinstance(entry.state, core().SnatState)
    for address in (entry.pod_ip, entry.remote_ip, entry.egress_ip):
        assert isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
    return (
        entry.protocol,
        entry.pod_ip,
        entry.pod_port,
        entry.remote_ip,
        entry.remote_port,
        entry.egress_ip,
        entry.egress_port,
        int(entry.state),
        entry.replied,
        entry.expires,
    )


def assert_entry(actual: Any, expected: tuple[Any, ...] | None) -> None:
    if expected is None:
        assert actual is None, f"expected no entry, got {actual}"
        return
    assert actual is not None, f"expected {expected}, got no entry"
    got = public(actual)
    assert got[:9] == tuple(expected[:9]), f"\n got      {got}\n expected {expected}"
    assert math.isclose(got[9], expected[9], abs_tol=1e-6), f"expires {got[9]}, expected {expected[9]}"


def assert_same_entries(actual: Iterable[Any], expected: list[tuple[Any, ...]]) -> None:
    got = sorted((public(entry) for entry in actual), key=sort_key)
    expected = sorted(expected, key=sort_key)
    assert [e[:9] for e in got] == [e[:9] for e in expected], f"\n got      {got}\n expected {expected}"
    for one, other in zip(got, expected, strict=True):
        assert math.isclose(one[9], other[9], abs_tol=1e-6), f"{one} expires, expected {other}"


def original_key(entry: Any) -> tuple[Any, ...]:
    return (entry.protocol, entry.pod_ip, entry.pod_port, entry.remote_ip, entry.remote_port)


def translated_key(entry: Any) -> tuple[Any, ...]:
    return (entry.protocol, entry.remote_ip, entry.remote_port, entry.egress_ip, entry.egress_port)


# --- a small driver for behaviour tests --------------------------------------------------


def send(table: Any, flow: Flow, now: float, egress: object = E4) -> tuple[Any, bytes]:
    """An outbound packet of ``flow``: its verdict and the bytes after the call."""
    buffer = bytearray(outbound_packet(flow))
    verdict = table.translate_outbound(buffer, egress, now)
    assert type(verdict) is core().Verdict
    return verdict, bytes(buffer)


def receive(table: Any, reply: Reply, now: float) -> tuple[Any, bytes]:
    buffer = bytearray(inbound_packet(reply))
    verdict = table.translate_inbound(buffer, now)
    assert type(verdict) is core().Verdict
    return verdict, bytes(buffer)


def egress_side(translated: bytes) -> tuple[Address, int]:
    parsed = parse(translated)
    return parsed.src, parsed.sport


def reply_to(flow: Flow, translated: bytes, flags: int = ACK) -> Reply:
    """The inbound packet answering a translated outbound packet."""
    egress, port = egress_side(translated)
    return Reply(
        flow.protocol, flow.remote_ip, flow.remote_port, egress, port, flags if flow.protocol == TCP else 0
    )


def tcp(
    pod: Address = POD4, port: int = 40000, remote: Address = R4, rport: int = 80, flags: int = SYN
) -> Flow:
    return Flow(TCP, pod, port, remote, rport, flags)


def udp(pod: Address = POD4, port: int = 40000, remote: Address = R4, rport: int = 53) -> Flow:
    return Flow(UDP, pod, port, remote, rport)


def echo(pod: Address = POD4, ident: int = 40000, remote: Address = R4) -> Flow:
    return Flow(echo_protocol(pod), pod, ident, remote, 0)


def with_flags(flow: Flow, flags: int) -> Flow:
    return Flow(flow.protocol, flow.pod_ip, flow.pod_port, flow.remote_ip, flow.remote_port, flags)


def lookup(table: Any, flow: Flow) -> Any:
    return table.lookup_outbound(*flow.key)


# --- the module's names ------------------------------------------------------------------


def test_package_exports_the_compiled_names() -> None:
    import egresscore

    module = core()
    for name in ("SnatTable", "Verdict", "SnatState", "SnatEntry"):
        assert getattr(egresscore, name) is getattr(module, name), name


def test_enums_have_the_documented_numbers() -> None:
    module = core()
    assert {v.name: int(v) for v in module.Verdict} == {v.name: int(v) for v in Verdict}
    assert {s.name: int(s) for s in module.SnatState} == {s.name: int(s) for s in State}
    for verdict in module.Verdict:
        assert verdict.is_drop == verdict.name.startswith("DROP_"), verdict
    assert module.SNAPSHOT_VERSION == 1
    assert module.SnatEntry._fields == (
        "protocol",
        "pod_ip",
        "pod_port",
        "remote_ip",
        "remote_port",
        "egress_ip",
        "egress_port",
        "state",
        "replied",
        "expires",
    )


def test_default_timeouts() -> None:
    module = core()
    assert dict(module.DEFAULT_TIMEOUTS) == DEFAULT_TIMEOUTS
    assert make_table([E4]).timeouts == DEFAULT_TIMEOUTS
    custom = make_table([E4], timeouts={"udp_replied": 7.5, "tcp_close": 1}).timeouts
    assert custom == {**DEFAULT_TIMEOUTS, "udp_replied": 7.5, "tcp_close": 1}


def test_default_properties() -> None:
    table = make_table(["192.0.2.10"])
    assert table.egress_ips == (E4,)
    assert table.port_range == (1024, 65535)
    assert table.max_entries == 262144
    assert len(table) == 0
    assert not table
    assert list(table.entries()) == []
    assert isinstance(table.memory_usage(), int) and table.memory_usage() > 0


def test_configured_properties() -> None:
    table = make_table(
        ["2001:db8::10", E4, b"\xc0\x00\x02\x0b"], port_range=(20000, 29999), max_entries=5, seed=1
    )
    assert table.egress_ips == (E6, E4, E4B)
    assert all(type(ip) in (ipaddress.IPv4Address, ipaddress.IPv6Address) for ip in table.egress_ips)
    assert table.port_range == (20000, 29999)
    assert table.max_entries == 5


@pytest.mark.parametrize(
    ("options", "parameter"),
    [
        ({"port_range": (30000, 20000)}, "port_range"),
        ({"port_range": (1024, 70000)}, "port_range"),
        ({"port_range": (-1, 100)}, "port_range"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": -5}, "max_entries"),
        ({"timeouts": {"tcp_bogus": 5}}, "tcp_bogus"),
        ({"timeouts": {"udp_replied": -1}}, "udp_replied"),
    ],
)
def test_constructor_rejects_bad_settings(options: dict[str, Any], parameter: str) -> None:
    with pytest.raises(ValueError) as caught:
        make_table([E4], **options)
    message = str(caught.value)
    assert parameter in message or ("timeouts" in message and "timeouts" in options), message


@pytest.mark.parametrize("bad", ["not-an-ip", "192.0.2.300", "2001:db8::zz", "192.0.2.0/24"])
def test_constructor_rejects_egress_ips_that_are_not_addresses(bad: str) -> None:
    with pytest.raises(ValueError) as caught:
        make_table([E4, bad])
    assert bad in str(caught.value), str(caught.value)


def test_unconfigured_egress_ip_is_a_value_error() -> None:
    table = make_table([E4])
    packet = bytearray(outbound_packet(udp()))
    for egress in (E4B, "192.0.2.99", "2001:db8::99"):
        with pytest.raises(ValueError):
            table.translate_outbound(packet, egress, 1000.0)
    assert bytes(packet) == outbound_packet(udp())
    assert len(table) == 0


def test_read_only_buffers_are_refused() -> None:
    table = make_table([E4])
    packet = outbound_packet(udp())
    with pytest.raises((TypeError, BufferError)):
        table.translate_outbound(packet, E4, 1000.0)
    with pytest.raises((TypeError, BufferError)):
        table.translate_outbound(memoryview(packet), E4, 1000.0)
    with pytest.raises((TypeError, BufferError)):
        table.translate_inbound(inbound_packet(Reply(UDP, R4, 53, E4, 40000)), 1000.0)
    offsets = array("I", [0, len(packet)])
    with pytest.raises((TypeError, BufferError)):
        table.translate_outbound_many(packet, offsets, E4, 1000.0)
    with pytest.raises((TypeError, BufferError)):
        table.translate_inbound_many(packet, offsets, 1000.0)
    assert len(table) == 0


# --- port allocation ---------------------------------------------------------------------

FLOW_MAKERS = {
    "tcp4": lambda port: tcp(POD4, port, R4),
    "udp4": lambda port: udp(POD4, port, R4),
    "echo4": lambda port: echo(POD4, port, R4),
    "tcp6": lambda port: tcp(POD6, port, R6),
    "udp6": lambda port: udp(POD6, port, R6),
    "echo6": lambda port: echo(POD6, port, R6),
}


def egress_for(flow: Flow) -> Address:
    return E4 if flow.pod_ip.version == 4 else E6


@pytest.mark.parametrize("kind", list(FLOW_MAKERS))
def test_pod_port_is_kept_when_free(kind: str) -> None:
    table = make_table(port_range=(20000, 29999))
    for port in (20000, 24242, 29999):
        flow = FLOW_MAKERS[kind](port)
        original = outbound_packet(flow)
        verdict, translated = send(table, flow, 1000.0, egress_for(flow))
        assert verdict == Verdict.TRANSLATED
        assert_rewritten(translated, original, src=egress_for(flow), sport=port)


@pytest.mark.parametrize("kind", list(FLOW_MAKERS))
def test_pod_port_outside_the_range_gets_one_inside(kind: str) -> None:
    # Folded into the range: 20000 + (port - 20000) mod 10.
    table = make_table(port_range=(20000, 20009))
    for port, folded in ((1, 20001), (1234, 20004), (19999, 20009), (20010, 20000), (65535, 20005)):
        flow = FLOW_MAKERS[kind](port)
        verdict, translated = send(table, flow, 1000.0, egress_for(flow))
        assert verdict == Verdict.TRANSLATED
        egress, egress_port = egress_side(translated)
        assert (egress, egress_port) == (egress_for(flow), folded)
        assert_rewritten(translated, outbound_packet(flow), src=egress, sport=egress_port)
    # 20011 folds onto 20001, which 1 holds toward the same destination: another port.
    flow = FLOW_MAKERS[kind](20011)
    verdict, translated = send(table, flow, 1000.0, egress_for(flow))
    assert verdict == Verdict.TRANSLATED
    assert egress_side(translated)[1] in {20002, 20003, 20006, 20007, 20008}


def test_taken_port_gets_another_but_port_space_is_per_destination() -> None:
    table = make_table(port_range=(20000, 20099))
    first = tcp(POD4, 20000, R4, 80)
    assert egress_side(send(table, first, 1000.0)[1]) == (E4, 20000)

    # Another pod with the same port toward the same (remote, remote port): another port.
    clash = tcp(POD4B, 20000, R4, 80)
    verdict, translated = send(table, clash, 1000.0)
    assert verdict == Verdict.TRANSLATED
    egress, port = egress_side(translated)
    assert egress == E4 and port != 20000 and 20000 <= port <= 20099

    # Toward a different remote address, remote port, protocol or egress IP, 20000 is free again.
    for flow, egress_ip in [
        (tcp(POD4B, 20000, R4B, 80), E4),
        (tcp(POD4B, 20000, R4, 443), E4),
        (udp(POD4B, 20000, R4, 80), E4),
        (tcp(POD4B, 20000, R4, 80), E4B),
    ]:
        if flow.key == clash.key:  # the same original tuple is an existing flow: use another pod port
            flow = tcp(A("198.18.0.3"), 20000, R4, 80)
        verdict, translated = send(table, flow, 1000.0, egress_ip)
        assert verdict == Verdict.TRANSLATED, flow
        assert egress_side(translated) == (egress_ip, 20000), flow
    mappings = Counter((e.egress_ip, e.egress_port) for e in table.entries())
    assert mappings[(E4, 20000)] == 4  # one egress port, four destinations


def test_an_existing_flow_keeps_its_mapping() -> None:
    table = make_table(port_range=(20000, 20099))
    flow = udp(POD4, 1234, R4, 53)
    _, first = send(table, flow, 1000.0)
    for now in (1001.0, 1002.0):
        verdict, again = send(table, flow, now, E4B)  # the egress IP only matters to a new flow
        assert verdict == Verdict.TRANSLATED
        assert egress_side(again) == egress_side(first)
    assert len(table) == 1


def test_port_exhaustion() -> None:
    table = make_table([E4, E4B], port_range=(30000, 30001))
    flows = [udp(POD4, port, R4, 53) for port in (1111, 2222, 3333, 4444)]
    ports = set()
    for flow in flows[:2]:
        verdict, translated = send(table, flow, 1000.0)
        assert verdict == Verdict.TRANSLATED
        ports.add(egress_side(translated)[1])
    assert ports == {30000, 30001}
    assert table.port_exhaustion() == {}

    original = outbound_packet(flows[2])
    verdict, after = send(table, flows[2], 1000.0)
    assert verdict == Verdict.DROP_PORT_EXHAUSTED
    assert after == original
    assert lookup(table, flows[2]) is None
    assert table.port_exhaustion() == {(E4, R4): 1}
    assert send(table, flows[3], 1001.0)[0] == Verdict.DROP_PORT_EXHAUSTED
    assert table.port_exhaustion() == {(E4, R4): 2}
    keys = list(table.port_exhaustion())
    assert all(isinstance(part, ipaddress.IPv4Address) for key in keys for part in key)

    # Other destinations, another protocol and the other egress IP have their own ports.
    assert send(table, udp(POD4, 3333, R4, 54), 1002.0)[0] == Verdict.TRANSLATED
    assert send(table, udp(POD4, 3333, R4B, 53), 1002.0)[0] == Verdict.TRANSLATED
    assert send(table, tcp(POD4, 3333, R4, 53), 1002.0)[0] == Verdict.TRANSLATED
    assert send(table, flows[2], 1002.0, E4B)[0] == Verdict.TRANSLATED
    assert table.port_exhaustion() == {(E4, R4): 2}
    assert len(table) == 6


def test_port_exhaustion_of_echo_identifiers() -> None:
    table = make_table([E6], port_range=(30000, 30000))
    assert send(table, echo(POD6, 1, R6), 1000.0, E6)[0] == Verdict.TRANSLATED
    assert send(table, echo(POD6, 2, R6), 1000.0, E6)[0] == Verdict.DROP_PORT_EXHAUSTED
    assert send(table, echo(POD6, 2, R6B), 1000.0, E6)[0] == Verdict.TRANSLATED
    assert table.port_exhaustion() == {(E6, R6): 1}


# --- states and timeouts -----------------------------------------------------------------


def expect_state(table: Any, flow: Flow, state: State, replied: bool, expires: float) -> None:
    entry = lookup(table, flow)
    assert entry is not None, flow
    assert (entry.state, entry.replied) == (state, replied), entry
    assert math.isclose(entry.expires, expires, abs_tol=1e-6), entry


def test_tcp_handshake_and_close_with_the_first_fin_outbound() -> None:
    table = make_table([E4])
    t = DEFAULT_TIMEOUTS
    flow = tcp(POD4, 40000, R4, 80, SYN)
    verdict, translated = send(table, flow, 1000.0)
    assert verdict == Verdict.TRANSLATED
    expect_state(table, flow, State.SYN_SENT, False, 1000.0 + t["tcp_syn_sent"])
    reply = reply_to(flow, translated)

    steps: list[tuple[str, int, State, str]] = [
        (IN, SYN | ACK, State.SYN_RECV, "tcp_syn_recv"),
        (OUT, ACK, State.ESTABLISHED, "tcp_established"),
        (OUT, PSH | ACK, State.ESTABLISHED, "tcp_established"),
        (IN, PSH | ACK, State.ESTABLISHED, "tcp_established"),
        (OUT, FIN | ACK, State.FIN_WAIT, "tcp_fin_wait"),
        (OUT, ACK, State.FIN_WAIT, "tcp_fin_wait"),  # same direction as the first FIN: no change
        (IN, ACK, State.CLOSE_WAIT, "tcp_close_wait"),
        (IN, FIN | ACK, State.LAST_ACK, "tcp_last_ack"),
        (IN, ACK, State.LAST_ACK, "tcp_last_ack"),  # must come from the first FIN's direction
        (OUT, ACK, State.TIME_WAIT, "tcp_time_wait"),
    ]
    now = 1000.0
    for direction, flags, state, timeout in steps:
        now += 1.0
        if direction == OUT:
            verdict, _ = send(table, with_flags(flow, flags), now)
        else:
            packet = Reply(TCP, reply.remote_ip, reply.remote_port, reply.egress_ip, reply.egress_port, flags)
            verdict, back = receive(table, packet, now)
            assert_rewritten(back, inbound_packet(packet), dst=POD4, dport=40000)
        assert verdict == Verdict.TRANSLATED
        expect_state(table, flow, state, True, now + t[timeout])

    # A new SYN reopens the flow with the same mapping; the replied mark is cleared.
    now += 1.0
    verdict, reopened = send(table, with_flags(flow, SYN), now)
    assert verdict == Verdict.TRANSLATED
    assert egress_side(reopened) == egress_side(translated)
    expect_state(table, flow, State.SYN_SENT, False, now + t["tcp_syn_sent"])
    assert len(table) == 1


def test_tcp_close_with_the_first_fin_inbound() -> None:
    table = make_table([E4])
    t = DEFAULT_TIMEOUTS
    flow = tcp(flags=SYN)
    _, translated = send(table, flow, 1000.0)
    reply = reply_to(flow, translated)

    def inbound(flags: int, now: float) -> None:
        packet = Reply(TCP, reply.remote_ip, reply.remote_port, reply.egress_ip, reply.egress_port, flags)
        assert receive(table, packet, now)[0] == Verdict.TRANSLATED

    inbound(SYN | ACK, 1001.0)
    send(table, with_flags(flow, ACK), 1002.0)
    expect_state(table, flow, State.ESTABLISHED, True, 1002.0 + t["tcp_established"])
    inbound(FIN | ACK, 1003.0)
    expect_state(table, flow, State.FIN_WAIT, True, 1003.0 + t["tcp_fin_wait"])
    send(table, with_flags(flow, FIN | ACK), 1004.0)  # FIN from the other direction, no ACK-only step
    expect_state(table, flow, State.LAST_ACK, True, 1004.0 + t["tcp_last_ack"])
    send(table, with_flags(flow, ACK), 1005.0)  # not the first FIN's direction
    expect_state(table, flow, State.LAST_ACK, True, 1005.0 + t["tcp_last_ack"])
    inbound(ACK, 1006.0)
    expect_state(table, flow, State.TIME_WAIT, True, 1006.0 + t["tcp_time_wait"])


@pytest.mark.parametrize("direction", [OUT, IN])
def test_tcp_rst_closes_and_a_syn_reopens(direction: str) -> None:
    table = make_table([E4], port_range=(20000, 20099))
    t = DEFAULT_TIMEOUTS
    flow = tcp(POD4, 1234, R4, 80, SYN)
    _, translated = send(table, flow, 1000.0)
    reply = reply_to(flow, translated, SYN | ACK)
    receive(table, reply, 1001.0)
    send(table, with_flags(flow, ACK), 1002.0)
    if direction == OUT:
        verdict, _ = send(table, with_flags(flow, RST | ACK), 1003.0)
    else:
        verdict, _ = receive(table, reply_to(flow, translated, RST), 1003.0)
    assert verdict == Verdict.TRANSLATED
    expect_state(table, flow, State.CLOSE, True, 1003.0 + t["tcp_close"])
    # SYN+ACK does not reopen (SYN without ACK does), and nothing but RST leaves CLOSE.
    send(table, with_flags(flow, SYN | ACK), 1004.0)
    expect_state(table, flow, State.CLOSE, True, 1004.0 + t["tcp_close"])
    verdict, reopened = send(table, with_flags(flow, SYN), 1005.0)
    assert verdict == Verdict.TRANSLATED
    assert egress_side(reopened) == egress_side(translated)
    expect_state(table, flow, State.SYN_SENT, False, 1005.0 + t["tcp_syn_sent"])


def test_tcp_segments_that_open_a_flow() -> None:
    table = make_table([E4])
    t = DEFAULT_TIMEOUTS
    picked_up = tcp(POD4, 40001, R4, 80, ACK)
    assert send(table, picked_up, 1000.0)[0] == Verdict.TRANSLATED
    expect_state(table, picked_up, State.ESTABLISHED, False, 1000.0 + t["tcp_established"])
    data = tcp(POD4, 40002, R4, 80, PSH | ACK)
    assert send(table, data, 1000.0)[0] == Verdict.TRANSLATED
    expect_state(table, data, State.ESTABLISHED, False, 1000.0 + t["tcp_established"])
    for flags in (RST, RST | ACK):
        flow = tcp(POD4, 40003, R4, 80, flags)
        original = outbound_packet(flow)
        verdict, after = send(table, flow, 1000.0)
        assert verdict == Verdict.DROP_INVALID
        assert after == original
        assert lookup(table, flow) is None
    assert len(table) == 2


def test_outbound_packets_that_cannot_open_a_flow() -> None:
    table = make_table([E4, E6])
    cases = [
        (echo_packet(POD4, R4, 40000, reply=True), E4, Verdict.DROP_INVALID),
        (echo_packet(POD6, R6, 40000, reply=True), E6, Verdict.DROP_INVALID),
        (icmp_error(POD4, R4, udp_packet(R4, 53, POD4, 40000)), E4, Verdict.DROP_INVALID),
        (ip_packet(POD4, R4, 47, b"\0\0\x08\0gre"), E4, Verdict.DROP_UNSUPPORTED),
        (ip_packet(POD6, R6, 132, b"\0" * 12), E6, Verdict.DROP_UNSUPPORTED),
        (outbound_packet(udp(POD4)), E6, Verdict.DROP_WRONG_FAMILY),
        (outbound_packet(tcp(POD6, remote=R6)), E4, Verdict.DROP_WRONG_FAMILY),
    ]
    for packet, egress, expected in cases:
        buffer = bytearray(packet)
        assert table.translate_outbound(buffer, egress, 1000.0) == expected, packet.hex()
        assert bytes(buffer) == packet
    assert len(table) == 0


def test_wrong_family_even_for_an_existing_flow() -> None:
    table = make_table([E4, E6])
    flow = udp(POD4)
    send(table, flow, 1000.0)
    assert send(table, flow, 1001.0, E6) == (Verdict.DROP_WRONG_FAMILY, outbound_packet(flow))


@pytest.mark.parametrize("family", [4, 6])
def test_udp_unreplied_then_replied(family: int) -> None:
    t = DEFAULT_TIMEOUTS
    pod, remote, egress = (POD4, R4, E4) if family == 4 else (POD6, R6, E6)
    table = make_table([egress])
    flow = udp(pod, 1234, remote, 53)
    verdict, translated = send(table, flow, 1000.0, egress)
    assert verdict == Verdict.TRANSLATED
    expect_state(table, flow, State.UNREPLIED, False, 1000.0 + t["udp_unreplied"])
    send(table, flow, 1010.0, egress)
    expect_state(table, flow, State.UNREPLIED, False, 1010.0 + t["udp_unreplied"])
    reply = reply_to(flow, translated)
    verdict, back = receive(table, reply, 1020.0)
    assert verdict == Verdict.TRANSLATED
    assert_rewritten(back, inbound_packet(reply), dst=pod, dport=1234)
    expect_state(table, flow, State.REPLIED, True, 1020.0 + t["udp_replied"])
    send(table, flow, 1030.0, egress)
    expect_state(table, flow, State.REPLIED, True, 1030.0 + t["udp_replied"])
    entry = table.lookup_inbound(UDP, remote, 53, egress, reply.egress_port)
    assert public(entry) == public(lookup(table, flow))


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_echo(family: int) -> None:
    t = DEFAULT_TIMEOUTS
    pod, remote, egress = (POD4, R4, E4) if family == 4 else (POD6, R6, E6)
    table = make_table([egress], port_range=(20000, 20099))
    flow = echo(pod, 7, remote)
    original = outbound_packet(flow)
    verdict, translated = send(table, flow, 1000.0, egress)
    assert verdict == Verdict.TRANSLATED
    _, ident = egress_side(translated)
    assert 20000 <= ident <= 20099
    assert_rewritten(translated, original, src=egress, sport=ident)
    expect_state(table, flow, State.UNREPLIED, False, 1000.0 + t["icmp"])
    entry = lookup(table, flow)
    assert (entry.protocol, entry.remote_port) == (echo_protocol(pod), 0)
    reply = Reply(flow.protocol, remote, 0, egress, ident)
    verdict, back = receive(table, reply, 1001.0)
    assert verdict == Verdict.TRANSLATED
    assert_rewritten(back, inbound_packet(reply), dst=pod, dport=7)
    expect_state(table, flow, State.REPLIED, True, 1001.0 + t["icmp"])
    # An echo reply with another identifier is not ours.
    other = Reply(flow.protocol, remote, 0, egress, ident + 1)
    assert receive(table, other, 1002.0) == (Verdict.NOT_OURS, inbound_packet(other))


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", [TCP, UDP, "echo"])
def test_inbound_icmp_error_is_translated_without_touching_the_entry(family: int, protocol: Any) -> None:
    pod, remote, egress, router = (POD4, R4, E4, ROUTER4) if family == 4 else (POD6, R6, E6, ROUTER6)
    table = make_table([egress], port_range=(20000, 20099))
    flow = {
        TCP: tcp(pod, 1234, remote, 80, SYN),
        UDP: udp(pod, 1234, remote, 53),
        "echo": echo(pod, 99, remote),
    }[protocol]
    original = outbound_packet(flow)
    _, translated = send(table, flow, 1000.0, egress)
    before = public(lookup(table, flow))
    for length in (layout(original).l4 + 8, len(original)):
        error = icmp_error(router, egress, translated[:length])
        buffer = bytearray(error)
        assert table.translate_inbound(buffer, 1005.0) == Verdict.TRANSLATED
        assert_error_rewritten(buffer, icmp_error(router, pod, original[:length]), original[:length])
        assert public(lookup(table, flow)) == before  # no state change, no refresh
    # An error quoting a packet of no entry is not ours.
    stray = bytearray(rewritten(translated, sport=egress_side(translated)[1] + 1))
    error = icmp_error(router, egress, bytes(stray))
    assert receive_raw(table, error, 1006.0) == (Verdict.NOT_OURS, error)


def receive_raw(table: Any, packet: bytes, now: float) -> tuple[Any, bytes]:
    buffer = bytearray(packet)
    verdict = table.translate_inbound(buffer, now)
    return verdict, bytes(buffer)


def assert_error_rewritten(actual: bytes | bytearray, expected: bytes, quoted_original: bytes) -> None:
    """An ICMP error rewritten back to the pod: ``expected`` apart from checksums, which all verify."""
    assert masked(actual) == masked(expected), f"\n{bytes(actual).hex()}\n{expected.hex()}"
    assert_checksums_valid(actual)
    quote = layout(actual).l4 + 8
    inner = layout(actual, quote)
    if inner.version == 4:
        assert ones_sum(actual[quote : inner.l4]) == 0xFFFF, "quoted IPv4 header checksum"
    checksum = inner.l4 + l4_checksum_offset(inner.protocol)
    if checksum + 2 <= len(actual):
        got = struct.unpack_from("!H", actual, checksum)[0]
        want = struct.unpack_from("!H", quoted_original, checksum - quote)[0]
        assert same_checksum(got, want), f"quoted L4 checksum {got:#x}, expected {want:#x}"


# --- expiry and the clock ----------------------------------------------------------------


def test_an_entry_is_live_while_now_is_before_its_expiry() -> None:
    for at, expected in [
        (1029.999, Verdict.TRANSLATED),
        (1030.0, Verdict.NOT_OURS),
        (1100.0, Verdict.NOT_OURS),
    ]:
        table = make_table([E4])
        flow = udp()
        _, translated = send(table, flow, 1000.0)  # udp_unreplied: 30 s
        reply = reply_to(flow, translated)
        verdict, after = receive(table, reply, at)
        assert verdict == expected, at
        if verdict == Verdict.NOT_OURS:
            assert after == inbound_packet(reply)
            assert lookup(table, flow) is None
            assert table.lookup_inbound(*reply.key) is None
            assert list(table.entries(now=at)) == []


def test_an_expired_flow_opens_afresh() -> None:
    table = make_table([E4], reclaim_budget=0, port_range=(20000, 20099))
    flow = udp(POD4, 20005, R4, 53)
    send(table, flow, 1000.0)
    assert len(table) == 1
    verdict, translated = send(table, flow, 1031.0)
    assert verdict == Verdict.TRANSLATED
    assert egress_side(translated) == (E4, 20005)
    expect_state(table, flow, State.UNREPLIED, False, 1031.0 + 30)
    assert len(table) == 1  # the lookup freed the expired entry


def test_len_counts_stored_entries_and_expire_reclaims() -> None:
    table = make_table([E4], reclaim_budget=0, timeouts={"udp_unreplied": 10, "tcp_syn_sent": 20})
    for port in range(5):
        send(table, udp(POD4, 1000 + port), 1000.0)
    send(table, tcp(POD4, 2000), 1000.0)
    assert len(table) == 6 and table
    assert len(list(table.entries(now=1015.0))) == 1
    assert len(table) == 6  # expired but not reclaimed yet
    reclaimed = table.expire(1015.0, 2)  # a budget bounds the work: at most 2 reclaimed
    assert 0 <= reclaimed <= 2
    assert len(table) == 6 - reclaimed
    assert table.expire(1015.0) == 5 - reclaimed  # no budget: every expired entry
    assert len(table) == 1
    assert table.expire(1016.0) == 0
    assert table.expire(1020.0) == 1
    assert len(table) == 0 and not table


def test_every_packet_reclaims_a_bounded_number() -> None:
    table = make_table([E4], reclaim_budget=4)
    for port in range(10):
        send(table, udp(POD4, 1000 + port), 1000.0)
    assert len(table) == 10
    stray = Reply(UDP, R4B, 53, E4, 5)
    assert receive(table, stray, 2000.0)[0] == Verdict.NOT_OURS
    assert 6 <= len(table) < 10


def test_the_clock_never_runs_backwards() -> None:
    table = make_table([E4])
    flow = udp()
    _, translated = send(table, flow, 1000.0)
    assert table.clock == 1000.0
    send(table, flow, 900.0)  # taken as 1000
    assert table.clock == 1000.0
    expect_state(table, flow, State.UNREPLIED, False, 1030.0)
    send(table, udp(POD4B), 1020.0)
    assert receive(table, reply_to(flow, translated), 1010.0)[0] == Verdict.TRANSLATED  # now is 1020
    expect_state(table, flow, State.REPLIED, True, 1020.0 + 120)
    assert table.expire(500.0) == 0
    assert table.clock == 1020.0
    assert lookup(table, udp(POD4B)) is not None


# --- a full table ------------------------------------------------------------------------


def test_a_full_table_evicts_the_oldest_unreplied_entry() -> None:
    table = make_table([E4], max_entries=3)
    flows = [udp(POD4, 1000 + i) for i in range(4)]
    for i, flow in enumerate(flows[:3]):
        assert send(table, flow, 1000.0 + i)[0] == Verdict.TRANSLATED
    evicted_before = evicted_count(table)
    assert send(table, flows[3], 1003.0)[0] == Verdict.TRANSLATED
    assert len(table) == 3
    assert lookup(table, flows[0]) is None
    assert all(lookup(table, flow) is not None for flow in flows[1:])
    assert evicted_count(table) == evicted_before + 1


def test_the_oldest_unreplied_entry_goes_first_whatever_its_protocol() -> None:
    """docs/snat.md: the unreplied entry that would expire first goes, whatever its protocol.

    The SYN_SENT flow is the oldest but has 120 s to live; the UDP flow expires at 1031 and
    the ICMP one at 1032.
    """
    table = make_table([E4], max_entries=3)
    flows = [tcp(POD4, 1000, flags=SYN), udp(POD4, 1001), echo(POD4, 1002)]
    for i, flow in enumerate(flows):
        assert send(table, flow, 1000.0 + i)[0] == Verdict.TRANSLATED
    assert send(table, udp(POD4, 1003), 1003.0)[0] == Verdict.TRANSLATED
    assert [lookup(table, flow) is None for flow in flows] == [False, True, False]


def test_an_unreplied_flow_picked_up_mid_stream_can_be_evicted() -> None:
    """docs/snat.md: "Only when every entry has seen a reply is the new flow refused with DROP_TABLE_FULL"."""
    table = make_table([E4], max_entries=2)
    replied = udp(POD4, 1000)
    _, translated = send(table, replied, 1000.0)
    receive(table, reply_to(replied, translated), 1000.0)
    picked_up = tcp(POD4, 1001, flags=ACK)  # ESTABLISHED, never replied
    send(table, picked_up, 1001.0)
    assert send(table, udp(POD4, 1002), 1002.0)[0] == Verdict.TRANSLATED
    assert lookup(table, picked_up) is None
    assert evicted_count(table) == 1


@pytest.mark.parametrize("flags", [ACK, SYN, PSH | ACK])
def test_a_syn_sent_entry_that_saw_a_reply_is_not_evicted(flags: int) -> None:
    """An inbound segment that is not a SYN+ACK leaves the flow in SYN_SENT, but it has seen a reply."""
    table = make_table([E4], max_entries=2)
    flows = [tcp(POD4, 1000, flags=SYN), tcp(POD4, 1001, flags=SYN)]
    for flow in flows:
        _, translated = send(table, flow, 1000.0)
        assert receive(table, reply_to(flow, translated, flags), 1001.0)[0] == Verdict.TRANSLATED
        expect_state(table, flow, State.SYN_SENT, True, 1001.0 + DEFAULT_TIMEOUTS["tcp_syn_sent"])
    newcomer = udp(POD4, 1002)
    assert send(table, newcomer, 1002.0) == (Verdict.DROP_TABLE_FULL, outbound_packet(newcomer))
    assert all(lookup(table, flow) is not None for flow in flows)
    assert evicted_count(table) == 0


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_a_large_full_table_still_evicts_its_one_unreplied_entry(kind: str) -> None:
    """An unreplied ICMP flow heads its own expiry list, so the bounded search finds it."""
    table = make_table([E4], max_entries=200)
    for i in range(199):
        flow = tcp(POD4, 2000 + i, flags=SYN) if kind == "tcp" else udp(POD4, 2000 + i)
        _, translated = send(table, flow, 1000.0)
        assert receive(table, reply_to(flow, translated, SYN | ACK), 1000.0)[0] == Verdict.TRANSLATED
    lone = echo(POD4, 7)
    assert send(table, lone, 1001.0)[0] == Verdict.TRANSLATED
    assert send(table, udp(POD4B, 9), 1002.0)[0] == Verdict.TRANSLATED
    assert lookup(table, lone) is None
    assert evicted_count(table) == 1
    assert len(table) == 200


def test_entries_that_saw_a_reply_are_never_evicted() -> None:
    table = make_table([E4], max_entries=3)
    replied = [udp(POD4, 1000), tcp(POD4, 1001, flags=SYN)]
    for flow in replied:
        _, translated = send(table, flow, 1000.0)
        receive(table, reply_to(flow, translated, SYN | ACK), 1001.0)
    unreplied = tcp(POD4, 1002, flags=SYN)
    send(table, unreplied, 1002.0)
    newcomer = echo(POD4, 1003)
    assert send(table, newcomer, 1003.0)[0] == Verdict.TRANSLATED
    assert lookup(table, unreplied) is None
    assert all(lookup(table, flow) is not None for flow in [*replied, newcomer])


def test_a_table_full_of_replied_entries_refuses_new_flows() -> None:
    table = make_table([E4], max_entries=2)
    flows = [tcp(POD4, 1000, flags=SYN), udp(POD4, 1001)]
    replies = []
    for flow in flows:
        _, translated = send(table, flow, 1000.0)
        replies.append(reply_to(flow, translated, SYN | ACK))
        assert receive(table, replies[-1], 1001.0)[0] == Verdict.TRANSLATED
    for newcomer in (udp(POD4, 1002), tcp(POD4, 1003, flags=SYN), echo(POD4, 9)):
        original = outbound_packet(newcomer)
        assert send(table, newcomer, 1002.0) == (Verdict.DROP_TABLE_FULL, original)
        assert lookup(table, newcomer) is None
    assert evicted_count(table) == 0
    # The established flows keep working both ways.
    assert send(table, with_flags(flows[0], ACK), 1003.0)[0] == Verdict.TRANSLATED
    expect_state(table, flows[0], State.ESTABLISHED, True, 1003.0 + DEFAULT_TIMEOUTS["tcp_established"])
    for reply in replies:
        assert receive(table, reply, 1004.0)[0] == Verdict.TRANSLATED
    assert send(table, flows[1], 1005.0)[0] == Verdict.TRANSLATED
    assert len(table) == 2


def test_a_full_table_reclaims_expired_entries_before_evicting() -> None:
    table = make_table([E4], max_entries=2, reclaim_budget=0)
    send(table, udp(POD4, 1000), 1000.0)
    send(table, udp(POD4, 1001), 1000.0)
    send(table, udp(POD4, 1002), 1000.0)  # evicts one
    assert evicted_count(table) == 1
    assert send(table, udp(POD4, 1003), 1100.0)[0] == Verdict.TRANSLATED
    assert evicted_count(table) == 1  # the expired entries made room
    assert [e.pod_port for e in table.entries(now=1100.0)] == [1003]


# --- introspection ------------------------------------------------------------------------


def test_ports_in_use_and_counts_by_state() -> None:
    table = make_table([E4, E4B, E6], port_range=(20000, 20099))
    send(table, tcp(POD4, 20001, flags=SYN), 1000.0)
    send(table, tcp(POD4, 20002, flags=ACK), 1000.0)
    send(table, udp(POD4, 20003), 1000.0)
    _, translated = send(table, udp(POD4, 20004), 1000.0, E4B)
    receive(table, reply_to(udp(POD4, 20004), translated), 1001.0)
    send(table, echo(POD6, 20005, R6), 1000.0, E6)
    in_use = table.ports_in_use()
    assert {ip: in_use.get(ip, 0) for ip in (E4, E4B, E6)} == {E4: 3, E4B: 1, E6: 1}
    assert all(isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for ip in in_use)
    counts = {key: n for key, n in table.counts_by_state().items() if n}
    assert counts == {
        (TCP, State.SYN_SENT): 1,
        (TCP, State.ESTABLISHED): 1,
        (UDP, State.UNREPLIED): 1,
        (UDP, State.REPLIED): 1,
        (ICMPV6, State.UNREPLIED): 1,
    }
    assert all(isinstance(state, core().SnatState) for _, state in counts)


def evicted_count(table: Any) -> int:
    """``counters()["entries_evicted"]`` (docs/snat.md)."""
    counters = table.counters()
    return int(counters["entries_evicted"])


def test_counters_have_the_documented_names() -> None:
    """docs/snat.md names the eviction and skipped-record counters."""
    counters = make_table([E4]).counters()
    assert {"entries_evicted", "restore_skipped"} <= set(counters), sorted(counters)


def test_counters_count_up() -> None:
    table = make_table([E4], max_entries=1)
    first = table.counters()
    assert all(isinstance(value, int) and value >= 0 for value in first.values())
    send(table, udp(POD4, 1000), 1000.0)
    send(table, udp(POD4, 1001), 1000.0)  # evicts
    receive(table, Reply(UDP, R4, 53, E4, 9), 1000.0)  # not ours
    second = table.counters()
    assert set(second) == set(first)
    assert evicted_count(table) == 1
    assert all(second[key] >= first[key] for key in first)
    assert sum(second.values()) > sum(first.values()) + 1


# --- snapshots ----------------------------------------------------------------------------


def populated_table(**options: Any) -> tuple[Any, dict[str, tuple[Flow, bytes]]]:
    """A table with entries in assorted states at now=1000, and the flows with their translations."""
    table = make_table([E4, E4B, E6], port_range=(20000, 20099), **options)
    flows: dict[str, tuple[Flow, bytes]] = {}

    def go(name: str, flow: Flow, egress: Address, now: float) -> None:
        verdict, translated = send(table, flow, now, egress)
        assert verdict == Verdict.TRANSLATED
        flows[name] = (flow, translated)

    go("established", tcp(POD4, 1234, R4, 443, SYN), E4, 990.0)
    receive(table, reply_to(*flows["established"], SYN | ACK), 991.0)
    send(table, with_flags(flows["established"][0], ACK), 992.0, E4)
    go("fin_out", tcp(POD4B, 20010, R4, 80, ACK), E4, 993.0)
    send(table, with_flags(flows["fin_out"][0], FIN | ACK), 994.0, E4)
    go("fin_in", tcp(POD4B, 20011, R4, 80, ACK), E4B, 995.0)
    receive(table, reply_to(*flows["fin_in"], FIN | ACK), 996.0)
    go("udp", udp(POD4, 5353, R4B, 53), E4B, 997.0)
    go("udp6", udp(POD6, 5353, R6, 53), E6, 998.0)
    receive(table, reply_to(*flows["udp6"]), 999.0)
    go("echo6", echo(POD6B, 77, R6B), E6, 1000.0)
    return table, flows


def test_snapshot_format() -> None:
    table, _ = populated_table()
    data = table.snapshot(1000.0)
    assert isinstance(data, bytes)
    magic, version, record_size, count = SNAPSHOT_HEADER.unpack_from(data)
    assert (magic, version, record_size, count) == (b"EGSN", 1, 64, 6)
    assert len(data) == 16 + 64 * 6
    assert all(data[16 + 64 * i + 10 : 16 + 64 * i + 12] == b"\0\0" for i in range(count))
    expected = []
    for e in table.entries():
        fin_out = e.state == State.FIN_WAIT and e.pod_port == 20010
        fin_in = e.state == State.FIN_WAIT and e.pod_port == 20011
        flags = int(e.replied) | (2 if fin_out else 0) | (4 if fin_in else 0)
        expected.append(
            SnapshotRecord(
                e.pod_ip.version,
                e.protocol,
                int(e.state),
                flags,
                e.pod_port,
                e.remote_port,
                e.egress_port,
                round((e.expires - 1000.0) * 1000),
                e.pod_ip,
                e.remote_ip,
                e.egress_ip,
            )
        )
    assert Counter(decode_snapshot(data)) == Counter(expected)
    states = Counter((r.protocol, r.state) for r in decode_snapshot(data))
    assert states[(TCP, State.FIN_WAIT)] == 2 and states[(ICMPV6, State.UNREPLIED)] == 1


def test_snapshot_of_an_empty_table() -> None:
    data = make_table([E4]).snapshot(5.0)
    assert data == SNAPSHOT_HEADER.pack(b"EGSN", 1, 64, 0)
    fresh = make_table([E4])
    assert fresh.restore(data, 10.0) == 0
    assert len(fresh) == 0


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_snapshot_restore_round_trip(kind: str) -> None:
    table, flows = populated_table()
    data = table.snapshot(1000.0)
    before = [public(e) for e in table.entries(now=1000.0)]
    fresh = make_table([E4, E4B, E6], port_range=(20000, 20099))
    buffer: Any = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]
    assert fresh.restore(buffer, 50000.0) == len(before)
    assert len(fresh) == len(before)
    rebased = [(*e[:9], e[9] - 1000.0 + 50000.0) for e in before]
    assert_same_entries(fresh.entries(now=50000.0), sorted(rebased, key=sort_key))

    # Replies translate after the restore, and the flows keep their mappings and states.
    for flow, translated in flows.values():
        reply = reply_to(flow, translated, ACK)
        verdict, back = receive(fresh, reply, 50001.0)
        assert verdict == Verdict.TRANSLATED, flow
        assert_rewritten(back, inbound_packet(reply), dst=flow.pod_ip, dport=flow.pod_port)
        verdict, again = send(fresh, with_flags(flow, ACK), 50002.0, E4)
        if flow.pod_ip.version == 6:
            assert verdict == Verdict.DROP_WRONG_FAMILY
            verdict, again = send(fresh, with_flags(flow, ACK), 50002.0, E6)
        assert verdict == Verdict.TRANSLATED
        assert egress_side(again) == egress_side(translated)
    # fin_out (first FIN outbound): the inbound ACK made it CLOSE_WAIT; fin_in: the outbound ACK did.
    assert lookup(fresh, flows["fin_out"][0]).state == State.CLOSE_WAIT
    assert lookup(fresh, flows["fin_in"][0]).state == State.CLOSE_WAIT


def test_restore_skips_unconfigured_egress_ips_and_taken_tuples() -> None:
    table, _ = populated_table()
    data = table.snapshot(1000.0)
    fresh = make_table([E4, E6], port_range=(20000, 20099))
    skipped = fresh.counters()["restore_skipped"]
    assert fresh.restore(data, 1000.0) == 4  # the two entries on 192.0.2.11 are skipped
    assert fresh.counters()["restore_skipped"] == skipped + 2
    assert {e.egress_ip for e in fresh.entries()} == {E4, E6}
    assert fresh.restore(data, 1000.0) == 0  # everything is taken now
    assert fresh.counters()["restore_skipped"] == skipped + 2 + 6
    assert len(fresh) == 4


def test_restore_skips_a_record_whose_translated_tuple_is_taken() -> None:
    table = make_table([E4], port_range=(20000, 20099))
    send(table, udp(POD4, 20000, R4, 53), 1000.0)
    data = table.snapshot(1000.0)
    other = make_table([E4], port_range=(20000, 20099))
    send(other, udp(POD4B, 20000, R4, 53), 1000.0)  # another pod holds (E4, 20000) toward R4:53
    assert other.restore(data, 1000.0) == 0
    assert other.counters()["restore_skipped"] == 1
    assert [e.pod_ip for e in other.entries()] == [POD4B]


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def record_offset(index: int, field: int = 0) -> int:
    return SNAPSHOT_HEADER.size + index * SNAPSHOT_RECORD.size + field


def snapshot_of_three() -> bytes:
    table = make_table([E4], port_range=(20000, 20099))
    for port in (20001, 20002, 20003):
        send(table, udp(POD4, port), 1000.0)
    return table.snapshot(1000.0)


CORRUPTIONS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "bad magic": (lambda d: corrupt(d, 0, b"EGSX"), ("magic",)),
    "version 0": (lambda d: corrupt(d, 4, b"\0\0"), ("version",)),
    "version 2": (lambda d: corrupt(d, 4, b"\0\x02"), ("version",)),
    "record size 32": (lambda d: corrupt(d, 6, b"\0\x20"), ()),
    "header cut": (lambda d: d[:10], ()),
    "empty": (lambda d: b"", ()),
    "last record cut": (lambda d: d[:-1], ()),
    "a record missing": (lambda d: d[: -SNAPSHOT_RECORD.size], ()),
    "count too large": (lambda d: corrupt(d, 8, struct.pack(">Q", 2**40)), ()),
    "family 5": (lambda d: corrupt(d, record_offset(1, 0), b"\x05"), ("record", "family")),
    "family 0": (lambda d: corrupt(d, record_offset(1, 0), b"\x00"), ("record", "family")),
    "protocol 99": (lambda d: corrupt(d, record_offset(1, 1), b"\x63"), ("record", "protocol")),
    "protocol 0": (lambda d: corrupt(d, record_offset(1, 1), b"\x00"), ("record", "protocol")),
    "state 0": (lambda d: corrupt(d, record_offset(1, 2), b"\x00"), ("record", "state")),
    "state 11": (lambda d: corrupt(d, record_offset(1, 2), b"\x0b"), ("record", "state")),
    "state 200": (lambda d: corrupt(d, record_offset(1, 2), b"\xc8"), ("record", "state")),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_restore_refuses_a_corrupt_snapshot_and_adds_nothing(case: str) -> None:
    data = snapshot_of_three()
    assert len(decode_snapshot(data)) == 3
    damage, words = CORRUPTIONS[case]
    bad = damage(data)
    with pytest.raises(SnapshotError):  # the oracle agrees the bytes are bad
        decode_snapshot(bad)

    table = make_table([E4], port_range=(20000, 20099))
    send(table, udp(POD4B, 1234, R4B, 53), 1000.0)
    before = [public(e) for e in table.entries()]
    skipped = table.counters()["restore_skipped"]
    with pytest.raises(SnapshotError) as caught:
        table.restore(bad, 1000.0)
    assert [public(e) for e in table.entries()] == before
    assert len(table) == 1
    assert table.counters()["restore_skipped"] == skipped
    message = str(caught.value).lower()
    for word in words:
        assert word in message, f"{case}: {message!r} does not name the {word}"
    if "record" in words:  # the second record, numbered from 0 or from 1
        assert re.search(r"\b[12]\b", message), f"{case}: {message!r} does not name the record"


def test_restore_of_records_built_by_hand() -> None:
    records = [
        SnapshotRecord(4, TCP, State.ESTABLISHED, 1, 1234, 443, 20001, 60_000, POD4, R4, E4),
        SnapshotRecord(6, ICMPV6, State.REPLIED, 1, 9, 0, 20002, 1_500, POD6, R6, E6),
        SnapshotRecord(4, UDP, State.UNREPLIED, 0, 53, 53, 20003, 10_000, POD4B, R4B, E4B),
    ]
    table = make_table([E4, E6], port_range=(20000, 20099))
    assert table.restore(encode_snapshot(records), 100.0) == 2
    assert_same_entries(
        table.entries(),
        sorted(
            [
                (TCP, POD4, 1234, R4, 443, E4, 20001, State.ESTABLISHED, True, 160.0),
                (ICMPV6, POD6, 9, R6, 0, E6, 20002, State.REPLIED, True, 101.5),
            ],
            key=sort_key,
        ),
    )
    verdict, back = receive(table, Reply(ICMPV6, R6, 0, E6, 20002), 101.0)
    assert verdict == Verdict.TRANSLATED
    assert parse(back).dst == POD6 and parse(back).dport == 9
    assert receive(table, Reply(ICMPV6, R6, 0, E6, 20002), 103.0)[0] == Verdict.TRANSLATED  # refreshed


# --- batches ------------------------------------------------------------------------------


def batch(packets: list[bytes], offsets_kind: str = "array") -> tuple[bytearray, Any]:
    buffer = bytearray(b"".join(packets))
    bounds = [0]
    for packet in packets:
        bounds.append(bounds[-1] + len(packet))
    offsets: Any = array("I", bounds) if offsets_kind == "array" else np.array(bounds, dtype=np.uint32)
    return buffer, offsets


def split(buffer: bytes | bytearray, packets: list[bytes]) -> list[bytes]:
    out, start = [], 0
    for packet in packets:
        out.append(bytes(buffer[start : start + len(packet)]))
        start += len(packet)
    return out


@pytest.mark.parametrize("offsets_kind", ["array", "numpy"])
@pytest.mark.parametrize("verdicts_kind", [None, "numpy", "array"])
def test_batches_match_single_calls(offsets_kind: str, verdicts_kind: str | None) -> None:
    """Pod ports inside the range and distinct destinations: every port is determined, so two tables agree."""
    options: dict[str, Any] = {"port_range": (20000, 20099), "max_entries": 6}
    flows: list[Flow | None] = [
        tcp(POD4, 20001, R4, 80, SYN),
        udp(POD4, 20002, R4, 53),
        echo(POD4, 20003, R4),
        None,  # truncated
        tcp(POD6, 20004, R6, 80, SYN),  # wrong family for E4
        None,  # empty
        tcp(POD4, 20005, R4, 80, RST),  # invalid
        udp(POD4, 20006, R4B, 53),
        udp(POD4B, 20002, R4B, 54),
        udp(POD4, 20002, R4, 53),  # the same flow again
        udp(POD4B, 20009, R4, 53),
        udp(POD4B, 20010, R4, 53),  # the seventh entry: evicts
    ]
    fillers = iter([outbound_packet(udp())[:25], b""])
    packets = [next(fillers) if flow is None else outbound_packet(flow) for flow in flows]
    singles_table, batch_table = make_table([E4], **options), make_table([E4], **options)
    expected_verdicts, expected_bytes = [], []
    for packet in packets:
        buffer = bytearray(packet)
        expected_verdicts.append(int(singles_table.translate_outbound(buffer, E4, 1000.0)))
        expected_bytes.append(bytes(buffer))
    assert expected_verdicts[3:7] == [
        Verdict.DROP_TRUNCATED,
        Verdict.DROP_WRONG_FAMILY,
        Verdict.DROP_TRUNCATED,
        Verdict.DROP_INVALID,
    ]
    assert evicted_count(singles_table) == 1

    buffer, offsets = batch(packets, offsets_kind)
    verdicts: Any = None
    if verdicts_kind == "numpy":
        verdicts = np.full(len(packets), 99, dtype=np.uint8)
    elif verdicts_kind == "array":
        verdicts = array("B", [99] * len(packets))
    result = batch_table.translate_outbound_many(buffer, offsets, E4, 1000.0, verdicts=verdicts)
    if verdicts is None:
        assert len(result) == len(packets)
    else:
        assert result is verdicts
    assert [int(v) for v in result] == expected_verdicts
    assert split(buffer, packets) == expected_bytes
    assert_same_entries(batch_table.entries(), [public(e) for e in singles_table.entries()])

    # Inbound: replies to every translated packet, a stray one and a malformed one.
    replies = [
        inbound_packet(reply_to(flow, after, SYN | ACK))
        for flow, verdict, after in zip(flows, expected_verdicts, expected_bytes, strict=True)
        if flow is not None and verdict == Verdict.TRANSLATED
    ]
    replies += [inbound_packet(Reply(UDP, R4, 53, E4, 30000)), b"\x45\x00\x00"]
    expected_in = []
    for packet in replies:
        one = bytearray(packet)
        expected_in.append((int(singles_table.translate_inbound(one, 1001.0)), bytes(one)))
    assert Counter(v for v, _ in expected_in)[Verdict.NOT_OURS] >= 2  # the evicted flow and the stray
    buffer, offsets = batch(replies, offsets_kind)
    result = batch_table.translate_inbound_many(buffer, offsets, 1001.0)
    assert [int(v) for v in result] == [v for v, _ in expected_in]
    assert split(buffer, replies) == [b for _, b in expected_in]
    assert_same_entries(batch_table.entries(), [public(e) for e in singles_table.entries()])


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
@pytest.mark.parametrize(
    "bounds",
    [
        pytest.param(lambda n: [0, n + 1], id="past-the-end"),
        pytest.param(lambda n: [0, 30, 20, n], id="decreasing"),
        pytest.param(lambda n: [], id="empty"),
        pytest.param(lambda n: [5, 0], id="start-after-end"),
    ],
)
def test_batches_refuse_bad_offsets(direction: str, bounds: Any) -> None:
    table = make_table([E4])
    packet = outbound_packet(udp()) + outbound_packet(udp(POD4B))
    buffer = bytearray(packet)
    offsets = array("I", bounds(len(packet)))
    with pytest.raises(ValueError):
        if direction == "outbound":
            table.translate_outbound_many(buffer, offsets, E4, 1000.0)
        else:
            table.translate_inbound_many(buffer, offsets, 1000.0)


def test_batch_of_nothing() -> None:
    table = make_table([E4])
    assert len(table.translate_outbound_many(bytearray(), array("I", [0]), E4, 1.0)) == 0
    assert len(table.translate_inbound_many(bytearray(), array("I", [0]), 1.0)) == 0


# --- the state machine against the oracle -------------------------------------------------


def test_the_oracle_on_its_own() -> None:
    """The oracle's own choices follow docs/snat.md, and it refuses choices the document forbids."""
    oracle = ReferenceSnatTable([E4], port_range=(30000, 30001), max_entries=2)
    first = oracle.outbound(udp(POD4, 30001), E4, 1000.0)
    assert first.verdict == Verdict.TRANSLATED and first.entry is not None
    assert first.entry[6] == 30001 and first.entry[7:] == (State.UNREPLIED, False, 1030.0)
    assert oracle.inbound(Reply(UDP, R4, 53, E4, 30001), 1001.0).entry == (
        *first.entry[:7],
        State.REPLIED,
        True,
        1121.0,
    )
    with pytest.raises(OracleMismatch, match="pod port"):  # the pod port was free
        oracle.outbound(udp(POD4B, 30000, R4B), E4, 1002.0, verdict=Verdict.TRANSLATED, port=30001)
    with pytest.raises(OracleMismatch, match="taken"):
        oracle.outbound(udp(POD4B, 1), E4, 1002.0, verdict=Verdict.TRANSLATED, port=30001)
    with pytest.raises(OracleMismatch, match="outside"):
        oracle.outbound(udp(POD4B, 1), E4, 1002.0, verdict=Verdict.TRANSLATED, port=29999)
    # Port 1 folds onto 30001, free for TCP toward R4.
    second = oracle.outbound(tcp(POD4B, 1, flags=SYN), E4, 1002.0, verdict=Verdict.TRANSLATED, port=30001)
    assert second.entry is not None and second.entry[7] == State.SYN_SENT
    # Full: the replied UDP entry may not go, the SYN_SENT one may.
    third = udp(POD4B, 2, R4B)
    with pytest.raises(OracleMismatch, match="seen a reply"):
        oracle.outbound(third, E4, 1003.0, verdict=Verdict.TRANSLATED, port=30000, evicted=first.entry[:5])
    outcome = oracle.outbound(third, E4, 1003.0)
    assert outcome.verdict == Verdict.TRANSLATED and oracle.evicted == 1
    assert oracle.lookup_outbound(tcp(POD4B, 1).key) is None
    assert len(oracle.entries()) == 2
    # A full table of replied entries refuses; ports run out toward one destination.
    oracle.inbound(Reply(UDP, R4B, 53, E4, outcome.entry[6]), 1004.0)  # type: ignore[index]
    assert oracle.outbound(echo(POD4, 5), E4, 1005.0).verdict == Verdict.DROP_TABLE_FULL
    roomy = ReferenceSnatTable([E4], port_range=(30000, 30000))
    roomy.outbound(udp(POD4, 1), E4, 1000.0)
    assert roomy.outbound(udp(POD4, 2), E4, 1000.0).verdict == Verdict.DROP_PORT_EXHAUSTED
    assert roomy.port_exhaustion == {(E4, R4): 1}
    # Snapshots round-trip through the oracle's own encoder and decoder.
    data = oracle.snapshot(1010.0)
    again = ReferenceSnatTable([E4], port_range=(30000, 30001), max_entries=2)
    assert again.restore(data, 2010.0) == 2
    assert [e[:9] for e in again.entries()] == [e[:9] for e in oracle.entries()]


SHORT_TIMEOUTS = {
    "tcp_syn_sent": 6,
    "tcp_syn_recv": 4,
    "tcp_established": 30,
    "tcp_fin_wait": 5,
    "tcp_close_wait": 4,
    "tcp_last_ack": 3,
    "tcp_time_wait": 5,
    "tcp_close": 2,
    "udp_unreplied": 3,
    "udp_replied": 8,
    "icmp": 2.5,
}
TCP_FLAGS = [SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, FIN, RST, RST | ACK]
FAMILIES = {
    4: {"pods": [POD4, POD4B], "remotes": [R4, R4B], "egress": [E4, E4B], "router": ROUTER4},
    6: {"pods": [POD6, POD6B], "remotes": [R6, R6B], "egress": [E6, E6B], "router": ROUTER6},
}
EGRESS_ALL = [E4, E4B, E6, E6B]
REMOTE_PORTS = [53, 443]


@dataclass(frozen=True)
class Known:
    """A flow the compiled table translated once: enough to answer it or quote it later."""

    flow: Flow
    egress_ip: Address
    egress_port: int
    original: bytes
    translated: bytes

    @property
    def translated_key(self) -> tuple[int, Address, int, Address, int]:
        return (
            self.flow.protocol,
            self.flow.remote_ip,
            self.flow.remote_port,
            self.egress_ip,
            self.egress_port,
        )

    def reply(self, flags: int) -> Reply:
        f = self.flow
        return Reply(f.protocol, f.remote_ip, f.remote_port, self.egress_ip, self.egress_port, flags)


class SnatMachine(RuleBasedStateMachine):
    """The compiled table and the oracle, fed the same packets, with a tiny port range and table."""

    def __init__(self) -> None:
        super().__init__()
        self.table: Any = None
        self.oracle: ReferenceSnatTable = ReferenceSnatTable(EGRESS_ALL)
        self.now = 1000.0
        self.known: list[Known] = []
        self.pod_ports: list[int] = []
        self.options: dict[str, Any] = {}
        self.clock_synced = False

    @initialize(
        max_entries=st.integers(2, 8),
        probes=st.sampled_from([4, 5, 128]),
        short=st.booleans(),
        low=st.sampled_from([40000, 65532]),
        seed=st.integers(0, 2**32 - 1),
        spread=st.sampled_from([1, 1, 2]),
        families=st.sampled_from([[4, 6], [4], [6]]),
        kinds=st.sampled_from([["tcp", "tcp", "udp", "echo"], ["udp"], ["tcp"], ["echo"]]),
    )
    def setup(
        self,
        max_entries: int,
        probes: int,
        short: bool,
        low: int,
        seed: int,
        spread: int,
        families: list[int],
        kinds: list[str],
    ) -> None:
        """``spread`` 1: one remote, remote port and egress IP per family, so ports run out often;
        ``families`` and ``kinds`` narrow the flows the same way."""
        self.families, self.kinds = families, kinds
        self.options = {
            "port_range": (low, low + 3),
            "max_entries": max_entries,
            "timeouts": SHORT_TIMEOUTS if short else None,
            "max_port_probes": probes,
        }
        self.seed = seed
        self.table = core().SnatTable(EGRESS_ALL, seed=seed, **self.options)
        self.oracle = ReferenceSnatTable(EGRESS_ALL, **self.options)
        self.pod_ports = [low, low + 1, low + 3, low - 1, 1234]
        self.remotes = {family: names["remotes"][:spread] for family, names in FAMILIES.items()}
        self.egress = {family: names["egress"][:spread] for family, names in FAMILIES.items()}
        self.remote_ports = REMOTE_PORTS[:spread]

    # -- sending

    def remember(self, known: Known) -> None:
        self.known = [*[k for k in self.known if k.flow.key != known.flow.key][-23:], known]

    def send_outbound(self, flow: Flow, egress: Address, now: float) -> None:
        effective = max(self.oracle.clock, now)
        before = self.oracle.live_keys(effective)
        original = outbound_packet(flow)
        buffer = bytearray(original)
        verdict = self.table.translate_outbound(buffer, egress, now)
        assert type(verdict) is core().Verdict
        port = parse(buffer).sport if verdict == Verdict.TRANSLATED else None
        after = {original_key(e) for e in self.table.entries(now=effective)}
        gone = before - after
        assert len(gone) <= 1, f"{flow}: several entries disappeared: {gone}"
        opened = None
        if verdict == Verdict.TRANSLATED and flow.key not in before:
            entry = self.table.lookup_outbound(*flow.key)
            opened = None if entry is None else int(entry.state)
        outcome = self.oracle.outbound(
            flow,
            egress,
            now,
            verdict=int(verdict),
            port=port,
            evicted=next(iter(gone), None),
            opened_state=opened,
        )
        self.clock_synced = True
        if outcome.verdict != Verdict.TRANSLATED:
            assert bytes(buffer) == original, f"{flow}: {verdict!r} but the packet changed"
            return
        assert outcome.entry is not None
        egress_ip, egress_port = outcome.entry[5], outcome.entry[6]
        assert_rewritten(buffer, original, src=egress_ip, sport=egress_port)
        self.remember(Known(flow, egress_ip, egress_port, original, bytes(buffer)))

    def send_inbound(self, reply: Reply, now: float) -> None:
        original = inbound_packet(reply)
        buffer = bytearray(original)
        verdict = self.table.translate_inbound(buffer, now)
        outcome = self.oracle.inbound(reply, now)
        self.clock_synced = True
        assert verdict == outcome.verdict, f"{reply}: {verdict!r}, expected {outcome.verdict!r}"
        if outcome.verdict != Verdict.TRANSLATED:
            assert bytes(buffer) == original
            return
        assert outcome.entry is not None
        assert_rewritten(buffer, original, dst=outcome.entry[1], dport=outcome.entry[2])

    def new_flow(self, data: st.DataObject, family: int, kind: str, flags: int) -> Flow:
        names = FAMILIES[family]
        pod = data.draw(st.sampled_from(names["pods"]), label="pod")
        port = data.draw(st.sampled_from(self.pod_ports), label="pod port")
        remote = data.draw(st.sampled_from(self.remotes[family]), label="remote")
        if kind == "echo":
            return Flow(ICMP if family == 4 else ICMPV6, pod, port, remote, 0)
        remote_port = data.draw(st.sampled_from(self.remote_ports), label="remote port")
        return Flow(
            TCP if kind == "tcp" else UDP, pod, port, remote, remote_port, flags if kind == "tcp" else 0
        )

    # -- rules

    @rule(
        data=st.data(),
        flags=st.sampled_from(TCP_FLAGS),
        backwards=st.sampled_from([0.0, 0.0, 0.0, 0.0, 1.5]),
        wrong_family=st.sampled_from([False] * 9 + [True]),
    )
    def outbound(self, data: st.DataObject, flags: int, backwards: float, wrong_family: bool) -> None:
        family = data.draw(st.sampled_from(self.families), label="family")
        kind = data.draw(st.sampled_from(self.kinds), label="kind")
        flow = self.new_flow(data, family, kind, flags)
        egress_family = (10 - family) if wrong_family else family
        egress = data.draw(st.sampled_from(self.egress[egress_family]), label="egress")
        self.send_outbound(flow, egress, self.now - backwards)

    @rule(data=st.data(), count=st.integers(2, 6), flags=st.sampled_from([SYN, ACK]))
    def burst(self, data: st.DataObject, count: int, flags: int) -> None:
        """Several new flows from different pod sockets toward one destination: the ports run out."""
        family = data.draw(st.sampled_from(self.families), label="family")
        kind = data.draw(st.sampled_from(self.kinds), label="kind")
        first = self.new_flow(data, family, kind, flags)
        egress = data.draw(st.sampled_from(self.egress[family]), label="egress")
        sockets = [(pod, port) for pod in FAMILIES[family]["pods"] for port in self.pod_ports]
        chosen = data.draw(st.permutations(sockets), label="sockets")[:count]
        for pod, port in chosen:
            flow = Flow(first.protocol, pod, port, first.remote_ip, first.remote_port, first.tcp_flags)
            self.send_outbound(flow, egress, self.now)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), flags=st.sampled_from(TCP_FLAGS))
    def outbound_again(self, data: st.DataObject, flags: int) -> None:
        """Another packet of a flow seen before (live or not)."""
        known = data.draw(st.sampled_from(self.known), label="flow")
        flow = with_flags(known.flow, flags if known.flow.protocol == TCP else 0)
        self.send_outbound(flow, known.egress_ip, self.now)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), flags=st.sampled_from([*TCP_FLAGS, SYN | ACK, ACK]))
    def inbound_reply(self, data: st.DataObject, flags: int) -> None:
        known = data.draw(st.sampled_from(self.known), label="flow")
        self.send_inbound(known.reply(flags if known.flow.protocol == TCP else 0), self.now)

    @rule(
        data=st.data(),
        family=st.sampled_from([4, 6]),
        kind=st.sampled_from(["tcp", "udp", "echo"]),
        flags=st.sampled_from(TCP_FLAGS),
    )
    def inbound_any(self, data: st.DataObject, family: int, kind: str, flags: int) -> None:
        """An inbound packet to some egress address and port: ours only by coincidence."""
        names = FAMILIES[family]
        remote = data.draw(st.sampled_from(names["remotes"]), label="remote")
        egress = data.draw(st.sampled_from(names["egress"]), label="egress")
        low = self.options["port_range"][0]
        port = data.draw(st.integers(low - 1, min(low + 4, 65535)), label="egress port")
        if kind == "echo":
            reply = Reply(ICMP if family == 4 else ICMPV6, remote, 0, egress, port)
        else:
            remote_port = data.draw(st.sampled_from(REMOTE_PORTS), label="remote port")
            reply = Reply(TCP if kind == "tcp" else UDP, remote, remote_port, egress, port, flags)
        self.send_inbound(reply, self.now)

    @precondition(lambda self: self.known)
    @rule(data=st.data(), whole=st.booleans())
    def inbound_error(self, data: st.DataObject, whole: bool) -> None:
        """An ICMP error about a translated packet: translated while its entry lives, state untouched."""
        known = data.draw(st.sampled_from(self.known), label="flow")
        length = len(known.translated) if whole else layout(known.original).l4 + 8
        router = FAMILIES[known.flow.pod_ip.version]["router"]
        error = icmp_error(router, known.egress_ip, known.translated[:length])
        buffer = bytearray(error)
        verdict = self.table.translate_inbound(buffer, self.now)
        outcome = self.oracle.inbound_error(known.translated_key, self.now)
        self.clock_synced = True
        assert verdict == outcome.verdict, (
            f"error about {known.flow}: {verdict!r}, expected {outcome.verdict!r}"
        )
        if verdict == Verdict.TRANSLATED:
            assert outcome.entry is not None
            # The entry holding the quoted tuple now (not necessarily the flow that was quoted).
            pod_ip, pod_port = outcome.entry[1], outcome.entry[2]
            pod_side = with_checksums(rewritten(known.translated, src=pod_ip, sport=pod_port))[:length]
            expected = icmp_error(router, pod_ip, pod_side)
            assert_error_rewritten(buffer, expected, pod_side)
        else:
            assert bytes(buffer) == error

    @precondition(lambda self: any(k.flow.protocol == TCP for k in self.known))
    @rule(data=st.data(), direction=st.sampled_from([OUT, IN]), flags=st.sampled_from([FIN | ACK, ACK, RST]))
    def close(self, data: st.DataObject, direction: str, flags: int) -> None:
        known = data.draw(st.sampled_from([k for k in self.known if k.flow.protocol == TCP]), label="flow")
        if direction == OUT:
            self.send_outbound(with_flags(known.flow, flags), known.egress_ip, self.now)
        else:
            self.send_inbound(known.reply(flags), self.now)

    @precondition(lambda self: any(e[0] == TCP for e in self.oracle.entries()))
    @rule(data=st.data())
    def tcp_step(self, data: st.DataObject) -> None:
        """The segment that moves a live TCP flow on (handshake, close, reopen), so every state is reached."""
        entry = data.draw(st.sampled_from([e for e in self.oracle.entries() if e[0] == TCP]), label="entry")
        flow = Flow(TCP, entry[1], entry[2], entry[3], entry[4])
        fin = self.oracle.fin_direction(flow.key) or OUT
        other = IN if fin == OUT else OUT
        moves = {
            State.SYN_SENT: [(IN, SYN | ACK)],
            State.SYN_RECV: [(OUT, ACK)],
            State.ESTABLISHED: [(OUT, FIN | ACK), (IN, FIN | ACK)],
            State.FIN_WAIT: [(other, ACK), (other, FIN | ACK)],
            State.CLOSE_WAIT: [(other, FIN | ACK)],
            State.LAST_ACK: [(fin, ACK)],
            State.TIME_WAIT: [(OUT, SYN)],
            State.CLOSE: [(OUT, SYN)],
        }[State(entry[7])]
        direction, flags = data.draw(st.sampled_from(moves), label="move")
        if direction == OUT:
            self.send_outbound(with_flags(flow, flags), entry[5], self.now)
        else:
            self.send_inbound(Reply(TCP, entry[3], entry[4], entry[5], entry[6], flags), self.now)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.5, 7.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]))
    def clock_jumps_back(self, seconds: float) -> None:
        self.now -= seconds

    @rule(budget=st.sampled_from([None, 0, 1, 100]))
    def expire(self, budget: int | None) -> None:
        stored = len(self.table)
        reclaimed = self.table.expire(self.now, budget)
        self.oracle.expire(self.now)
        self.clock_synced = True
        assert isinstance(reclaimed, int) and 0 <= reclaimed <= stored
        if budget is not None:
            assert reclaimed <= budget
        assert len(self.table) == stored - reclaimed

    @precondition(lambda self: self.clock_synced)
    @rule()
    def snapshot_and_restore(self) -> None:
        """Swap in a fresh table restored from a snapshot taken now: nothing observable changes."""
        clock = self.oracle.clock
        data = self.table.snapshot(clock)
        records = decode_snapshot(data)
        assert Counter(records) == Counter(self.oracle.snapshot_records(clock))
        fresh = core().SnatTable(EGRESS_ALL, seed=self.seed + 1, **self.options)
        assert fresh.restore(data, clock) == len(records)
        oracle = ReferenceSnatTable(EGRESS_ALL, **self.options)
        assert oracle.restore(data, clock) == len(records)
        oracle.orders, oracle.openings = self.oracle.orders, self.oracle.openings
        self.table, self.oracle = fresh, oracle
        self.clock_synced = False

    # -- invariants

    @invariant()
    def same_live_entries(self) -> None:
        if self.table is None:
            return
        expected = self.oracle.entries()
        actual = list(self.table.entries(now=self.oracle.clock))
        assert_same_entries(actual, expected)
        assert len({translated_key(e) for e in actual}) == len(actual), "two entries share a translated tuple"
        assert len({original_key(e) for e in actual}) == len(actual), "two entries share an original tuple"
        low, high = self.options["port_range"]
        assert all(low <= e.egress_port <= high for e in actual)
        assert len(actual) <= len(self.table) <= self.options["max_entries"]
        if self.clock_synced:
            assert self.table.clock == self.oracle.clock

    @invariant()
    def lookups_agree(self) -> None:
        if self.table is None:
            return
        for e in self.oracle.entries():
            assert_entry(self.table.lookup_outbound(*e[:5]), e)
            assert_entry(self.table.lookup_inbound(e[0], e[3], e[4], e[5], e[6]), e)
        for known in self.known:
            assert_entry(
                self.table.lookup_outbound(*known.flow.key), self.oracle.lookup_outbound(known.flow.key)
            )
            assert_entry(
                self.table.lookup_inbound(*known.translated_key),
                self.oracle.lookup_inbound(known.translated_key),
            )

    @invariant()
    def counters_agree(self) -> None:
        if self.table is None:
            return
        assert evicted_count(self.table) == self.oracle.evicted
        assert self.table.port_exhaustion() == dict(self.oracle.port_exhaustion)


TestSnatTableAgainstReference = SnatMachine.TestCase
TestSnatTableAgainstReference.settings = settings(
    max_examples=250,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def test_hold_keeps_a_flow_established_and_release_frees_its_port() -> None:
    # The gateway hands a TCP flow to the kernel after its first packet: hold() keeps the
    # entry (and its egress port) as an established flow; release() frees it when the
    # kernel's connection ends.
    from egresscore.core.snat_table import SnatState, SnatTable, Verdict

    table = SnatTable(["192.0.2.10"], port_range=(20000, 20000))
    syn = bytearray(
        bytes(
            dpkt.ip.IP(
                src=bytes([198, 18, 1, 2]),
                dst=bytes([203, 0, 113, 10]),
                p=6,
                data=dpkt.tcp.TCP(sport=40000, dport=80, flags=dpkt.tcp.TH_SYN),
            )
        )
    )
    assert table.translate_outbound(syn, "192.0.2.10", 100.0) == Verdict.TRANSLATED
    assert table.hold(6, "198.18.1.2", 40000, "203.0.113.10", 80, 100.0)
    entry = table.lookup_outbound(6, "198.18.1.2", 40000, "203.0.113.10", 80)
    assert entry is not None and entry.state == SnatState.ESTABLISHED
    assert entry.expires == 100.0 + table.timeouts["tcp_established"]
    assert not table.hold(6, "198.18.1.2", 40001, "203.0.113.10", 80, 100.0)
    # The only port is taken until release.
    other = bytearray(syn)
    other[12:16] = bytes([198, 18, 1, 3])
    assert table.translate_outbound(other, "192.0.2.10", 101.0) == Verdict.DROP_PORT_EXHAUSTED
    assert table.release(6, "198.18.1.2", 40000, "203.0.113.10", 80)
    assert not table.release(6, "198.18.1.2", 40000, "203.0.113.10", 80)
    assert len(table) == 0
    other = bytearray(syn)
    other[12:16] = bytes([198, 18, 1, 3])
    assert table.translate_outbound(other, "192.0.2.10", 102.0) == Verdict.TRANSLATED
