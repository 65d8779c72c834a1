# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Address and prefix coercion for the Cython core.

Text is parsed in C for the common case (a ``str``), because single lookups from
Python are dominated by this step; ``ipaddress`` objects, packed ``bytes`` and
``int`` with an explicit family are accepted too. Prefixes with host bits set are
rejected, never silently masked: a routing table that quietly turns
``198.51.100.7/24`` into ``198.51.100.0/24`` hides a typo in a policy.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy, memset

from egresscore.includes.libc_extra cimport AF_INET, AF_INET6, inet_pton

import ipaddress as _ipaddress
import socket as _socket

from egresscore.errors import InvalidAddressError, InvalidPrefixError

cdef object IPv4Network = _ipaddress.IPv4Network
cdef object IPv6Network = _ipaddress.IPv6Network
cdef object IPv4Address = _ipaddress.IPv4Address
cdef object IPv6Address = _ipaddress.IPv6Address
cdef object IPv4Interface = _ipaddress.IPv4Interface
cdef object IPv6Interface = _ipaddress.IPv6Interface

# The longest IPv6 text inet_pton accepts is 45 characters (RFC 4291 section 2.2
# form 3 with an embedded IPv4 address); anything longer is not an address.
cdef enum:
    MAX_IPV6_TEXT = 45


cdef int parse_ipv4_text(const char *text, Py_ssize_t size, uint32_t *out) noexcept nogil:
    cdef uint32_t result = 0, octet
    cdef Py_ssize_t i = 0, start
    cdef int part
    for part in range(4):
        if part:
            if i >= size or text[i] != c'.':
                return -1
            i += 1
        start = i
        octet = 0
        while i < size and c'0' <= text[i] <= c'9' and i - start < 3:
            octet = octet * 10 + <uint32_t>(text[i] - c'0')
            i += 1
        # No digits, more than three, a value over 255, or a leading zero (ambiguous:
        # some C libraries read "010" as octal, so ipaddress rejects it, and so do we).
        if i == start or octet > 255 or (text[start] == c'0' and i - start > 1):
            return -1
        result = (result << 8) | octet
    if i != size:
        return -1
    out[0] = result
    return 0


cdef inline void store_ipv4(uint32_t value, IpKey *out) noexcept nogil:
    out.family = 4
    memset(out.addr, 0, 16)
    out.addr[0] = <uint8_t>(value >> 24)
    out.addr[1] = <uint8_t>(value >> 16)
    out.addr[2] = <uint8_t>(value >> 8)
    out.addr[3] = <uint8_t>value


cdef uint32_t key_ipv4(const IpKey *key) noexcept nogil:
    return ((<uint32_t>key.addr[0] << 24) | (<uint32_t>key.addr[1] << 16)
            | (<uint32_t>key.addr[2] << 8) | <uint32_t>key.addr[3])


cdef int parse_address_text(const char *text, Py_ssize_t size, IpKey *out) noexcept:
    """Fill *out* from IPv4 or IPv6 text; -1 (no exception set) if it is neither."""
    cdef uint32_t v4
    cdef char buffer[MAX_IPV6_TEXT + 1]
    cdef Py_ssize_t i
    if parse_ipv4_text(text, size, &v4) == 0:
        store_ipv4(v4, out)
        out.length = 32
        return 0
    if size < 2 or size > MAX_IPV6_TEXT:
        return -1
    for i in range(size):
        # inet_pton stops at a NUL; a zone index ("%eth0") names an interface, not
        # an address, and has no place in a table keyed by address.
        if text[i] == 0 or text[i] == c'%':
            return -1
    memcpy(buffer, text, size)
    buffer[size] = 0
    if inet_pton(AF_INET6, buffer, out.addr) != 1:
        return -1
    out.family = 6
    out.length = 128
    return 0


cdef int family_of(object family, object address) except -1:
    if family is None:
        raise InvalidAddressError(
            f"integer address {address!r} needs an explicit family: expected family=4 or family=6")
    if family == 4 or family == _socket.AF_INET:
        return 4
    if family == 6 or family == _socket.AF_INET6:
        return 6
    raise InvalidAddressError(
        f"unknown address family {family!r} for address {address!r}: expected 4, 6, "
        f"socket.AF_INET or socket.AF_INET6")


