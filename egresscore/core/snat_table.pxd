# The SNAT connection-tracking table (docs/snat.md): flows keyed both ways in two chained
# hash tables over one entry array, expiry kept in per-timeout lists, all in C memory.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.packet cimport PacketView, VERDICT_COUNT
from egresscore.includes.libc_extra cimport pthread_mutex_t

cdef enum:
    # "No entry": an index never allocated (max_entries is at most 2**31).
    NIL = 0xFFFFFFFF
    # Entries live in chunks of 2**17 (10 MiB: exactly five 2 MiB huge pages) so the
    # array grows without moving a live entry.
    CHUNK_SHIFT = 17
    CHUNK_SIZE = 131072
    # One expiry list per timeout: TCP's eight states, UDP and ICMP unreplied/replied.
    TIMER_CLASSES = 12
    # Port exhaustion counters: (egress, remote address) pairs remembered, then "overflow".
    EXHAUSTION_SLOTS = 1024

# SnatState values (docs/snat.md; the snapshot format stores them).
cdef enum:
    STATE_SYN_SENT = 1
    STATE_SYN_RECV = 2
    STATE_ESTABLISHED = 3
    STATE_FIN_WAIT = 4
    STATE_CLOSE_WAIT = 5
    STATE_LAST_ACK = 6
    STATE_TIME_WAIT = 7
    STATE_CLOSE = 8
    STATE_UNREPLIED = 9
    STATE_REPLIED = 10

# Entry flags. The FIN bits record the direction of the first FIN; the snapshot stores
# the low three bits as they are.
cdef enum:
    FLAG_REPLIED = 1
    FLAG_FIN_OUTBOUND = 2
    FLAG_FIN_INBOUND = 4
    FLAG_IN_USE = 128

# Timer classes; the first eight are the TCP states in order.
cdef enum:
    TIMER_TCP_SYN_SENT = 0
    TIMER_UDP_UNREPLIED = 8
    TIMER_UDP_REPLIED = 9
    TIMER_ICMP_UNREPLIED = 10
    TIMER_ICMP_REPLIED = 11

ctypedef struct FlowEntry:
    # 80 bytes. expires is the truth; queued_expires is the expiry the entry had when it
    # was put at the tail of its timer list, so a list is ordered by queued_expires and a
    # refresh only writes expires (no list move, no neighbour touched per packet).
    double expires
    double queued_expires
    uint8_t pod_address[16]         # IPv4: 4 bytes then zeros
    uint8_t remote_address[16]
    uint32_t original_next          # chain in the original-direction hash table
    uint32_t reply_next             # chain in the reply-direction hash table
    uint32_t timer_prev
    uint32_t timer_next             # also the free list's link
    uint16_t pod_port
    uint16_t remote_port
    uint16_t egress_port
    uint16_t egress_index
    uint8_t protocol
    uint8_t family
    uint8_t state
    uint8_t flags
    uint8_t timer_class
    uint8_t reserved[3]

ctypedef struct FlowKey:
    # (protocol, address a, port a, address b, port b): original direction a = pod,
    # b = remote; reply direction a = remote, b = egress.
    uint8_t a[16]
    uint8_t b[16]
    uint16_t port_a
    uint16_t port_b
    uint8_t protocol
    uint8_t family

ctypedef struct PreparedPacket:
    # A packet parsed and hashed ahead of its translation, so that a batch can prefetch
    # the hash bucket and the entry of the next packets while it translates this one.
    PacketView view
    FlowKey key
    uint64_t hash
    uint8_t status      # PARSE_OK, or the verdict already decided

ctypedef struct EgressAddress:
    uint8_t address[16]
    uint8_t family
    uint64_t entries

ctypedef struct ExhaustionSlot:
    uint8_t remote[16]
    uint64_t count
    uint16_t egress_index
    uint8_t family
    uint8_t used


cimport cython


