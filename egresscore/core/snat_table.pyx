# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The gateway's SNAT connection-tracking table (docs/snat.md).

Layout: entries of 80 bytes in chunks of 2**16 (indices never move); two chained hash
tables of uint32 heads, one keyed by the original direction (pod → remote) and one by
the reply direction (remote → egress); one doubly linked expiry list per timeout. The
hash is seeded per table from os.urandom, so remote peers cannot aim collisions at it.

Locking: every operation holds the table's mutex, the batch calls without the GIL. A
single call holds the GIL too; a batch in another thread never needs the GIL, so the
two cannot deadlock.
"""

import enum
import ipaddress
import os
from array import array
from typing import NamedTuple

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport INFINITY, ceil, isfinite
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.checksum cimport load16, store16
from egresscore.core.inet cimport IpKey, coerce_address
from egresscore.core.packet cimport (
    ICMP_HEADER_LENGTH,
    KIND_ECHO_REPLY,
    KIND_ECHO_REQUEST,
    KIND_ICMP_ERROR,
    KIND_OTHER,
    KIND_PORTS,
    PARSE_OK,
    VERDICT_COUNT,
    VERDICT_DROP_INVALID,
    VERDICT_DROP_PORT_EXHAUSTED,
    VERDICT_DROP_TABLE_FULL,
    VERDICT_DROP_UNSUPPORTED,
    VERDICT_DROP_WRONG_FAMILY,
    VERDICT_NOT_OURS,
    VERDICT_TRANSLATED,
    PacketView,
    parse_packet,
    parse_quoted,
    rewrite_destination,
    rewrite_icmp_error_inbound,
    rewrite_icmp_error_outbound,
    rewrite_source,
)
from egresscore.includes.libc_extra cimport (
    MADV_HUGEPAGE,
    aligned_alloc,
    madvise,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
)
from egresscore.includes.netinet cimport (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TH_ACK,
    TH_FIN,
    TH_RST,
    TH_SYN,
)

from egresscore.errors import SnapshotError

cdef extern from * nogil:
    void __builtin_prefetch(const void *address)


class Verdict(enum.IntEnum):
    """What the table did with a packet (docs/snat.md, "Verdicts")."""

    TRANSLATED = 0
    NOT_OURS = 1
    DROP_TRUNCATED = 2
    DROP_MALFORMED = 3
    DROP_UNSUPPORTED = 4
    DROP_FRAGMENT = 5
    DROP_INVALID = 6
    DROP_TABLE_FULL = 7
    DROP_PORT_EXHAUSTED = 8
    DROP_WRONG_FAMILY = 9

    @property
    def is_drop(self):
        return self >= Verdict.DROP_TRUNCATED


class SnatState(enum.IntEnum):
    """The state of a flow: TCP's conntrack states, UNREPLIED/REPLIED for UDP and ICMP."""

    SYN_SENT = STATE_SYN_SENT
    SYN_RECV = STATE_SYN_RECV
    ESTABLISHED = STATE_ESTABLISHED
    FIN_WAIT = STATE_FIN_WAIT
    CLOSE_WAIT = STATE_CLOSE_WAIT
    LAST_ACK = STATE_LAST_ACK
    TIME_WAIT = STATE_TIME_WAIT
    CLOSE = STATE_CLOSE
    UNREPLIED = STATE_UNREPLIED
    REPLIED = STATE_REPLIED


class SnatEntry(NamedTuple):
    """One flow of the table, as introspection returns it."""

    protocol: int
    pod_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    pod_port: int
    remote_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_port: int
    egress_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    egress_port: int
    state: SnatState
    replied: bool
    expires: float


# Linux conntrack's defaults (Documentation/networking/nf_conntrack-sysctl.rst), seconds.
# Each key sets the timer classes listed in TIMEOUT_CLASSES.
DEFAULT_TIMEOUTS = {
    "tcp_syn_sent": 120.0,
    "tcp_syn_recv": 60.0,
    "tcp_established": 432000.0,
    "tcp_fin_wait": 120.0,
    "tcp_close_wait": 60.0,
    "tcp_last_ack": 30.0,
    "tcp_time_wait": 120.0,
    "tcp_close": 10.0,
    "udp_unreplied": 30.0,
    "udp_replied": 120.0,
    "icmp": 30.0,
}
TIMEOUT_CLASSES = {
    "tcp_syn_sent": (0,),
    "tcp_syn_recv": (1,),
    "tcp_established": (2,),
    "tcp_fin_wait": (3,),
    "tcp_close_wait": (4,),
    "tcp_last_ack": (5,),
    "tcp_time_wait": (6,),
    "tcp_close": (7,),
    "udp_unreplied": (TIMER_UDP_UNREPLIED,),
    "udp_replied": (TIMER_UDP_REPLIED,),
    "icmp": (TIMER_ICMP_UNREPLIED, TIMER_ICMP_REPLIED),
}
# The snapshot stores milliseconds left in 32 bits: timeouts stay below 2**32 ms.
MAX_TIMEOUT = 4294967.0

SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"EGSN"
cdef const char *SNAPSHOT_MAGIC_C = b"EGSN"
cdef enum:
    SNAPSHOT_HEADER_SIZE = 16
    SNAPSHOT_RECORD_SIZE = 64
    # When a new flow finds the table full: entries looked at per expiry list. Unreplied
    # flows head their own lists (SYN_SENT, UDP and ICMP unreplied), so they are found.
    FULL_RECLAIM_PER_LIST = 16
    # Packets a batch parses and prefetches ahead of translating them.
    BATCH_GROUP = 16

VERDICT_NAMES = tuple(verdict.name.lower() for verdict in Verdict)
VERDICT_OBJECTS = tuple(Verdict)
DIRECTION_NAMES = ("outbound", "inbound")
MAX_ENTRIES_LIMIT = 1 << 31

DEFAULT_MAX_ENTRIES = 262144


# ---------------------------------------------------------------------------------------
# Small C helpers.

cdef enum:
    HUGE_PAGE = 2 * 1024 * 1024


cdef void *table_alloc(size_t size) noexcept nogil:
    # Lookups land on random entries: with 4 KiB pages nearly every one is also a TLB miss,
    # and under a hypervisor a page walk costs several memory accesses. Large arrays are
    # therefore 2 MiB aligned and offered to transparent huge pages (MADV_HUGEPAGE works
    # in the default "madvise" mode). Free with free().
    cdef void *memory
    if size < HUGE_PAGE:
        return malloc(size)
    size = (size + HUGE_PAGE - 1) & ~(<size_t>HUGE_PAGE - 1)
    memory = aligned_alloc(HUGE_PAGE, size)
    if memory != NULL:
        # Advice only: without huge pages the table still works, on small pages.
        madvise(memory, size, MADV_HUGEPAGE)
    return memory

cdef inline uint64_t rotate_left(uint64_t value, int bits) noexcept nogil:
    return (value << bits) | (value >> (64 - bits))


cdef inline uint64_t load64(const uint8_t *p) noexcept nogil:
    cdef uint64_t value
    memcpy(&value, p, 8)
    return value


cdef inline uint64_t hash_key(uint64_t seed, const FlowKey *key) noexcept nogil:
    # Multiply-rotate mixing of the five 64-bit words of the key, then a murmur3-style
    # finaliser so that every input bit reaches the low bits the bucket mask keeps.
    cdef uint64_t h = seed ^ ((<uint64_t>key.port_a << 48) | (<uint64_t>key.port_b << 32)
                              | (<uint64_t>key.protocol << 8) | key.family)
    h = rotate_left(h ^ (load64(key.a) * 0x9E3779B97F4A7C15ULL), 29) * 0xBF58476D1CE4E5B9ULL
    h = rotate_left(h ^ (load64(key.a + 8) * 0x9E3779B97F4A7C15ULL), 29) * 0x94D049BB133111EBULL
    h = rotate_left(h ^ (load64(key.b) * 0x9E3779B97F4A7C15ULL), 29) * 0xBF58476D1CE4E5B9ULL
    h = rotate_left(h ^ (load64(key.b + 8) * 0x9E3779B97F4A7C15ULL), 29) * 0x94D049BB133111EBULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    return h


