"""Packet rewriting by egresscore.core.snat_table.SnatTable, checked against golden packets.

Every packet here is built with dpkt (IPv6 extension headers are spliced in by hand,
around an L4 segment whose checksum dpkt computed), and every rewritten packet is
checked three ways: byte for byte against the packet the same builder makes with the
translated addresses and ports (checksum fields compared up to the one's-complement
+0/-0 ambiguity, exactly for UDP), by this file's own one's-complement checksum code
(``ones_sum``, independent of the implementation and of dpkt), and, for plain packets,
against dpkt's own recomputation of every checksum.

The spec is docs/snat.md. Addresses come from the documentation ranges only (RFC 5737,
RFC 2544's 198.18.0.0/15, RFC 3849's 2001:db8::/32). Pods use a source port outside the
table's port range, so the translation always changes the port too.

The helpers at the top (parser, checksum report, packet builders) are shared with
tests/test_snat_fuzz.py.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dpkt
import numpy as np
import pytest

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60
EXTENSION_HEADERS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS})

ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMP6_ERRORS = frozenset({1, 2, 3, 4})
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
ICMP_PROTO = {4: IPPROTO_ICMP, 6: IPPROTO_ICMPV6}

# (family, protocol) -> (offset of the checksum in the L4 header, shortest L4 header)
L4_LAYOUT: dict[tuple[int, int], tuple[int, int]] = {
    (4, IPPROTO_TCP): (16, 20),
    (6, IPPROTO_TCP): (16, 20),
    (4, IPPROTO_UDP): (6, 8),
    (6, IPPROTO_UDP): (6, 8),
    (4, IPPROTO_ICMP): (2, 8),
    (6, IPPROTO_ICMPV6): (2, 8),
}

POD4, REMOTE4, EGRESS4, ROUTER4 = "198.18.0.5", "203.0.113.7", "192.0.2.10", "198.51.100.1"
POD6, REMOTE6, EGRESS6, ROUTER6 = "2001:db8:1::5", "2001:db8:2::7", "2001:db8::10", "2001:db8:3::1"
ADDRESSES = {4: (POD4, REMOTE4, EGRESS4, ROUTER4), 6: (POD6, REMOTE6, EGRESS6, ROUTER6)}
PORT_RANGE = (20000, 29999)
POD_PORT = 40000  # outside PORT_RANGE: always reallocated
KEPT_PORT = 25000  # inside PORT_RANGE: kept when free
NOW = 1000.0

A = ipaddress.ip_address


def load_snat() -> Any:
    """The compiled module. If the extension is not built this raises: a failure, never a skip."""
    from egresscore.core import snat_table

    return snat_table


def new_table(**kwargs: Any) -> Any:
    options: dict[str, Any] = {"port_range": PORT_RANGE, "seed": 1}
    options.update(kwargs)
    return load_snat().SnatTable([EGRESS4, EGRESS6], **options)


def verdicts() -> Any:
    return load_snat().Verdict


# --- one's-complement arithmetic (RFC 1071), independent of the implementation ---------------


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Folded one's-complement sum of big-endian 16-bit words; an odd last byte is padded with zero.

    2**16 is 1 modulo 0xFFFF, so the sum is the number the bytes spell modulo 0xFFFF, with
    a non-zero multiple of 0xFFFF folding to 0xFFFF (negative zero) and no data to 0.
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    number = int.from_bytes(raw, "big")
    if number == 0:
        return 0
    return number % 0xFFFF or 0xFFFF


def ones_sum_slow(data: bytes | bytearray | memoryview) -> int:
    """The same sum, word by word with end-around carry, as RFC 1071 writes it."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", raw):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    return ~ones_sum(data) & 0xFFFF


def pseudo_header(family: int, src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    if family == 4:
        return src + dst + struct.pack("!BBH", 0, protocol, length)
    return src + dst + struct.pack("!I3xB", length, protocol)


def u16(buf: bytes | bytearray | memoryview, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 2], "big")


def equivalent_checksums(got: int, want: int, *, udp: bool) -> bool:
    """One's complement has two zeros: a TCP/ICMP checksum of 0x0000 and 0xFFFF verify alike.

    A UDP checksum has no such freedom: 0 means "none" and a computed 0 is sent as 0xFFFF.
    """
    return got == want or (not udp and {got, want} == {0, 0xFFFF})


# --- an independent parser ------------------------------------------------------------------


@dataclass(frozen=True)
class IpView:
    family: int
    l4: int  # offset of the upper-layer header (after IPv4 options / IPv6 extension headers)
    end: int  # where the datagram ends as its header declares (a quote ends before that)
    protocol: int
    src: bytes
    dst: bytes
    frag_offset: int
    more_fragments: bool

    @property
    def whole(self) -> bool:
        return self.frag_offset == 0 and not self.more_fragments


def parse_ip(buf: bytes | bytearray | memoryview, base: int = 0) -> IpView | None:
    """The IP header at buf[base:]; None when it (with IPv6's extension chain) is incomplete or impossible.

    The declared end may lie beyond the buffer (a truncated packet or an ICMP quote).
    """
    size = len(buf)
    if size - base < 1:
        return None
    version = buf[base] >> 4
    if version == 4:
        if size - base < 20:
            return None
        header_len = (buf[base] & 15) * 4
        total = u16(buf, base + 2)
        if header_len < 20 or total < header_len or size - base < header_len:
            return None
        frag = u16(buf, base + 6)
        return IpView(
            4,
            base + header_len,
            base + total,
            buf[base + 9],
            bytes(buf[base + 12 : base + 16]),
            bytes(buf[base + 16 : base + 20]),
            (frag & 0x1FFF) * 8,
            bool(frag & 0x2000),
        )
    if version == 6:
        if size - base < 40:
            return None
        end = base + 40 + u16(buf, base + 4)
        limit = min(end, size)
        next_header = buf[base + 6]
        position = base + 40
        frag_offset, more = 0, False
        while next_header in EXTENSION_HEADERS:
            if position + 8 > limit:
                return None
            if next_header == IPPROTO_FRAGMENT:
                word = u16(buf, position + 2)
                frag_offset, more = word & 0xFFF8, bool(word & 1)
                length = 8
            else:
                length = (buf[position + 1] + 1) * 8
            next_header = buf[position]
            position += length
        if position > limit:
            return None
        return IpView(
            6,
            position,
            end,
            next_header,
            bytes(buf[base + 8 : base + 24]),
            bytes(buf[base + 24 : base + 40]),
            frag_offset,
            more,
        )
    return None


def is_icmp_error(ip: IpView, buf: bytes | bytearray | memoryview) -> bool:
    if ip.l4 >= len(buf):
        return False
    if ip.family == 4:
        return ip.protocol == IPPROTO_ICMP and buf[ip.l4] in ICMP4_ERRORS
    return ip.protocol == IPPROTO_ICMPV6 and buf[ip.l4] in ICMP6_ERRORS


def l4_valid(ip: IpView, segment: bytes) -> bool:
    if ip.protocol == IPPROTO_ICMP:
        return ones_sum(segment) == 0xFFFF
    return ones_sum(pseudo_header(ip.family, ip.src, ip.dst, ip.protocol, len(segment)) + segment) == 0xFFFF


def checksum_report(buf: bytes | bytearray | memoryview) -> dict[str, bool]:
    """Every checksum of the packet that can be verified, and whether it verifies.

    Keys: "ip" (IPv4 header), "l4" (TCP/UDP/ICMP/ICMPv6 of a whole datagram), "udp_zero"
    (an IPv4 UDP checksum of 0, "none"), and for ICMP errors "inner_ip" (the quoted IPv4
    header) and "inner_l4"/"inner_udp_zero" when the quote holds the whole quoted datagram.
    """
    raw = bytes(buf)
    report: dict[str, bool] = {}
    ip = parse_ip(raw)
    if ip is None or ip.end > len(raw):
        return report
    if ip.family == 4:
        report["ip"] = ones_sum(raw[: ip.l4]) == 0xFFFF
    if not ip.whole:
        return report
    layout = L4_LAYOUT.get((ip.family, ip.protocol))
    segment = raw[ip.l4 : ip.end]
    if layout is None or len(segment) < layout[1]:
        return report
    if ip.family == 4 and ip.protocol == IPPROTO_UDP and segment[6:8] == b"\0\0":
        report["udp_zero"] = True
    else:
        # An IPv6 UDP checksum field of 0 is invalid even when the sum works out (RFC 8200 8.1).
        zero6 = ip.family == 6 and ip.protocol == IPPROTO_UDP and segment[6:8] == b"\0\0"
        report["l4"] = l4_valid(ip, segment) and not zero6
    if is_icmp_error(ip, raw):
        quote = segment[8:]
        inner = parse_ip(quote)
        if inner is not None and inner.family == ip.family:
            if inner.family == 4:
                report["inner_ip"] = ones_sum(quote[: inner.l4]) == 0xFFFF
            inner_layout = L4_LAYOUT.get((inner.family, inner.protocol))
            if inner.end <= len(quote) and inner.whole and inner_layout is not None:
                inner_segment = quote[inner.l4 : inner.end]
                if len(inner_segment) >= inner_layout[1]:
                    if inner.family == 4 and inner.protocol == IPPROTO_UDP and inner_segment[6:8] == b"\0\0":
                        report["inner_udp_zero"] = True
                    else:
                        report["inner_l4"] = l4_valid(inner, inner_segment)
    return report


