# The kernel's conntrack through ctnetlink (docs/nfqueue.md, "TCP through the kernel"):
# entries created with an explicit source NAT, and the destroy events of those entries.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.snat_table cimport FlowKey
from egresscore.includes.libnetfilter_conntrack cimport nf_conntrack, nfct_handle


ctypedef struct DestroyedFlows:
    # Filled by the destroy-event callback: original tuples of our entries that ended.
    FlowKey *keys
    uint32_t count
    uint32_t capacity
    uint32_t mark            # our entries carry this conntrack mark bit
    uint64_t overflow        # events that did not fit (the next collect picks up the rest)
    uint64_t events
    bint growable            # a dump grows the array; the event collector does not


ctypedef struct ExpectedDestroy:
    # A slot of the direct-mapped table of destroy events this gateway caused itself
    # (a closing entry it replaced); count 0 is an empty slot.
    FlowKey key
    uint32_t count


cdef enum:
    EXPECTED_SLOTS = 65536


ctypedef struct QueryResult:
    # Filled by the callback of a GET on the query socket.
    int found
    uint8_t tcp_state


cdef class KernelConntrack:
    cdef nfct_handle *queries
    cdef nfct_handle *events
    cdef nf_conntrack *entry
    cdef readonly uint32_t mark
    cdef readonly uint32_t syn_timeout
    cdef DestroyedFlows destroyed
    cdef DestroyedFlows dumped
    cdef QueryResult found
    cdef uint64_t c_replaced
    cdef uint64_t c_event_losses
    cdef ExpectedDestroy *expected
    cdef uint64_t c_expected_evictions
    cdef uint64_t c_expected_consumed
    cdef bint lost_events
    cdef uint64_t c_still_alive
    cdef uint64_t c_created
    cdef uint64_t c_existed
    cdef uint64_t c_failed
    cdef uint64_t c_released
    cdef int last_errno

    cdef int create_tcp_snat(self, uint32_t source, uint32_t destination, uint16_t source_port,
                             uint16_t destination_port, uint32_t egress, uint16_t egress_port,
                             bint replace) noexcept nogil
    cdef Py_ssize_t collect_destroyed(self) noexcept nogil
    cdef Py_ssize_t dump_ours(self) noexcept nogil
    cdef void set_tuple(self, uint32_t source, uint32_t destination, uint16_t source_port,
                        uint16_t destination_port) noexcept nogil
    cdef int lookup_tcp_state(self) noexcept nogil
    cdef bint flow_alive(self, const FlowKey *key) noexcept nogil
    cdef void expect_destroy(self, const FlowKey *key) noexcept nogil
    cdef bint should_release(self, const FlowKey *key) noexcept nogil
