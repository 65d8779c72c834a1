# libmnl: the minimal netlink library libnetfilter_queue's message API is built on.
# Names only; every value comes from the headers at compile time.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "<linux/netlink.h>" nogil:
    struct nlmsghdr:
        uint32_t nlmsg_len
        uint16_t nlmsg_type
        uint16_t nlmsg_flags
        uint32_t nlmsg_seq
        uint32_t nlmsg_pid
    struct nlattr:
        uint16_t nla_len
        uint16_t nla_type
    struct nlmsgerr:
        int error
        nlmsghdr msg
    enum:
        NETLINK_NETFILTER
        NETLINK_NO_ENOBUFS
        NLMSG_ERROR
        NLMSG_DONE
        NLM_F_REQUEST
        NLM_F_ACK

cdef extern from "<libmnl/libmnl.h>" nogil:
    struct mnl_socket:
        pass
    enum:
        MNL_SOCKET_AUTOPID
        MNL_ALIGNTO
    mnl_socket *mnl_socket_open(int bus)
    int mnl_socket_bind(mnl_socket *nl, unsigned int groups, int pid)
    int mnl_socket_close(mnl_socket *nl)
    int mnl_socket_get_fd(const mnl_socket *nl)
    unsigned int mnl_socket_get_portid(const mnl_socket *nl)
    ssize_t mnl_socket_sendto(const mnl_socket *nl, const void *req, size_t siz)
    ssize_t mnl_socket_recvfrom(const mnl_socket *nl, void *buf, size_t siz)
    bint mnl_nlmsg_ok(const nlmsghdr *nlh, int len)
    nlmsghdr *mnl_nlmsg_next(const nlmsghdr *nlh, int *len)
    void *mnl_nlmsg_get_payload(const nlmsghdr *nlh)
    void *mnl_nlmsg_get_payload_tail(const nlmsghdr *nlh)
    uint16_t mnl_attr_get_payload_len(const nlattr *attr)
    void *mnl_attr_get_payload(const nlattr *attr)
    uint32_t mnl_attr_get_u32(const nlattr *attr)
    void mnl_attr_put_u32(nlmsghdr *nlh, uint16_t type, uint32_t data)
    int mnl_cb_run(const void *buf, size_t numbytes, unsigned int seq, unsigned int portid,
                   void *cb_data, void *data)
