# cython: boundscheck=False, wraparound=False, cdivision=True
"""The node datapath: one decision per flow, carried by the packet's mark.

The node's rules queue the first packet of a local pod's flow to a policy destination
(a packet whose connection carries no decision bits in its connmark yet). Here it is
classified and answered: accepted with the decision in the mark bits the agent owns
(``mask``), which the kernel saves on the connection so that the flow's later packets
never reach user space, or dropped (fail closed: a selected pod with no usable gateway
never leaves with the node's address). An ``ip rule`` per gateway routes the marked
packets into the tunnel towards it (egresscore/agent/node.py; docs/agent.md).
"""

import ipaddress

from libc.stdlib cimport calloc, free

from egresscore.core.classifier cimport (
    A_DROP,
    A_PASS,
    A_REDIRECT,
    A_SNAT,
    R_NO_GATEWAY,
    R_NOT_AN_ENDPOINT,
)
from egresscore.includes.libnetfilter_queue cimport NF_ACCEPT, NF_DROP
from egresscore.includes.sockets cimport CLOCK_MONOTONIC, EINTR, clock_gettime, timespec

from egresscore.core.nfqueue import kernel_error

__all__ = ["NodeDatapath", "NodeDecisions", "OUTCOME_NAMES"]

OUTCOME_NAMES = (
    "passed",
    "redirected",
    "local",
    "rule_drop",
    "no_gateway_drop",
    "no_tunnel_drop",
    "unknown_source_drop",
    "not_here_drop",
    "family_drop",
    "malformed_drop",
)

cdef enum:
    # Pairs classified per batch (the queue's batch size is at most 1024).
    MAX_PAIRS = 1024
    V6_GROUP = 64

cdef uint32_t NO_CODE = 0xFFFFFFFF


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint32_t load32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


def _family_of(address):
    if isinstance(address, (bytes, bytearray)):
        return 4 if len(address) == 4 else 6
    return ipaddress.ip_address(address).version


