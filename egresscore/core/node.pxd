# The node's per-flow decision on an NFQUEUE batch (docs/nfqueue.md, "The node
# datapath"): classify each queued first packet of a local pod's flow, answer it with a
# verdict whose mark carries the decision (pass, a gateway's tunnel, this node's own
# gateway), or drop it (fail closed).
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.classifier cimport Classifier
from egresscore.core.nfqueue cimport NfQueue, QueuedPacket

cdef enum:
    # Outcome counters of NodeDecisions (the names are in node.pyx, OUTCOME_NAMES).
    N_PASSED = 0
    N_REDIRECTED = 1
    N_LOCAL = 2
    N_RULE_DROP = 3
    N_NO_GATEWAY_DROP = 4
    N_NO_TUNNEL_DROP = 5
    N_UNKNOWN_SOURCE_DROP = 6
    N_NOT_HERE_DROP = 7
    N_FAMILY_DROP = 8
    N_MALFORMED_DROP = 9
    NODE_OUTCOME_COUNT = 10
    # A gateway without a tunnel (no slot, no endpoint): its flows are dropped.
    NO_TUNNEL = 0xFFFFFFFF


cdef class NodeDecisions:
    # What a classifier code means on this node: the mark value of each gateway's
    # tunnel, the pass and local values, and which decisions drop.
    cdef readonly Classifier classifier
    cdef uint32_t *gateway_marks
    cdef Py_ssize_t gateway_count
    cdef readonly uint32_t mask
    cdef readonly uint32_t pass_value
    cdef readonly uint32_t local_value
    cdef readonly bint local_gateway
    cdef readonly bint drop_unknown
    cdef readonly bint redirect_ipv6

    # NF_ACCEPT or NF_DROP for a packet of `family` whose classifier code is `code`;
    # the decision's mark value (inside `mask`) in mark_value, the outcome in outcome.
    cdef uint32_t verdict_for(self, uint32_t code, uint8_t family, uint32_t *mark_value,
                              uint32_t *outcome) noexcept nogil


cdef class NodeDatapath:
    cdef readonly NfQueue queue
    cdef readonly NodeDecisions decisions
    cdef uint64_t outcomes[NODE_OUTCOME_COUNT]
    cdef uint64_t busy_ns
    cdef uint64_t batches

    cdef Py_ssize_t run_batch(self, bint wait) noexcept nogil