def checksum_fields(buf: bytes | bytearray | memoryview) -> dict[str, tuple[int, bool]]:
    """Where the packet's checksum fields are: name -> (offset, is a UDP checksum)."""
    raw = bytes(buf)
    fields: dict[str, tuple[int, bool]] = {}
    ip = parse_ip(raw)
    if ip is None:
        return fields
    if ip.family == 4:
        fields["ip"] = (10, False)
    if ip.frag_offset:
        return fields
    limit = min(ip.end, len(raw))
    layout = L4_LAYOUT.get((ip.family, ip.protocol))
    if layout is not None and ip.l4 + layout[0] + 2 <= limit:
        fields["l4"] = (ip.l4 + layout[0], ip.protocol == IPPROTO_UDP)
    if is_icmp_error(ip, raw) and ip.l4 + 8 <= limit:
        quote_start = ip.l4 + 8
        quote = raw[quote_start:limit]
        inner = parse_ip(quote)
        if inner is not None and inner.family == ip.family:
            if inner.family == 4:
                fields["inner_ip"] = (quote_start + 10, False)
            inner_layout = L4_LAYOUT.get((inner.family, inner.protocol))
            if not inner.frag_offset and inner_layout and inner.l4 + inner_layout[0] + 2 <= len(quote):
                fields["inner_l4"] = (quote_start + inner.l4 + inner_layout[0], inner.protocol == IPPROTO_UDP)
    return fields


def l4_ports(buf: bytes | bytearray | memoryview, base: int = 0) -> tuple[int, int]:
    """(source port, destination port); for ICMP echo the identifier on the side that owns it.

    An echo request's identifier belongs to its sender: (id, 0); a reply's to its
    receiver: (0, id). This is how the flows below name the echo identifier a "port".
    """
    ip = parse_ip(buf, base)
    assert ip is not None
    if ip.protocol in (IPPROTO_TCP, IPPROTO_UDP):
        return u16(buf, ip.l4), u16(buf, ip.l4 + 2)
    assert ip.protocol == ICMP_PROTO[ip.family]
    icmp_type, ident = buf[ip.l4], u16(buf, ip.l4 + 4)
    if icmp_type == ECHO_REQUEST[ip.family]:
        return ident, 0
    assert icmp_type == ECHO_REPLY[ip.family], f"ICMP type {icmp_type} is not an echo"
    return 0, ident


def hexdiff(got: bytes, want: bytes) -> str:
    return f"\n got  {got.hex()}\n want {want.hex()}"


def assert_same_packet(got: bytes, want: bytes) -> None:
    """``got`` is ``want`` but for checksum fields, and its checksums are ``want``'s (up to +0/-0)."""
    assert len(got) == len(want), f"length {len(got)} != {len(want)}" + hexdiff(got, want)
    fields = checksum_fields(want)
    skip = {offset + i for offset, _ in fields.values() for i in (0, 1)}
    differ = [i for i in range(len(got)) if i not in skip and got[i] != want[i]]
    assert not differ, f"bytes differ at offsets {differ[:20]}" + hexdiff(got, want)
    for name, (offset, udp) in fields.items():
        assert equivalent_checksums(u16(got, offset), u16(want, offset), udp=udp), (
            f"{name} checksum at offset {offset}: {u16(got, offset):#06x}, want {u16(want, offset):#06x}"
            + hexdiff(got, want)
        )
    report = checksum_report(got)
    assert report == checksum_report(want), f"checksums: {report}" + hexdiff(got, want)
    assert all(report.values()), f"checksums: {report}" + hexdiff(got, want)


def dpkt_recomputed(buf: bytes) -> bytes:
    """The packet after dpkt recomputes every checksum (plain packets: no IPv6 extension headers).

    A UDP checksum of 0 ("none") is not recomputed: dpkt would fill it in.
    """
    if buf[0] >> 4 == 4:
        packet4 = dpkt.ip.IP(buf)
        udp_zero = packet4.p == IPPROTO_UDP and packet4.data.sum == 0
        packet4.sum = 0
        packet4.data.sum = 0
        redone = bytes(packet4)
    else:
        packet6 = dpkt.ip6.IP6(buf)
        udp_zero = packet6.p == IPPROTO_UDP and packet6.data.sum == 0
        packet6.data.sum = 0
        redone = bytes(packet6)
    return set_l4_checksum(redone, 0) if udp_zero else redone


def assert_translated_to(got: bytes, want: bytes) -> None:
    """assert_same_packet, plus dpkt's recomputation of every checksum for plain packets."""
    assert_same_packet(got, want)
    ip = parse_ip(got)
    assert ip is not None
    plain = ip.whole and ip.l4 == (20 if ip.family == 4 else 40) and not is_icmp_error(ip, got)
    if plain:
        redone = dpkt_recomputed(got)
        assert len(redone) == len(got)
        fields = checksum_fields(got)
        for name, (offset, udp) in fields.items():
            # dpkt leaves an IPv6 UDP checksum that computes to 0 as 0x0000, not RFC 8200's
            # 0xFFFF; assert_same_packet above has already checked the exact value.
            udp_exact = udp and ip.family == 4
            assert equivalent_checksums(u16(got, offset), u16(redone, offset), udp=udp_exact), (
                f"dpkt recomputes the {name} checksum as {u16(redone, offset):#06x}" + hexdiff(got, redone)
            )
        skip = {offset + i for offset, _ in fields.values() for i in (0, 1)}
        assert all(got[i] == redone[i] for i in range(len(got)) if i not in skip), hexdiff(got, redone)


# --- packet builders (dpkt) -------------------------------------------------------------------


def ip4(
    src: str,
    dst: str,
    protocol: int,
    l4: dpkt.Packet | bytes,
    *,
    ttl: int = 64,
    options: bytes = b"",
    flags_offset: int = 0x4000,
    ident: int = 0x1C46,
) -> bytes:
    """An IPv4 packet; dpkt computes the header checksum and, for a whole TCP/UDP datagram, the L4 one."""
    assert len(options) % 4 == 0
    packet = dpkt.ip.IP(
        src=A(src).packed,
        dst=A(dst).packed,
        p=protocol,
        ttl=ttl,
        id=ident,
        hl=5 + len(options) // 4,
        opts=options,
        data=l4,
    )
    packet._flags_offset = flags_offset
    return bytes(packet)


def extension_header(kind: int, next_header: int, *, fragment: tuple[int, bool] = (0, False)) -> bytes:
    if kind in (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS):
        return bytes([next_header, 0]) + b"\x01\x04\0\0\0\0"  # one PadN option
    if kind == IPPROTO_ROUTING:
        # A segment routing header (type 4) with segments left 0: the destination is final.
        return bytes([next_header, 2, 4, 0, 0, 0, 0, 0]) + A("2001:db8:9::9").packed
    assert kind == IPPROTO_FRAGMENT
    offset, more = fragment
    assert offset % 8 == 0
    return struct.pack("!BBHI", next_header, 0, offset | int(more), 0x5EED)


def ip6(
    src: str,
    dst: str,
    protocol: int,
    l4: dpkt.Packet | bytes,
    *,
    hop_limit: int = 64,
    ext: Sequence[int] = (),
    fragment: tuple[int, bool] = (0, False),
) -> bytes:
    """An IPv6 packet; dpkt computes the L4 checksum, then extension headers are spliced in by hand.

    The checksum does not cover extension headers and the pseudo-header's upper-layer
    length excludes them, so it stays right.
    """
    length = len(bytes(l4))
    plain = bytes(
        dpkt.ip6.IP6(src=A(src).packed, dst=A(dst).packed, nxt=protocol, hlim=hop_limit, plen=length, data=l4)
    )
    if protocol == IPPROTO_UDP and len(plain) >= 48 and plain[46:48] == b"\0\0":
        # dpkt does not apply RFC 8200's rule: a UDP checksum computing to 0 is sent as 0xFFFF.
        plain = plain[:46] + b"\xff\xff" + plain[48:]
    if not ext:
        return plain
    chain = b""
    for index, kind in enumerate(ext):
        following = ext[index + 1] if index + 1 < len(ext) else protocol
        chain += extension_header(kind, following, fragment=fragment)
    return (
        plain[:4]
        + struct.pack("!HBB", length + len(chain), ext[0], hop_limit)
        + plain[8:40]
        + chain
        + plain[40:]
    )


def with_ttl(packet: bytes, ttl: int) -> bytes:
    """The packet as a router further on saw it: TTL / hop limit changed, IPv4 header checksum redone."""
    raw = bytearray(packet)
    if raw[0] >> 4 == 4:
        raw[8] = ttl
        header_len = (raw[0] & 15) * 4
        raw[10:12] = b"\0\0"
        raw[10:12] = internet_checksum(raw[:header_len]).to_bytes(2, "big")
    else:
        raw[7] = ttl
    return bytes(raw)


