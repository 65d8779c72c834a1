# Internet checksum arithmetic (RFC 1071) and its incremental update (RFC 1624).
# Header-only: every function is inline so the rewrite paths compile to straight-line code.
#
# An incremental update never re-reads the data a checksum covers. Each rewritten 16-bit
# word adds (~old + new) to a 64-bit "delta" (one's-complement addition is associative and
# commutative, so the order of the words and the fold at the end do not matter), and the
# checksum field becomes HC' = ~(~HC + delta): RFC 1624 equation 3, which unlike equation 2
# never produces the -0 (0x0000 vs 0xFFFF) mistake of RFC 1141.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef inline uint16_t load16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline void store16(uint8_t *p, uint16_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 8)
    p[1] = <uint8_t>(value & 0xFF)


cdef inline uint16_t fold(uint64_t total) noexcept nogil:
    # Fold carries back in until the total fits 16 bits (end-around carry, RFC 1071 section 1).
    total = (total & 0xFFFFFFFFULL) + (total >> 32)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total


cdef inline uint64_t sum_words(const uint8_t *p, uint32_t length) noexcept nogil:
    # One's-complement sum of big-endian 16-bit words; an odd last byte is padded with zero.
    cdef uint64_t total = 0
    cdef uint32_t i = 0
    while i + 1 < length:
        total += (<uint64_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < length:
        total += <uint64_t>p[i] << 8
    return total


cdef inline uint64_t replace_words(uint8_t *field, const uint8_t *value, uint32_t length) noexcept nogil:
    # Overwrite an even-length, even-aligned field and return the delta it causes.
    cdef uint64_t delta = 0
    cdef uint32_t i = 0
    cdef uint16_t old_word, new_word
    while i < length:
        old_word = load16(field + i)
        new_word = load16(value + i)
        delta += <uint16_t>(~old_word) + <uint64_t>new_word
        field[i] = value[i]
        field[i + 1] = value[i + 1]
        i += 2
    return delta


cdef inline uint64_t replace16(uint8_t *field, uint16_t new_word) noexcept nogil:
    cdef uint16_t old_word = load16(field)
    store16(field, new_word)
    return <uint16_t>(~old_word) + <uint64_t>new_word


cdef inline uint64_t apply_delta(uint8_t *field, uint64_t delta) noexcept nogil:
    # RFC 1624 eqn. 3 on a complemented checksum field; returns the delta of the field itself,
    # for a checksum that covers this one (an ICMP error covers the header it quotes).
    cdef uint16_t old_sum = load16(field)
    cdef uint16_t new_sum = <uint16_t>~fold(<uint16_t>(~old_sum) + delta)
    store16(field, new_sum)
    return <uint16_t>(~old_sum) + <uint64_t>new_sum


cdef inline uint64_t apply_delta_udp(uint8_t *field, uint64_t delta) noexcept nogil:
    # RFC 768: 0 means "no checksum" and stays 0; a computed 0 is transmitted as 0xFFFF.
    # RFC 8200 section 8.1 keeps the 0xFFFF rule for IPv6, where 0 is invalid: such a
    # packet is left as it came, for the receiver to drop.
    cdef uint16_t old_sum = load16(field)
    cdef uint16_t new_sum
    if old_sum == 0:
        return 0
    new_sum = <uint16_t>~fold(<uint16_t>(~old_sum) + delta)
    if new_sum == 0:
        new_sum = 0xFFFF
    store16(field, new_sum)
    return <uint16_t>(~old_sum) + <uint64_t>new_sum


cdef inline void apply_delta_partial(uint8_t *field, uint64_t delta) noexcept nogil:
    # CHECKSUM_PARTIAL: the field holds the folded, uncomplemented pseudo-header sum that the
    # device will complete, so the delta is added without complementing.
    store16(field, fold(<uint64_t>load16(field) + delta))
