# cython: boundscheck=False, wraparound=False, cdivision=True
"""The gateway datapath: NFQUEUE batches through the classifier and the SNAT table.

Packets queued from PREROUTING are replies to an egress IP: translated back to the pod
before routing (a rewrite to the pod's address after routing would be delivered
locally). Packets queued from POSTROUTING are pods' packets to policy destinations:
classified, and for this gateway's own rules translated to the egress IP after
routing (the kernel drops a packet whose source is one of its own addresses before
routing, as spoofed). See docs/nfqueue.md for the rules that queue them.
"""

from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from egresscore.core.checksum cimport fold, load16, store16, sum_words
from egresscore.core.classifier cimport A_DROP, A_PASS, A_REDIRECT, A_SNAT
from egresscore.core.kernel_conntrack cimport KernelConntrack
from egresscore.core.snat_table cimport FlowKey
from egresscore.core.packet cimport (
    NO_OFFSET,
    PARSE_OK,
    VERDICT_NOT_OURS,
    VERDICT_TRANSLATED,
    PacketView,
    parse_packet,
)
from egresscore.includes.libnetfilter_queue cimport (
    NF_ACCEPT,
    NF_DROP,
    NF_INET_POST_ROUTING,
    NF_INET_PRE_ROUTING,
    NFQA_SKB_CSUMNOTREADY,
    NFQA_SKB_GSO,
)
from egresscore.includes.netinet cimport IPPROTO_TCP
from egresscore.includes.sockets cimport CLOCK_MONOTONIC, EINTR, clock_gettime, timespec

from egresscore.core.nfqueue import kernel_error

__all__ = ["GatewayDatapath", "OUTCOME_NAMES"]

OUTCOME_NAMES = (
    "outbound_translated",
    "outbound_passed",
    "outbound_policy_drop",
    "outbound_misdirected",
    "outbound_snat_drop",
    "inbound_translated",
    "inbound_not_ours",
    "inbound_snat_drop",
    "truncated",
    "other_hook",
    "checksum_finished",
    "not_ip",
    "tcp_handed_to_kernel",
    "tcp_passed",
    "tcp_handover_failed",
    "tcp_released",
    "local_pod_redirected",
    "tunnel_disagreement",
    "node_disagreement",
)

cdef enum:
    # Pairs classified per batch: the queue's batch size is at most 1024, doubled for
    # a datagram holding more than one packet.
    MAX_PAIRS = 2048
    NO_EGRESS = 0xFFFF
    # A TCP flow's first packet is copied here to allocate its egress port without
    # touching the packet itself (a SYN, possibly with Fast Open data).
    SCRATCH = 2048
    EEXIST_ERRNO = 17