def set_l4_checksum(packet: bytes, value: int) -> bytes:
    ip = parse_ip(packet)
    assert ip is not None
    offset = ip.l4 + L4_LAYOUT[(ip.family, ip.protocol)][0]
    return packet[:offset] + value.to_bytes(2, "big") + packet[offset + 2 :]


TCP_OPTIONS = b"\x02\x04\x05\xb4\x01\x03\x03\x07"  # MSS 1460, NOP, window scale 7
IP_OPTIONS = b"\x94\x04\x00\x00\x01\x01\x01\x00"  # router alert, NOP NOP NOP, end of list


@dataclass(frozen=True)
class Kind:
    """A kind of flow packet; ``packet(src, dst, sport, dport)`` builds one with correct checksums."""

    name: str
    family: int
    proto: str  # "tcp", "udp" or "echo"
    ip_options: bytes = b""
    ext: tuple[int, ...] = ()
    udp_zero: bool = False  # the UDP checksum field is 0
    payload: bytes = field(default=b"hello, egress", repr=False)  # odd length on purpose

    @property
    def protocol(self) -> int:
        return {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "echo": ICMP_PROTO[self.family]}[self.proto]

    @property
    def remote_port(self) -> int:
        return {"tcp": 443, "udp": 53, "echo": 0}[self.proto]

    def l4(
        self, sport: int, dport: int, *, reply: bool, payload: bytes, tcp_flags: int | None
    ) -> dpkt.Packet:
        if self.proto == "tcp":
            flags = tcp_flags if tcp_flags is not None else (0x12 if reply else 0x02)
            seq, ack = (0x0A0B0C0D, 0x01020305) if reply else (0x01020304, 0)
            return dpkt.tcp.TCP(
                sport=sport,
                dport=dport,
                seq=seq,
                ack=ack,
                off=(20 + len(TCP_OPTIONS)) // 4,
                flags=flags,
                win=64240,
                opts=TCP_OPTIONS,
                data=payload,
            )
        if self.proto == "udp":
            return dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
        ident = dport if reply else sport
        if self.family == 4:
            icmp_type = ECHO_REPLY[4] if reply else ECHO_REQUEST[4]
            return dpkt.icmp.ICMP(type=icmp_type, data=dpkt.icmp.ICMP.Echo(id=ident, seq=7, data=payload))
        icmp_type = ECHO_REPLY[6] if reply else ECHO_REQUEST[6]
        return dpkt.icmp6.ICMP6(type=icmp_type, data=dpkt.icmp6.ICMP6.Echo(id=ident, seq=7, data=payload))

    def packet(
        self,
        src: str,
        dst: str,
        sport: int,
        dport: int,
        *,
        reply: bool = False,
        ttl: int = 64,
        payload: bytes | None = None,
        tcp_flags: int | None = None,
    ) -> bytes:
        body = self.l4(
            sport,
            dport,
            reply=reply,
            payload=self.payload if payload is None else payload,
            tcp_flags=tcp_flags,
        )
        if self.family == 4:
            raw = ip4(src, dst, self.protocol, body, ttl=ttl, options=self.ip_options)
        else:
            raw = ip6(src, dst, self.protocol, body, hop_limit=ttl, ext=self.ext)
        if self.udp_zero:
            raw = set_l4_checksum(raw, 0)
        return raw


KINDS = [
    Kind("tcp4", 4, "tcp"),
    Kind("tcp4-ip-options", 4, "tcp", ip_options=IP_OPTIONS),
    Kind("udp4", 4, "udp"),
    Kind("udp4-ip-options", 4, "udp", ip_options=IP_OPTIONS),
    Kind("udp4-no-checksum", 4, "udp", udp_zero=True),
    Kind("echo4", 4, "echo"),
    Kind("tcp6", 6, "tcp"),
    Kind("udp6", 6, "udp"),
    Kind("echo6", 6, "echo"),
    Kind("udp6-hop-by-hop", 6, "udp", ext=(IPPROTO_HOPOPTS,)),
    Kind("tcp6-destination-options", 6, "tcp", ext=(IPPROTO_DSTOPTS,)),
    Kind("udp6-routing", 6, "udp", ext=(IPPROTO_ROUTING,)),
    Kind("tcp6-atomic-fragment", 6, "tcp", ext=(IPPROTO_FRAGMENT,)),
    Kind("echo6-hop-by-hop", 6, "echo", ext=(IPPROTO_HOPOPTS,)),
    Kind(
        "udp6-every-extension",
        6,
        "udp",
        ext=(IPPROTO_HOPOPTS, IPPROTO_DSTOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS),
    ),
]
KIND = {kind.name: kind for kind in KINDS}


def icmp_error(
    family: int,
    src: str,
    dst: str,
    icmp_type: int,
    code: int,
    quote: bytes,
    *,
    mtu: int = 0,
    rest: int | None = None,
    ttl: int = 64,
) -> bytes:
    """An ICMP/ICMPv6 error quoting ``quote``; the 4 bytes after the checksum hold ``rest`` or the MTU."""
    word = struct.pack("!I", mtu if rest is None else rest)
    if family == 4:
        message = dpkt.icmp.ICMP(type=icmp_type, code=code, data=word + quote)
        return ip4(src, dst, IPPROTO_ICMP, message, ttl=ttl, flags_offset=0)
    message6 = dpkt.icmp6.ICMP6(type=icmp_type, code=code, data=word + quote)
    return ip6(src, dst, IPPROTO_ICMPV6, message6, hop_limit=ttl)


# --- calling the table ------------------------------------------------------------------------


def outbound(
    table: Any, packet: bytes, egress: str, *, now: float = NOW, partial: bool = False
) -> tuple[Any, bytes]:
    """(verdict, packet afterwards); checks that only TRANSLATED changes the packet."""
    Verdict = verdicts()
    buf = bytearray(packet)
    verdict = table.translate_outbound(buf, egress, now, checksum_partial=partial)
    assert isinstance(verdict, Verdict), f"translate_outbound returned {verdict!r}, not a Verdict"
    if verdict != Verdict.TRANSLATED:
        assert bytes(buf) == packet, f"{verdict.name} but the packet was written" + hexdiff(
            bytes(buf), packet
        )
    assert len(buf) == len(packet)
    return verdict, bytes(buf)


def inbound(table: Any, packet: bytes, *, now: float = NOW, partial: bool = False) -> tuple[Any, bytes]:
    Verdict = verdicts()
    buf = bytearray(packet)
    verdict = table.translate_inbound(buf, now, checksum_partial=partial)
    assert isinstance(verdict, Verdict), f"translate_inbound returned {verdict!r}, not a Verdict"
    if verdict != Verdict.TRANSLATED:
        assert bytes(buf) == packet, f"{verdict.name} but the packet was written" + hexdiff(
            bytes(buf), packet
        )
    assert len(buf) == len(packet)
    return verdict, bytes(buf)


def translated_out(table: Any, packet: bytes, egress: str, **kwargs: Any) -> bytes:
    verdict, out = outbound(table, packet, egress, **kwargs)
    assert verdict == verdicts().TRANSLATED, f"outbound verdict {verdict.name} for {packet.hex()}"
    return out


def translated_in(table: Any, packet: bytes, **kwargs: Any) -> bytes:
    verdict, out = inbound(table, packet, **kwargs)
    assert verdict == verdicts().TRANSLATED, f"inbound verdict {verdict.name} for {packet.hex()}"
    return out


@dataclass
class OpenFlow:
    """A flow opened through the table: what the pod sent, what left, and the egress port."""

    kind: Kind
    pod: str
    remote: str
    egress: str
    pod_port: int
    egress_port: int
    sent: bytes
    left: bytes

    def reply(self, **kwargs: Any) -> bytes:
        """The remote's reply as it arrives at the egress IP."""
        return self.kind.packet(
            self.remote, self.egress, self.kind.remote_port, self.egress_port, reply=True, **kwargs
        )

    def reply_delivered(self, **kwargs: Any) -> bytes:
        """The same reply as the pod must receive it."""
        return self.kind.packet(
            self.remote, self.pod, self.kind.remote_port, self.pod_port, reply=True, **kwargs
        )


def open_flow(table: Any, kind: Kind, *, pod_port: int = POD_PORT, **packet_args: Any) -> OpenFlow:
    pod, remote, egress, _ = ADDRESSES[kind.family]
    sent = kind.packet(pod, remote, pod_port, kind.remote_port, **packet_args)
    left = translated_out(table, sent, egress)
    egress_port = l4_ports(left)[0]
    return OpenFlow(kind, pod, remote, egress, pod_port, egress_port, sent, left)


# --- the independent checksum code itself -----------------------------------------------------


