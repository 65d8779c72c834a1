# Address and prefix coercion shared by every core component: turns the many ways a
# Python caller names an address (str, ipaddress objects, packed bytes, int with a
# family) into one fixed C form, and back.
from egresscore.core._types cimport uint8_t, uint32_t

cdef struct IpKey:
    uint8_t family       # 4 or 6
    uint8_t length       # prefix length in bits; 32 or 128 for a plain address
    uint8_t addr[16]     # network byte order; IPv4 uses addr[0:4]

# Parse IPv4 dotted-quad text strictly (four decimal octets, no leading zeros, as
# ipaddress does). Returns 0 on success, -1 when the text is not an IPv4 address.
cdef int parse_ipv4_text(const char *text, Py_ssize_t size, uint32_t *out) noexcept nogil

cdef int coerce_address(object address, object family, IpKey *out) except -1
cdef int coerce_prefix(object prefix, IpKey *out) except -1
cdef object key_to_network(const IpKey *key)
cdef uint32_t key_ipv4(const IpKey *key) noexcept nogil