cdef int coerce_address(object address, object family, IpKey *out) except -1:
    cdef const char *text
    cdef Py_ssize_t size
    cdef int fam
    if type(address) is str:
        text = PyUnicode_AsUTF8AndSize(address, &size)
        if parse_address_text(text, size, out) == 0:
            return 0
        raise InvalidAddressError(
            f"invalid IP address {address!r}: expected IPv4 dotted-quad text such as '192.0.2.1' "
            f"or IPv6 text such as '2001:db8::1'")
    if isinstance(address, (IPv4Address, IPv6Address)) and not isinstance(
            address, (IPv4Interface, IPv6Interface)):
        address = address.packed
    if isinstance(address, bytes):
        size = PyBytes_GET_SIZE(address)
        if size == 4:
            out.family = 4
            out.length = 32
            memset(out.addr, 0, 16)
            memcpy(out.addr, PyBytes_AS_STRING(address), 4)
            return 0
        if size == 16:
            out.family = 6
            out.length = 128
            memcpy(out.addr, PyBytes_AS_STRING(address), 16)
            return 0
        raise InvalidAddressError(
            f"packed address {address!r} has {size} bytes: expected 4 (IPv4) or 16 (IPv6) "
            f"in network byte order")
    if isinstance(address, int) and not isinstance(address, bool):
        fam = family_of(family, address)
        if fam == 4:
            if not 0 <= address <= 0xFFFFFFFF:
                raise InvalidAddressError(
                    f"integer IPv4 address {address!r} is out of range: expected 0 to 2**32-1")
            store_ipv4(<uint32_t>address, out)
            out.length = 32
            return 0
        if not 0 <= address < (1 << 128):
            raise InvalidAddressError(
                f"integer IPv6 address {address!r} is out of range: expected 0 to 2**128-1")
        memcpy(out.addr, PyBytes_AS_STRING(address.to_bytes(16, "big")), 16)
        out.family = 6
        out.length = 128
        return 0
    raise InvalidAddressError(
        f"cannot use {address!r} ({type(address).__name__}) as an IP address: expected str, "
        f"ipaddress.IPv4Address/IPv6Address, packed bytes of length 4 or 16, or int with family")


cdef int prefix_length_text(const char *text, Py_ssize_t size) noexcept nogil:
    """Decimal prefix length, or -1 if the text is not one to three ASCII digits."""
    cdef int value = 0
    cdef Py_ssize_t i
    if size < 1 or size > 3:
        return -1
    for i in range(size):
        if not c'0' <= text[i] <= c'9':
            return -1
        value = value * 10 + (text[i] - c'0')
    return value


cdef int check_host_bits(const IpKey *key) noexcept nogil:
    """0 if every bit after the prefix length is zero, else -1."""
    cdef int total = 32 if key.family == 4 else 128
    cdef int i, bit
    for bit in range(key.length, total):
        i = bit >> 3
        if key.addr[i] & (0x80 >> (bit & 7)):
            return -1
    return 0


cdef object masked_text(const IpKey *key):
    cdef int total = 32 if key.family == 4 else 128
    cdef bytes raw = (<char *>key.addr)[:total // 8]
    return str(_ipaddress.ip_network((raw, key.length), strict=False))


cdef int coerce_prefix(object prefix, IpKey *out) except -1:
    cdef const char *text
    cdef Py_ssize_t size, slash, i
    cdef int length, limit
    if type(prefix) is str:
        text = PyUnicode_AsUTF8AndSize(prefix, &size)
        slash = -1
        for i in range(size):
            if text[i] == c'/':
                slash = i
                break
        if parse_address_text(text, size if slash < 0 else slash, out) != 0:
            raise InvalidPrefixError(
                f"invalid prefix {prefix!r}: expected CIDR text such as '198.51.100.0/24' or "
                f"'2001:db8::/32'")
        limit = 32 if out.family == 4 else 128
        if slash >= 0:
            length = prefix_length_text(text + slash + 1, size - slash - 1)
            if length < 0 or length > limit:
                raise InvalidPrefixError(
                    f"invalid prefix length in {prefix!r}: expected an integer from 0 to {limit} "
                    f"after the '/'")
            out.length = <uint8_t>length
        if check_host_bits(out) != 0:
            raise InvalidPrefixError(
                f"prefix {prefix!r} has host bits set: expected the network address "
                f"{masked_text(out)} (host bits are rejected, not masked)")
        return 0
    if isinstance(prefix, (IPv4Interface, IPv6Interface)):
        raise InvalidPrefixError(
            f"{prefix!r} is an interface (address with a prefix length), not a network: "
            f"expected a network such as {prefix.network!s}; pass its .network")
    if isinstance(prefix, (IPv4Network, IPv6Network)):
        coerce_address(prefix.network_address, None, out)
        out.length = <uint8_t>prefix.prefixlen
        return 0
    if isinstance(prefix, (IPv4Address, IPv6Address)):
        coerce_address(prefix, None, out)
        return 0
    raise InvalidPrefixError(
        f"cannot use {prefix!r} ({type(prefix).__name__}) as a prefix: expected CIDR text such as "
        f"'198.51.100.0/24' or an ipaddress.IPv4Network/IPv6Network")


cdef object key_to_network(const IpKey *key):
    if key.family == 4:
        return IPv4Network((key_ipv4(key), key.length))
    return IPv6Network(((<char *>key.addr)[:16], key.length))
