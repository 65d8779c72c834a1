# libnetfilter_conntrack: create the kernel's conntrack entries (with their NAT) through
# ctnetlink, and read its destroy events. Names only; values come from the headers.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "<libnetfilter_conntrack/libnetfilter_conntrack.h>" nogil:
    struct nfct_handle:
        pass
    struct nf_conntrack:
        pass
    enum:
        CONNTRACK
        NF_NETLINK_CONNTRACK_DESTROY
    enum nf_conntrack_attr:
        ATTR_ORIG_IPV4_SRC
        ATTR_ORIG_IPV4_DST
        ATTR_REPL_IPV4_SRC
        ATTR_REPL_IPV4_DST
        ATTR_ORIG_PORT_SRC
        ATTR_ORIG_PORT_DST
        ATTR_REPL_PORT_SRC
        ATTR_REPL_PORT_DST
        ATTR_ORIG_L3PROTO
        ATTR_ORIG_L4PROTO
        ATTR_REPL_L3PROTO
        ATTR_REPL_L4PROTO
        ATTR_TCP_STATE
        ATTR_SNAT_IPV4
        ATTR_SNAT_PORT
        ATTR_TIMEOUT
        ATTR_MARK
    enum nf_conntrack_query:
        NFCT_Q_CREATE
        NFCT_Q_DESTROY
        NFCT_Q_GET
        NFCT_Q_DUMP
    enum nf_conntrack_msg_type:
        NFCT_T_DESTROY
        NFCT_T_ALL
    enum:
        NFCT_CB_CONTINUE
    ctypedef int (*nfct_callback)(nf_conntrack_msg_type type, nf_conntrack *ct, void *data) noexcept nogil
    nfct_handle *nfct_open(uint8_t subsys_id, unsigned subscriptions)
    int nfct_close(nfct_handle *cth)
    int nfct_fd(nfct_handle *cth)
    nf_conntrack *nfct_new()
    void nfct_destroy(nf_conntrack *ct)
    void nfct_set_attr_u8(nf_conntrack *ct, nf_conntrack_attr type, uint8_t value)
    void nfct_set_attr_u16(nf_conntrack *ct, nf_conntrack_attr type, uint16_t value)
    void nfct_set_attr_u32(nf_conntrack *ct, nf_conntrack_attr type, uint32_t value)
    uint8_t nfct_get_attr_u8(const nf_conntrack *ct, nf_conntrack_attr type)
    uint16_t nfct_get_attr_u16(const nf_conntrack *ct, nf_conntrack_attr type)
    uint32_t nfct_get_attr_u32(const nf_conntrack *ct, nf_conntrack_attr type)
    int nfct_attr_is_set(const nf_conntrack *ct, nf_conntrack_attr type)
    int nfct_query(nfct_handle *h, nf_conntrack_query query, const void *data)
    int nfct_catch(nfct_handle *h)
    int nfct_callback_register(nfct_handle *h, nf_conntrack_msg_type type, nfct_callback cb, void *data)

cdef extern from "<libnetfilter_conntrack/libnetfilter_conntrack_tcp.h>" nogil:
    enum:
        TCP_CONNTRACK_SYN_SENT
        TCP_CONNTRACK_FIN_WAIT

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK
    int fcntl(int fd, int cmd, ...)