cdef inline uint64_t next_random(uint64_t *state) noexcept nogil:
    # splitmix64: port allocation only needs starts that peers cannot guess from the
    # previous port, and the state is seeded from os.urandom.
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline void key_from_view(FlowKey *key, const uint8_t *data, const PacketView *view,
                               bint source_first) noexcept nogil:
    # source_first: a = source, b = destination; else a = destination, b = source.
    cdef uint32_t a_offset = view.src_offset if source_first else view.dst_offset
    cdef uint32_t b_offset = view.dst_offset if source_first else view.src_offset
    memset(key, 0, sizeof(FlowKey))
    memcpy(key.a, data + a_offset, view.address_length)
    memcpy(key.b, data + b_offset, view.address_length)
    key.port_a = view.src_port if source_first else view.dst_port
    key.port_b = view.dst_port if source_first else view.src_port
    key.protocol = view.protocol
    key.family = view.family


cdef inline uint8_t timer_class_of(uint8_t protocol, uint8_t state) noexcept nogil:
    if protocol == IPPROTO_TCP:
        return state - STATE_SYN_SENT
    if protocol == IPPROTO_UDP:
        return TIMER_UDP_REPLIED if state == STATE_REPLIED else TIMER_UDP_UNREPLIED
    return TIMER_ICMP_REPLIED if state == STATE_REPLIED else TIMER_ICMP_UNREPLIED


cdef inline bint has(uint8_t flags, uint8_t bits) noexcept nogil:
    return (flags & bits) != 0


cdef void tcp_transition(FlowEntry *e, bint inbound, uint8_t flags) noexcept nogil:
    # docs/snat.md, "TCP": the first rule that matches applies.
    cdef uint8_t state = e.state
    cdef uint8_t this_fin = FLAG_FIN_INBOUND if inbound else FLAG_FIN_OUTBOUND
    cdef uint8_t other_fin = FLAG_FIN_OUTBOUND if inbound else FLAG_FIN_INBOUND
    cdef bint pure_ack = has(flags, TH_ACK) and not has(flags, TH_SYN | TH_FIN | TH_RST)
    if has(flags, TH_RST):
        e.state = STATE_CLOSE
    elif (has(flags, TH_SYN) and not has(flags, TH_ACK) and not inbound
            and (state == STATE_TIME_WAIT or state == STATE_CLOSE)):
        e.state = STATE_SYN_SENT
        e.flags &= ~(FLAG_REPLIED | FLAG_FIN_OUTBOUND | FLAG_FIN_INBOUND)
    elif has(flags, TH_SYN) and has(flags, TH_ACK) and inbound and state == STATE_SYN_SENT:
        e.state = STATE_SYN_RECV
    elif has(flags, TH_FIN) and (state == STATE_SYN_RECV or state == STATE_ESTABLISHED):
        e.state = STATE_FIN_WAIT
        e.flags = (e.flags & ~(FLAG_FIN_OUTBOUND | FLAG_FIN_INBOUND)) | this_fin
    elif (has(flags, TH_FIN) and has(e.flags, other_fin)
            and (state == STATE_FIN_WAIT or state == STATE_CLOSE_WAIT)):
        e.state = STATE_LAST_ACK
    elif pure_ack and not inbound and state == STATE_SYN_RECV:
        e.state = STATE_ESTABLISHED
    elif (has(flags, TH_ACK) and not has(flags, TH_FIN) and has(e.flags, other_fin)
            and state == STATE_FIN_WAIT):
        e.state = STATE_CLOSE_WAIT
    elif pure_ack and has(e.flags, this_fin) and state == STATE_LAST_ACK:
        e.state = STATE_TIME_WAIT


cdef bint record_is_valid(const uint8_t *record) noexcept nogil:
    # The same rules as SnatTable.check_record, which words the error.
    cdef uint8_t family = record[0]
    cdef uint8_t protocol = record[1]
    cdef uint8_t state = record[2]
    cdef int i
    if family != 4 and family != 6:
        return False
    if protocol == IPPROTO_TCP:
        if state < STATE_SYN_SENT or state > STATE_CLOSE:
            return False
    elif (protocol == IPPROTO_UDP or (family == 4 and protocol == IPPROTO_ICMP)
            or (family == 6 and protocol == IPPROTO_ICMPV6)):
        if state != STATE_UNREPLIED and state != STATE_REPLIED:
            return False
    else:
        return False
    if record[3] & ~7 or ((record[3] & FLAG_FIN_OUTBOUND) and (record[3] & FLAG_FIN_INBOUND)):
        return False
    if record[10] != 0 or record[11] != 0:
        return False
    if family == 4:
        for i in range(4, 16):
            if record[16 + i] or record[32 + i] or record[48 + i]:
                return False
    return True