cdef class NodeDecisions:
    """``NodeDecisions(classifier, gateway_marks, *, mask, pass_value, local_value=None,
    drop_unknown=True, ipv6=False)``: what each decision of ``classifier`` does on this node.

    - ``gateway_marks[g]``: the mark value (inside ``mask``) that routes into the tunnel
      towards the classifier's gateway ``g``, or None when there is no tunnel to it:
      its flows are then dropped.
    - ``pass_value``: the mark value of a flow that goes its normal way (saved on the
      connection like any decision, so that its later packets skip the queue).
    - ``local_value``: the mark value of a flow whose gateway is this node (role
      ``both``); None: this node translates nothing, and such flows are dropped.
    - ``drop_unknown``: a source that is no known endpoint (a pod the inventory does not
      list yet) is dropped, not passed, and its decision is not saved, so its next
      packet is decided again once the inventory knows it.
    - ``ipv6``: IPv6 flows may be redirected; when False (the gateway role translates
      IPv4 only so far) an IPv6 flow a policy sends to a gateway is dropped.

    Immutable; a policy reload builds a new one (:meth:`NodeDatapath.set_decisions`).
    """

    def __cinit__(self):
        self.gateway_marks = NULL

    def __init__(self, Classifier classifier not None, gateway_marks, *, mask, pass_value, local_value=None,
                 bint drop_unknown=True, bint ipv6=False):
        cdef Py_ssize_t g
        marks = list(gateway_marks)
        if len(marks) != len(classifier.gateways):
            raise ValueError(f"gateway_marks has {len(marks)} items: expected one per classifier gateway "
                             f"({len(classifier.gateways)})")
        if not 0 < mask <= 0xFFFFFFFF:
            raise ValueError(f"mask {mask!r}: expected a non-zero 32-bit value")
        reserved = {}
        for name, value in (("pass_value", pass_value), ("local_value", local_value)):
            if value is None:
                continue
            if not 0 < value <= 0xFFFFFFFF or value & ~mask:
                raise ValueError(f"{name} {value:#x}: expected a non-zero value inside the mask {mask:#x}")
            if value in reserved:
                raise ValueError(f"{name} {value:#x} is also {reserved[value]}: expected distinct values")
            reserved[value] = name
        if pass_value is None:
            raise ValueError("pass_value is required")
        free(self.gateway_marks)
        self.gateway_marks = <uint32_t *>calloc(max(1, len(marks)), sizeof(uint32_t))
        if self.gateway_marks == NULL:
            raise MemoryError()
        for g, value in enumerate(marks):
            if value is None:
                self.gateway_marks[g] = NO_TUNNEL
                continue
            if not 0 < value <= 0xFFFFFFFF or value & ~mask:
                raise ValueError(f"gateway_marks[{g}]={value!r}: expected None or a non-zero value inside the "
                                 f"mask {mask:#x}")
            if value in reserved:
                raise ValueError(f"gateway_marks[{g}]={value:#x} is also {reserved[value]}: expected a value "
                                 "of its own")
            self.gateway_marks[g] = <uint32_t>value
        self.classifier = classifier
        self.gateway_count = len(marks)
        self.mask = mask
        self.pass_value = pass_value
        self.local_gateway = local_value is not None
        self.local_value = local_value or 0
        self.drop_unknown = drop_unknown
        self.redirect_ipv6 = ipv6

    def __dealloc__(self):
        free(self.gateway_marks)

    @property
    def gateway_marks(self):
        """The mark value of each classifier gateway's tunnel (None: no tunnel)."""
        return tuple(None if self.gateway_marks[g] == NO_TUNNEL else self.gateway_marks[g]
                     for g in range(self.gateway_count))

    cdef uint32_t verdict_for(self, uint32_t code, uint8_t family, uint32_t *mark_value,
                              uint32_t *outcome) noexcept nogil:
        cdef uint32_t action = code & 0xF
        cdef uint32_t reason = (code >> 4) & 0xF
        cdef uint32_t gateway
        mark_value[0] = 0
        if action == A_PASS:
            if reason == R_NOT_AN_ENDPOINT and self.drop_unknown:
                outcome[0] = N_UNKNOWN_SOURCE_DROP
                return NF_DROP
            mark_value[0] = self.pass_value
            outcome[0] = N_PASSED
            return NF_ACCEPT
        if action == A_REDIRECT or action == A_SNAT:
            if family == 6 and not self.redirect_ipv6:
                outcome[0] = N_FAMILY_DROP
                return NF_DROP
            if action == A_SNAT:
                if not self.local_gateway:
                    outcome[0] = N_NOT_HERE_DROP
                    return NF_DROP
                mark_value[0] = self.local_value
                outcome[0] = N_LOCAL
                return NF_ACCEPT
            gateway = (code >> 8) - 1
            if gateway >= <uint32_t>self.gateway_count or self.gateway_marks[gateway] == NO_TUNNEL:
                outcome[0] = N_NO_TUNNEL_DROP
                return NF_DROP
            mark_value[0] = self.gateway_marks[gateway]
            outcome[0] = N_REDIRECTED
            return NF_ACCEPT
        if action == A_DROP:
            outcome[0] = N_NO_GATEWAY_DROP if reason == R_NO_GATEWAY else N_RULE_DROP
            return NF_DROP
        outcome[0] = N_MALFORMED_DROP
        return NF_DROP

    def decide(self, source, destination):
        """``(accept, mark_value, outcome)`` for a packet from ``source`` to
        ``destination``: whether it is accepted, the mark value its flow gets (None
        when dropped) and the outcome counter it adds to (a name of OUTCOME_NAMES)."""
        cdef uint32_t value = 0, outcome = 0, verdict
        code, _unit = self.classifier.classify_code(source, destination)
        family = _family_of(source)
        if family != _family_of(destination):
            raise ValueError(f"{source!r} and {destination!r}: expected addresses of one family")
        verdict = self.verdict_for(<uint32_t>code, <uint8_t>family, &value, &outcome)
        accepted = verdict == NF_ACCEPT
        return accepted, (value if accepted else None), OUTCOME_NAMES[outcome]