# The code of a packet that was not classified (not IPv4/IPv6, or not outbound).
cdef uint32_t NO_CODE = 0xFFFFFFFF


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint32_t load32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef class GatewayDatapath:
    """Runs a gateway's NFQUEUE: ``GatewayDatapath(queue, table, classifier,
    egress_of_gateway, *, mark=None)``.

    ``egress_of_gateway[g]`` is the index in ``table.egress_ips`` of the egress IP of
    the classifier's gateway ``g``, or None when gateway ``g`` is another node. A
    packet the classifier sends to SNAT through a gateway that is not ours is dropped
    and counted as misdirected; a PASS is accepted as it is; DROP and REDIRECT are
    dropped (on a gateway, a redirect means the sender and this node disagree about
    the policy: fail closed). ``mark`` is set on every translated packet.

    With ``kernel`` (a :class:`~egresscore.core.kernel_conntrack.KernelConntrack`), TCP
    packets queued from PREROUTING are the first packets of flows (the rules queue SYNs
    before conntrack): the egress port is allocated in the table and the flow handed to
    the kernel's conntrack with that source NAT; the kernel translates the rest. A TCP
    first packet the policy passes is accepted with ``pass_mark`` set.

    ``tunnel_ifindex``: the tunnel's interface index. A packet that arrived through it
    was sent here by a node whose policies chose this gateway; unless this gateway's
    classifier translates it too (SNAT), the two disagree (a policy file one of them has
    not reloaded yet) and the packet is dropped: passed, it could only leave
    untranslated (``tunnel_disagreement``).

    ``node_mask``, ``node_pass`` and ``node_flag`` (role ``both``: the node role runs beside
    the gateway and decides this host's own pods' flows, with those mark bits): a local
    pod's TCP first packet that the classifier passes or redirects is accepted without
    ``pass_mark``, the node's decision and the rules' guard deciding; a local pod's
    packet queued after routing carries the node's decision in its mark, and one whose
    decision differs from the classifier's (the two roles' workers change policy
    generations at different moments) is dropped (``node_disagreement``).
    """

    def __cinit__(self):
        self.egress_of_gateway = NULL

    def __init__(self, NfQueue queue not None, SnatTable table not None, Classifier classifier not None,
                 egress_of_gateway, *, mark=None, KernelConntrack kernel=None, pass_mark=0, tunnel_ifindex=None,
                 node_mask=0, node_pass=0, node_flag=0):
        if mark is not None and not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {mark}: expected a 32-bit unsigned value")
        if not 0 <= pass_mark <= 0xFFFFFFFF:
            raise ValueError(f"pass_mark {pass_mark}: expected a 32-bit unsigned value")
        if tunnel_ifindex is not None and not 0 < tunnel_ifindex <= 0xFFFFFFFF:
            raise ValueError(f"tunnel_ifindex {tunnel_ifindex!r}: expected None or an interface index")
        for name, value in (("node_mask", node_mask), ("node_pass", node_pass), ("node_flag", node_flag)):
            if not 0 <= value <= 0xFFFFFFFF or value & ~node_mask:
                raise ValueError(f"{name} {value!r}: expected a 32-bit value inside node_mask")
        if node_mask and (not node_pass or not node_flag):
            raise ValueError("node_mask needs node_pass and node_flag")
        self.queue = queue
        self.set_policy(classifier, egress_of_gateway, table)
        self.set_mark = mark is not None
        self.mark = mark or 0
        self.kernel = kernel
        self.kernel_on = kernel is not None
        self.pass_mark = pass_mark
        self.tunnel_on = tunnel_ifindex is not None
        self.tunnel_ifindex = tunnel_ifindex or 0
        self.node_decides = node_mask != 0
        self.node_mask = node_mask
        self.node_pass = node_pass
        self.node_flag = node_flag

    def set_policy(self, Classifier classifier not None, egress_of_gateway, SnatTable table=None):
        """Classify with ``classifier`` from the next batch on (a policy reload), with its
        ``egress_of_gateway``; with ``table``, translate in that table from then on (a
        table rebuilt for a changed set of egress IPs). Checked before anything changes."""
        cdef Py_ssize_t g
        cdef uint16_t *mapping
        if table is None:
            table = self.table
        if table is None:
            raise ValueError("a SNAT table is required")
        gateways = list(egress_of_gateway)
        if len(gateways) != len(classifier.gateways):
            raise ValueError(f"egress_of_gateway has {len(gateways)} items: expected one per classifier "
                             f"gateway ({len(classifier.gateways)})")
        egress_count = len(table.egress_ips)
        for g, index in enumerate(gateways):
            if index is not None and not 0 <= index < egress_count:
                raise ValueError(f"egress_of_gateway[{g}]={index!r}: expected None or an index below "
                                 f"{egress_count} (the table's egress IPs)")
        mapping = <uint16_t *>calloc(max(1, len(gateways)), sizeof(uint16_t))
        if mapping == NULL:
            raise MemoryError()
        for g, index in enumerate(gateways):
            mapping[g] = NO_EGRESS if index is None else <uint16_t>index
        free(self.egress_of_gateway)
        self.egress_of_gateway = mapping
        self.gateway_count = len(gateways)
        self.table = table
        self.classifier = classifier

    def __dealloc__(self):
        free(self.egress_of_gateway)

    cdef uint8_t finish_partial_checksum(self, QueuedPacket *p) noexcept nogil:
        # The kernel marks a packet whose payload a verdict replaced as CHECKSUM_NONE, so
        # a CHECKSUM_PARTIAL packet's L4 field (the pseudo-header sum, already updated
        # for the new address) must become the full checksum here. GSO super-packets are
        # exempt: segmentation writes every segment's checksum from scratch.
        cdef PacketView view
        cdef uint16_t check
        if parse_packet(p.data, p.length, &view) != PARSE_OK:
            return 0
        if not view.pseudo_header or view.l4_checksum_offset == NO_OFFSET:
            return 0
        check = <uint16_t>~fold(sum_words(p.data + view.l4_offset, view.end - view.l4_offset))
        if view.udp and check == 0:
            check = 0xFFFF      # RFC 768: a computed zero is sent as all ones
        store16(p.data + view.l4_checksum_offset, check)
        return 1

    cdef void hand_over(self, uint32_t index, QueuedPacket *p, uint32_t code, double now) noexcept nogil:
        # The first packet of a TCP flow, queued before conntrack. SNAT here: the table
        # allocates the egress port (on a copy of the packet), the kernel gets the flow's
        # conntrack entry with that source NAT, and the packet goes on untouched: the
        # kernel finds the entry and translates it, and every packet after it.
        cdef uint8_t scratch[SCRATCH]
        cdef uint32_t offsets[2]
        cdef uint32_t action = code & 0xF
        cdef uint32_t gateway
        cdef uint16_t egress
        cdef uint8_t result, zero = 0
        cdef uint32_t header
        cdef int error
        cdef uint64_t created
        cdef FlowKey key
        if action != A_SNAT and self.tunnel_on and p.indev == self.tunnel_ifindex:
            self.outcomes[O_TUNNEL_DISAGREEMENT] += 1
            self.queue.verdict_packet(index, NF_DROP, False, 0, False)
            return
        if self.node_decides and (action == A_PASS or action == A_REDIRECT):
            # A local pod's flow: the node role's decision, saved on the connection, and the
            # guard rule say whether it may go (no pass mark: the node may disagree).
            self.outcomes[O_TCP_PASSED if action == A_PASS else O_LOCAL_REDIRECT] += 1
            return
        if action == A_PASS:
            # Accepted with the pass mark: the rules save it on the connection, so that the
            # kernel's later packets of this flow are known not to need a translation.
            self.outcomes[O_TCP_PASSED] += 1
            self.queue.verdict_packet(index, NF_ACCEPT, True, self.pass_mark, False)
            return
        gateway = (code >> 8) - 1
        egress = NO_EGRESS
        if action == A_SNAT and gateway < <uint32_t>self.gateway_count:
            egress = self.egress_of_gateway[gateway]
        if egress == NO_EGRESS:
            self.outcomes[O_OUT_POLICY_DROP if action != A_SNAT else O_OUT_MISDIRECTED] += 1
            self.queue.verdict_packet(index, NF_DROP, False, 0, False)
            return
        header = (p.data[0] & 0x0F) * 4
        if p.length > SCRATCH or p.wire_length > p.length or p.length < header + 20:
            self.outcomes[O_TRUNCATED] += 1
            self.queue.verdict_packet(index, NF_DROP, False, 0, False)
            return
        memcpy(scratch, p.data, p.length)
        offsets[0] = 0
        offsets[1] = p.length
        created = self.table.created
        self.table.translate_run(False, scratch, offsets, 1, &egress, 0, &zero, 0, &result, now)
        if result != VERDICT_TRANSLATED:
            self.outcomes[O_OUT_SNAT_DROP] += 1
            self.queue.verdict_packet(index, NF_DROP, False, 0, False)
            return
        error = self.kernel.create_tcp_snat(load32(p.data + 12), load32(p.data + 16), load16(p.data + header),
                                            load16(p.data + header + 2), load32(scratch + 12),
                                            load16(scratch + header), self.table.created == created)
        if error != 0 and error != EEXIST_ERRNO:
            # Not handed over: never let it out untranslated.
            self.outcomes[O_TCP_HANDOVER_FAILED] += 1
            self.queue.verdict_packet(index, NF_DROP, False, 0, False)
            return
        memset(&key, 0, sizeof(FlowKey))
        memcpy(key.a, p.data + 12, 4)
        memcpy(key.b, p.data + 16, 4)
        key.port_a = load16(p.data + header)
        key.port_b = load16(p.data + header + 2)
        key.protocol = IPPROTO_TCP
        key.family = 4
        self.table.hold_flow(&key, now)
        self.outcomes[O_TCP_HANDED] += 1
        # Accepted with the batch verdict, unchanged.

    def follow_kernel(self):
        """Free the egress ports of flows whose kernel conntrack entries ended (their
        destroy events); returns how many. Nothing to do without ``kernel``."""
        cdef Py_ssize_t n, i
        cdef Py_ssize_t freed = 0
        if not self.kernel_on:
            return 0
        with nogil:
            n = self.kernel.collect_destroyed()
            for i in range(n):
                if self.kernel.should_release(&self.kernel.destroyed.keys[i]):
                    freed += self.table.release_flow(&self.kernel.destroyed.keys[i])
            self.outcomes[O_TCP_RELEASED] += freed
        return freed

    cdef Py_ssize_t run_batch(self, bint wait) noexcept nogil:
        cdef Py_ssize_t n = self.queue.receive_batch(wait)
        cdef Py_ssize_t i, count4 = 0, count6 = 0
        cdef uint32_t pairs4[2 * MAX_PAIRS]
        cdef uint8_t pairs6[32 * 64]
        cdef uint32_t codes4[MAX_PAIRS]
        cdef uint32_t codes6[64]
        cdef uint32_t code[MAX_PAIRS]
        cdef uint16_t slot4[MAX_PAIRS]
        cdef QueuedPacket *p
        cdef uint32_t offsets[2]
        cdef uint8_t partial, result, version
        cdef uint16_t egress, zero = 0
        cdef uint32_t action, gateway, node
        cdef double now, started
        cdef Py_ssize_t j
        if n <= 0:
            return n
        started = monotonic()
        now = started
        # Classify every outbound IPv4 packet of the batch in one staged call; IPv6 in
        # groups of 64 (rare on today's egress paths).
        for i in range(n):
            p = &self.queue.packets[i]
            code[i] = NO_CODE
            if p.length < 1:
                continue
            if p.hook != NF_INET_POST_ROUTING and not (
                    self.kernel_on and p.hook == NF_INET_PRE_ROUTING and p.length >= 20 and p.data[9] == IPPROTO_TCP):
                continue
            version = p.data[0] >> 4
            if version == 4 and p.length >= 20:
                pairs4[2 * count4] = load32(p.data + 12)
                pairs4[2 * count4 + 1] = load32(p.data + 16)
                slot4[count4] = <uint16_t>i
                count4 += 1
            elif version == 6 and p.length >= 40:
                for j in range(32):
                    pairs6[32 * count6 + j] = p.data[8 + j]
                slot4[MAX_PAIRS - 1 - count6] = <uint16_t>i
                count6 += 1
                if count6 == 64:
                    self.classifier.classify_batch(NULL, pairs6, count6, codes6)
                    for j in range(count6):
                        code[slot4[MAX_PAIRS - 1 - j]] = codes6[j]
                    count6 = 0
        if count4:
            self.classifier.classify_batch(pairs4, NULL, count4, codes4)
            for j in range(count4):
                code[slot4[j]] = codes4[j]
        if count6:
            self.classifier.classify_batch(NULL, pairs6, count6, codes6)
            for j in range(count6):
                code[slot4[MAX_PAIRS - 1 - j]] = codes6[j]

        for i in range(n):
            p = &self.queue.packets[i]
            partial = 1 if p.skb_info & NFQA_SKB_CSUMNOTREADY else 0
            offsets[0] = 0
            offsets[1] = p.length
            if p.hook == NF_INET_PRE_ROUTING and code[i] != NO_CODE:
                self.hand_over(<uint32_t>i, p, code[i], now)
            elif p.hook == NF_INET_PRE_ROUTING:
                if p.wire_length > p.length:
                    self.outcomes[O_TRUNCATED] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                    continue
                self.table.translate_run(True, p.data, offsets, 1, &zero, 0, &partial, 0, &result, now)
                if result == VERDICT_TRANSLATED:
                    self.outcomes[O_IN_TRANSLATED] += 1
                    if partial and not (p.skb_info & NFQA_SKB_GSO):
                        self.outcomes[O_CHECKSUM_FINISHED] += self.finish_partial_checksum(p)
                    self.queue.verdict_packet(<uint32_t>i, NF_ACCEPT, self.set_mark, self.mark, True)
                elif result == VERDICT_NOT_OURS:
                    # Addressed to the egress IP but no flow of ours (a ping to the
                    # gateway itself, a late packet): the local stack answers it.
                    self.outcomes[O_IN_NOT_OURS] += 1
                else:
                    self.outcomes[O_IN_SNAT_DROP] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
            elif p.hook == NF_INET_POST_ROUTING:
                if code[i] == NO_CODE:
                    # Not IP (or too short to be): nothing a policy could select.
                    self.outcomes[O_NOT_IP] += 1
                    continue
                action = code[i] & 0xF
                if action != A_SNAT and self.tunnel_on and p.indev == self.tunnel_ifindex:
                    self.outcomes[O_TUNNEL_DISAGREEMENT] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                    continue
                if self.node_decides and not (self.tunnel_on and p.indev == self.tunnel_ifindex):
                    # A local pod's packet, after the node role's decision (in its mark):
                    # both must agree, or it goes nowhere.
                    node = p.mark & self.node_mask
                    if ((action == A_PASS and node != self.node_pass)
                            or (action == A_REDIRECT and not node & self.node_flag)
                            or (action == A_SNAT and node & self.node_flag)):
                        self.outcomes[O_NODE_DISAGREEMENT] += 1
                        self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                        continue
                    if action == A_REDIRECT:
                        # A local pod's flow that the node role routes to another gateway.
                        self.outcomes[O_LOCAL_REDIRECT] += 1
                        continue
                if action == A_PASS:
                    self.outcomes[O_OUT_PASSED] += 1
                    continue
                if action != A_SNAT:
                    self.outcomes[O_OUT_POLICY_DROP] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                    continue
                gateway = (code[i] >> 8) - 1
                egress = self.egress_of_gateway[gateway] if gateway < <uint32_t>self.gateway_count else NO_EGRESS
                if egress == NO_EGRESS:
                    self.outcomes[O_OUT_MISDIRECTED] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                    continue
                if p.wire_length > p.length:
                    self.outcomes[O_TRUNCATED] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
                    continue
                self.table.translate_run(False, p.data, offsets, 1, &egress, 0, &partial, 0, &result, now)
                if result == VERDICT_TRANSLATED:
                    self.outcomes[O_OUT_TRANSLATED] += 1
                    if partial and not (p.skb_info & NFQA_SKB_GSO):
                        self.outcomes[O_CHECKSUM_FINISHED] += self.finish_partial_checksum(p)
                    self.queue.verdict_packet(<uint32_t>i, NF_ACCEPT, self.set_mark, self.mark, True)
                else:
                    # Never out untranslated: a selected pod's packet that cannot be
                    # translated (table full, ports exhausted, malformed) is dropped.
                    self.outcomes[O_OUT_SNAT_DROP] += 1
                    self.queue.verdict_packet(<uint32_t>i, NF_DROP, False, 0, False)
            else:
                self.outcomes[O_OTHER_HOOK] += 1
        # Everything not answered above is accepted as it is, in one batch verdict.
        self.queue.answer_rest(NF_ACCEPT)
        self.queue.flush_verdicts()
        self.busy_ns += <uint64_t>((monotonic() - started) * 1e9)
        return n

    def process(self, double seconds):
        """Receive and answer batches for about ``seconds`` (without the GIL); returns the
        number of packets handled. Returns early when a signal interrupts the receive,
        so that the caller's signal handlers run."""
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
        how many. Used when stopping, before the queue is closed."""
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
        """Outcome counters of this datapath and its queue's counters, in one dict."""
        result = {name: self.outcomes[k] for k, name in enumerate(OUTCOME_NAMES)}
        result["busy_seconds"] = self.busy_ns / 1e9
        result.update({f"queue_{key}": value for key, value in self.queue.counters().items()})
        if self.kernel is not None:
            result.update(self.kernel.counters())
        return result
