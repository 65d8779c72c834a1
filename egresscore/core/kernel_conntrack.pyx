# cython: boundscheck=False, wraparound=False, cdivision=True
"""The kernel's conntrack as the executor of TCP translations (docs/nfqueue.md).

For a TCP flow's first packet the gateway allocates the egress port in its SnatTable,
then creates the kernel's conntrack entry for the flow with that explicit source NAT
(ctnetlink, ``NFCT_Q_CREATE``). The kernel translates every later packet of the flow,
both ways, at its own speed. The entries carry the gateway's conntrack mark bit, and
their destroy events tell the gateway when to free the egress port again.
"""

from libc.errno cimport errno
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

from egresscore.includes.libc_extra cimport htonl, ntohl
from egresscore.includes.libnetfilter_conntrack cimport (
    ATTR_MARK,
    ATTR_ORIG_IPV4_DST,
    ATTR_ORIG_IPV4_SRC,
    ATTR_ORIG_L3PROTO,
    ATTR_ORIG_L4PROTO,
    ATTR_ORIG_PORT_DST,
    ATTR_ORIG_PORT_SRC,
    ATTR_REPL_IPV4_DST,
    ATTR_REPL_L3PROTO,
    ATTR_REPL_L4PROTO,
    ATTR_REPL_IPV4_SRC,
    ATTR_REPL_PORT_DST,
    ATTR_REPL_PORT_SRC,
    ATTR_SNAT_IPV4,
    ATTR_SNAT_PORT,
    ATTR_TCP_STATE,
    ATTR_TIMEOUT,
    CONNTRACK,
    F_GETFL,
    F_SETFL,
    NF_NETLINK_CONNTRACK_DESTROY,
    NFCT_CB_CONTINUE,
    NFCT_Q_CREATE,
    NFCT_Q_DESTROY,
    NFCT_Q_DUMP,
    NFCT_Q_GET,
    NFCT_T_ALL,
    NFCT_T_DESTROY,
    TCP_CONNTRACK_FIN_WAIT,
    O_NONBLOCK,
    TCP_CONNTRACK_SYN_SENT,
    fcntl,
    nf_conntrack,
    nf_conntrack_msg_type,
    nfct_callback_register,
    nfct_catch,
    nfct_close,
    nfct_destroy,
    nfct_fd,
    nfct_get_attr_u8,
    nfct_get_attr_u16,
    nfct_get_attr_u32,
    nfct_new,
    nfct_open,
    nfct_query,
    nfct_set_attr_u8,
    nfct_set_attr_u16,
    nfct_set_attr_u32,
)
from egresscore.includes.libc_extra cimport AF_INET
from egresscore.includes.sockets cimport ENOBUFS, SO_RCVBUF, SO_RCVBUFFORCE, SOL_SOCKET, setsockopt
from egresscore.includes.netinet cimport IPPROTO_TCP

import ipaddress
import os

from egresscore.errors import KernelError

__all__ = ["KernelConntrack"]

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t value)
    uint16_t c_ntohs "ntohs"(uint16_t value)


cdef inline uint32_t slot_of(const FlowKey *key) noexcept nogil:
    cdef uint32_t a, b
    cdef uint64_t h
    memcpy(&a, key.a, 4)
    memcpy(&b, key.b, 4)
    h = ((<uint64_t>a << 32) | b) ^ ((<uint64_t>key.port_a << 16) | key.port_b) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h *= 0xBF58476D1CE4E5B9ULL
    h ^= h >> 32
    return <uint32_t>(h & (EXPECTED_SLOTS - 1))


cdef bint grow(DestroyedFlows *out) noexcept nogil:
    cdef uint32_t capacity = out.capacity * 2 if out.capacity else 1024
    cdef FlowKey *keys = <FlowKey *>realloc(out.keys, <size_t>capacity * sizeof(FlowKey))
    if keys == NULL:
        return False
    out.keys = keys
    out.capacity = capacity
    return True