cdef class NodeDatapath:
    """Runs a node's NFQUEUE: ``NodeDatapath(queue, decisions)``.

    Every queued packet gets exactly one verdict: accepted with its mark's ``mask``
    bits replaced by the decision's value (the other bits are kept: they belong to
    other programs), or dropped. A packet too short to be classified is dropped.
    """

    def __init__(self, NfQueue queue not None, NodeDecisions decisions not None):
        self.queue = queue
        self.decisions = decisions

    def set_decisions(self, NodeDecisions decisions not None):
        """Decide with ``decisions`` from the next batch on (a policy reload). Flows
        decided already keep their decision: it lives on their connections."""
        self.decisions = decisions

    cdef Py_ssize_t run_batch(self, bint wait) noexcept nogil:
        cdef Py_ssize_t n = self.queue.receive_batch(wait)
        cdef Py_ssize_t i, j, count4 = 0, count6 = 0
        cdef uint32_t pairs4[2 * MAX_PAIRS]
        cdef uint8_t pairs6[32 * V6_GROUP]
        cdef uint32_t codes4[MAX_PAIRS]
        cdef uint32_t codes6[V6_GROUP]
        cdef uint32_t code[MAX_PAIRS]
        cdef uint8_t family[MAX_PAIRS]
        cdef uint16_t slot[MAX_PAIRS]
        cdef uint16_t slot6[V6_GROUP]
        cdef QueuedPacket *p
        cdef uint8_t version
        cdef uint32_t verdict, value, outcome, mark
        cdef double started
        if n <= 0:
            return n
        if n > MAX_PAIRS:
            n = MAX_PAIRS  # cannot happen: batch_size is at most 1024; the rest would be dropped
        started = monotonic()
        for i in range(n):
            p = &self.queue.packets[i]
            code[i] = NO_CODE
            family[i] = 0
            if p.length < 1:
                continue
            version = p.data[0] >> 4
            if version == 4 and p.length >= 20 and (p.data[0] & 0x0F) >= 5:
                pairs4[2 * count4] = load32(p.data + 12)
                pairs4[2 * count4 + 1] = load32(p.data + 16)
                slot[count4] = <uint16_t>i
                family[i] = 4
                count4 += 1
            elif version == 6 and p.length >= 40:
                for j in range(32):
                    pairs6[32 * count6 + j] = p.data[8 + j]
                slot6[count6] = <uint16_t>i
                family[i] = 6
                count6 += 1
                if count6 == V6_GROUP:
                    self.decisions.classifier.classify_batch(NULL, pairs6, count6, codes6)
                    for j in range(count6):
                        code[slot6[j]] = codes6[j]
                    count6 = 0
        if count4:
            self.decisions.classifier.classify_batch(pairs4, NULL, count4, codes4)
            for j in range(count4):
                code[slot[j]] = codes4[j]
        if count6:
            self.decisions.classifier.classify_batch(NULL, pairs6, count6, codes6)
            for j in range(count6):
                code[slot6[j]] = codes6[j]
        for i in range(n):
            p = &self.queue.packets[i]
            if code[i] == NO_CODE:
                self.outcomes[N_MALFORMED_DROP] += 1
                self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                continue
            verdict = self.decisions.verdict_for(code[i], family[i], &value, &outcome)
            self.outcomes[outcome] += 1
            if verdict == NF_ACCEPT:
                mark = (p.mark & ~self.decisions.mask) | value
                self.queue.verdict_packet(<uint32_t>i, NF_ACCEPT, True, mark, False)
            else:
                self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
        # Every packet was answered above; a packet beyond MAX_PAIRS (impossible) is dropped.
        self.queue.answer_rest(NF_DROP)
        self.queue.flush_verdicts()
        self.batches += 1
        self.busy_ns += <uint64_t>((monotonic() - started) * 1e9)
        return n

    def process(self, double seconds):
        """Receive and answer batches for about ``seconds`` (without the GIL); returns
        the number of packets handled. Returns early when a signal interrupts the
        receive, so that the caller's signal handlers run."""
        cdef double deadline
        cdef Py_ssize_t n
        cdef Py_ssize_t total = 0
        cdef int error = 0
        with nogil:
            deadline = monotonic() + seconds
            while True:
                n = self.run_batch(True)
                if n < 0:
                    error = <int>-n
                    break
                total += n
                if monotonic() >= deadline:
                    break
        if error and error != EINTR:
            raise kernel_error(self.queue.number, error, "receive packets")
        return total

    def drain(self):
        """Answer every packet already waiting in the socket, without blocking; returns
        how many (used when stopping, before the queue is closed)."""
        cdef Py_ssize_t n
        cdef Py_ssize_t total = 0
        with nogil:
            while True:
                n = self.run_batch(False)
                if n <= 0:
                    break
                total += n
        return total

    def counters(self):
        """Outcome counters, the busy time and the queue's counters, in one dict."""
        result = {name: self.outcomes[k] for k, name in enumerate(OUTCOME_NAMES)}
        result["batches"] = self.batches
        result["busy_seconds"] = self.busy_ns / 1e9
        result.update({f"queue_{key}": value for key, value in self.queue.counters().items()})
        return result
