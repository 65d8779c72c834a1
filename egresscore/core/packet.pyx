# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Parsing and in-place rewriting of IP packets for the SNAT table.

The C functions (declared in packet.pxd) are the datapath. :func:`parse` is the same
parser for Python callers: logs, debugging, tests.
"""

from typing import NamedTuple

from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.checksum cimport (
    apply_delta,
    apply_delta_partial,
    apply_delta_udp,
    load16,
    replace16,
    replace_words,
)
from egresscore.includes.netinet cimport (
    ICMP6_DST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    ICMP6_PARAM_PROB,
    ICMP6_TIME_EXCEEDED,
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHOREPLY,
    ICMP_PARAMETERPROB,
    ICMP_REDIRECT,
    ICMP_SOURCE_QUENCH,
    ICMP_TIME_EXCEEDED,
    IP_OFFMASK,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

import ipaddress

from egresscore.errors import PacketError


cdef inline bint is_icmp4_error(uint8_t icmp_type) noexcept nogil:
    return (icmp_type == ICMP_DEST_UNREACH or icmp_type == ICMP_SOURCE_QUENCH
            or icmp_type == ICMP_REDIRECT or icmp_type == ICMP_TIME_EXCEEDED
            or icmp_type == ICMP_PARAMETERPROB)


cdef inline bint is_icmp6_error(uint8_t icmp_type) noexcept nogil:
    return (icmp_type == ICMP6_DST_UNREACH or icmp_type == ICMP6_PACKET_TOO_BIG
            or icmp_type == ICMP6_TIME_EXCEEDED or icmp_type == ICMP6_PARAM_PROB)


cdef uint8_t parse_l4(const uint8_t *data, uint32_t l4, uint32_t end, bint quoted,
                      PacketView *view) noexcept nogil:
    cdef uint32_t available, header_length
    cdef uint8_t protocol = view.protocol
    view.l4_offset = l4
    view.end = end
    view.src_port_offset = NO_OFFSET
    view.dst_port_offset = NO_OFFSET
    view.l4_checksum_offset = NO_OFFSET
    view.src_port = 0
    view.dst_port = 0
    view.tcp_flags = 0
    view.pseudo_header = 0
    view.udp = 0
    view.icmp_type = 0
    view.kind = KIND_OTHER
    if l4 > end:
        return VERDICT_DROP_TRUNCATED
    available = end - l4
    if protocol == IPPROTO_TCP or protocol == IPPROTO_UDP:
        if available < 8:
            return VERDICT_DROP_TRUNCATED
        if protocol == IPPROTO_TCP:
            if not quoted:
                if available < 20:
                    return VERDICT_DROP_TRUNCATED
                header_length = (data[l4 + 12] >> 4) * 4
                if header_length < 20:
                    return VERDICT_DROP_MALFORMED
                if header_length > available:
                    return VERDICT_DROP_TRUNCATED
            if available >= 14:
                view.tcp_flags = data[l4 + 13]
            # A quote of only 8 bytes stops before the TCP checksum (offset 16).
            if available >= 18:
                view.l4_checksum_offset = l4 + 16
        else:
            view.l4_checksum_offset = l4 + 6
            view.udp = 1
        view.kind = KIND_PORTS
        view.pseudo_header = 1
        view.src_port_offset = l4
        view.dst_port_offset = l4 + 2
        view.src_port = load16(data + l4)
        view.dst_port = load16(data + l4 + 2)
        return PARSE_OK
    if (protocol == IPPROTO_ICMP and view.family == 4) or (protocol == IPPROTO_ICMPV6 and view.family == 6):
        if available < ICMP_HEADER_LENGTH:
            return VERDICT_DROP_TRUNCATED
        view.icmp_type = data[l4]
        view.l4_checksum_offset = l4 + 2
        view.pseudo_header = view.family == 6
        if (view.family == 4 and view.icmp_type == ICMP_ECHO) or (
                view.family == 6 and view.icmp_type == ICMP6_ECHO_REQUEST):
            view.kind = KIND_ECHO_REQUEST
            view.src_port_offset = l4 + 4
            view.src_port = load16(data + l4 + 4)
        elif (view.family == 4 and view.icmp_type == ICMP_ECHOREPLY) or (
                view.family == 6 and view.icmp_type == ICMP6_ECHO_REPLY):
            view.kind = KIND_ECHO_REPLY
            view.dst_port_offset = l4 + 4
            view.dst_port = load16(data + l4 + 4)
        elif not quoted and ((view.family == 4 and is_icmp4_error(view.icmp_type)) or (
                view.family == 6 and is_icmp6_error(view.icmp_type))):
            view.kind = KIND_ICMP_ERROR
        return PARSE_OK
    return PARSE_OK


cdef uint8_t parse_ipv4(const uint8_t *data, uint32_t offset, uint32_t end, bint quoted,
                        PacketView *view) noexcept nogil:
    cdef uint32_t header_length, total_length
    if end - offset < 20:
        return VERDICT_DROP_TRUNCATED
    if data[offset] >> 4 != 4:
        return VERDICT_DROP_MALFORMED
    header_length = (data[offset] & 0x0F) * 4
    total_length = load16(data + offset + 2)
    # A header length the packet's own total length cannot hold is malformed, whatever
    # the buffer holds; a buffer that stops inside a consistent header is truncated.
    if header_length < 20 or total_length < header_length:
        return VERDICT_DROP_MALFORMED
    if header_length > end - offset:
        return VERDICT_DROP_TRUNCATED
    if total_length <= end - offset:
        end = offset + total_length
    elif not quoted:
        return VERDICT_DROP_TRUNCATED
    # else: a quote cut short of the length it states; work on the bytes that are there.
    if load16(data + offset + 6) & IP_OFFMASK:
        return VERDICT_DROP_FRAGMENT
    view.ip_offset = offset
    view.family = 4
    view.address_length = 4
    view.protocol = data[offset + 9]
    view.ip_checksum_offset = offset + 10
    view.src_offset = offset + 12
    view.dst_offset = offset + 16
    return parse_l4(data, offset + header_length, end, quoted, view)


cdef uint8_t parse_ipv6(const uint8_t *data, uint32_t offset, uint32_t end, bint quoted,
                        PacketView *view) noexcept nogil:
    cdef uint32_t total_length, position, header_length
    cdef uint8_t next_header
    cdef int count
    if end - offset < 40:
        return VERDICT_DROP_TRUNCATED
    if data[offset] >> 4 != 6:
        return VERDICT_DROP_MALFORMED
    total_length = 40 + <uint32_t>load16(data + offset + 4)
    if total_length <= end - offset:
        end = offset + total_length
    elif not quoted:
        return VERDICT_DROP_TRUNCATED
    next_header = data[offset + 6]
    position = offset + 40
    count = 0
    while True:
        if (next_header == IPPROTO_HOPOPTS or next_header == IPPROTO_ROUTING
                or next_header == IPPROTO_DSTOPTS or next_header == IPPROTO_FRAGMENT
                or next_header == IPPROTO_AH):
            if count == MAX_EXTENSION_HEADERS:
                return VERDICT_DROP_MALFORMED
            count += 1
            # The outer packet's bytes are all there (checked above): a chain running past
            # its payload length is malformed. A quote may just have been cut short.
            if end - position < 8:
                return VERDICT_DROP_TRUNCATED if quoted else VERDICT_DROP_MALFORMED
            if next_header == IPPROTO_FRAGMENT:
                # RFC 8200 section 4.5: the offset is the upper 13 bits of bytes 2-3.
                if load16(data + position + 2) & 0xFFF8:
                    return VERDICT_DROP_FRAGMENT
                header_length = 8
            elif next_header == IPPROTO_AH:
                # RFC 4302 section 2.2: length in 4-byte units, minus 2.
                header_length = (<uint32_t>data[position + 1] + 2) * 4
            else:
                # RFC 8200 section 4.3: length in 8-byte units, not counting the first 8.
                header_length = (<uint32_t>data[position + 1] + 1) * 8
            if header_length > end - position:
                return VERDICT_DROP_TRUNCATED if quoted else VERDICT_DROP_MALFORMED
            next_header = data[position]
            position += header_length
        else:
            break
    view.ip_offset = offset
    view.family = 6
    view.address_length = 16
    view.protocol = next_header
    view.ip_checksum_offset = NO_OFFSET
    view.src_offset = offset + 8
    view.dst_offset = offset + 24
    return parse_l4(data, position, end, quoted, view)


cdef uint8_t parse_packet(const uint8_t *data, uint32_t length, PacketView *view) noexcept nogil:
    if length == 0:
        return VERDICT_DROP_TRUNCATED
    if data[0] >> 4 == 4:
        return parse_ipv4(data, 0, length, False, view)
    if data[0] >> 4 == 6:
        return parse_ipv6(data, 0, length, False, view)
    return VERDICT_DROP_MALFORMED


cdef uint8_t parse_quoted(const uint8_t *data, uint32_t offset, uint32_t end, PacketView *view) noexcept nogil:
    if offset >= end:
        return VERDICT_DROP_TRUNCATED
    if data[offset] >> 4 == 4:
        return parse_ipv4(data, offset, end, True, view)
    if data[offset] >> 4 == 6:
        return parse_ipv6(data, offset, end, True, view)
    return VERDICT_DROP_MALFORMED


cdef inline uint64_t fix_checksums(uint8_t *data, PacketView *view, uint64_t address_delta,
                                   uint64_t port_delta, bint partial) noexcept nogil:
    # Returns the delta of the two checksum fields themselves.
    cdef uint64_t field_delta = 0
    cdef uint64_t l4_delta = port_delta
    if view.ip_checksum_offset != NO_OFFSET:
        field_delta += apply_delta(data + view.ip_checksum_offset, address_delta)
    if view.l4_checksum_offset == NO_OFFSET:
        return field_delta
    if view.pseudo_header:
        l4_delta += address_delta
    if partial:
        # Only the pseudo-header is in a partial sum; the device adds the header words.
        if view.pseudo_header:
            apply_delta_partial(data + view.l4_checksum_offset, address_delta)
    elif view.udp:
        field_delta += apply_delta_udp(data + view.l4_checksum_offset, l4_delta)
    else:
        field_delta += apply_delta(data + view.l4_checksum_offset, l4_delta)
    return field_delta


cdef uint64_t rewrite_source(uint8_t *data, PacketView *view, const uint8_t *address,
                             uint16_t port, bint partial) noexcept nogil:
    cdef uint64_t address_delta = replace_words(data + view.src_offset, address, view.address_length)
    cdef uint64_t port_delta = 0
    if view.src_port_offset != NO_OFFSET:
        port_delta = replace16(data + view.src_port_offset, port)
        view.src_port = port
    return address_delta + port_delta + fix_checksums(data, view, address_delta, port_delta, partial)


cdef uint64_t rewrite_destination(uint8_t *data, PacketView *view, const uint8_t *address,
                                  uint16_t port, bint partial) noexcept nogil:
    cdef uint64_t address_delta = replace_words(data + view.dst_offset, address, view.address_length)
    cdef uint64_t port_delta = 0
    if view.dst_port_offset != NO_OFFSET:
        port_delta = replace16(data + view.dst_port_offset, port)
        view.dst_port = port
    return address_delta + port_delta + fix_checksums(data, view, address_delta, port_delta, partial)


cdef inline void fix_icmp_error_checksums(uint8_t *data, PacketView *outer, uint64_t outer_delta,
                                          uint64_t quote_delta, bint partial) noexcept nogil:
    # The outer IPv4 header checksum covers the outer address; the ICMP checksum covers the
    # whole quote and, for ICMPv6 only, the outer addresses through the pseudo-header.
    if outer.ip_checksum_offset != NO_OFFSET:
        apply_delta(data + outer.ip_checksum_offset, outer_delta)
    if partial:
        if outer.pseudo_header:
            apply_delta_partial(data + outer.l4_checksum_offset, outer_delta)
        return
    if outer.pseudo_header:
        quote_delta += outer_delta
    apply_delta(data + outer.l4_checksum_offset, quote_delta)


cdef void rewrite_icmp_error_inbound(uint8_t *data, PacketView *outer, PacketView *quoted,
                                     const uint8_t *address, uint16_t port, bint partial) noexcept nogil:
    cdef uint64_t outer_delta = replace_words(data + outer.dst_offset, address, outer.address_length)
    cdef uint64_t quote_delta = rewrite_source(data, quoted, address, port, False)
    fix_icmp_error_checksums(data, outer, outer_delta, quote_delta, partial)


cdef void rewrite_icmp_error_outbound(uint8_t *data, PacketView *outer, PacketView *quoted,
                                      const uint8_t *address, uint16_t port, bint partial) noexcept nogil:
    cdef uint64_t outer_delta = replace_words(data + outer.src_offset, address, outer.address_length)
    cdef uint64_t quote_delta = rewrite_destination(data, quoted, address, port, False)
    fix_icmp_error_checksums(data, outer, outer_delta, quote_delta, partial)


# ---------------------------------------------------------------------------------------
# Python view of the parser.

VERDICT_NAMES = {
    VERDICT_DROP_TRUNCATED: "truncated",
    VERDICT_DROP_MALFORMED: "malformed",
    VERDICT_DROP_FRAGMENT: "non-first fragment",
}

KIND_NAMES = {
    KIND_PORTS: "ports",
    KIND_ECHO_REQUEST: "echo-request",
    KIND_ECHO_REPLY: "echo-reply",
    KIND_ICMP_ERROR: "icmp-error",
    KIND_OTHER: "other",
}


class PacketInfo(NamedTuple):
    """The headers of a parsed packet, as the SNAT table sees them."""

    family: int
    protocol: int
    kind: str
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    source_port: int
    destination_port: int
    tcp_flags: int
    icmp_type: int
    quoted: "PacketInfo | None"


cdef object view_to_info(const uint8_t *data, PacketView *view, object quoted):
    cdef bytes source = data[view.src_offset:view.src_offset + view.address_length]
    cdef bytes destination = data[view.dst_offset:view.dst_offset + view.address_length]
    return PacketInfo(
        view.family, view.protocol, KIND_NAMES[view.kind],
        ipaddress.ip_address(source), ipaddress.ip_address(destination),
        view.src_port, view.dst_port, view.tcp_flags, view.icmp_type, quoted,
    )


def parse(packet) -> PacketInfo:
    """Parse an IP packet (IP header first) into :class:`PacketInfo`.

    An ICMP error's quoted packet is parsed too (``quoted``). Raises
    :class:`~egresscore.errors.PacketError` saying why a packet cannot be translated.
    """
    cdef const uint8_t[::1] buffer = packet
    cdef PacketView view, inner
    cdef uint32_t length = <uint32_t>buffer.shape[0]
    cdef uint8_t result
    cdef object quoted = None
    if buffer.shape[0] > 0xFFFFFFFF:
        raise PacketError(f"packet of {buffer.shape[0]} bytes: expected at most 4 GiB")
    if length == 0:
        raise PacketError("empty packet: expected an IPv4 or IPv6 header")
    result = parse_packet(&buffer[0], length, &view)
    if result != PARSE_OK:
        raise PacketError(f"{VERDICT_NAMES[result]} packet of {length} bytes (first byte 0x{buffer[0]:02x})")
    if view.kind == KIND_ICMP_ERROR:
        result = parse_quoted(&buffer[0], view.l4_offset + ICMP_HEADER_LENGTH, view.end, &inner)
        if result != PARSE_OK:
            raise PacketError(
                f"ICMP error quoting a {VERDICT_NAMES[result]} packet at offset {view.l4_offset + ICMP_HEADER_LENGTH}"
            )
        quoted = view_to_info(&buffer[0], &inner, None)
    return view_to_info(&buffer[0], &view, quoted)
