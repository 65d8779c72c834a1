# The NFQUEUE binding (docs/nfqueue.md): one netlink socket bound to one queue, batch
# receive with recvmmsg into fixed slots, verdicts gathered into one sendmsg per batch.
from egresscore.core._types cimport uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.includes.libmnl cimport mnl_socket
from egresscore.includes.sockets cimport iovec, mmsghdr


cdef enum:
    # Verdict "set the mark" flag and the "no conntrack info" value of QueuedPacket.
    NO_CT_INFO = 0xFF
    # Bytes of a verdict message before its payload: nlmsghdr 16, nfgenmsg 4,
    # NFQA_VERDICT_HDR 12, NFQA_MARK 8, NFQA_PAYLOAD's header 4 (rounded up).
    VERDICT_HEADER_ROOM = 48
    # Room in a receive slot for the netlink and attribute headers around the payload.
    SLOT_HEADROOM = 4096


ctypedef struct QueuedPacket:
    # One packet of a received batch. data points into the batch's receive slot and is
    # valid (and writable in place) until the next receive on the same queue.
    uint8_t *data
    uint32_t length         # bytes at data (the copy range may cut the packet)
    uint32_t wire_length    # the packet's real length (NFQA_CAP_LEN, else length)
    uint32_t id
    uint32_t mark
    uint32_t skb_info       # NFQA_SKB_* flags
    uint32_t indev
    uint32_t outdev
    uint16_t hw_protocol
    uint8_t hook            # NF_INET_* hook the packet was queued from
    uint8_t ct_info         # enum ip_conntrack_info, or NO_CT_INFO


cdef class NfQueue:
    cdef mnl_socket *socket
    cdef int fd
    cdef readonly uint16_t number
    cdef readonly uint32_t batch_size
    cdef readonly uint32_t copy_range
    cdef readonly uint32_t max_length
    cdef readonly bint fail_open
    cdef readonly bint gso
    cdef readonly bint conntrack
    cdef uint32_t slot_size
    cdef uint8_t *slots
    cdef mmsghdr *messages
    cdef iovec *receive_iov
    cdef QueuedPacket *packets
    cdef uint32_t received           # packets of the current batch
    cdef uint32_t answered           # of them, given a verdict so far
    cdef uint8_t *answered_flags
    # The verdict send buffer: headers in `headers`, payloads referenced in place.
    cdef uint8_t *headers
    cdef uint32_t header_used
    cdef uint32_t header_capacity
    cdef iovec *send_iov
    cdef uint32_t send_iov_count
    cdef uint64_t send_bytes
    cdef uint32_t last_id
    cdef bint have_last_id
    # Counters (docs/nfqueue.md, "Counters").
    cdef uint64_t c_packets
    cdef uint64_t c_batches
    cdef uint64_t c_enobufs
    cdef uint64_t c_lost
    cdef uint64_t c_verdict_messages
    cdef uint64_t c_batch_verdicts
    cdef uint64_t c_payload_verdicts
    cdef uint64_t c_sends
    cdef uint64_t c_send_errors
    cdef uint64_t c_kernel_errors
    cdef uint64_t c_truncated
    cdef uint64_t c_malformed
    cdef int last_errno

    cdef int configure(self, uint8_t command, bint with_params) except -1
    cdef int send_config(self, uint8_t *buffer, uint32_t length) except -1
    cdef Py_ssize_t receive_batch(self, bint wait) noexcept nogil
    cdef int parse_message(self, uint8_t *data, uint32_t length) noexcept nogil
    cdef int add_verdict(self, uint32_t id, uint32_t verdict, bint set_mark, uint32_t mark,
                         const uint8_t *payload, uint32_t length) noexcept nogil
    cdef int add_batch_verdict(self, uint32_t id, uint32_t verdict, bint set_mark, uint32_t mark) noexcept nogil
    cdef int verdict_packet(self, uint32_t index, uint32_t verdict, bint set_mark, uint32_t mark,
                            bint with_payload) noexcept nogil
    cdef int flush_verdicts(self) noexcept nogil
    cdef int answer_rest(self, uint32_t verdict) noexcept nogil