cdef int on_destroy(nf_conntrack_msg_type kind, nf_conntrack *ct, void *data) noexcept nogil:
    cdef DestroyedFlows *out = <DestroyedFlows *>data
    cdef FlowKey *key
    cdef uint32_t address
    out.events += 1
    if (nfct_get_attr_u32(ct, ATTR_MARK) & out.mark) == 0:
        return NFCT_CB_CONTINUE
    if nfct_get_attr_u8(ct, ATTR_ORIG_L3PROTO) != AF_INET or nfct_get_attr_u8(ct, ATTR_ORIG_L4PROTO) != IPPROTO_TCP:
        return NFCT_CB_CONTINUE
    if out.count == out.capacity:
        if not out.growable or not grow(out):
            out.overflow += 1
            return NFCT_CB_CONTINUE
    key = &out.keys[out.count]
    out.count += 1
    memset(key, 0, sizeof(FlowKey))
    address = nfct_get_attr_u32(ct, ATTR_ORIG_IPV4_SRC)     # network order, as in a packet
    memcpy(key.a, &address, 4)
    address = nfct_get_attr_u32(ct, ATTR_ORIG_IPV4_DST)
    memcpy(key.b, &address, 4)
    key.port_a = c_ntohs(nfct_get_attr_u16(ct, ATTR_ORIG_PORT_SRC))
    key.port_b = c_ntohs(nfct_get_attr_u16(ct, ATTR_ORIG_PORT_DST))
    key.protocol = IPPROTO_TCP
    key.family = 4
    return NFCT_CB_CONTINUE


cdef int on_found(nf_conntrack_msg_type kind, nf_conntrack *ct, void *data) noexcept nogil:
    cdef QueryResult *out = <QueryResult *>data
    out.found = 1
    out.tcp_state = nfct_get_attr_u8(ct, ATTR_TCP_STATE)
    return NFCT_CB_CONTINUE