cdef class SnatTable:
    """The SNAT translation table of a gateway (docs/snat.md).

    ``SnatTable(egress_ips, *, port_range=(1024, 65535), max_entries=262144,
    timeouts=None, max_port_probes=128, reclaim_budget=4, seed=None)``.
    """

    def __cinit__(self):
        cdef int c
        self.chunks = NULL
        self.original_buckets = NULL
        self.reply_buckets = NULL
        self.egress = NULL
        self.exhaustion = NULL
        self.lock_ready = False
        for c in range(TIMER_CLASSES):
            self.timer_head[c] = NIL
            self.timer_tail[c] = NIL
            self.timer_due[c] = INFINITY

    def __init__(self, egress_ips, *, port_range=(1024, 65535), max_entries=DEFAULT_MAX_ENTRIES,
                 timeouts=None, max_port_probes=128, reclaim_budget=4, seed=None):
        cdef IpKey key
        cdef uint64_t buckets
        cdef Py_ssize_t i
        if self.chunks != NULL:
            raise RuntimeError("SnatTable.__init__ called twice")
        addresses = []
        if isinstance(egress_ips, (str, bytes)):
            raise TypeError(f"egress_ips={egress_ips!r}: expected a list of addresses, not one address")
        for position, address in enumerate(egress_ips):
            try:
                coerce_address(address, None, &key)
            except ValueError as error:
                raise ValueError(f"egress_ips[{position}]: {error}") from None
            parsed = ipaddress.ip_address(PyBytes_FromStringAndSize(<char *>key.addr, 4 if key.family == 4 else 16))
            if parsed in addresses:
                raise ValueError(f"egress_ips[{position}]: {parsed} is listed twice")
            addresses.append(parsed)
        if not addresses:
            raise ValueError("egress_ips is empty: expected at least one egress IP")
        if len(addresses) > 0xFFFF:
            raise ValueError(f"egress_ips has {len(addresses)} addresses: expected at most 65535")
        low, high = self._check_port_range(port_range)
        if (not isinstance(max_entries, int) or isinstance(max_entries, bool)
                or not 1 <= max_entries <= MAX_ENTRIES_LIMIT):
            raise ValueError(f"max_entries={max_entries!r}: expected an integer from 1 to {MAX_ENTRIES_LIMIT}")
        resolved = dict(DEFAULT_TIMEOUTS)
        if timeouts is not None:
            for name, value in dict(timeouts).items():
                if name not in DEFAULT_TIMEOUTS:
                    raise ValueError(
                        f"timeouts[{name!r}]: unknown timeout; expected one of {', '.join(DEFAULT_TIMEOUTS)}")
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not (0 < value <= MAX_TIMEOUT)):
                    raise ValueError(
                        f"timeouts[{name!r}]={value!r}: expected seconds, more than 0 and at most {MAX_TIMEOUT:.0f}")
                resolved[name] = float(value)
        for name, value in (("max_port_probes", max_port_probes), ("reclaim_budget", reclaim_budget)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name}={value!r}: expected a non-negative integer")
        if max_port_probes == 0:
            raise ValueError("max_port_probes=0: expected at least 1")
        if seed is None:
            seed = int.from_bytes(os.urandom(16), "little")
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r}: expected an integer or None")

        self.capacity = <uint32_t>max_entries
        self.chunk_count = <uint32_t>((max_entries + CHUNK_SIZE - 1) >> CHUNK_SHIFT)
        buckets = 16
        while buckets < <uint64_t>max_entries:
            buckets <<= 1
        self.bucket_mask = buckets - 1
        self.chunks = <FlowEntry **>calloc(self.chunk_count, sizeof(FlowEntry *))
        self.original_buckets = <uint32_t *>table_alloc(buckets * sizeof(uint32_t))
        self.reply_buckets = <uint32_t *>table_alloc(buckets * sizeof(uint32_t))
        self.egress = <EgressAddress *>calloc(len(addresses), sizeof(EgressAddress))
        self.exhaustion = <ExhaustionSlot *>calloc(EXHAUSTION_SLOTS, sizeof(ExhaustionSlot))
        if (self.chunks == NULL or self.original_buckets == NULL or self.reply_buckets == NULL
                or self.egress == NULL or self.exhaustion == NULL):
            raise MemoryError(f"SnatTable of {max_entries} entries")
        memset(self.original_buckets, 0xFF, buckets * sizeof(uint32_t))
        memset(self.reply_buckets, 0xFF, buckets * sizeof(uint32_t))
        if pthread_mutex_init(&self.lock, NULL) != 0:
            raise MemoryError("SnatTable: pthread_mutex_init failed")
        self.lock_ready = True
        self.egress_count = <uint16_t>len(addresses)
        for i, parsed in enumerate(addresses):
            self.egress[i].family = parsed.version
            memcpy(self.egress[i].address, PyBytes_AS_STRING(parsed.packed), len(parsed.packed))
        self.egress_objects = tuple(addresses)
        self.egress_cache = {}
        self.port_low = low
        self.port_high = high
        self.max_port_probes = max_port_probes
        self.reclaim_budget = reclaim_budget
        for name, classes in TIMEOUT_CLASSES.items():
            for c in classes:
                self.timeout[c] = resolved[name]
        self.seed = (seed ^ (seed >> 64)) & 0xFFFFFFFFFFFFFFFF
        self.random_state = (seed * 0x2545F4914F6CDD1D + 1) & 0xFFFFFFFFFFFFFFFF
        self.high_water = 0
        self.free_head = NIL
        self.count = 0
        self.clock = -INFINITY

    def __dealloc__(self):
        cdef uint32_t c
        if self.chunks != NULL:
            for c in range(self.chunk_count):
                free(self.chunks[c])
            free(self.chunks)
        free(self.original_buckets)
        free(self.reply_buckets)
        free(self.egress)
        free(self.exhaustion)
        if self.lock_ready:
            pthread_mutex_destroy(&self.lock)

    @staticmethod
    def _check_port_range(port_range):
        try:
            low, high = port_range
        except (TypeError, ValueError):
            raise ValueError(f"port_range={port_range!r}: expected a pair (low, high)") from None
        if (isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, int)
                or not isinstance(high, int) or not 1 <= low <= high <= 65535):
            raise ValueError(f"port_range={port_range!r}: expected (low, high) with 1 <= low <= high <= 65535")
        return low, high

    # -----------------------------------------------------------------------------------
    # Entries, chains and timers.

    cdef FlowEntry *entry(self, uint32_t index) noexcept nogil:
        return self.chunks[index >> CHUNK_SHIFT] + (index & (CHUNK_SIZE - 1))

    cdef bint matches_original(self, const FlowEntry *e, const FlowKey *key) noexcept nogil:
        return (e.pod_port == key.port_a and e.remote_port == key.port_b and e.protocol == key.protocol
                and e.family == key.family and memcmp(e.pod_address, key.a, 16) == 0
                and memcmp(e.remote_address, key.b, 16) == 0)

    cdef bint matches_reply(self, const FlowEntry *e, const FlowKey *key) noexcept nogil:
        return (e.remote_port == key.port_a and e.egress_port == key.port_b and e.protocol == key.protocol
                and e.family == key.family and memcmp(e.remote_address, key.a, 16) == 0
                and memcmp(self.egress[e.egress_index].address, key.b, 16) == 0)

    cdef uint32_t find_original(self, const FlowKey *key, uint64_t h) noexcept nogil:
        cdef uint32_t index = self.original_buckets[h & self.bucket_mask]
        cdef FlowEntry *e
        while index != NIL:
            e = self.entry(index)
            if self.matches_original(e, key):
                return index
            index = e.original_next
        return NIL

    cdef uint32_t find_reply(self, const FlowKey *key, uint64_t h) noexcept nogil:
        cdef uint32_t index = self.reply_buckets[h & self.bucket_mask]
        cdef FlowEntry *e
        while index != NIL:
            e = self.entry(index)
            if self.matches_reply(e, key):
                return index
            index = e.reply_next
        return NIL

    cdef void original_key(self, const FlowEntry *e, FlowKey *key) noexcept nogil:
        memcpy(key.a, e.pod_address, 16)
        memcpy(key.b, e.remote_address, 16)
        key.port_a = e.pod_port
        key.port_b = e.remote_port
        key.protocol = e.protocol
        key.family = e.family

    cdef void reply_key(self, const FlowEntry *e, FlowKey *key) noexcept nogil:
        memcpy(key.a, e.remote_address, 16)
        memcpy(key.b, self.egress[e.egress_index].address, 16)
        key.port_a = e.remote_port
        key.port_b = e.egress_port
        key.protocol = e.protocol
        key.family = e.family

    cdef void unlink_chain(self, uint32_t *buckets, uint64_t h, uint32_t index, bint reply) noexcept nogil:
        cdef uint32_t *link = &buckets[h & self.bucket_mask]
        cdef FlowEntry *e
        while link[0] != NIL:
            e = self.entry(link[0])
            if link[0] == index:
                link[0] = e.reply_next if reply else e.original_next
                return
            link = &e.reply_next if reply else &e.original_next

    cdef void timer_unlink(self, uint32_t index, FlowEntry *e) noexcept nogil:
        cdef uint8_t c = e.timer_class
        if e.timer_prev != NIL:
            self.entry(e.timer_prev).timer_next = e.timer_next
        else:
            self.timer_head[c] = e.timer_next
            self.timer_due[c] = (INFINITY if e.timer_next == NIL
                                 else self.entry(e.timer_next).queued_expires)
        if e.timer_next != NIL:
            self.entry(e.timer_next).timer_prev = e.timer_prev
        else:
            self.timer_tail[c] = e.timer_prev

    cdef void timer_append(self, uint32_t index, FlowEntry *e, uint8_t c) noexcept nogil:
        e.timer_class = c
        e.queued_expires = e.expires
        e.timer_next = NIL
        e.timer_prev = self.timer_tail[c]
        if self.timer_tail[c] != NIL:
            self.entry(self.timer_tail[c]).timer_next = index
        else:
            self.timer_head[c] = index
            self.timer_due[c] = e.queued_expires
        self.timer_tail[c] = index

    cdef void refresh(self, uint32_t index, FlowEntry *e, double now) noexcept nogil:
        # A refresh in the same timer class only writes the entry (see FlowEntry).
        cdef uint8_t c = timer_class_of(e.protocol, e.state)
        e.expires = now + self.timeout[c]
        if c != e.timer_class:
            self.timer_unlink(index, e)
            self.timer_append(index, e, c)

    cdef void free_entry(self, uint32_t index) noexcept nogil:
        cdef FlowEntry *e = self.entry(index)
        cdef FlowKey key
        self.original_key(e, &key)
        self.unlink_chain(self.original_buckets, hash_key(self.seed, &key), index, False)
        self.reply_key(e, &key)
        self.unlink_chain(self.reply_buckets, hash_key(self.seed, &key), index, True)
        self.timer_unlink(index, e)
        self.egress[e.egress_index].entries -= 1
        e.flags = 0
        e.timer_next = self.free_head
        self.free_head = index
        self.count -= 1

    cdef uint32_t allocate_entry(self) noexcept nogil:
        cdef uint32_t index, chunk, size
        if self.free_head != NIL:
            index = self.free_head
            self.free_head = self.entry(index).timer_next
            return index
        if self.high_water >= self.capacity:
            return NIL
        index = self.high_water
        chunk = index >> CHUNK_SHIFT
        if self.chunks[chunk] == NULL:
            size = self.capacity - (chunk << CHUNK_SHIFT)
            if size > CHUNK_SIZE:
                size = CHUNK_SIZE
            # Not zeroed: an entry is written in full when it is handed out, and nothing
            # reads entries at or above high_water.
            self.chunks[chunk] = <FlowEntry *>table_alloc(size * sizeof(FlowEntry))
            if self.chunks[chunk] == NULL:
                return NIL
        self.high_water += 1
        return index

    cdef bint live_or_free(self, uint32_t index, double now) noexcept nogil:
        # An expired entry found by a lookup is freed on the spot: it must never match.
        if self.entry(index).expires > now:
            return True
        self.free_entry(index)
        self.expired += 1
        return False

    # -----------------------------------------------------------------------------------
    # Expiry.

    cdef uint32_t reclaim(self, double now, uint64_t budget) noexcept nogil:
        # Pop expired heads of the timer lists; a head that was refreshed since it was
        # queued goes back to the tail with its new expiry. At most `budget` entries looked at.
        cdef uint32_t freed = 0
        cdef uint32_t index
        cdef FlowEntry *e
        cdef int c
        for c in range(TIMER_CLASSES):
            while budget > 0 and self.timer_due[c] <= now:
                budget -= 1
                index = self.timer_head[c]
                e = self.entry(index)
                if e.expires <= now:
                    self.free_entry(index)
                    self.expired += 1
                    freed += 1
                else:
                    self.timer_unlink(index, e)
                    self.timer_append(index, e, c)
            if budget == 0:
                break
        return freed

    cdef uint32_t reclaim_scan(self, double now, uint64_t budget) noexcept nogil:
        # Walk every list past unexpired entries (lists are only roughly ordered by expires).
        cdef uint32_t freed = 0
        cdef uint32_t index, next_index
        cdef int c
        for c in range(TIMER_CLASSES):
            index = self.timer_head[c]
            while index != NIL and budget > 0:
                budget -= 1
                next_index = self.entry(index).timer_next
                if self.entry(index).expires <= now:
                    self.free_entry(index)
                    self.expired += 1
                    freed += 1
                index = next_index
        return freed

    cdef bint make_room(self, double now) noexcept nogil:
        # A new flow found the table full. Walk each expiry list from its head (the
        # longest-queued entries), at most FULL_RECLAIM_PER_LIST entries each: free the expired
        # ones, and if that frees nothing, evict the unreplied entry that expires first
        # (Linux's early drop of unassured entries). Entries that saw a reply stay.
        cdef uint64_t budget
        cdef uint32_t index, next_index
        cdef uint32_t victim = NIL
        cdef double best = INFINITY
        cdef FlowEntry *e
        cdef int c
        for c in range(TIMER_CLASSES):
            index = self.timer_head[c]
            budget = FULL_RECLAIM_PER_LIST
            while index != NIL and budget > 0:
                budget -= 1
                e = self.entry(index)
                next_index = e.timer_next
                if e.expires <= now:
                    self.free_entry(index)
                    self.expired += 1
                elif not (e.flags & FLAG_REPLIED) and e.expires < best:
                    victim = index
                    best = e.expires
                index = next_index
        if self.count < self.capacity:
            return True
        if victim == NIL:
            return False
        self.free_entry(victim)
        self.evicted += 1
        return True

    # -----------------------------------------------------------------------------------
    # New flows.

    cdef bint reply_tuple_free(self, FlowKey *reply, uint16_t port, uint64_t *h, double now) noexcept nogil:
        cdef uint32_t index
        reply.port_b = port
        h[0] = hash_key(self.seed, reply)
        index = self.find_reply(reply, h[0])
        return index == NIL or not self.live_or_free(index, now)

    cdef void count_exhaustion(self, const FlowKey *original, uint16_t egress_index) noexcept nogil:
        # Keyed by (egress, remote address) only: every flow toward that pair counts together.
        cdef FlowKey pair
        cdef uint64_t h
        cdef uint32_t probe, slot
        memset(&pair, 0, sizeof(FlowKey))
        memcpy(pair.b, original.b, 16)
        pair.port_a = egress_index
        pair.family = original.family
        h = hash_key(self.seed, &pair)
        cdef ExhaustionSlot *s
        for probe in range(16):
            slot = <uint32_t>((h + probe) & (EXHAUSTION_SLOTS - 1))
            s = &self.exhaustion[slot]
            if not s.used:
                s.used = 1
                s.family = original.family
                s.egress_index = egress_index
                memcpy(s.remote, original.b, 16)
                s.count = 1
                return
            if s.egress_index == egress_index and s.family == original.family and memcmp(
                    s.remote, original.b, 16) == 0:
                s.count += 1
                return
        self.exhaustion_overflow += 1

    cdef uint8_t open_flow(self, const FlowKey *original, uint64_t original_hash, uint16_t egress_index,
                           const PacketView *view, double now, uint32_t *out) noexcept nogil:
        cdef FlowKey reply
        cdef uint64_t reply_hash = 0
        cdef uint32_t range_size, probes, start, i, index, offset
        cdef int port = -1
        cdef uint16_t candidate
        cdef FlowEntry *e
        memcpy(reply.a, original.b, 16)
        memcpy(reply.b, self.egress[egress_index].address, 16)
        reply.port_a = original.port_b
        reply.protocol = original.protocol
        reply.family = original.family
        range_size = <uint32_t>self.port_high - self.port_low + 1
        # The first choice is the pod's port, folded into the range when outside it: a
        # client cycling through its ports then cycles through the egress ports in the
        # same order, and reuses one only when it reuses its own (docs/snat.md).
        if original.port_a >= self.port_low:
            offset = (<uint32_t>original.port_a - self.port_low) % range_size
        else:
            offset = range_size - 1 - (<uint32_t>self.port_low - original.port_a - 1) % range_size
        candidate = <uint16_t>(self.port_low + offset)
        if self.reply_tuple_free(&reply, candidate, &reply_hash, now):
            port = candidate
        else:
            probes = self.max_port_probes if self.max_port_probes < range_size else range_size
            start = <uint32_t>(next_random(&self.random_state) % range_size)
            for i in range(probes):
                candidate = <uint16_t>(self.port_low + (start + i) % range_size)
                if self.reply_tuple_free(&reply, candidate, &reply_hash, now):
                    port = candidate
                    break
        if port < 0:
            self.count_exhaustion(original, egress_index)
            return VERDICT_DROP_PORT_EXHAUSTED
        if self.count >= self.capacity and not self.make_room(now):
            return VERDICT_DROP_TABLE_FULL
        index = self.allocate_entry()
        if index == NIL:
            return VERDICT_DROP_TABLE_FULL
        e = self.entry(index)
        memcpy(e.pod_address, original.a, 16)
        memcpy(e.remote_address, original.b, 16)
        e.pod_port = original.port_a
        e.remote_port = original.port_b
        e.egress_port = <uint16_t>port
        e.egress_index = egress_index
        e.protocol = original.protocol
        e.family = original.family
        e.flags = FLAG_IN_USE
        if original.protocol == IPPROTO_TCP:
            e.state = (STATE_SYN_SENT if has(view.tcp_flags, TH_SYN) and not has(view.tcp_flags, TH_ACK)
                       else STATE_ESTABLISHED)
        else:
            e.state = STATE_UNREPLIED
        e.expires = now + self.timeout[timer_class_of(e.protocol, e.state)]
        # A reclaim or eviction above may have changed the chains; the hashes stay valid.
        e.original_next = self.original_buckets[original_hash & self.bucket_mask]
        self.original_buckets[original_hash & self.bucket_mask] = index
        e.reply_next = self.reply_buckets[reply_hash & self.bucket_mask]
        self.reply_buckets[reply_hash & self.bucket_mask] = index
        self.timer_append(index, e, timer_class_of(e.protocol, e.state))
        self.egress[egress_index].entries += 1
        self.count += 1
        self.created += 1
        out[0] = index
        return VERDICT_TRANSLATED

    # -----------------------------------------------------------------------------------
    # Translation (the caller holds the lock).

    cdef double advance_clock(self, double now) noexcept nogil:
        if now > self.clock:
            self.clock = now
        return self.clock

    cdef void prepare_outbound(self, const uint8_t *data, uint32_t length, uint16_t egress_index,
                               PreparedPacket *p) noexcept nogil:
        p.status = parse_packet(data, length, &p.view)
        if p.status != PARSE_OK or p.view.kind == KIND_ICMP_ERROR:
            return
        if p.view.kind == KIND_OTHER:
            p.status = VERDICT_DROP_UNSUPPORTED
        elif p.view.kind == KIND_ECHO_REPLY:
            p.status = VERDICT_DROP_INVALID
        elif self.egress[egress_index].family != p.view.family:
            p.status = VERDICT_DROP_WRONG_FAMILY
        else:
            key_from_view(&p.key, data, &p.view, True)
            p.hash = hash_key(self.seed, &p.key)

    cdef uint8_t finish_outbound(self, uint8_t *data, PreparedPacket *p, uint16_t egress_index,
                                 bint partial, double now) noexcept nogil:
        # The caller holds the lock; p came from prepare_outbound on the same bytes.
        cdef PacketView quoted
        cdef FlowKey key
        cdef uint32_t index
        cdef uint8_t result
        cdef FlowEntry *e
        if p.status != PARSE_OK:
            return p.status
        if p.view.kind == KIND_ICMP_ERROR:
            # The pod answers a translated inbound packet with an error: the quote is that
            # packet as the pod got it (remote → pod), so it names the flow's original tuple.
            result = parse_quoted(data, p.view.l4_offset + ICMP_HEADER_LENGTH, p.view.end, &quoted)
            if (result != PARSE_OK or quoted.family != p.view.family
                    or (quoted.kind != KIND_PORTS and quoted.kind != KIND_ECHO_REPLY)):
                return VERDICT_DROP_INVALID
            key_from_view(&key, data, &quoted, False)
            index = self.find_original(&key, hash_key(self.seed, &key))
            if index == NIL or not self.live_or_free(index, now):
                return VERDICT_DROP_INVALID
            e = self.entry(index)
            rewrite_icmp_error_outbound(data, &p.view, &quoted, self.egress[e.egress_index].address,
                                        e.egress_port, partial)
            return VERDICT_TRANSLATED
        index = self.find_original(&p.key, p.hash)
        if index != NIL and not self.live_or_free(index, now):
            index = NIL
        if index == NIL:
            if p.view.protocol == IPPROTO_TCP and has(p.view.tcp_flags, TH_RST):
                return VERDICT_DROP_INVALID
            result = self.open_flow(&p.key, p.hash, egress_index, &p.view, now, &index)
            if result != VERDICT_TRANSLATED:
                return result
            e = self.entry(index)
        else:
            e = self.entry(index)
            if e.protocol == IPPROTO_TCP:
                tcp_transition(e, False, p.view.tcp_flags)
            self.refresh(index, e, now)
        rewrite_source(data, &p.view, self.egress[e.egress_index].address, e.egress_port, partial)
        return VERDICT_TRANSLATED

    cdef void prepare_inbound(self, const uint8_t *data, uint32_t length, PreparedPacket *p) noexcept nogil:
        p.status = parse_packet(data, length, &p.view)
        if p.status != PARSE_OK or p.view.kind == KIND_ICMP_ERROR:
            return
        if p.view.kind != KIND_PORTS and p.view.kind != KIND_ECHO_REPLY:
            p.status = VERDICT_NOT_OURS
        else:
            key_from_view(&p.key, data, &p.view, True)
            p.hash = hash_key(self.seed, &p.key)

    cdef uint8_t finish_inbound(self, uint8_t *data, PreparedPacket *p, bint partial, double now) noexcept nogil:
        cdef PacketView quoted
        cdef FlowKey key
        cdef uint32_t index
        cdef uint8_t result
        cdef FlowEntry *e
        if p.status != PARSE_OK:
            return p.status
        if p.view.kind == KIND_ICMP_ERROR:
            # An error about a translated outbound packet quotes it as it left:
            # egress → remote. The outer destination must be that egress address.
            result = parse_quoted(data, p.view.l4_offset + ICMP_HEADER_LENGTH, p.view.end, &quoted)
            if (result != PARSE_OK or quoted.family != p.view.family
                    or (quoted.kind != KIND_PORTS and quoted.kind != KIND_ECHO_REQUEST)
                    or memcmp(data + p.view.dst_offset, data + quoted.src_offset, p.view.address_length) != 0):
                return VERDICT_NOT_OURS
            key_from_view(&key, data, &quoted, False)
            index = self.find_reply(&key, hash_key(self.seed, &key))
            if index == NIL or not self.live_or_free(index, now):
                return VERDICT_NOT_OURS
            e = self.entry(index)
            rewrite_icmp_error_inbound(data, &p.view, &quoted, e.pod_address, e.pod_port, partial)
            return VERDICT_TRANSLATED
        index = self.find_reply(&p.key, p.hash)
        if index == NIL or not self.live_or_free(index, now):
            return VERDICT_NOT_OURS
        e = self.entry(index)
        e.flags |= FLAG_REPLIED
        if e.protocol == IPPROTO_TCP:
            tcp_transition(e, True, p.view.tcp_flags)
        else:
            e.state = STATE_REPLIED
        self.refresh(index, e, now)
        rewrite_destination(data, &p.view, e.pod_address, e.pod_port, partial)
        return VERDICT_TRANSLATED

    cdef void prefetch_buckets(self, PreparedPacket *group, Py_ssize_t count, bint reply) noexcept nogil:
        # Touch the bucket heads of a whole group, then the entries they name, in two tight
        # loops: the loads are independent, so the CPU overlaps their cache misses instead
        # of paying them one packet at a time inside the translation. Plain loads, not
        # __builtin_prefetch: on the project's VMs prefetches of random lines were measured
        # to be dropped (no gain), while overlapped loads cut a 1M-entry batch from ~450 to
        # ~190 ns per packet.
        cdef uint32_t *buckets = self.reply_buckets if reply else self.original_buckets
        cdef uint32_t heads[BATCH_GROUP]
        cdef Py_ssize_t j
        cdef const uint8_t *e
        cdef uint64_t touched = 0
        for j in range(count):
            heads[j] = NIL
            if group[j].status == PARSE_OK and group[j].view.kind != KIND_ICMP_ERROR:
                heads[j] = buckets[group[j].hash & self.bucket_mask]
        for j in range(count):
            if heads[j] != NIL:
                e = <const uint8_t *>self.entry(heads[j])
                touched += e[0] + e[sizeof(FlowEntry) - 1]
        # Stored so that the compiler keeps the loads.
        self.touched = touched

    # -----------------------------------------------------------------------------------
    # Python API.

    @property
    def egress_ips(self):
        """The configured egress addresses, in the order given (egress indices)."""
        return self.egress_objects

    @property
    def port_range(self):
        return (self.port_low, self.port_high)

    @property
    def max_entries(self):
        return self.capacity

    @property
    def timeouts(self):
        """The timeout of every key, in seconds (docs/snat.md)."""
        return {name: self.timeout[classes[0]] for name, classes in TIMEOUT_CLASSES.items()}

    @property
    def clock(self):
        """The latest ``now`` seen (the table's clock never runs backwards)."""
        return self.clock

    cdef uint16_t egress_index_of(self, object egress_ip) except? 0xFFFF:
        cdef IpKey key
        cdef uint16_t i
        try:
            cached = self.egress_cache.get(egress_ip)
        except TypeError:
            cached = None
        if cached is not None:
            return cached
        coerce_address(egress_ip, None, &key)
        for i in range(self.egress_count):
            if self.egress[i].family == key.family and memcmp(self.egress[i].address, key.addr, 16) == 0:
                if len(self.egress_cache) < 4096:
                    self.egress_cache[egress_ip] = i
                return i
        raise ValueError(
            f"egress IP {egress_ip!r} is not configured in this table: expected one of "
            f"{', '.join(str(address) for address in self.egress_objects)}")

    cdef void translate_run(self, bint inbound, uint8_t *base, const uint32_t *offsets, Py_ssize_t n,
                            const uint16_t *index_of, Py_ssize_t index_stride,
                            const uint8_t *partial_of, Py_ssize_t partial_stride,
                            uint8_t *out, double now) noexcept nogil:
        # Every translation, single or batch: packet i is base[offsets[i]:offsets[i + 1]];
        # per-packet settings are read through a pointer and a stride of 1, or 0 for one value.
        cdef PreparedPacket group[BATCH_GROUP]
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t j, count
        cdef uint8_t result
        pthread_mutex_lock(&self.lock)
        now = self.advance_clock(now)
        self.reclaim(now, <uint64_t>self.reclaim_budget * <uint64_t>n)
        while i < n:
            count = n - i if n - i < BATCH_GROUP else BATCH_GROUP
            for j in range(count):
                if inbound:
                    self.prepare_inbound(base + offsets[i + j], offsets[i + j + 1] - offsets[i + j], &group[j])
                else:
                    self.prepare_outbound(base + offsets[i + j], offsets[i + j + 1] - offsets[i + j],
                                          index_of[(i + j) * index_stride], &group[j])
            self.prefetch_buckets(group, count, inbound)
            for j in range(count):
                if inbound:
                    result = self.finish_inbound(base + offsets[i + j], &group[j],
                                                 partial_of[(i + j) * partial_stride] != 0, now)
                else:
                    result = self.finish_outbound(base + offsets[i + j], &group[j], index_of[(i + j) * index_stride],
                                                  partial_of[(i + j) * partial_stride] != 0, now)
                out[i + j] = result
                self.verdicts[inbound][result] += 1
            i += count
        pthread_mutex_unlock(&self.lock)

    cdef uint8_t translate_one(self, bint inbound, object packet, uint16_t egress_index, bint partial,
                               double now) except 0xFF:
        cdef Py_buffer buffer
        cdef uint32_t offsets[2]
        cdef uint8_t partial_byte = partial
        cdef uint8_t result
        try:
            PyObject_GetBuffer(packet, &buffer, PyBUF_WRITABLE | PyBUF_SIMPLE)
        except (BufferError, TypeError) as error:
            raise TypeError(
                f"packet: expected a writable buffer such as a bytearray, got {type(packet).__name__}") from error
        try:
            if buffer.len > 0xFFFFFFFF:
                raise ValueError(f"packet of {buffer.len} bytes: expected at most 4 GiB")
            offsets[0] = 0
            offsets[1] = <uint32_t>buffer.len
            with nogil:
                self.translate_run(inbound, <uint8_t *>buffer.buf, offsets, 1, &egress_index, 0,
                                   &partial_byte, 0, &result, now)
        finally:
            PyBuffer_Release(&buffer)
        return result

    def translate_outbound(self, packet, egress_ip, double now, *, bint checksum_partial=False):
        """Translate a packet from a pod (source → egress IP and port) in place.

        Opens a flow on the first packet. Returns a :class:`Verdict`; the packet is
        changed only when the verdict is ``TRANSLATED``.
        """
        return VERDICT_OBJECTS[self.translate_one(False, packet, self.egress_index_of(egress_ip),
                                                  checksum_partial, now)]

    def translate_inbound(self, packet, double now, *, bint checksum_partial=False):
        """Translate a packet to an egress IP back to its pod, in place. Returns a :class:`Verdict`."""
        return VERDICT_OBJECTS[self.translate_one(True, packet, 0, checksum_partial, now)]

    cdef Py_ssize_t check_batch(self, uint8_t[::1] buffer, const uint32_t[::1] offsets,
                                object checksum_partial, object verdicts) except -1:
        cdef Py_ssize_t n = offsets.shape[0] - 1
        cdef Py_ssize_t i = 0
        cdef uint32_t previous
        cdef bint ordered = True
        if n < 0:
            raise ValueError("offsets is empty: expected n + 1 offsets for n packets (the last is the end)")
        previous = offsets[0]
        with nogil:
            for i in range(1, n + 1):
                if offsets[i] < previous:
                    ordered = False
                    break
                previous = offsets[i]
        if not ordered:
            raise ValueError(f"offsets[{i}]={offsets[i]} is below offsets[{i - 1}]={offsets[i - 1]}: "
                             "expected non-decreasing offsets")
        if offsets[n] > <uint64_t>buffer.shape[0]:
            raise ValueError(f"offsets[{n}]={offsets[n]} is past the end of the buffer ({buffer.shape[0]} bytes)")
        for name, value in (("checksum_partial", checksum_partial), ("verdicts", verdicts)):
            if value is not None and len(memoryview(value).cast("B")) != n:
                raise ValueError(f"{name} has {len(memoryview(value).cast('B'))} items: expected {n}, one per packet")
        return n

    cdef object translate_many(self, bint inbound, object buffer, object offsets, object egress_ip,
                               object egress_indices, object checksum_partial, object verdicts, double now):
        cdef uint8_t[::1] data = buffer
        cdef const uint32_t[::1] offs = offsets
        cdef const uint16_t[::1] indices
        cdef const uint8_t[::1] partial
        cdef uint8_t[::1] out
        cdef uint16_t single_index = 0
        cdef uint8_t no_partial = 0
        cdef const uint16_t *index_of = &single_index
        cdef Py_ssize_t index_stride = 0
        cdef const uint8_t *partial_of = &no_partial
        cdef Py_ssize_t partial_stride = 0
        cdef Py_ssize_t n = self.check_batch(data, offs, checksum_partial, verdicts)
        cdef Py_ssize_t i
        cdef uint8_t *base
        cdef uint8_t *out_of
        if not inbound and egress_ip is None:
            if egress_indices is None:
                raise ValueError("egress_ip is None and no egress_indices: expected one of them")
            indices = egress_indices
            if indices.shape[0] != n:
                raise ValueError(f"egress_indices has {indices.shape[0]} items: expected {n}, one per packet")
            for i in range(n):
                if indices[i] >= self.egress_count:
                    raise ValueError(f"egress_indices[{i}]={indices[i]}: expected an index below "
                                     f"{self.egress_count} (the number of egress IPs)")
            if n > 0:
                index_of = &indices[0]
                index_stride = 1
        elif not inbound:
            if egress_indices is not None:
                raise ValueError("both egress_ip and egress_indices given: expected one of them")
            single_index = self.egress_index_of(egress_ip)
        if checksum_partial is not None and n > 0:
            partial = checksum_partial
            partial_of = &partial[0]
            partial_stride = 1
        result_object = array("B", bytes(n)) if verdicts is None else verdicts
        out = result_object
        base = &data[0] if data.shape[0] > 0 else NULL
        out_of = &out[0] if n > 0 else NULL
        with nogil:
            self.translate_run(inbound, base, &offs[0], n, index_of, index_stride, partial_of, partial_stride,
                               out_of, now)
        return result_object

    def translate_outbound_many(self, buffer, offsets, egress_ip, double now, *, egress_indices=None,
                                checksum_partial=None, verdicts=None):
        """Translate many packets from pods held in one buffer, without the GIL.

        Packet i is ``buffer[offsets[i]:offsets[i + 1]]`` (``offsets``: n + 1 uint32).
        Every packet uses ``egress_ip``, or, when it is None, the egress IP at
        ``egress_indices[i]`` (uint16, indices into :attr:`egress_ips`).
        ``checksum_partial``: optional uint8 per packet. The verdicts are written to
        ``verdicts`` (uint8 per packet), or to a new ``array('B')``, which is returned.
        """
        return self.translate_many(False, buffer, offsets, egress_ip, egress_indices, checksum_partial,
                                   verdicts, now)

    def translate_inbound_many(self, buffer, offsets, double now, *, checksum_partial=None, verdicts=None):
        """Translate many packets to egress IPs back to their pods, without the GIL.

        Buffers as in :meth:`translate_outbound_many`.
        """
        return self.translate_many(True, buffer, offsets, None, None, checksum_partial, verdicts, now)

    # -----------------------------------------------------------------------------------
    # Introspection.

    cdef object entry_object(self, const FlowEntry *e):
        cdef uint8_t length = 4 if e.family == 4 else 16
        return SnatEntry(
            e.protocol,
            ipaddress.ip_address(PyBytes_FromStringAndSize(<const char *>e.pod_address, length)),
            e.pod_port,
            ipaddress.ip_address(PyBytes_FromStringAndSize(<const char *>e.remote_address, length)),
            e.remote_port,
            self.egress_objects[e.egress_index],
            e.egress_port,
            SnatState(e.state),
            (e.flags & FLAG_REPLIED) != 0,
            e.expires,
        )

    cdef int key_from_python(self, FlowKey *key, object protocol, object a, object port_a, object b,
                             object port_b) except -1:
        cdef IpKey address_a, address_b
        coerce_address(a, None, &address_a)
        coerce_address(b, None, &address_b)
        if address_a.family != address_b.family:
            raise ValueError(f"{a} and {b} are of different address families")
        for name, value in (("protocol", protocol), ("port", port_a), ("port", port_b)):
            if not isinstance(value, int) or not 0 <= value <= (255 if name == "protocol" else 65535):
                raise ValueError(f"{name}={value!r}: expected an integer in range")
        memset(key, 0, sizeof(FlowKey))
        memcpy(key.a, address_a.addr, 16)
        memcpy(key.b, address_b.addr, 16)
        key.port_a = port_a
        key.port_b = port_b
        key.protocol = protocol
        key.family = address_a.family
        return 0

    def lookup_outbound(self, protocol, pod_ip, pod_port, remote_ip, remote_port):
        """The live entry of a flow by its original tuple, or None (no side effects)."""
        cdef FlowKey key
        cdef uint32_t index
        self.key_from_python(&key, protocol, pod_ip, pod_port, remote_ip, remote_port)
        with nogil:
            pthread_mutex_lock(&self.lock)
            index = self.find_original(&key, hash_key(self.seed, &key))
            pthread_mutex_unlock(&self.lock)
        if index == NIL or self.entry(index).expires <= self.clock:
            return None
        return self.entry_object(self.entry(index))

    cdef bint hold_flow(self, const FlowKey *original, double now) noexcept nogil:
        # The kernel carries this flow from now on (docs/snat.md, "Flows the kernel
        # carries"): its entry keeps its egress port as an established flow would, and
        # is freed by release_flow when the kernel's connection ends.
        cdef uint32_t index
        cdef FlowEntry *e
        pthread_mutex_lock(&self.lock)
        index = self.find_original(original, hash_key(self.seed, original))
        if index != NIL:
            e = self.entry(index)
            e.state = STATE_ESTABLISHED
            e.flags |= FLAG_REPLIED
            self.refresh(index, e, now)
        pthread_mutex_unlock(&self.lock)
        return index != NIL

    cdef bint release_flow(self, const FlowKey *original) noexcept nogil:
        cdef uint32_t index
        pthread_mutex_lock(&self.lock)
        index = self.find_original(original, hash_key(self.seed, original))
        if index != NIL:
            self.free_entry(index)
        pthread_mutex_unlock(&self.lock)
        return index != NIL

    def hold(self, protocol, pod_ip, pod_port, remote_ip, remote_port, double now):
        """Mark a flow as carried by the kernel: established, with the established
        timeout from ``now``. Returns whether the flow was in the table."""
        cdef FlowKey key
        self.key_from_python(&key, protocol, pod_ip, pod_port, remote_ip, remote_port)
        return self.hold_flow(&key, now)

    def release(self, protocol, pod_ip, pod_port, remote_ip, remote_port):
        """Free a flow's entry and its egress port now (its connection ended elsewhere).
        Returns whether the flow was in the table."""
        cdef FlowKey key
        self.key_from_python(&key, protocol, pod_ip, pod_port, remote_ip, remote_port)
        return self.release_flow(&key)

    def lookup_inbound(self, protocol, remote_ip, remote_port, egress_ip, egress_port):
        """The live entry a reply (remote → egress IP and port) would match, or None."""
        cdef FlowKey key
        cdef uint32_t index
        self.key_from_python(&key, protocol, remote_ip, remote_port, egress_ip, egress_port)
        with nogil:
            pthread_mutex_lock(&self.lock)
            index = self.find_reply(&key, hash_key(self.seed, &key))
            pthread_mutex_unlock(&self.lock)
        if index == NIL or self.entry(index).expires <= self.clock:
            return None
        return self.entry_object(self.entry(index))

    def expire(self, double now, budget=None):
        """Reclaim entries expired at ``now``: up to ``budget`` looked at (default: all).

        Returns the number freed.
        """
        cdef uint64_t limit = 0xFFFFFFFFFFFFFFFF if budget is None else budget
        cdef uint32_t freed
        with nogil:
            pthread_mutex_lock(&self.lock)
            now = self.advance_clock(now)
            freed = self.reclaim_scan(now, limit)
            pthread_mutex_unlock(&self.lock)
        return freed

    def entries(self, now=None):
        """Iterate over a snapshot of the stored entries (those live at ``now`` if given)."""
        cdef uint32_t index
        cdef FlowEntry *e
        cdef double limit = -INFINITY if now is None else now
        result = []
        pthread_mutex_lock(&self.lock)
        try:
            for index in range(self.high_water):
                e = self.entry(index)
                if (e.flags & FLAG_IN_USE) and e.expires > limit:
                    result.append(self.entry_object(e))
        finally:
            pthread_mutex_unlock(&self.lock)
        return iter(result)

    def counters(self):
        """Counts of every verdict per direction, and of entries created, expired and evicted."""
        result = {}
        for direction in range(2):
            for verdict in range(VERDICT_COUNT):
                result[f"{DIRECTION_NAMES[direction]}.{VERDICT_NAMES[verdict]}"] = self.verdicts[direction][verdict]
        result["entries_created"] = self.created
        result["entries_expired"] = self.expired
        result["entries_evicted"] = self.evicted
        result["restore_skipped"] = self.restore_skipped
        result["port_exhaustion_overflow"] = self.exhaustion_overflow
        return result

    def counts_by_state(self):
        """Stored entries live at the table's clock, by (protocol, SnatState)."""
        result = {}
        for entry in self.entries(self.clock):
            key = (entry.protocol, entry.state)
            result[key] = result.get(key, 0) + 1
        return result

    def ports_in_use(self):
        """Stored entries (translated ports in use) per egress IP."""
        return {self.egress_objects[i]: self.egress[i].entries for i in range(self.egress_count)}

    def port_exhaustion(self):
        """Failed port allocations per (egress IP, remote IP).

        Up to 1024 pairs are told apart; further pairs count in
        ``counters()["port_exhaustion_overflow"]``.
        """
        cdef int slot
        cdef ExhaustionSlot *s
        result = {}
        for slot in range(EXHAUSTION_SLOTS):
            s = &self.exhaustion[slot]
            if s.used:
                remote = ipaddress.ip_address(PyBytes_FromStringAndSize(<char *>s.remote, 4 if s.family == 4 else 16))
                result[(self.egress_objects[s.egress_index], remote)] = s.count
        return result

    def _chain_lengths(self):
        """Diagnostics: {chain length: number of buckets} for both hash tables."""
        cdef uint64_t b
        cdef uint32_t index, length
        result = []
        for reply in (False, True):
            histogram = {}
            for b in range(self.bucket_mask + 1):
                length = 0
                index = (self.reply_buckets if reply else self.original_buckets)[b]
                while index != NIL:
                    length += 1
                    index = self.entry(index).reply_next if reply else self.entry(index).original_next
                histogram[length] = histogram.get(length, 0) + 1
            result.append(histogram)
        return result

    def memory_usage(self):
        """Bytes of C memory the table holds (entries, hash tables, counters)."""
        cdef uint64_t total = sizeof(FlowEntry *) * self.chunk_count
        cdef uint32_t c, size
        for c in range(self.chunk_count):
            if self.chunks[c] != NULL:
                size = self.capacity - (c << CHUNK_SHIFT)
                total += sizeof(FlowEntry) * (size if size < <uint32_t>CHUNK_SIZE else <uint32_t>CHUNK_SIZE)
        total += 2 * (self.bucket_mask + 1) * sizeof(uint32_t)
        total += self.egress_count * sizeof(EgressAddress) + EXHAUSTION_SLOTS * sizeof(ExhaustionSlot)
        return total

    def clear(self):
        """Forget every entry (counters stay)."""
        cdef uint32_t index
        pthread_mutex_lock(&self.lock)
        for index in range(self.high_water):
            if self.entry(index).flags & FLAG_IN_USE:
                self.free_entry(index)
        pthread_mutex_unlock(&self.lock)

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count != 0

    def __repr__(self):
        return (f"<SnatTable {self.count}/{self.capacity} entries, egress "
                f"{', '.join(str(address) for address in self.egress_objects)}, "
                f"ports {self.port_low}-{self.port_high}>")

    # -----------------------------------------------------------------------------------
    # Snapshot (format: docs/snat.md).

    def snapshot(self, double now):
        """The entries live at ``now`` as bytes (docs/snat.md, "Snapshot format")."""
        cdef uint32_t index
        cdef uint64_t records = 0
        cdef uint64_t written = 0
        cdef FlowEntry *e
        cdef uint8_t *out
        cdef uint8_t *record
        cdef double left
        cdef uint64_t milliseconds
        cdef int i
        cdef bytes result
        pthread_mutex_lock(&self.lock)
        try:
            for index in range(self.high_water):
                e = self.entry(index)
                if (e.flags & FLAG_IN_USE) and e.expires > now:
                    records += 1
            result = PyBytes_FromStringAndSize(NULL, SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * records)
            out = <uint8_t *>PyBytes_AS_STRING(result)
            memcpy(out, SNAPSHOT_MAGIC_C, 4)
            store16(out + 4, SNAPSHOT_VERSION)
            store16(out + 6, SNAPSHOT_RECORD_SIZE)
            for i in range(8):
                out[8 + i] = <uint8_t>(records >> (8 * (7 - i)))
            with nogil:
                for index in range(self.high_water):
                    e = self.entry(index)
                    if not (e.flags & FLAG_IN_USE) or e.expires <= now:
                        continue
                    record = out + SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * written
                    written += 1
                    left = ceil((e.expires - now) * 1000.0)
                    milliseconds = <uint64_t>left if left < 4294967295.0 else 4294967295
                    record[0] = e.family
                    record[1] = e.protocol
                    record[2] = e.state
                    record[3] = e.flags & (FLAG_REPLIED | FLAG_FIN_OUTBOUND | FLAG_FIN_INBOUND)
                    store16(record + 4, e.pod_port)
                    store16(record + 6, e.remote_port)
                    store16(record + 8, e.egress_port)
                    store16(record + 10, 0)
                    store16(record + 12, <uint16_t>(milliseconds >> 16))
                    store16(record + 14, <uint16_t>(milliseconds & 0xFFFF))
                    memcpy(record + 16, e.pod_address, 16)
                    memcpy(record + 32, e.remote_address, 16)
                    memcpy(record + 48, self.egress[e.egress_index].address, 16)
        finally:
            pthread_mutex_unlock(&self.lock)
        return result

    def restore(self, data, double now):
        """Add the entries of a :meth:`snapshot` to this table; returns how many were added.

        Everything is checked before anything is added: a bad snapshot raises
        :class:`~egresscore.errors.SnapshotError` and leaves the table as it was.
        """
        cdef const uint8_t[::1] raw
        cdef const uint8_t *p
        cdef const uint8_t *record
        cdef uint64_t records, r, milliseconds
        cdef FlowKey original, reply
        cdef uint64_t original_hash, reply_hash
        cdef uint32_t index
        cdef FlowEntry *e
        cdef uint16_t egress_index
        cdef int i
        cdef uint64_t added = 0
        cdef uint64_t skipped = 0
        try:
            raw = memoryview(data).cast("B")
        except TypeError:
            raise SnapshotError(f"snapshot: expected bytes, got {type(data).__name__}") from None
        if raw.shape[0] < SNAPSHOT_HEADER_SIZE:
            raise SnapshotError(f"snapshot of {raw.shape[0]} bytes: shorter than its {SNAPSHOT_HEADER_SIZE}-byte header")
        p = &raw[0]
        if memcmp(p, SNAPSHOT_MAGIC_C, 4) != 0:
            raise SnapshotError(f"snapshot starts with {bytes(raw[:4])!r}: expected the magic {SNAPSHOT_MAGIC!r}")
        if load16(p + 4) != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {load16(p + 4)}: this egresscore reads version {SNAPSHOT_VERSION}")
        if load16(p + 6) != SNAPSHOT_RECORD_SIZE:
            raise SnapshotError(f"snapshot record size {load16(p + 6)}: expected {SNAPSHOT_RECORD_SIZE}")
        records = 0
        for i in range(8):
            records = (records << 8) | p[8 + i]
        if <uint64_t>raw.shape[0] != SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * records:
            raise SnapshotError(
                f"snapshot of {raw.shape[0]} bytes: its header announces {records} records, "
                f"{SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * records} bytes")
        # Checked in C first (a million records in milliseconds); only a bad record is
        # looked at again in Python, to say what is wrong with it.
        with nogil:
            for r in range(records):
                if not record_is_valid(p + SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * r):
                    break
        if records and r < records and not record_is_valid(p + SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * r):
            self.check_record(p + SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * r, r)
            raise SnapshotError(f"snapshot record {r}: invalid")
        pthread_mutex_lock(&self.lock)
        try:
            now = self.advance_clock(now)
            for r in range(records):
                record = p + SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * r
                egress_index = self.find_egress(record[0], record + 48)
                memset(&original, 0, sizeof(FlowKey))
                original.family = record[0]
                original.protocol = record[1]
                original.port_a = load16(record + 4)
                original.port_b = load16(record + 6)
                memcpy(original.a, record + 16, 16)
                memcpy(original.b, record + 32, 16)
                memset(&reply, 0, sizeof(FlowKey))
                reply.family = record[0]
                reply.protocol = record[1]
                reply.port_a = original.port_b
                reply.port_b = load16(record + 8)
                memcpy(reply.a, record + 32, 16)
                memcpy(reply.b, record + 48, 16)
                original_hash = hash_key(self.seed, &original)
                reply_hash = hash_key(self.seed, &reply)
                if egress_index == 0xFFFF:
                    skipped += 1
                    continue
                index = self.find_original(&original, original_hash)
                if index != NIL and self.live_or_free(index, now):
                    skipped += 1
                    continue
                index = self.find_reply(&reply, reply_hash)
                if index != NIL and self.live_or_free(index, now):
                    skipped += 1
                    continue
                if self.count >= self.capacity:
                    skipped += 1
                    continue
                index = self.allocate_entry()
                if index == NIL:
                    skipped += 1
                    continue
                e = self.entry(index)
                memcpy(e.pod_address, record + 16, 16)
                memcpy(e.remote_address, record + 32, 16)
                e.pod_port = original.port_a
                e.remote_port = original.port_b
                e.egress_port = reply.port_b
                e.egress_index = egress_index
                e.protocol = record[1]
                e.family = record[0]
                e.state = record[2]
                e.flags = FLAG_IN_USE | record[3]
                milliseconds = (<uint64_t>load16(record + 12) << 16) | load16(record + 14)
                e.expires = now + milliseconds / 1000.0
                e.original_next = self.original_buckets[original_hash & self.bucket_mask]
                self.original_buckets[original_hash & self.bucket_mask] = index
                e.reply_next = self.reply_buckets[reply_hash & self.bucket_mask]
                self.reply_buckets[reply_hash & self.bucket_mask] = index
                self.timer_append(index, e, timer_class_of(e.protocol, e.state))
                self.egress[egress_index].entries += 1
                self.count += 1
                added += 1
            self.restore_skipped += skipped
        finally:
            pthread_mutex_unlock(&self.lock)
        return added

    cdef uint16_t find_egress(self, uint8_t family, const uint8_t *address) noexcept nogil:
        cdef uint16_t i
        for i in range(self.egress_count):
            if self.egress[i].family == family and memcmp(self.egress[i].address, address, 16) == 0:
                return i
        return 0xFFFF

    cdef int check_record(self, const uint8_t *record, uint64_t r) except -1:
        where = f"snapshot record {r} (byte {SNAPSHOT_HEADER_SIZE + SNAPSHOT_RECORD_SIZE * r})"
        family = record[0]
        protocol = record[1]
        state = record[2]
        if family != 4 and family != 6:
            raise SnapshotError(f"{where}: family {family}: expected 4 or 6")
        valid_protocols = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP if family == 4 else IPPROTO_ICMPV6)
        if protocol not in valid_protocols:
            raise SnapshotError(f"{where}: protocol {protocol}: expected one of {valid_protocols} for IPv{family}")
        if protocol == IPPROTO_TCP:
            if not STATE_SYN_SENT <= state <= STATE_CLOSE:
                raise SnapshotError(f"{where}: state {state}: expected a TCP state, {STATE_SYN_SENT} to {STATE_CLOSE}")
        elif state != STATE_UNREPLIED and state != STATE_REPLIED:
            raise SnapshotError(f"{where}: state {state}: expected {STATE_UNREPLIED} or {STATE_REPLIED}")
        if record[3] & ~7:
            raise SnapshotError(f"{where}: flags 0x{record[3]:02x}: expected only bits 0 to 2")
        if (record[3] & FLAG_FIN_OUTBOUND) and (record[3] & FLAG_FIN_INBOUND):
            raise SnapshotError(f"{where}: flags 0x{record[3]:02x}: both FIN directions marked first")
        if load16(record + 10) != 0:
            raise SnapshotError(f"{where}: reserved bytes 10-11 are not zero")
        if family == 4:
            for offset in (16, 32, 48):
                if any(record[offset + 4:offset + 16]):
                    raise SnapshotError(f"{where}: IPv4 address at bytes {offset}-{offset + 15} "
                                        "has non-zero padding after its 4 bytes")
        return 0