def test_ones_sum_matches_rfc1071_loop() -> None:
    rng = random.Random(1071)
    samples = [b"", b"\0", b"\xff", b"\xff\xff", b"\0" * 7, b"\xff" * 9, b"\x01\x00\xfe\xff"]
    samples += [rng.randbytes(rng.randrange(0, 90)) for _ in range(3000)]
    for data in samples:
        assert ones_sum(data) == ones_sum_slow(data), data.hex()


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2.
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_golden_packets_are_valid(kind: Kind) -> None:
    """The builders' packets verify under this file's checksum code (and dpkt agrees where it can)."""
    pod, remote, _, _ = ADDRESSES[kind.family]
    for packet in (
        kind.packet(pod, remote, POD_PORT, kind.remote_port),
        kind.packet(remote, pod, 53, 99, reply=True),
    ):
        report = checksum_report(packet)
        expected_keys = {"ip"} if kind.family == 4 else set()
        expected_keys.add("udp_zero" if kind.udp_zero else "l4")
        assert set(report) == expected_keys
        assert all(report.values()), report
        if not kind.ext:
            assert_translated_to(packet, packet)


# --- flows, both directions -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_outbound_and_reply(kind: Kind) -> None:
    table = new_table()
    flow = open_flow(table, kind)
    low, high = PORT_RANGE
    assert low <= flow.egress_port <= high, f"egress port {flow.egress_port} outside {PORT_RANGE}"
    entry = table.lookup_outbound(kind.protocol, flow.pod, POD_PORT, flow.remote, kind.remote_port)
    assert entry is not None
    assert entry.egress_ip == A(flow.egress) and entry.egress_port == flow.egress_port
    assert_translated_to(flow.left, kind.packet(flow.egress, flow.remote, flow.egress_port, kind.remote_port))
    if kind.udp_zero and kind.family == 4:
        assert flow.left[-len(kind.payload) - 2 : -len(kind.payload)] == b"\0\0", "UDP checksum 0 must stay 0"

    delivered = translated_in(table, flow.reply())
    assert_translated_to(delivered, flow.reply_delivered())

    # A second packet of the flow uses the same mapping.
    again = translated_out(
        table, kind.packet(flow.pod, flow.remote, POD_PORT, kind.remote_port, payload=b"x"), flow.egress
    )
    assert l4_ports(again)[0] == flow.egress_port


@pytest.mark.parametrize("name", ["tcp4", "udp4", "echo4", "tcp6", "udp6", "echo6"])
def test_pod_port_inside_range_is_kept(name: str) -> None:
    table = new_table()
    flow = open_flow(table, KIND[name], pod_port=KEPT_PORT)
    assert flow.egress_port == KEPT_PORT
    assert_translated_to(
        flow.left, flow.kind.packet(flow.egress, flow.remote, KEPT_PORT, flow.kind.remote_port)
    )


def test_ipv6_udp_checksum_zero_is_left_zero() -> None:
    """RFC 8200 forbids it, the spec says it is left as it is (the receiver drops it)."""
    kind = Kind("udp6-zero", 6, "udp", udp_zero=True)
    table = new_table()
    flow = open_flow(table, kind)
    ip = parse_ip(flow.left)
    assert ip is not None
    assert ip.src == A(EGRESS6).packed and u16(flow.left, ip.l4) == flow.egress_port
    assert u16(flow.left, ip.l4 + 6) == 0
    delivered = translated_in(table, flow.reply())
    assert delivered == flow.reply_delivered()


def payload_for_zero_checksum(
    family: int, src: str, dst: str, sport: int, dport: int, filler: bytes
) -> bytes:
    """A UDP payload (filler + 2 chosen bytes) whose checksum from src:sport to dst:dport computes to 0."""
    assert len(filler) % 2 == 0
    length = 8 + len(filler) + 2
    header = struct.pack("!HHHH", sport, dport, length, 0)
    partial = ones_sum(
        pseudo_header(family, A(src).packed, A(dst).packed, IPPROTO_UDP, length) + header + filler
    )
    word = ~partial & 0xFFFF  # partial + word == 0xFFFF: the sum is negative zero, the checksum 0
    payload = filler + word.to_bytes(2, "big")
    assert (
        internet_checksum(
            pseudo_header(family, A(src).packed, A(dst).packed, IPPROTO_UDP, length) + header + payload
        )
        == 0
    )
    return payload


@pytest.mark.parametrize("family", [4, 6])
def test_udp_checksum_computing_to_zero_is_sent_as_ffff(family: int) -> None:
    kind = KIND[f"udp{family}"]
    pod, remote, egress, _ = ADDRESSES[family]
    table = new_table()
    # The pod's port lies in the range and is kept, so the translated packet is known in advance.
    payload = payload_for_zero_checksum(family, egress, remote, KEPT_PORT, 53, b"dns?")
    sent = kind.packet(pod, remote, KEPT_PORT, 53, payload=payload)
    assert u16(sent, len(sent) - len(payload) - 2) not in (0, 0xFFFF)
    left = translated_out(table, sent, egress)
    assert l4_ports(left) == (KEPT_PORT, 53)
    assert u16(left, len(left) - len(payload) - 2) == 0xFFFF, (
        "a UDP checksum computing to 0 must be sent as 0xFFFF"
    )
    assert_translated_to(left, kind.packet(egress, remote, KEPT_PORT, 53, payload=payload))

    # And inbound: a reply whose checksum toward the pod computes to 0.
    payload = payload_for_zero_checksum(family, remote, pod, 53, KEPT_PORT, b"answer")
    reply = kind.packet(remote, egress, 53, KEPT_PORT, payload=payload)
    delivered = translated_in(table, reply)
    assert u16(delivered, len(delivered) - len(payload) - 2) == 0xFFFF
    assert_translated_to(delivered, kind.packet(remote, pod, 53, KEPT_PORT, payload=payload))


@pytest.mark.parametrize("family", [4, 6])
def test_quoted_udp_checksum_computing_to_zero_is_ffff(family: int) -> None:
    """The 0xFFFF rule holds for the UDP checksum inside an ICMP error quote too, both directions."""
    kind = KIND[f"udp{family}"]
    pod, remote, egress, router = ADDRESSES[family]
    table = new_table()
    # The pod's own packet has a checksum computing to 0, sent as 0xFFFF; the translated one does not.
    payload = payload_for_zero_checksum(family, pod, remote, KEPT_PORT, 53, b"dns?")
    sent = kind.packet(pod, remote, KEPT_PORT, 53, payload=payload)
    assert u16(sent, len(sent) - len(payload) - 2) == 0xFFFF
    left = translated_out(table, sent, egress)
    assert l4_ports(left)[0] == KEPT_PORT
    error_type, code = (3, 4) if family == 4 else (2, 0)
    message = icmp_error(family, router, egress, error_type, code, left, mtu=1280)
    delivered = translated_in(table, message)
    assert_same_packet(delivered, icmp_error(family, router, pod, error_type, code, sent, mtu=1280))

    # The remote's reply toward the egress side computes to 0; the pod reports an error about it.
    payload = payload_for_zero_checksum(family, remote, egress, 53, KEPT_PORT, b"answer")
    reply = kind.packet(remote, egress, 53, KEPT_PORT, payload=payload)
    assert u16(reply, len(reply) - len(payload) - 2) == 0xFFFF
    received = translated_in(table, reply)
    unreachable = (3, 3) if family == 4 else (1, 4)
    message = icmp_error(family, pod, remote, *unreachable, received[: quote_length(received, "8")])
    left = translated_out(table, message, egress)
    assert_same_packet(
        left, icmp_error(family, egress, remote, *unreachable, reply[: quote_length(reply, "8")])
    )


def test_tcp_exchange_with_payloads_of_every_parity() -> None:
    """Several segments of one flow, odd and even payload lengths, each direction."""
    for family in (4, 6):
        kind = KIND[f"tcp{family}"]
        table = new_table()
        flow = open_flow(table, kind)
        for size in range(0, 40):
            payload = bytes((size * 7 + i) & 0xFF for i in range(size))
            sent = kind.packet(flow.pod, flow.remote, POD_PORT, 443, payload=payload, tcp_flags=0x18)
            left = translated_out(table, sent, flow.egress)
            assert_same_packet(
                left,
                kind.packet(flow.egress, flow.remote, flow.egress_port, 443, payload=payload, tcp_flags=0x18),
            )
            reply = flow.reply(payload=payload, tcp_flags=0x18)
            assert_same_packet(
                translated_in(table, reply), flow.reply_delivered(payload=payload, tcp_flags=0x18)
            )


# --- buffers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["bytearray", "memoryview", "numpy", "slice"])
def test_buffer_kinds(wrap: str) -> None:
    kind = KIND["udp4"]
    table = new_table()
    sent = kind.packet(POD4, REMOTE4, KEPT_PORT, 53)
    guard = b"\xa5" * 13
    backing = bytearray(guard + sent + guard)
    buffer: Any
    if wrap == "bytearray":
        buffer = bytearray(sent)
    elif wrap == "memoryview":
        buffer = memoryview(bytearray(sent))
    elif wrap == "numpy":
        buffer = np.frombuffer(bytearray(sent), dtype=np.uint8)
    else:
        buffer = memoryview(backing)[len(guard) : len(guard) + len(sent)]
    assert table.translate_outbound(buffer, EGRESS4, NOW) == verdicts().TRANSLATED
    assert_translated_to(bytes(buffer), kind.packet(EGRESS4, REMOTE4, KEPT_PORT, 53))
    if wrap == "slice":
        assert backing[: len(guard)] == guard and backing[-len(guard) :] == guard