cdef class KernelConntrack:
    """ctnetlink for the gateway: ``KernelConntrack(*, mark, syn_timeout=120, events=True)``.

    ``mark`` is the conntrack mark bit every entry it creates carries (and by which its
    destroy events are recognised). Raises :class:`~egresscore.errors.KernelError` if
    the kernel refuses the netlink sockets (no ``nf_conntrack_netlink``, no privilege).
    """

    def __cinit__(self):
        self.queries = NULL
        self.events = NULL
        self.entry = NULL
        self.destroyed.keys = NULL
        self.dumped.keys = NULL
        self.expected = NULL

    def __init__(self, *, mark, int syn_timeout=120, bint events=True, int capacity=65536,
                 int event_buffer=32 * 1024 * 1024):
        cdef int flags
        cdef int buffer = event_buffer
        if not 0 < mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {mark!r}: expected a non-zero 32-bit value")
        if not 1 <= syn_timeout <= 3600:
            raise ValueError(f"syn_timeout={syn_timeout}: expected 1 to 3600 seconds")
        self.mark = mark
        self.syn_timeout = syn_timeout
        self.destroyed.mark = mark
        self.dumped.mark = mark
        self.dumped.growable = True
        self.destroyed.capacity = capacity
        self.destroyed.keys = <FlowKey *>realloc(NULL, capacity * sizeof(FlowKey))
        self.entry = nfct_new()
        self.expected = <ExpectedDestroy *>calloc(EXPECTED_SLOTS, sizeof(ExpectedDestroy))
        if self.destroyed.keys == NULL or self.entry == NULL or self.expected == NULL:
            raise MemoryError()
        self.queries = nfct_open(CONNTRACK, 0)
        if self.queries == NULL:
            raise KernelError(errno, f"cannot open a ctnetlink socket: {os.strerror(errno)}")
        nfct_callback_register(self.queries, NFCT_T_ALL, on_found, &self.found)
        if events:
            self.events = nfct_open(CONNTRACK, NF_NETLINK_CONNTRACK_DESTROY)
            if self.events == NULL:
                raise KernelError(errno, f"cannot subscribe to conntrack destroy events: {os.strerror(errno)}")
            flags = fcntl(nfct_fd(self.events), F_GETFL)
            fcntl(nfct_fd(self.events), F_SETFL, flags | O_NONBLOCK)
            # Room for bursts of closing connections between two reads (root can go past
            # net.core.rmem_max). An overflow loses events: see resync.
            if setsockopt(nfct_fd(self.events), SOL_SOCKET, SO_RCVBUFFORCE, &buffer, sizeof(int)) < 0:
                setsockopt(nfct_fd(self.events), SOL_SOCKET, SO_RCVBUF, &buffer, sizeof(int))
            nfct_callback_register(self.events, NFCT_T_DESTROY, on_destroy, &self.destroyed)

    def __dealloc__(self):
        if self.queries != NULL:
            nfct_close(self.queries)
        if self.events != NULL:
            nfct_close(self.events)
        if self.entry != NULL:
            nfct_destroy(self.entry)
        free(self.destroyed.keys)
        free(self.dumped.keys)
        free(self.expected)

    cdef void set_tuple(self, uint32_t source, uint32_t destination, uint16_t source_port,
                        uint16_t destination_port) noexcept nogil:
        # The original tuple, and its plain inverse as the reply tuple (host order in).
        cdef nf_conntrack *ct = self.entry
        nfct_set_attr_u8(ct, ATTR_ORIG_L3PROTO, AF_INET)
        nfct_set_attr_u8(ct, ATTR_ORIG_L4PROTO, IPPROTO_TCP)
        nfct_set_attr_u32(ct, ATTR_ORIG_IPV4_SRC, htonl(source))
        nfct_set_attr_u32(ct, ATTR_ORIG_IPV4_DST, htonl(destination))
        nfct_set_attr_u16(ct, ATTR_ORIG_PORT_SRC, htons(source_port))
        nfct_set_attr_u16(ct, ATTR_ORIG_PORT_DST, htons(destination_port))
        nfct_set_attr_u8(ct, ATTR_REPL_L3PROTO, AF_INET)
        nfct_set_attr_u8(ct, ATTR_REPL_L4PROTO, IPPROTO_TCP)
        nfct_set_attr_u32(ct, ATTR_REPL_IPV4_SRC, htonl(destination))
        nfct_set_attr_u32(ct, ATTR_REPL_IPV4_DST, htonl(source))
        nfct_set_attr_u16(ct, ATTR_REPL_PORT_SRC, htons(destination_port))
        nfct_set_attr_u16(ct, ATTR_REPL_PORT_DST, htons(source_port))

    cdef int lookup_tcp_state(self) noexcept nogil:
        # The TCP state of the kernel's entry for the tuple in self.entry, or -1 if none.
        self.found.found = 0
        if nfct_query(self.queries, NFCT_Q_GET, self.entry) != 0 or not self.found.found:
            return -1
        return self.found.tcp_state

    cdef int create_tcp_snat(self, uint32_t source, uint32_t destination, uint16_t source_port,
                             uint16_t destination_port, uint32_t egress, uint16_t egress_port,
                             bint replace) noexcept nogil:
        # Addresses and ports in host order. Returns 0, or the errno of the refusal
        # (EEXIST: the flow has its live entry already, as for a retransmitted SYN). The
        # kernel's NAT setup rewrites the reply tuple to the egress address and port, and
        # refuses if that tuple is taken. With `replace` (the SNAT table knew this tuple
        # already: a client reusing its port, or a SYN sent again), whatever entry the
        # kernel has for the tuple is removed first: a closing one would otherwise be
        # replaced by the kernel with an entry without our NAT, and one in SYN_SENT is
        # the same flow with the same NAT, recreated.
        cdef nf_conntrack *ct = self.entry
        cdef int attempt, state
        cdef FlowKey key
        cdef uint32_t network
        if replace:
            self.set_tuple(source, destination, source_port, destination_port)
            if nfct_query(self.queries, NFCT_Q_DESTROY, ct) == 0:
                self.c_replaced += 1
                memset(&key, 0, sizeof(FlowKey))
                network = htonl(source)
                memcpy(key.a, &network, 4)
                network = htonl(destination)
                memcpy(key.b, &network, 4)
                key.port_a = source_port
                key.port_b = destination_port
                key.protocol = IPPROTO_TCP
                key.family = 4
                self.expect_destroy(&key)
        for attempt in range(3):
            self.set_tuple(source, destination, source_port, destination_port)
            nfct_set_attr_u32(ct, ATTR_SNAT_IPV4, htonl(egress))
            nfct_set_attr_u16(ct, ATTR_SNAT_PORT, htons(egress_port))
            nfct_set_attr_u8(ct, ATTR_TCP_STATE, TCP_CONNTRACK_SYN_SENT)
            nfct_set_attr_u32(ct, ATTR_TIMEOUT, self.syn_timeout)
            nfct_set_attr_u32(ct, ATTR_MARK, self.mark)
            if nfct_query(self.queries, NFCT_Q_CREATE, ct) == 0:
                self.c_created += 1
                return 0
            if errno == 11:
                continue    # EAGAIN: the kernel loaded its NAT module for this request
            if errno != 17:
                break
            # EEXIST. A SYN on a closing entry of the same tuple (the client reused its
            # port) would make the kernel replace that entry with one without our NAT:
            # replace it here instead. Otherwise this is a retransmitted SYN of a flow
            # we handed over already.
            self.set_tuple(source, destination, source_port, destination_port)
            state = self.lookup_tcp_state()
            if state < TCP_CONNTRACK_FIN_WAIT:
                self.c_existed += 1
                return 17
            if nfct_query(self.queries, NFCT_Q_DESTROY, ct) != 0 and errno != 2:
                break
            self.c_replaced += 1
            memset(&key, 0, sizeof(FlowKey))
            network = htonl(source)
            memcpy(key.a, &network, 4)
            network = htonl(destination)
            memcpy(key.b, &network, 4)
            key.port_a = source_port
            key.port_b = destination_port
            key.protocol = IPPROTO_TCP
            key.family = 4
            self.expect_destroy(&key)
        self.last_errno = errno
        self.c_failed += 1
        return errno if errno != 0 else 5

    cdef void expect_destroy(self, const FlowKey *key) noexcept nogil:
        # The destroy event of the entry just replaced will come: it must not free the
        # table entry, which the new connection of the same tuple goes on using.
        cdef ExpectedDestroy *slot = &self.expected[slot_of(key)]
        if slot.count and memcmp(&slot.key, key, sizeof(FlowKey)) == 0:
            slot.count += 1
            return
        if slot.count:
            self.c_expected_evictions += 1
        slot.key = key[0]
        slot.count = 1

    cdef bint should_release(self, const FlowKey *key) noexcept nogil:
        # Whether a destroy event for this tuple frees its table entry: not when it is one
        # we caused (replace); when an expectation was ever evicted, ask the kernel.
        cdef ExpectedDestroy *slot = &self.expected[slot_of(key)]
        if slot.count and memcmp(&slot.key, key, sizeof(FlowKey)) == 0:
            slot.count -= 1
            self.c_expected_consumed += 1
            return False
        if self.c_expected_evictions:
            return not self.flow_alive(key)
        return True

    cdef bint flow_alive(self, const FlowKey *key) noexcept nogil:
        # Whether the kernel has an entry for this original tuple now (a destroy event
        # may be about an entry that a newer one of the same tuple has replaced).
        cdef uint32_t source, destination
        memcpy(&source, key.a, 4)
        memcpy(&destination, key.b, 4)
        self.set_tuple(ntohl(source), ntohl(destination), key.port_a, key.port_b)
        if self.lookup_tcp_state() >= 0:
            self.c_still_alive += 1
            return True
        return False

    cdef Py_ssize_t collect_destroyed(self) noexcept nogil:
        # Reads every destroy event waiting on the socket into self.destroyed (the
        # socket is non-blocking: nfct_catch returns once it is empty).
        self.destroyed.count = 0
        if self.events == NULL:
            return 0
        if nfct_catch(self.events) < 0 and errno == ENOBUFS:
            # The kernel dropped events the socket had no room for: some entries ended
            # unseen. The owner finds them with a resync (a dump of our entries).
            self.c_event_losses += 1
            self.lost_events = True
        return self.destroyed.count

    cdef Py_ssize_t dump_ours(self) noexcept nogil:
        # Every live entry carrying our mark, into self.dumped; -1 if the dump failed.
        cdef uint32_t family = AF_INET
        self.dumped.count = 0
        self.dumped.overflow = 0
        nfct_callback_register(self.queries, NFCT_T_ALL, on_destroy, &self.dumped)
        if nfct_query(self.queries, NFCT_Q_DUMP, &family) != 0 or self.dumped.overflow:
            nfct_callback_register(self.queries, NFCT_T_ALL, on_found, &self.found)
            return -1
        nfct_callback_register(self.queries, NFCT_T_ALL, on_found, &self.found)
        return self.dumped.count

    def create_snat(self, source, destination, int source_port, int destination_port, egress, int egress_port):
        """Create the entry of a TCP flow with source NAT to ``egress:egress_port``
        (IPv4). Returns 0 or the errno of the kernel's refusal."""
        cdef uint32_t s = int(ipaddress.IPv4Address(source))
        cdef uint32_t d = int(ipaddress.IPv4Address(destination))
        cdef uint32_t e = int(ipaddress.IPv4Address(egress))
        cdef int result
        with nogil:
            result = self.create_tcp_snat(s, d, <uint16_t>source_port, <uint16_t>destination_port, e,
                                          <uint16_t>egress_port, False)
        return result

    def live_flows(self):
        """Original tuples (pod, pod port, remote, remote port) of every live entry with our
        mark (a dump of the kernel's table)."""
        cdef Py_ssize_t n, i
        with nogil:
            n = self.dump_ours()
        if n < 0:
            raise KernelError(self.last_errno or 5, "cannot dump the kernel's conntrack table")
        result = set()
        for i in range(n):
            key = &self.dumped.keys[i]
            result.add((str(ipaddress.IPv4Address(bytes(key.a[:4]))), key.port_a,
                        str(ipaddress.IPv4Address(bytes(key.b[:4]))), key.port_b))
        return result

    @property
    def events_lost(self):
        """Whether destroy events were lost since the flag was last cleared."""
        return self.lost_events

    def clear_events_lost(self):
        self.lost_events = False

    def destroyed_flows(self):
        """Original tuples (pod, pod port, remote, remote port) of our entries whose
        destroy events arrived since the last call."""
        cdef Py_ssize_t n, i
        with nogil:
            n = self.collect_destroyed()
        result = []
        for i in range(n):
            key = &self.destroyed.keys[i]
            result.append((str(ipaddress.IPv4Address(bytes(key.a[:4]))), key.port_a,
                           str(ipaddress.IPv4Address(bytes(key.b[:4]))), key.port_b))
        return result

    def counters(self):
        return {
            "kernel_created": self.c_created,
            "kernel_existed": self.c_existed,
            "kernel_failed": self.c_failed,
            "kernel_released": self.c_released,
            "kernel_replaced_closing": self.c_replaced,
            "kernel_destroyed_but_alive": self.c_still_alive,
            "kernel_expected_destroys": self.c_expected_consumed,
            "kernel_expected_evictions": self.c_expected_evictions,
            "kernel_destroy_events": self.destroyed.events,
            "kernel_destroy_overflow": self.destroyed.overflow,
            "kernel_last_errno": self.last_errno,
            "kernel_event_losses": self.c_event_losses,
        }
