# Parsing of IP packets as NFQUEUE delivers them (IP header first, no link layer), and the
# in-place rewrites of the SNAT table. Nothing here allocates or touches Python objects.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    # "This header has no such field" (an offset into a packet is never this large).
    NO_OFFSET = 0xFFFFFFFF
    # At most this many IPv6 extension headers before the L4 header; more is DROP_MALFORMED.
    MAX_EXTENSION_HEADERS = 8
    # RFC 792 / RFC 4443: an ICMP header is 8 bytes, and an error's quote follows it.
    ICMP_HEADER_LENGTH = 8


# Verdicts: the numbers of egresscore.Verdict (docs/snat.md).
cdef enum:
    VERDICT_TRANSLATED = 0
    VERDICT_NOT_OURS = 1
    VERDICT_DROP_TRUNCATED = 2
    VERDICT_DROP_MALFORMED = 3
    VERDICT_DROP_UNSUPPORTED = 4
    VERDICT_DROP_FRAGMENT = 5
    VERDICT_DROP_INVALID = 6
    VERDICT_DROP_TABLE_FULL = 7
    VERDICT_DROP_PORT_EXHAUSTED = 8
    VERDICT_DROP_WRONG_FAMILY = 9
    VERDICT_COUNT = 10
    # Internal: parse succeeded.
    PARSE_OK = 255


# What the L4 header is, for translation purposes.
cdef enum:
    KIND_PORTS = 1          # TCP or UDP: source and destination ports
    KIND_ECHO_REQUEST = 2   # ICMP/ICMPv6 echo request: the identifier is the source "port"
    KIND_ECHO_REPLY = 3     # ICMP/ICMPv6 echo reply: the identifier is the destination "port"
    KIND_ICMP_ERROR = 4     # ICMP/ICMPv6 error quoting an earlier packet
    KIND_OTHER = 5          # anything else (other protocols and ICMP types)


ctypedef struct PacketView:
    # Offsets are from the start of the buffer. A quoted packet (inside an ICMP error) uses
    # the same buffer, so its offsets can be rewritten the same way.
    uint32_t ip_offset
    uint32_t l4_offset
    uint32_t end                # end of this packet's bytes in the buffer
    uint32_t src_offset         # source address (4 or 16 bytes)
    uint32_t dst_offset
    uint32_t src_port_offset    # NO_OFFSET: no field (the remote side of an echo)
    uint32_t dst_port_offset
    uint32_t ip_checksum_offset # IPv4 header checksum; NO_OFFSET for IPv6
    uint32_t l4_checksum_offset # NO_OFFSET when the checksum is not in the bytes at hand
    uint16_t src_port           # host order; 0 where there is no field
    uint16_t dst_port
    uint8_t family              # 4 or 6
    uint8_t address_length      # 4 or 16
    uint8_t protocol            # IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6, or other
    uint8_t kind                # KIND_*
    uint8_t tcp_flags
    uint8_t pseudo_header       # the L4 checksum covers the IP pseudo-header (RFC 793/768/8200)
    uint8_t udp                 # UDP: checksum 0 stays 0, a computed 0 is sent as 0xFFFF
    uint8_t icmp_type


# Parse the packet at data[0:length]. Returns PARSE_OK or a drop verdict; fills view.
cdef uint8_t parse_packet(const uint8_t *data, uint32_t length, PacketView *view) noexcept nogil

# Parse the packet an ICMP error quotes, starting at `offset` and ending at `end`. A quote
# holds the IP header and at least the first 8 bytes of L4 (RFC 792, RFC 4443 section 2.4).
cdef uint8_t parse_quoted(const uint8_t *data, uint32_t offset, uint32_t end, PacketView *view) noexcept nogil

# Rewrite the source (address, port) or destination (address, port) of a packet and fix its
# IPv4 header checksum and L4 checksum. `port` is ignored where the view has no such field.
# With `partial`, the L4 checksum is a CHECKSUM_PARTIAL pseudo-header sum (docs/snat.md).
# Returns the delta the rewrite caused in the bytes from ip_offset to end (for an enclosing
# ICMP checksum).
cdef uint64_t rewrite_source(uint8_t *data, PacketView *view, const uint8_t *address,
                             uint16_t port, bint partial) noexcept nogil
cdef uint64_t rewrite_destination(uint8_t *data, PacketView *view, const uint8_t *address,
                                  uint16_t port, bint partial) noexcept nogil

# An ICMP error: rewrite the outer destination and the quoted source (inbound), or the
# outer source and the quoted destination (outbound), and fix every checksum on the way.
cdef void rewrite_icmp_error_inbound(uint8_t *data, PacketView *outer, PacketView *quoted,
                                     const uint8_t *address, uint16_t port, bint partial) noexcept nogil
cdef void rewrite_icmp_error_outbound(uint8_t *data, PacketView *outer, PacketView *quoted,
                                      const uint8_t *address, uint16_t port, bint partial) noexcept nogil