def test_read_only_buffer_is_refused() -> None:
    table = new_table()
    packet = KIND["udp4"].packet(POD4, REMOTE4, POD_PORT, 53)
    with pytest.raises((TypeError, BufferError, ValueError)):
        table.translate_outbound(packet, EGRESS4, NOW)
    with pytest.raises((TypeError, BufferError, ValueError)):
        table.translate_inbound(packet, NOW)


# --- partial checksums ------------------------------------------------------------------------


def pseudo_sum(family: int, src: str, dst: str, protocol: int, length: int) -> int:
    """What Linux leaves in the L4 checksum field under CHECKSUM_PARTIAL: the folded, uncomplemented
    pseudo-header sum (~csum_tcpudp_magic(saddr, daddr, len, proto, 0))."""
    return ones_sum(pseudo_header(family, A(src).packed, A(dst).packed, protocol, length))


@pytest.mark.parametrize("name", ["tcp4", "udp4", "tcp4-ip-options", "tcp6", "udp6", "udp6-every-extension"])
def test_partial_checksum(name: str) -> None:
    kind = KIND[name]
    pod, remote, egress, _ = ADDRESSES[kind.family]
    table = new_table()

    def partial(packet: bytes, src: str, dst: str) -> bytes:
        ip = parse_ip(packet)
        assert ip is not None
        return set_l4_checksum(packet, pseudo_sum(kind.family, src, dst, kind.protocol, ip.end - ip.l4))

    sent = partial(kind.packet(pod, remote, POD_PORT, kind.remote_port), pod, remote)
    left = translated_out(table, sent, egress, partial=True)
    egress_port = l4_ports(left)[0]
    assert egress_port != POD_PORT
    # Addresses folded in, ports left to the device: exactly the new pseudo-header sum.
    want = partial(kind.packet(egress, remote, egress_port, kind.remote_port), egress, remote)
    assert_partial_translated(left, want)

    reply = partial(kind.packet(remote, egress, kind.remote_port, egress_port, reply=True), remote, egress)
    delivered = translated_in(table, reply, partial=True)
    want = partial(kind.packet(remote, pod, kind.remote_port, POD_PORT, reply=True), remote, pod)
    assert_partial_translated(delivered, want)


def assert_partial_translated(got: bytes, want: bytes) -> None:
    """Equal to ``want``, the L4 checksum field exactly, the IPv4 header checksum up to +0/-0."""
    assert len(got) == len(want), hexdiff(got, want)
    fields = checksum_fields(want)
    l4_offset = fields["l4"][0]
    assert u16(got, l4_offset) == u16(want, l4_offset), (
        f"partial checksum field {u16(got, l4_offset):#06x}, want the new pseudo-header sum "
        f"{u16(want, l4_offset):#06x} (addresses only)" + hexdiff(got, want)
    )
    if "ip" in fields:
        assert checksum_report(got)["ip"], "IPv4 header checksum" + hexdiff(got, want)
        assert equivalent_checksums(u16(got, 10), u16(want, 10), udp=False)
    skip = {10, 11} if "ip" in fields else set()
    differ = [i for i in range(len(got)) if i not in skip and got[i] != want[i]]
    assert not differ, f"bytes differ at offsets {differ[:20]}" + hexdiff(got, want)


# --- fragments --------------------------------------------------------------------------------


