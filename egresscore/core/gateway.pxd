# The gateway's per-packet work on an NFQUEUE batch (docs/nfqueue.md, "The gateway
# datapath"): classify outbound packets, translate both directions in the SNAT table,
# finish partial checksums, and answer every packet exactly once.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.classifier cimport Classifier
from egresscore.core.kernel_conntrack cimport KernelConntrack
from egresscore.core.nfqueue cimport NfQueue, QueuedPacket
from egresscore.core.snat_table cimport SnatTable

cdef enum:
    # Outcome counters of GatewayDatapath (the names are in gateway.pyx).
    O_OUT_TRANSLATED = 0
    O_OUT_PASSED = 1
    O_OUT_POLICY_DROP = 2
    O_OUT_MISDIRECTED = 3
    O_OUT_SNAT_DROP = 4
    O_IN_TRANSLATED = 5
    O_IN_NOT_OURS = 6
    O_IN_SNAT_DROP = 7
    O_TRUNCATED = 8
    O_OTHER_HOOK = 9
    O_CHECKSUM_FINISHED = 10
    O_NOT_IP = 11
    O_TCP_HANDED = 12
    O_TCP_PASSED = 13
    O_TCP_HANDOVER_FAILED = 14
    O_TCP_RELEASED = 15
    O_LOCAL_REDIRECT = 16
    O_TUNNEL_DISAGREEMENT = 17
    O_NODE_DISAGREEMENT = 18
    OUTCOME_COUNT = 19


cdef class GatewayDatapath:
    cdef readonly NfQueue queue
    cdef readonly SnatTable table
    cdef readonly Classifier classifier
    cdef readonly KernelConntrack kernel
    cdef bint kernel_on
    cdef uint32_t pass_mark
    cdef bint tunnel_on
    cdef uint32_t tunnel_ifindex
    cdef bint node_decides
    cdef uint32_t node_mask
    cdef uint32_t node_pass
    cdef uint32_t node_flag
    cdef uint16_t *egress_of_gateway
    cdef Py_ssize_t gateway_count
    cdef bint set_mark
    cdef uint32_t mark
    cdef uint64_t outcomes[OUTCOME_COUNT]
    cdef uint64_t busy_ns

    cdef Py_ssize_t run_batch(self, bint wait) noexcept nogil
    cdef uint8_t finish_partial_checksum(self, QueuedPacket *p) noexcept nogil
    cdef void hand_over(self, uint32_t index, QueuedPacket *p, uint32_t code, double now) noexcept nogil