# final: methods are called directly (no vtable), so the C compiler can inline them.
@cython.final
cdef class SnatTable:
    cdef FlowEntry **chunks
    cdef uint32_t chunk_count
    cdef uint32_t capacity          # max_entries
    cdef uint32_t high_water        # indices below this have been handed out once
    cdef uint32_t free_head
    cdef uint32_t count
    cdef uint32_t *original_buckets
    cdef uint32_t *reply_buckets
    cdef uint64_t bucket_mask
    cdef uint64_t seed
    cdef uint64_t random_state
    cdef uint32_t timer_head[TIMER_CLASSES]
    cdef uint32_t timer_tail[TIMER_CLASSES]
    # queued_expires of each list's head (+inf when empty): the reclaim check per packet
    # reads this array, not the entries.
    cdef double timer_due[TIMER_CLASSES]
    cdef double timeout[TIMER_CLASSES]
    cdef EgressAddress *egress
    cdef uint16_t egress_count
    cdef uint16_t port_low
    cdef uint16_t port_high
    cdef uint32_t max_port_probes
    cdef uint32_t reclaim_budget
    cdef double clock
    cdef uint64_t verdicts[2][VERDICT_COUNT]
    cdef uint64_t created
    cdef uint64_t expired
    cdef uint64_t evicted
    cdef uint64_t restore_skipped
    cdef uint64_t exhaustion_overflow
    cdef ExhaustionSlot *exhaustion
    cdef pthread_mutex_t lock
    cdef bint lock_ready
    cdef tuple egress_objects
    cdef dict egress_cache
    cdef uint64_t touched

    cdef FlowEntry *entry(self, uint32_t index) noexcept nogil
    cdef bint matches_original(self, const FlowEntry *e, const FlowKey *key) noexcept nogil
    cdef bint matches_reply(self, const FlowEntry *e, const FlowKey *key) noexcept nogil
    cdef uint32_t find_original(self, const FlowKey *key, uint64_t h) noexcept nogil
    cdef uint32_t find_reply(self, const FlowKey *key, uint64_t h) noexcept nogil
    cdef void original_key(self, const FlowEntry *e, FlowKey *key) noexcept nogil
    cdef void reply_key(self, const FlowEntry *e, FlowKey *key) noexcept nogil
    cdef void unlink_chain(self, uint32_t *buckets, uint64_t h, uint32_t index, bint reply) noexcept nogil
    cdef void timer_unlink(self, uint32_t index, FlowEntry *e) noexcept nogil
    cdef void timer_append(self, uint32_t index, FlowEntry *e, uint8_t c) noexcept nogil
    cdef void refresh(self, uint32_t index, FlowEntry *e, double now) noexcept nogil
    cdef void free_entry(self, uint32_t index) noexcept nogil
    cdef uint32_t allocate_entry(self) noexcept nogil
    cdef bint live_or_free(self, uint32_t index, double now) noexcept nogil
    cdef uint32_t reclaim(self, double now, uint64_t budget) noexcept nogil
    cdef uint32_t reclaim_scan(self, double now, uint64_t budget) noexcept nogil
    cdef bint make_room(self, double now) noexcept nogil
    cdef bint reply_tuple_free(self, FlowKey *reply, uint16_t port, uint64_t *h, double now) noexcept nogil
    cdef void count_exhaustion(self, const FlowKey *original, uint16_t egress_index) noexcept nogil
    cdef uint8_t open_flow(self, const FlowKey *original, uint64_t original_hash, uint16_t egress_index,
                           const PacketView *view, double now, uint32_t *out) noexcept nogil
    cdef double advance_clock(self, double now) noexcept nogil
    cdef uint16_t egress_index_of(self, object egress_ip) except? 0xFFFF
    cdef void translate_run(self, bint inbound, uint8_t *base, const uint32_t *offsets, Py_ssize_t n,
                            const uint16_t *index_of, Py_ssize_t index_stride,
                            const uint8_t *partial_of, Py_ssize_t partial_stride,
                            uint8_t *out, double now) noexcept nogil
    cdef uint8_t translate_one(self, bint inbound, object packet, uint16_t egress_index, bint partial,
                               double now) except 0xFF
    cdef object translate_many(self, bint inbound, object buffer, object offsets, object egress_ip,
                               object egress_indices, object checksum_partial, object verdicts, double now)
    cdef Py_ssize_t check_batch(self, uint8_t[::1] buffer, const uint32_t[::1] offsets,
                                object checksum_partial, object verdicts) except -1
    cdef object entry_object(self, const FlowEntry *e)
    cdef int key_from_python(self, FlowKey *key, object protocol, object a, object port_a, object b,
                             object port_b) except -1
    cdef uint16_t find_egress(self, uint8_t family, const uint8_t *address) noexcept nogil
    cdef int check_record(self, const uint8_t *record, uint64_t r) except -1
    cdef void prepare_outbound(self, const uint8_t *data, uint32_t length, uint16_t egress_index,
                               PreparedPacket *p) noexcept nogil
    cdef uint8_t finish_outbound(self, uint8_t *data, PreparedPacket *p, uint16_t egress_index,
                                 bint partial, double now) noexcept nogil
    cdef void prepare_inbound(self, const uint8_t *data, uint32_t length, PreparedPacket *p) noexcept nogil
    cdef uint8_t finish_inbound(self, uint8_t *data, PreparedPacket *p, bint partial, double now) noexcept nogil
    cdef void prefetch_buckets(self, PreparedPacket *group, Py_ssize_t count, bint reply) noexcept nogil
    cdef bint hold_flow(self, const FlowKey *original, double now) noexcept nogil
    cdef bint release_flow(self, const FlowKey *original) noexcept nogil