def fragment4(src: str, dst: str, protocol: int, data: bytes, *, offset: int, more: bool) -> bytes:
    return ip4(src, dst, protocol, data, flags_offset=(0x2000 if more else 0) | offset // 8, ident=0xF00D)


def fragment6(src: str, dst: str, protocol: int, data: bytes, *, offset: int, more: bool) -> bytes:
    header = struct.pack("!IHBB", 0x60000000, 8 + len(data), IPPROTO_FRAGMENT, 64)
    return (
        header
        + A(src).packed
        + A(dst).packed
        + struct.pack("!BBHI", protocol, 0, offset | int(more), 0xF00D)
        + data
    )


FRAGMENT_PAYLOAD = bytes((i * 37 + 11) & 0xFF for i in range(301))
FIRST_FRAGMENT_DATA = 104  # bytes of the L4 datagram in the first fragment (a multiple of 8)


def segment_of(packet: bytes) -> bytes:
    ip = parse_ip(packet)
    assert ip is not None
    return packet[ip.l4 :]


@pytest.mark.parametrize("name", ["tcp4", "udp4", "echo4", "tcp6", "udp6", "echo6"])
def test_first_fragment_translated_with_checksum_over_whole_datagram(name: str) -> None:
    kind = KIND[name]
    pod, remote, egress, _ = ADDRESSES[kind.family]
    make = fragment4 if kind.family == 4 else fragment6
    table = new_table()

    whole = segment_of(kind.packet(pod, remote, POD_PORT, kind.remote_port, payload=FRAGMENT_PAYLOAD))
    first = make(pod, remote, kind.protocol, whole[:FIRST_FRAGMENT_DATA], offset=0, more=True)
    left = translated_out(table, first, egress)
    egress_port = l4_ports(left)[0]
    assert egress_port != POD_PORT
    expected_whole = segment_of(
        kind.packet(egress, remote, egress_port, kind.remote_port, payload=FRAGMENT_PAYLOAD)
    )
    assert_same_packet(
        left, make(egress, remote, kind.protocol, expected_whole[:FIRST_FRAGMENT_DATA], offset=0, more=True)
    )
    # Recompute by hand: the translated first fragment's L4 bytes plus the untouched rest.
    reassembled = segment_of(left) + whole[FIRST_FRAGMENT_DATA:]
    if kind.proto == "echo" and kind.family == 4:
        assert ones_sum(reassembled) == 0xFFFF
    else:
        pseudo = pseudo_header(
            kind.family, A(egress).packed, A(remote).packed, kind.protocol, len(reassembled)
        )
        assert ones_sum(pseudo + reassembled) == 0xFFFF, "the checksum must still cover the whole datagram"

    # The rest of the datagram cannot be matched.
    rest = make(
        pod, remote, kind.protocol, whole[FIRST_FRAGMENT_DATA:], offset=FIRST_FRAGMENT_DATA, more=False
    )
    assert outbound(table, rest, egress)[0] == verdicts().DROP_FRAGMENT

    # A fragmented reply: the first fragment is translated back, the others dropped.
    reply_whole = segment_of(
        kind.packet(remote, egress, kind.remote_port, egress_port, reply=True, payload=FRAGMENT_PAYLOAD)
    )
    reply_first = make(remote, egress, kind.protocol, reply_whole[:FIRST_FRAGMENT_DATA], offset=0, more=True)
    delivered = translated_in(table, reply_first)
    want_whole = segment_of(
        kind.packet(remote, pod, kind.remote_port, POD_PORT, reply=True, payload=FRAGMENT_PAYLOAD)
    )
    assert_same_packet(
        delivered, make(remote, pod, kind.protocol, want_whole[:FIRST_FRAGMENT_DATA], offset=0, more=True)
    )
    reply_rest = make(
        remote,
        egress,
        kind.protocol,
        reply_whole[FIRST_FRAGMENT_DATA:],
        offset=FIRST_FRAGMENT_DATA,
        more=False,
    )
    assert inbound(table, reply_rest)[0] == verdicts().DROP_FRAGMENT


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("offset", [8, 104, 1480, 65528])
@pytest.mark.parametrize("more", [True, False])
def test_non_first_fragments_are_dropped(family: int, offset: int, more: bool) -> None:
    pod, remote, egress, _ = ADDRESSES[family]
    make = fragment4 if family == 4 else fragment6
    Verdict = verdicts()
    table = new_table()
    flow = open_flow(table, KIND[f"udp{family}"])
    for protocol in (IPPROTO_TCP, IPPROTO_UDP, ICMP_PROTO[family]):
        # Data that looks like the flow's own ports, to tempt a matcher that ignores the offset.
        data = struct.pack("!HHHH", POD_PORT, 53, 16, 0) + b"fragment"
        assert outbound(table, make(pod, remote, protocol, data, offset=offset, more=more), egress)[0] == (
            Verdict.DROP_FRAGMENT
        )
        data = struct.pack("!HHHH", 53, flow.egress_port, 16, 0) + b"fragment"
        assert inbound(table, make(remote, egress, protocol, data, offset=offset, more=more))[0] == (
            Verdict.DROP_FRAGMENT
        )
    assert len(table) == 1


# --- ICMP errors ------------------------------------------------------------------------------

# (name, family, type, code, mtu, sent by the remote itself rather than a router, TTL of the quote)
INBOUND_ERRORS = [
    ("frag-needed", 4, 3, 4, 1400, False, 57),
    ("time-exceeded", 4, 11, 0, 0, False, 1),
    ("port-unreachable", 4, 3, 3, 0, True, 52),
    ("packet-too-big", 6, 2, 0, 1280, False, 57),
    ("hop-limit-exceeded", 6, 3, 0, 0, False, 1),
    ("port-unreachable6", 6, 1, 4, 0, True, 52),
]
INNER_KINDS = {
    4: ["tcp4", "tcp4-ip-options", "udp4", "udp4-no-checksum", "echo4"],
    6: ["tcp6", "udp6", "echo6", "udp6-hop-by-hop"],
}


def quote_length(packet: bytes, which: str) -> int:
    """'8': the IP header (with extension headers) and 8 bytes; 'l4': the whole L4 header; 'whole'."""
    ip = parse_ip(packet)
    assert ip is not None
    if which == "8":
        return ip.l4 + 8
    if which == "l4":
        return ip.l4 + (packet[ip.l4 + 12] >> 4) * 4 if ip.protocol == IPPROTO_TCP else ip.l4 + 8
    return len(packet)


INBOUND_ERROR_CASES = [
    pytest.param(error, inner, quote, id=f"{error[0]}-{inner}-quote-{quote}")
    for error in INBOUND_ERRORS
    for inner in INNER_KINDS[error[1]]
    for quote in (["8", "l4", "whole"] if inner.startswith("tcp") else ["8", "whole"])
]


@pytest.mark.parametrize(("error", "inner", "quote"), INBOUND_ERROR_CASES)
def test_inbound_icmp_error_quoting_a_translated_packet(
    error: tuple[str, int, int, int, int, bool, int], inner: str, quote: str
) -> None:
    _, family, icmp_type, code, mtu, from_remote, quoted_ttl = error
    kind = KIND[inner]
    pod, remote, egress, router = ADDRESSES[family]
    reporter = remote if from_remote else router
    table = new_table()
    flow = open_flow(table, kind)
    before = table.lookup_outbound(kind.protocol, pod, POD_PORT, remote, kind.remote_port)

    length = quote_length(flow.left, quote)
    on_the_wire = with_ttl(flow.left, quoted_ttl)[:length]
    message = icmp_error(family, reporter, egress, icmp_type, code, on_the_wire, mtu=mtu)
    delivered = translated_in(table, message, now=NOW + 5)

    # The pod gets the error as if its own packet had been quoted.
    want = icmp_error(
        family, reporter, pod, icmp_type, code, with_ttl(flow.sent, quoted_ttl)[:length], mtu=mtu
    )
    assert_same_packet(delivered, want)
    outer = parse_ip(delivered)
    assert outer is not None and outer.dst == A(pod).packed and outer.src == A(reporter).packed
    quoted = delivered[outer.l4 + 8 :]
    inner_ip = parse_ip(quoted)
    assert inner_ip is not None
    assert inner_ip.src == A(pod).packed and inner_ip.dst == A(remote).packed
    assert l4_ports(quoted)[0] == POD_PORT
    report = checksum_report(delivered)
    assert report["l4"], "the outer ICMP checksum"
    if family == 4:
        assert report["inner_ip"], "the quoted IPv4 header checksum"
    fields = checksum_fields(delivered)
    if kind.proto == "udp" or kind.proto == "echo" or quote != "8":
        assert "inner_l4" in fields  # the quote holds the L4 checksum: it was compared above
        if kind.udp_zero:
            assert u16(delivered, fields["inner_l4"][0]) == 0, "a quoted UDP checksum of 0 stays 0"
    if quote == "whole":
        assert report.get("inner_l4") or report.get("inner_udp_zero"), report

    # Errors neither change state nor refresh the timeout.
    after = table.lookup_outbound(kind.protocol, pod, POD_PORT, remote, kind.remote_port)
    assert after is not None and before is not None
    assert (after.state, after.replied, after.expires) == (before.state, before.replied, before.expires)


ERROR_TYPES = {
    4: [(3, 0), (3, 1), (3, 3), (3, 4), (3, 13), (4, 0), (5, 1), (11, 0), (11, 1), (12, 0), (12, 2)],
    6: [(1, 0), (1, 1), (1, 3), (1, 4), (1, 6), (2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2)],
}


@pytest.mark.parametrize(
    ("family", "icmp_type", "code"),
    [(family, icmp_type, code) for family, types in ERROR_TYPES.items() for icmp_type, code in types],
)
def test_every_icmp_error_type_is_translated(family: int, icmp_type: int, code: int) -> None:
    """ICMPv4 types 3, 4, 5, 11, 12 and ICMPv6 types 1 to 4, each direction; the 4 bytes after the
    checksum (MTU, pointer, redirect gateway) pass through untouched."""
    kind = KIND[f"udp{family}"]
    pod, remote, egress, router = ADDRESSES[family]
    table = new_table()
    flow = open_flow(table, kind)
    rest = 0x0A0B0C0D
    message = icmp_error(family, router, egress, icmp_type, code, flow.left, rest=rest)
    delivered = translated_in(table, message)
    assert_same_packet(delivered, icmp_error(family, router, pod, icmp_type, code, flow.sent, rest=rest))
    received = translated_in(table, flow.reply())
    message = icmp_error(family, pod, remote, icmp_type, code, received, rest=rest)
    left = translated_out(table, message, egress)
    assert_same_packet(left, icmp_error(family, egress, remote, icmp_type, code, flow.reply(), rest=rest))


OUTBOUND_ERRORS = [
    ("port-unreachable", 4, 3, 3),
    ("admin-prohibited", 4, 3, 13),
    ("port-unreachable6", 6, 1, 4),
]
OUTBOUND_ERROR_CASES = [
    pytest.param(error, inner, quote, id=f"{error[0]}-{inner}-quote-{quote}")
    for error in OUTBOUND_ERRORS
    for inner in INNER_KINDS[error[1]]
    for quote in ["8", "whole"]
]


@pytest.mark.parametrize(("error", "inner", "quote"), OUTBOUND_ERROR_CASES)
def test_outbound_icmp_error_about_a_translated_reply(
    error: tuple[str, int, int, int], inner: str, quote: str
) -> None:
    """The pod reports an error about a reply it received: the error must leave as the egress side."""
    _, family, icmp_type, code = error
    kind = KIND[inner]
    pod, remote, egress, _ = ADDRESSES[family]
    table = new_table()
    flow = open_flow(table, kind)
    reply = flow.reply()
    received = translated_in(table, reply)
    assert_same_packet(received, flow.reply_delivered())

    length = quote_length(received, quote)
    message = icmp_error(family, pod, remote, icmp_type, code, received[:length])
    left = translated_out(table, message, egress, now=NOW + 5)
    want = icmp_error(family, egress, remote, icmp_type, code, reply[:length])
    assert_same_packet(left, want)
    outer = parse_ip(left)
    assert outer is not None and outer.src == A(egress).packed and outer.dst == A(remote).packed
    quoted = left[outer.l4 + 8 :]
    inner_ip = parse_ip(quoted)
    assert inner_ip is not None and inner_ip.dst == A(egress).packed
    assert l4_ports(quoted)[1] == flow.egress_port


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_errors_about_unknown_flows(family: int) -> None:
    pod, remote, egress, router = ADDRESSES[family]
    Verdict = verdicts()
    table = new_table()
    flow = open_flow(table, KIND[f"udp{family}"])
    error_type, error_code = (3, 3) if family == 4 else (1, 4)
    # Inbound: a quote of a packet the table never sent (another port, another remote).
    for quoted in (
        KIND[f"udp{family}"].packet(egress, remote, flow.egress_port + 1, 53),
        KIND[f"udp{family}"].packet(egress, router, flow.egress_port, 53),
        KIND[f"tcp{family}"].packet(egress, remote, flow.egress_port, 53),
    ):
        message = icmp_error(
            family, router, egress, error_type, error_code, quoted[: 48 if family == 4 else 68]
        )
        assert inbound(table, message)[0] == Verdict.NOT_OURS
    # Outbound: the pod reports on a packet that matches no entry.
    quoted = KIND[f"udp{family}"].packet(remote, pod, 53, POD_PORT + 1, reply=True)
    message = icmp_error(family, pod, remote, error_type, error_code, quoted)
    assert outbound(table, message, egress)[0] == Verdict.DROP_INVALID
    assert len(table) == 1


# --- verdicts without translation -------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_unknown_protocols(family: int) -> None:
    pod, remote, egress, _ = ADDRESSES[family]
    Verdict = verdicts()
    table = new_table()
    open_flow(table, KIND[f"udp{family}"])
    data = struct.pack("!HHHH", POD_PORT, 53, 16, 0) + b"payload!"
    for protocol in (47, 50, 132, 255):  # GRE, ESP, SCTP, reserved
        build = ip4 if family == 4 else ip6
        assert outbound(table, build(pod, remote, protocol, data), egress)[0] == Verdict.DROP_UNSUPPORTED
        assert inbound(table, build(remote, egress, protocol, data))[0] == Verdict.NOT_OURS
    if family == 6:
        # No next header at all, and an unknown protocol behind an extension header.
        bare = ip6(pod, remote, 59, b"")
        assert outbound(table, bare, egress)[0] == Verdict.DROP_UNSUPPORTED
        behind = ip6(pod, remote, 132, data, ext=(IPPROTO_HOPOPTS,))
        assert outbound(table, behind, egress)[0] == Verdict.DROP_UNSUPPORTED
        assert inbound(table, ip6(remote, egress, 132, data, ext=(IPPROTO_HOPOPTS,)))[0] == Verdict.NOT_OURS
    assert len(table) == 1


UNSUPPORTED_ICMP = {4: [13, 14, 9, 10, 17, 42], 6: [130, 133, 134, 135, 136, 137, 143]}


@pytest.mark.parametrize("family", [4, 6])
def test_unsupported_icmp_types(family: int) -> None:
    pod, remote, egress, _ = ADDRESSES[family]
    Verdict = verdicts()
    table = new_table()
    for icmp_type in UNSUPPORTED_ICMP[family]:
        body = struct.pack("!HH", POD_PORT, 1) + bytes(12)
        if family == 4:
            out = ip4(pod, remote, IPPROTO_ICMP, dpkt.icmp.ICMP(type=icmp_type, data=body))
            back = ip4(remote, egress, IPPROTO_ICMP, dpkt.icmp.ICMP(type=icmp_type, data=body))
        else:
            out = ip6(pod, remote, IPPROTO_ICMPV6, dpkt.icmp6.ICMP6(type=icmp_type, data=body))
            back = ip6(remote, egress, IPPROTO_ICMPV6, dpkt.icmp6.ICMP6(type=icmp_type, data=body))
        assert outbound(table, out, egress)[0] == Verdict.DROP_UNSUPPORTED, icmp_type
        assert inbound(table, back)[0] == Verdict.NOT_OURS, icmp_type
    assert len(table) == 0


@pytest.mark.parametrize("family", [4, 6])
def test_packets_that_cannot_open_a_flow(family: int) -> None:
    pod, remote, egress, _ = ADDRESSES[family]
    Verdict = verdicts()
    table = new_table()
    rst = KIND[f"tcp{family}"].packet(pod, remote, POD_PORT, 443, tcp_flags=0x04)
    rst_ack = KIND[f"tcp{family}"].packet(pod, remote, POD_PORT, 443, tcp_flags=0x14)
    echo_reply = KIND[f"echo{family}"].packet(pod, remote, 0, 4242, reply=True)
    for packet in (rst, rst_ack, echo_reply):
        assert outbound(table, packet, egress)[0] == Verdict.DROP_INVALID
    assert len(table) == 0


def test_inbound_packets_for_no_entry() -> None:
    Verdict = verdicts()
    table = new_table()
    flows = {family: open_flow(table, KIND[f"udp{family}"]) for family in (4, 6)}
    for family, flow in flows.items():
        pod, remote, egress, router = ADDRESSES[family]
        kind = flow.kind
        candidates = [
            kind.packet(remote, egress, 53, flow.egress_port + 1, reply=True),  # another port
            kind.packet(router, egress, 53, flow.egress_port, reply=True),  # another remote
            kind.packet(remote, egress, 54, flow.egress_port, reply=True),  # another remote port
            kind.packet(remote, pod, 53, flow.egress_port, reply=True),  # not to the egress IP
            KIND[f"tcp{family}"].packet(remote, egress, 53, flow.egress_port, reply=True),  # another protocol
            KIND[f"echo{family}"].packet(remote, egress, 0, flow.egress_port, reply=True),
        ]
        for packet in candidates:
            assert inbound(table, packet)[0] == Verdict.NOT_OURS, packet.hex()
    assert len(table) == 2


@pytest.mark.parametrize("name", ["tcp4", "udp4", "echo4", "tcp6", "udp6", "echo6"])
def test_wrong_family_egress(name: str) -> None:
    kind = KIND[name]
    pod, remote, _, _ = ADDRESSES[kind.family]
    wrong = EGRESS6 if kind.family == 4 else EGRESS4
    table = new_table()
    packet = kind.packet(pod, remote, POD_PORT, kind.remote_port)
    assert outbound(table, packet, wrong)[0] == verdicts().DROP_WRONG_FAMILY
    assert len(table) == 0


# --- truncated and malformed ------------------------------------------------------------------


def truncation_corpus() -> list[tuple[str, str, bytes, Any]]:
    """(label, direction, packet, table) for packets that are translated whole."""
    cases: list[tuple[str, str, bytes, Any]] = []
    for kind in KINDS:
        table = new_table()
        pod, remote, egress, router = ADDRESSES[kind.family]
        flow = open_flow(table, kind)
        cases.append(
            (f"{kind.name}-out", "out", kind.packet(pod, remote, POD_PORT + 1, kind.remote_port), table)
        )
        cases.append((f"{kind.name}-reply", "in", flow.reply(), table))
        error_type = 3 if kind.family == 4 else 1
        message = icmp_error(
            kind.family, router, egress, error_type, 1, flow.left[: quote_length(flow.left, "8")]
        )
        cases.append((f"{kind.name}-error", "in", message, table))
        received = translated_in(table, flow.reply())
        message = icmp_error(kind.family, pod, remote, error_type, 3 if kind.family == 4 else 4, received)
        cases.append((f"{kind.name}-pod-error", "out", message, table))
    return cases


def call(direction: str, table: Any, packet: bytes) -> Any:
    family = packet[0] >> 4 if packet else 4
    egress = EGRESS6 if family == 6 else EGRESS4
    return outbound(table, packet, egress)[0] if direction == "out" else inbound(table, packet)[0]


def test_truncated_at_every_length() -> None:
    """Every prefix of a packet that would be translated: dropped as truncated (or malformed), untouched."""
    Verdict = verdicts()
    allowed = {Verdict.DROP_TRUNCATED, Verdict.DROP_MALFORMED}
    for label, direction, packet, table in truncation_corpus():
        assert call(direction, table, packet) == Verdict.TRANSLATED, label
        entries = len(table)
        for length in range(len(packet)):
            verdict = call(direction, table, packet[:length])
            assert verdict in allowed, (
                f"{label} cut to {length} bytes: {verdict.name}: {packet[:length].hex()}"
            )
        assert len(table) == entries, f"{label}: a truncated packet opened a flow"


def shortened(packet: bytes, length: int) -> bytes:
    """The packet cut to ``length`` bytes with its length field saying so (IPv4 checksum redone)."""
    raw = bytearray(packet[:length])
    if raw[0] >> 4 == 4:
        raw[2:4] = length.to_bytes(2, "big")
        header_len = (raw[0] & 15) * 4
        raw[10:12] = b"\0\0"
        raw[10:12] = internet_checksum(raw[:header_len]).to_bytes(2, "big")
    else:
        raw[4:6] = (length - 40).to_bytes(2, "big")
    return bytes(raw)


def test_self_consistent_packets_too_short_for_their_headers() -> None:
    """The IP length field says the packet ends inside its extension headers or L4 header."""
    Verdict = verdicts()
    allowed = {Verdict.DROP_TRUNCATED, Verdict.DROP_MALFORMED}
    for label, direction, packet, table in truncation_corpus():
        if "error" in label:
            continue
        ip = parse_ip(packet)
        assert ip is not None
        header_end = quote_length(packet, "l4")
        start = 20 if ip.family == 4 else 40
        for length in range(start, header_end):
            cut = shortened(packet, length)
            verdict = call(direction, table, cut)
            assert verdict in allowed, f"{label} declaring {length} bytes: {verdict.name}: {cut.hex()}"


def restamp4(raw: bytearray) -> bytes:
    """Redo the IPv4 header checksum over the header length the packet claims (at least 20 bytes)."""
    header_len = max(20, min((raw[0] & 15) * 4, len(raw)))
    raw[10:12] = b"\0\0"
    raw[10:12] = internet_checksum(raw[:header_len]).to_bytes(2, "big")
    return bytes(raw)


def malformed_cases() -> list[tuple[str, str, bytes, Any]]:
    cases: list[tuple[str, str, bytes, Any]] = []
    for label, direction, packet, table in truncation_corpus():
        if not label.startswith(
            ("tcp4-out", "udp4-reply", "tcp6-out", "udp6-reply", "echo4-error", "udp6-error")
        ):
            continue
        for version in (0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15):
            raw = bytearray(packet)
            raw[0] = (version << 4) | (raw[0] & 15)
            cases.append((f"{label} version {version}", direction, bytes(raw), table))
        if packet[0] >> 4 != 4:
            continue
        for ihl in (0, 1, 2, 3, 4):
            raw = bytearray(packet)
            raw[0] = 0x40 | ihl
            cases.append((f"{label} IHL {ihl}", direction, restamp4(raw), table))
        for ihl in range(6, 16):
            # The header would be longer than the packet's total length.
            raw = bytearray(packet[: ihl * 4 - 4] if len(packet) >= ihl * 4 - 4 else packet)
            raw[0] = 0x40 | ihl
            raw[2:4] = len(raw).to_bytes(2, "big")
            if len(raw) < ihl * 4:
                cases.append(
                    (f"{label} IHL {ihl} over total length {len(raw)}", direction, restamp4(raw), table)
                )
        for ihl in range(6, 16):
            # The whole header is in the buffer, the total length field says less.
            raw = bytearray(packet + bytes(max(0, ihl * 4 - len(packet))))
            raw[0] = 0x40 | ihl
            raw[2:4] = (ihl * 4 - 4).to_bytes(2, "big")
            cases.append((f"{label} IHL {ihl}, total length {ihl * 4 - 4}", direction, restamp4(raw), table))
        for total in (0, 1, 19):
            raw = bytearray(packet)
            raw[2:4] = total.to_bytes(2, "big")
            cases.append((f"{label} total length {total}", direction, restamp4(raw), table))
    return cases


def test_malformed_headers() -> None:
    Verdict = verdicts()
    wrong = []
    for label, direction, packet, table in malformed_cases():
        verdict = call(direction, table, packet)
        if verdict != Verdict.DROP_MALFORMED:
            wrong.append(f"{label}: {verdict.name}: {packet.hex()}")
    assert not wrong, "not DROP_MALFORMED:\n" + "\n".join(wrong)


@pytest.mark.parametrize("direction", ["out", "in"])
def test_ipv6_extension_chain_over_the_packet(direction: str) -> None:
    Verdict = verdicts()
    table = new_table()
    kind = KIND["udp6-hop-by-hop"]
    flow = open_flow(table, kind)
    packet = kind.packet(POD6, REMOTE6, POD_PORT, 53) if direction == "out" else flow.reply()
    for ext_length in (3, 4, 10, 255):  # the hop-by-hop header claims (n + 1) * 8 bytes
        raw = bytearray(packet)
        raw[41] = ext_length
        assert (ext_length + 1) * 8 > len(raw) - 40
        verdict = call(direction, table, bytes(raw))
        assert verdict == Verdict.DROP_MALFORMED, (
            f"hop-by-hop length {ext_length}: {verdict.name}: {raw.hex()}"
        )
    # A chain of headers that runs past the payload length while the buffer is longer.
    raw = bytearray(packet)
    raw[4:6] = (8).to_bytes(2, "big")  # only the hop-by-hop header is in the payload
    verdict = call(direction, table, bytes(raw[:48]))
    assert verdict in (Verdict.DROP_MALFORMED, Verdict.DROP_TRUNCATED), verdict.name


@pytest.mark.parametrize("direction", ["out", "in"])
def test_impossible_l4_header_lengths(direction: str) -> None:
    """A TCP data offset under 5 words is impossible; one past the segment is truncated."""
    Verdict = verdicts()
    table = new_table()
    for family in (4, 6):
        flow = open_flow(table, KIND[f"tcp{family}"])
        packet = (
            flow.kind.packet(flow.pod, flow.remote, POD_PORT, 443) if direction == "out" else flow.reply()
        )
        ip = parse_ip(packet)
        assert ip is not None
        for offset_words in range(16):
            raw = bytearray(packet)
            raw[ip.l4 + 12] = (offset_words << 4) | (raw[ip.l4 + 12] & 15)
            verdict = call(direction, table, bytes(raw))
            segment = len(raw) - ip.l4
            if offset_words < 5:
                assert verdict == Verdict.DROP_MALFORMED, (
                    f"data offset {offset_words}: {verdict.name}: {raw.hex()}"
                )
            elif offset_words * 4 > segment:
                assert verdict in (Verdict.DROP_MALFORMED, Verdict.DROP_TRUNCATED), (
                    f"data offset {offset_words}: {verdict.name}: {raw.hex()}"
                )


def test_no_verdict_but_translated_writes_to_the_packet() -> None:
    """outbound()/inbound() check this on every call above; here over one mixed corpus, all verdicts."""
    Verdict = verdicts()
    seen: set[Any] = set()
    table = new_table(port_range=(20000, 20001))
    cases: list[tuple[str, bytes, str | None]] = []
    for _label, direction, packet, _ in truncation_corpus():
        cases.append((direction, packet, None))
        cases.append((direction, packet[: len(packet) // 2], None))
    for _label, direction, packet, _ in malformed_cases()[:40]:
        cases.append((direction, packet, None))
    for family in (4, 6):
        pod, remote, egress, _ = ADDRESSES[family]
        wrong = EGRESS6 if family == 4 else EGRESS4
        cases.append(("out", KIND[f"udp{family}"].packet(pod, remote, POD_PORT, 53), wrong))
        cases.append(("out", KIND[f"tcp{family}"].packet(pod, remote, POD_PORT, 443, tcp_flags=0x04), None))
        # More flows toward one remote port than the two-port range holds.
        for port in range(30000, 30004):
            cases.append(("out", KIND[f"udp{family}"].packet(pod, remote, port, 53), None))
    for direction, packet, egress in cases:
        if direction == "out":
            chosen = egress or (EGRESS6 if packet and packet[0] >> 4 == 6 else EGRESS4)
            verdict, _ = outbound(table, packet, chosen)
        else:
            verdict, _ = inbound(table, packet)
        seen.add(verdict)
    expected = {
        Verdict.TRANSLATED,
        Verdict.NOT_OURS,
        Verdict.DROP_TRUNCATED,
        Verdict.DROP_MALFORMED,
        Verdict.DROP_INVALID,
        Verdict.DROP_PORT_EXHAUSTED,
        Verdict.DROP_WRONG_FAMILY,
    }
    assert expected <= seen, f"verdicts never seen: {sorted(v.name for v in expected - seen)}"


# --- shared with the fuzz tests ---------------------------------------------------------------


def flow_corpus(table: Any, rng: random.Random, flows: int) -> tuple[list[bytes], list[bytes]]:
    """Valid packets of every kind above for ``flows`` random flows: (outbound packets, inbound packets).

    Outbound: what pods send (new flows, second packets of open flows, errors about received
    replies, first and later fragments, unknown protocols, RSTs). Inbound: replies to the
    egress side, ICMP errors quoting translated packets with quotes of several lengths,
    fragments, strays. Each flow is opened through ``table`` so its inbound packets match.
    """
    out: list[bytes] = []
    back: list[bytes] = []
    pods = {
        4: [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(500)],
        6: [f"2001:db8:1::{i:x}" for i in range(1, 500)],
    }
    remotes = {4: ["203.0.113.7", "203.0.113.8", "198.51.100.9"], 6: ["2001:db8:2::7", "2001:db8:2::8"]}
    for _ in range(flows):
        kind = rng.choice(KINDS)
        family = kind.family
        pod = rng.choice(pods[family])
        remote = rng.choice(remotes[family])
        egress = EGRESS4 if family == 4 else EGRESS6
        router = ADDRESSES[family][3]
        pod_port = rng.choice([rng.randrange(1, 65536), rng.randrange(PORT_RANGE[0], PORT_RANGE[1] + 1)])
        payload = rng.randbytes(rng.randrange(0, 48))
        sent = kind.packet(pod, remote, pod_port, kind.remote_port, payload=payload)
        buf = bytearray(sent)
        if table.translate_outbound(buf, egress, NOW) != 0:
            continue
        left = bytes(buf)
        egress_port = l4_ports(left)[0]
        out.append(sent)
        out.append(kind.packet(pod, remote, pod_port, kind.remote_port, payload=payload[::-1]))
        reply = kind.packet(remote, egress, kind.remote_port, egress_port, reply=True, payload=payload[:9])
        back.append(reply)
        received = bytearray(reply)
        table.translate_inbound(received, NOW)
        error_type = 3 if family == 4 else 1
        for which in ("8", "l4", "whole"):
            back.append(
                icmp_error(
                    family,
                    router,
                    egress,
                    error_type,
                    4 if family == 4 else 0,
                    left[: quote_length(left, which)],
                    mtu=1400,
                )
            )
        back.append(
            icmp_error(
                family,
                router,
                egress,
                11 if family == 4 else 3,
                0,
                with_ttl(left, 1)[: quote_length(left, "8")],
            )
        )
        out.append(
            icmp_error(
                family,
                pod,
                remote,
                error_type,
                3 if family == 4 else 4,
                bytes(received)[: quote_length(bytes(received), rng.choice(["8", "whole"]))],
            )
        )
        if kind.proto == "tcp":
            out.append(kind.packet(pod, remote, pod_port, 443, tcp_flags=0x11, payload=b""))
            back.append(kind.packet(remote, egress, 443, egress_port, reply=True, tcp_flags=0x04))
        if not kind.ext and rng.random() < 0.2:
            make = fragment4 if family == 4 else fragment6
            whole = segment_of(kind.packet(pod, remote, pod_port, kind.remote_port, payload=FRAGMENT_PAYLOAD))
            out.append(make(pod, remote, kind.protocol, whole[:FIRST_FRAGMENT_DATA], offset=0, more=True))
            out.append(
                make(
                    pod,
                    remote,
                    kind.protocol,
                    whole[FIRST_FRAGMENT_DATA:],
                    offset=FIRST_FRAGMENT_DATA,
                    more=False,
                )
            )
            reply_whole = segment_of(
                kind.packet(
                    remote, egress, kind.remote_port, egress_port, reply=True, payload=FRAGMENT_PAYLOAD
                )
            )
            back.append(
                make(remote, egress, kind.protocol, reply_whole[:FIRST_FRAGMENT_DATA], offset=0, more=True)
            )
        if rng.random() < 0.05:
            build = ip4 if family == 4 else ip6
            out.append(build(pod, remote, 132, payload))
            back.append(build(remote, egress, 47, payload))
    return out, back
