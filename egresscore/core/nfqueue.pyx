# cython: boundscheck=False, wraparound=False, cdivision=True
"""A binding to the kernel's NFQUEUE through libnetfilter_queue (docs/nfqueue.md).

One :class:`NfQueue` is one netlink socket bound to one queue number. Packets arrive
in batches (``recvmmsg`` into fixed slots, one packet a slot); verdicts are gathered
into one ``sendmsg`` a batch: rewritten packets each carry their payload, referenced
in place from the receive slot (no copy), and the packets left over share one
``NFQNL_MSG_VERDICT_BATCH`` message. The per-packet work of the gateway is done on
these structures in Cython without the GIL (egresscore/core/gateway.pyx); the Python
methods here are for tools, tests and programs that want a packet at a time.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport errno
from libc.stdint cimport int32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from egresscore.includes.libc_extra cimport htonl, ntohl, ntohs
from egresscore.includes.libmnl cimport (
    MNL_SOCKET_AUTOPID,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLMSG_ERROR,
    mnl_attr_get_payload,
    mnl_attr_get_payload_len,
    mnl_attr_get_u32,
    mnl_attr_put_u32,
    mnl_nlmsg_get_payload,
    mnl_nlmsg_get_payload_tail,
    mnl_nlmsg_next,
    mnl_nlmsg_ok,
    mnl_socket_bind,
    mnl_socket_close,
    mnl_socket_get_fd,
    mnl_socket_get_portid,
    mnl_socket_open,
    mnl_socket_recvfrom,
    mnl_socket_sendto,
    nlattr,
    nlmsgerr,
    nlmsghdr,
)
from egresscore.includes.libnetfilter_queue cimport (
    NF_ACCEPT,
    NF_DROP,
    NF_REPEAT,
    NFNL_SUBSYS_QUEUE,
    NFQA_CAP_LEN,
    NFQA_CFG_F_CONNTRACK,
    NFQA_CFG_F_FAIL_OPEN,
    NFQA_CFG_F_GSO,
    NFQA_CFG_FLAGS,
    NFQA_CFG_MASK,
    NFQA_CT_INFO,
    NFQA_IFINDEX_INDEV,
    NFQA_IFINDEX_OUTDEV,
    NFQA_MARK,
    NFQA_MAX,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_SKB_CSUMNOTREADY,
    NFQA_SKB_GSO,
    NFQA_SKB_INFO,
    NFQNL_CFG_CMD_BIND,
    NFQNL_CFG_CMD_UNBIND,
    NFQNL_COPY_PACKET,
    NFQNL_MSG_CONFIG,
    NFQNL_MSG_PACKET,
    NFQNL_MSG_VERDICT,
    NFQNL_MSG_VERDICT_BATCH,
    nfq_nlmsg_cfg_put_cmd,
    nfq_nlmsg_cfg_put_params,
    nfq_nlmsg_cfg_put_qmaxlen,
    nfq_nlmsg_parse,
    nfq_nlmsg_put,
    nfq_nlmsg_verdict_put,
    nfq_nlmsg_verdict_put_mark,
    nfqnl_msg_packet_hdr,
)
from egresscore.includes.sockets cimport (
    AF_NETLINK,
    EAGAIN,
    EINTR,
    ENOBUFS,
    MSG_DONTWAIT,
    MSG_TRUNC,
    MSG_WAITFORONE,
    SO_RCVBUF,
    SO_RCVBUFFORCE,
    SO_RCVTIMEO,
    SO_SNDBUF,
    SO_SNDBUFFORCE,
    SOL_SOCKET,
    UIO_MAXIOV,
    iovec,
    mmsghdr,
    msghdr,
    recvmmsg,
    sendmsg,
    setsockopt,
    sockaddr_nl,
    socklen_t,
    timeval,
)

import os
from typing import NamedTuple

from egresscore.errors import KernelError

__all__ = ["ACCEPT", "DROP", "REPEAT", "HOOK_NAMES", "MAX_COPY_RANGE", "NfQueue", "Packet"]

ACCEPT = NF_ACCEPT
DROP = NF_DROP
REPEAT = NF_REPEAT

# The kernel caps the copy range at 0xffff minus an attribute header (NFQNL_MAX_COPY_RANGE
# in net/netfilter/nfnetlink_queue.c); a 64 KB GSO packet of TCP fits below it.
MAX_COPY_RANGE = 0xFFFF - 4

HOOK_NAMES = {0: "PREROUTING", 1: "INPUT", 2: "FORWARD", 3: "OUTPUT", 4: "POSTROUTING"}

# A verdict for more than this many bytes of payloads is sent before the next is added:
# the kernel refuses a netlink message larger than the socket's send buffer.
cdef uint64_t SEND_LIMIT = 4 * 1024 * 1024
cdef int SEND_BUFFER = 16 * 1024 * 1024
cdef uint8_t ZEROS[4]


class Packet(NamedTuple):
    """A queued packet as a Python object (the per-packet API; copies the payload).

    ``payload`` is a bytearray the caller may change and hand back to
    :meth:`NfQueue.verdict`. ``checksum_partial`` means the L4 checksum field holds
    only the pseudo-header sum (CHECKSUM_PARTIAL, docs/nfqueue.md); ``gso`` means the
    packet is a GSO super-packet larger than the MTU.
    """

    id: int
    hook: int
    hw_protocol: int
    mark: int
    indev: int
    outdev: int
    ct_info: int | None
    wire_length: int
    checksum_partial: bool
    gso: bool
    payload: bytearray


def kernel_error(number, error, what):
    hint = ""
    if error == 1:
        # EPERM: no CAP_NET_ADMIN, or (nfqnl_recv_config) the queue is bound to another socket.
        hint = " (another socket holds this queue)" if os.geteuid() == 0 else " (CAP_NET_ADMIN is needed)"
    return KernelError(error, f"NFQUEUE {number}: cannot {what}: {os.strerror(error)}{hint}")


cdef inline uint32_t align4(uint32_t n) noexcept nogil:
    return (n + 3) & ~(<uint32_t>3)


cdef class NfQueue:
    """One NFQUEUE queue, bound for as long as this object is open.

    ``NfQueue(number, *, batch_size=64, copy_range=MAX_COPY_RANGE, max_length=4096,
    fail_open=False, gso=True, conntrack=False, receive_buffer=16 MiB, timeout=0.1)``

    - ``gso``: receive GSO super-packets whole (``NFQA_CFG_F_GSO``) instead of having the
      kernel segment them; their checksums may then be partial.
    - ``fail_open``: when the queue is full the kernel accepts packets instead of
      dropping them (``NFQA_CFG_F_FAIL_OPEN``). Off by default: for an egress gateway an
      accepted, untranslated packet is a leak.
    - ``conntrack``: ask for the connection's state (``NFQA_CT_INFO``) with each packet.
    - ``timeout``: how long a waiting receive blocks before it returns empty-handed.

    Raises :class:`~egresscore.errors.KernelError` when the kernel refuses the socket or
    the bind (``EPERM`` without CAP_NET_ADMIN, ``EBUSY`` when another socket holds the
    queue).
    """

    def __cinit__(self):
        self.socket = NULL
        self.fd = -1

    def __init__(self, int number, *, int batch_size=64, int copy_range=MAX_COPY_RANGE, int max_length=4096,
                 bint fail_open=False, bint gso=True, bint conntrack=False,
                 int receive_buffer=16 * 1024 * 1024, double timeout=0.1):
        cdef timeval tv
        cdef int i
        if not 0 <= number <= 65535:
            raise ValueError(f"queue number {number}: expected 0 to 65535")
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size={batch_size}: expected 1 to 1024")
        if not 0 < copy_range <= MAX_COPY_RANGE:
            raise ValueError(f"copy_range={copy_range}: expected 1 to {MAX_COPY_RANGE}")
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: expected at least 1 queued packet")
        if receive_buffer < 65536:
            raise ValueError(f"receive_buffer={receive_buffer}: expected at least 65536 bytes")
        if not 0.001 <= timeout <= 60:
            raise ValueError(f"timeout={timeout}: expected 0.001 to 60 seconds")
        if self.socket != NULL:
            raise RuntimeError("NfQueue.__init__ called twice")
        self.number = number
        self.batch_size = batch_size
        self.copy_range = copy_range
        self.max_length = max_length
        self.fail_open = fail_open
        self.gso = gso
        self.conntrack = conntrack
        self.slot_size = align4(copy_range + SLOT_HEADROOM)
        self.slots = <uint8_t *>malloc(<size_t>self.slot_size * batch_size)
        self.messages = <mmsghdr *>calloc(batch_size, sizeof(mmsghdr))
        self.receive_iov = <iovec *>calloc(batch_size, sizeof(iovec))
        # A datagram normally holds one packet; room for twice that keeps an odd one.
        self.packets = <QueuedPacket *>calloc(2 * batch_size, sizeof(QueuedPacket))
        self.answered_flags = <uint8_t *>calloc(2 * batch_size, 1)
        # Per packet at most one verdict message, plus one batch verdict.
        self.header_capacity = (2 * batch_size + 2) * VERDICT_HEADER_ROOM
        self.headers = <uint8_t *>calloc(self.header_capacity, 1)
        self.send_iov = <iovec *>calloc(UIO_MAXIOV, sizeof(iovec))
        if (self.slots == NULL or self.messages == NULL or self.receive_iov == NULL or self.packets == NULL
                or self.answered_flags == NULL or self.headers == NULL or self.send_iov == NULL):
            raise MemoryError(f"NfQueue {number}: cannot allocate {self.slot_size * batch_size} bytes of slots")
        for i in range(batch_size):
            self.receive_iov[i].iov_base = self.slots + <size_t>i * self.slot_size
            self.receive_iov[i].iov_len = self.slot_size
            self.messages[i].msg_hdr.msg_iov = &self.receive_iov[i]
            self.messages[i].msg_hdr.msg_iovlen = 1

        self.socket = mnl_socket_open(NETLINK_NETFILTER)
        if self.socket == NULL:
            raise self._kernel_error(errno, "open a netfilter netlink socket")
        if mnl_socket_bind(self.socket, 0, MNL_SOCKET_AUTOPID) < 0:
            error = errno
            self._close_socket()
            raise self._kernel_error(error, "bind the netlink socket")
        self.fd = mnl_socket_get_fd(self.socket)
        # Root may go past net.core.rmem_max with the FORCE options; otherwise the
        # kernel's ceiling applies and a burst larger than it costs ENOBUFS (counted).
        if setsockopt(self.fd, SOL_SOCKET, SO_RCVBUFFORCE, &receive_buffer, sizeof(int)) < 0:
            setsockopt(self.fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof(int))
        if setsockopt(self.fd, SOL_SOCKET, SO_SNDBUFFORCE, &SEND_BUFFER, sizeof(int)) < 0:
            setsockopt(self.fd, SOL_SOCKET, SO_SNDBUF, &SEND_BUFFER, sizeof(int))
        tv.tv_sec = <long>timeout
        tv.tv_usec = <long>((timeout - tv.tv_sec) * 1e6)
        setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(timeval))
        try:
            self.configure(NFQNL_CFG_CMD_BIND, True)
        except BaseException:
            self._close_socket()
            raise

    def __dealloc__(self):
        self._close_socket()
        free(self.slots)
        free(self.messages)
        free(self.receive_iov)
        free(self.packets)
        free(self.answered_flags)
        free(self.headers)
        free(self.send_iov)

    def _kernel_error(self, int error, str what):
        return kernel_error(self.number, error, what)

    def _close_socket(self):
        if self.socket != NULL:
            mnl_socket_close(self.socket)
            self.socket = NULL
            self.fd = -1

    cdef int send_config(self, uint8_t *buffer, uint32_t length) except -1:
        # Sent with NLM_F_ACK and answered before any packet can reach this socket: the
        # queue copies nothing until the parameters that follow the bind are applied.
        cdef uint8_t reply[8192]
        cdef ssize_t got
        cdef int remaining
        cdef nlmsghdr *nlh
        cdef nlmsgerr *err
        if mnl_socket_sendto(self.socket, buffer, length) < 0:
            raise self._kernel_error(errno, "send a configuration message")
        while True:
            got = mnl_socket_recvfrom(self.socket, reply, sizeof(reply))
            if got < 0:
                if errno == EINTR:
                    continue
                raise self._kernel_error(errno, "read the kernel's answer to a configuration message")
            remaining = <int>got
            nlh = <nlmsghdr *>reply
            while mnl_nlmsg_ok(nlh, remaining):
                if nlh.nlmsg_type == NLMSG_ERROR:
                    err = <nlmsgerr *>mnl_nlmsg_get_payload(nlh)
                    if err.error != 0:
                        raise self._kernel_error(-err.error, "configure the queue")
                    return 0
                nlh = mnl_nlmsg_next(nlh, &remaining)

    cdef int configure(self, uint8_t command, bint with_params) except -1:
        cdef uint8_t buffer[512]
        cdef nlmsghdr *nlh
        cdef uint32_t flags = 0
        cdef uint32_t mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO | NFQA_CFG_F_CONNTRACK
        memset(buffer, 0, sizeof(buffer))
        nlh = nfq_nlmsg_put(<char *>buffer, NFQNL_MSG_CONFIG, self.number)
        nfq_nlmsg_cfg_put_cmd(nlh, 2, command)   # the family is ignored by the kernel since 3.8
        nlh.nlmsg_flags |= NLM_F_ACK
        self.send_config(buffer, nlh.nlmsg_len)
        if not with_params:
            return 0
        memset(buffer, 0, sizeof(buffer))
        nlh = nfq_nlmsg_put(<char *>buffer, NFQNL_MSG_CONFIG, self.number)
        nfq_nlmsg_cfg_put_params(nlh, NFQNL_COPY_PACKET, self.copy_range)
        nfq_nlmsg_cfg_put_qmaxlen(nlh, self.max_length)
        if self.fail_open:
            flags |= NFQA_CFG_F_FAIL_OPEN
        if self.gso:
            flags |= NFQA_CFG_F_GSO
        if self.conntrack:
            flags |= NFQA_CFG_F_CONNTRACK
        mnl_attr_put_u32(nlh, NFQA_CFG_FLAGS, htonl(flags))
        mnl_attr_put_u32(nlh, NFQA_CFG_MASK, htonl(mask))
        nlh.nlmsg_flags |= NLM_F_ACK
        self.send_config(buffer, nlh.nlmsg_len)
        return 0

    # ---- the batch API (Cython, no GIL) ---------------------------------------------

    cdef Py_ssize_t receive_batch(self, bint wait) noexcept nogil:
        # Receives up to batch_size packets into self.packets; returns how many, or
        # -errno for an error the caller must see (EINTR: a signal to handle). ENOBUFS
        # (the socket overflowed and the kernel dropped packets it could not deliver) is
        # counted and survived: the packets delivered before and after are good.
        cdef int n, i
        cdef uint32_t k
        self.received = 0
        self.answered = 0
        if self.fd < 0:
            return -9
        n = recvmmsg(self.fd, self.messages, self.batch_size, MSG_WAITFORONE if wait else MSG_DONTWAIT, NULL)
        if n < 0:
            if errno == ENOBUFS:
                self.c_enobufs += 1
                return 0
            if errno == EAGAIN:     # also EWOULDBLOCK: the timeout passed with nothing queued
                return 0
            self.last_errno = errno
            return -errno
        for i in range(n):
            if self.messages[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.c_malformed += 1
            self.parse_message(<uint8_t *>self.receive_iov[i].iov_base, self.messages[i].msg_len)
            self.messages[i].msg_hdr.msg_flags = 0
        self.c_batches += 1
        for k in range(self.received):
            self.answered_flags[k] = 0
        return self.received

    cdef int parse_message(self, uint8_t *data, uint32_t length) noexcept nogil:
        cdef nlattr *attrs[NFQA_MAX + 1]
        cdef int remaining = <int>length
        cdef nlmsghdr *nlh = <nlmsghdr *>data
        cdef nlmsgerr *err
        cdef nfqnl_msg_packet_hdr *ph
        cdef QueuedPacket *p
        cdef uint32_t gap
        while mnl_nlmsg_ok(nlh, remaining):
            if nlh.nlmsg_type == NLMSG_ERROR:
                # A verdict the kernel refused (ENOENT: the packet was already gone).
                err = <nlmsgerr *>mnl_nlmsg_get_payload(nlh)
                if err.error != 0:
                    self.c_kernel_errors += 1
                    self.last_errno = -err.error
            elif nlh.nlmsg_type == ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET):
                memset(attrs, 0, sizeof(attrs))
                if nfq_nlmsg_parse(nlh, attrs) < 0 or attrs[NFQA_PACKET_HDR] == NULL:
                    # Without a packet id no verdict can be given; the kernel keeps the
                    # packet until the queue is unbound, then drops it.
                    self.c_malformed += 1
                elif self.received >= 2 * self.batch_size:
                    self.c_malformed += 1
                else:
                    ph = <nfqnl_msg_packet_hdr *>mnl_attr_get_payload(attrs[NFQA_PACKET_HDR])
                    p = &self.packets[self.received]
                    self.received += 1
                    p.id = ntohl(ph.packet_id)
                    p.hook = ph.hook
                    p.hw_protocol = ntohs(ph.hw_protocol)
                    if attrs[NFQA_PAYLOAD] != NULL:
                        p.data = <uint8_t *>mnl_attr_get_payload(attrs[NFQA_PAYLOAD])
                        p.length = mnl_attr_get_payload_len(attrs[NFQA_PAYLOAD])
                    else:
                        p.data = NULL
                        p.length = 0
                    p.wire_length = ntohl(mnl_attr_get_u32(attrs[NFQA_CAP_LEN])) if attrs[NFQA_CAP_LEN] != NULL \
                        else p.length
                    if p.wire_length > p.length:
                        self.c_truncated += 1
                    p.mark = ntohl(mnl_attr_get_u32(attrs[NFQA_MARK])) if attrs[NFQA_MARK] != NULL else 0
                    p.skb_info = ntohl(mnl_attr_get_u32(attrs[NFQA_SKB_INFO])) if attrs[NFQA_SKB_INFO] != NULL \
                        else 0
                    p.indev = ntohl(mnl_attr_get_u32(attrs[NFQA_IFINDEX_INDEV])) \
                        if attrs[NFQA_IFINDEX_INDEV] != NULL else 0
                    p.outdev = ntohl(mnl_attr_get_u32(attrs[NFQA_IFINDEX_OUTDEV])) \
                        if attrs[NFQA_IFINDEX_OUTDEV] != NULL else 0
                    p.ct_info = <uint8_t>ntohl(mnl_attr_get_u32(attrs[NFQA_CT_INFO])) \
                        if attrs[NFQA_CT_INFO] != NULL else NO_CT_INFO
                    # Ids are consecutive per queue; a gap is packets the kernel could not
                    # deliver (socket full) and dropped itself, or accepted with fail-open.
                    if self.have_last_id:
                        gap = p.id - self.last_id - 1
                        if <int32_t>gap >= 0:
                            self.c_lost += gap
                    self.last_id = p.id
                    self.have_last_id = True
                    self.c_packets += 1
            nlh = mnl_nlmsg_next(nlh, &remaining)
        return 0

    cdef int add_verdict(self, uint32_t id, uint32_t verdict, bint set_mark, uint32_t mark,
                         const uint8_t *payload, uint32_t length) noexcept nogil:
        cdef nlmsghdr *nlh
        cdef nlattr *attr
        cdef uint32_t header_length
        if (self.header_used + VERDICT_HEADER_ROOM > self.header_capacity
                or self.send_iov_count + 3 > UIO_MAXIOV
                or (payload != NULL and self.send_bytes + length > SEND_LIMIT)):
            if self.flush_verdicts() < 0:
                return -1
        nlh = nfq_nlmsg_put(<char *>(self.headers + self.header_used), NFQNL_MSG_VERDICT, self.number)
        nfq_nlmsg_verdict_put(nlh, <int>id, <int>verdict)
        if set_mark:
            nfq_nlmsg_verdict_put_mark(nlh, mark)
        if payload != NULL:
            # The payload attribute's header ends the header block; the bytes follow from
            # the receive slot through their own iovec, then padding to 4 bytes.
            attr = <nlattr *>mnl_nlmsg_get_payload_tail(nlh)
            attr.nla_type = NFQA_PAYLOAD
            attr.nla_len = <uint16_t>(4 + length) if 4 + length <= 0xFFFF else 0
            nlh.nlmsg_len = align4(nlh.nlmsg_len) + 4
        header_length = nlh.nlmsg_len
        self.send_iov[self.send_iov_count].iov_base = nlh
        self.send_iov[self.send_iov_count].iov_len = header_length
        self.send_iov_count += 1
        self.header_used += align4(header_length)
        self.send_bytes += header_length
        if payload != NULL:
            nlh.nlmsg_len = header_length + length
            self.send_iov[self.send_iov_count].iov_base = <void *>payload
            self.send_iov[self.send_iov_count].iov_len = length
            self.send_iov_count += 1
            if align4(length) != length:
                self.send_iov[self.send_iov_count].iov_base = ZEROS
                self.send_iov[self.send_iov_count].iov_len = align4(length) - length
                self.send_iov_count += 1
            self.send_bytes += align4(length)
            self.c_payload_verdicts += 1
        self.c_verdict_messages += 1
        return 0

    cdef int add_batch_verdict(self, uint32_t id, uint32_t verdict, bint set_mark, uint32_t mark) noexcept nogil:
        cdef nlmsghdr *nlh
        if self.header_used + VERDICT_HEADER_ROOM > self.header_capacity or self.send_iov_count + 1 > UIO_MAXIOV:
            if self.flush_verdicts() < 0:
                return -1
        nlh = nfq_nlmsg_put(<char *>(self.headers + self.header_used), NFQNL_MSG_VERDICT_BATCH, self.number)
        nfq_nlmsg_verdict_put(nlh, <int>id, <int>verdict)
        if set_mark:
            nfq_nlmsg_verdict_put_mark(nlh, mark)
        self.send_iov[self.send_iov_count].iov_base = nlh
        self.send_iov[self.send_iov_count].iov_len = nlh.nlmsg_len
        self.send_iov_count += 1
        self.header_used += align4(nlh.nlmsg_len)
        self.send_bytes += nlh.nlmsg_len
        self.c_batch_verdicts += 1
        self.c_verdict_messages += 1
        return 0

    cdef int verdict_packet(self, uint32_t index, uint32_t verdict, bint set_mark, uint32_t mark,
                            bint with_payload) noexcept nogil:
        # A verdict for packet `index` of the current batch; with_payload sends its
        # (rewritten) bytes back. Each packet is answered at most once.
        cdef QueuedPacket *p = &self.packets[index]
        if self.answered_flags[index]:
            return 0
        self.answered_flags[index] = 1
        self.answered += 1
        return self.add_verdict(p.id, verdict, set_mark, mark, p.data if with_payload else NULL, p.length)

    cdef int answer_rest(self, uint32_t verdict) noexcept nogil:
        # One batch verdict for every packet of the batch not answered yet. It applies to
        # every queued packet with an id up to the one named: the answered ones left the
        # queue when their own messages (earlier in the same send) were processed, and
        # packets not yet received have higher ids (ids are given in delivery order).
        cdef uint32_t k
        cdef uint32_t highest = 0
        cdef bint any_left = False
        for k in range(self.received):
            if not self.answered_flags[k]:
                self.answered_flags[k] = 1
                if not any_left or <int32_t>(self.packets[k].id - highest) > 0:
                    highest = self.packets[k].id
                any_left = True
        self.answered = self.received
        if any_left:
            return self.add_batch_verdict(highest, verdict, False, 0)
        return 0

    cdef int flush_verdicts(self) noexcept nogil:
        cdef msghdr message
        cdef sockaddr_nl kernel
        cdef ssize_t sent
        cdef int attempt
        if self.send_iov_count == 0:
            return 0
        memset(&kernel, 0, sizeof(kernel))
        kernel.nl_family = AF_NETLINK
        memset(&message, 0, sizeof(message))
        message.msg_name = &kernel
        message.msg_namelen = sizeof(kernel)
        message.msg_iov = self.send_iov
        message.msg_iovlen = self.send_iov_count
        sent = -1
        for attempt in range(3):
            sent = sendmsg(self.fd, &message, 0)
            if sent >= 0 or (errno != EINTR and errno != ENOBUFS and errno != EAGAIN):
                break
        self.c_sends += 1
        self.send_iov_count = 0
        self.header_used = 0
        self.send_bytes = 0
        if sent < 0:
            # The packets stay queued in the kernel until the queue is unbound, which
            # drops them: never accepted untranslated.
            self.c_send_errors += 1
            self.last_errno = errno
            return -1
        return 0

    # ---- the Python API (one object a packet) ---------------------------------------

    def fileno(self):
        """The netlink socket's file descriptor (for select/poll)."""
        return self.fd

    def receive(self, *, bint wait=True):
        """Receive one batch as a list of :class:`Packet`; empty after the timeout.

        Packets of the previous batch that were given no verdict are dropped first, so
        that every packet gets exactly one verdict.
        """
        cdef Py_ssize_t n
        cdef uint32_t k
        cdef QueuedPacket *p
        self._check_open()
        self.answer_rest(NF_DROP)
        self.flush_verdicts()
        with nogil:
            n = self.receive_batch(wait)
        if n < 0:
            if -n == EINTR:
                return []
            raise self._kernel_error(<int>-n, "receive packets")
        result = []
        for k in range(<uint32_t>n):
            p = &self.packets[k]
            result.append(Packet(
                p.id, p.hook, p.hw_protocol, p.mark, p.indev, p.outdev,
                None if p.ct_info == NO_CT_INFO else p.ct_info, p.wire_length,
                bool(p.skb_info & NFQA_SKB_CSUMNOTREADY), bool(p.skb_info & NFQA_SKB_GSO),
                bytearray((<char *>p.data)[:p.length]) if p.data != NULL else bytearray()))
        return result

    def verdict(self, packet, int verdict, *, mark=None, payload=None):
        """Give one packet of the last received batch its verdict (``ACCEPT``, ``DROP``
        or ``REPEAT``), optionally setting its mark and replacing its bytes. Sent at once.
        """
        cdef uint32_t k
        cdef uint32_t wanted
        cdef bytes data
        self._check_open()
        if verdict not in (NF_ACCEPT, NF_DROP, NF_REPEAT):
            raise ValueError(f"verdict {verdict}: expected ACCEPT ({NF_ACCEPT}), DROP ({NF_DROP}) "
                             f"or REPEAT ({NF_REPEAT})")
        if mark is not None and not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"mark {mark}: expected a 32-bit unsigned value")
        wanted = packet.id if isinstance(packet, Packet) else packet
        for k in range(self.received):
            if self.packets[k].id == wanted:
                break
        else:
            raise ValueError(f"packet id {wanted} is not in the last received batch")
        if self.answered_flags[k]:
            raise ValueError(f"packet id {wanted} already has its verdict")
        self.answered_flags[k] = 1
        self.answered += 1
        if payload is not None:
            data = bytes(payload)
            if PyBytes_GET_SIZE(data) > 0xFFFF - 4:
                raise ValueError(f"payload of {len(data)} bytes: expected at most {0xFFFF - 4}")
            self.add_verdict(wanted, verdict, mark is not None, mark or 0,
                             <const uint8_t *>PyBytes_AS_STRING(data), <uint32_t>PyBytes_GET_SIZE(data))
            # The payload is referenced, not copied: send before `data` goes away.
            if self.flush_verdicts() < 0:
                raise self._kernel_error(self.last_errno, "send a verdict")
        else:
            self.add_verdict(wanted, verdict, mark is not None, mark or 0, NULL, 0)
            if self.flush_verdicts() < 0:
                raise self._kernel_error(self.last_errno, "send a verdict")

    def _check_open(self):
        if self.socket == NULL:
            raise ValueError(f"NFQUEUE {self.number} is closed")

    def counters(self):
        """Counters since the queue was opened (docs/nfqueue.md, "Counters")."""
        return {
            "packets": self.c_packets,
            "batches": self.c_batches,
            "enobufs": self.c_enobufs,
            "lost": self.c_lost,
            "verdict_messages": self.c_verdict_messages,
            "batch_verdicts": self.c_batch_verdicts,
            "payload_verdicts": self.c_payload_verdicts,
            "sends": self.c_sends,
            "send_errors": self.c_send_errors,
            "kernel_errors": self.c_kernel_errors,
            "truncated": self.c_truncated,
            "malformed": self.c_malformed,
        }

    @property
    def closed(self):
        return self.socket == NULL

    def close(self):
        """Answer what is pending (drop), unbind and close. Packets still queued in the
        kernel are dropped by the kernel when the queue is unbound. Idempotent."""
        if self.socket == NULL:
            return
        try:
            self.answer_rest(NF_DROP)
            self.flush_verdicts()
            self.configure(NFQNL_CFG_CMD_UNBIND, False)
        except KernelError:
            pass
        finally:
            self._close_socket()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.socket == NULL else f"fd {self.fd}"
        return f"<NfQueue {self.number} ({state}), batch {self.batch_size}, gso={self.gso}>"
