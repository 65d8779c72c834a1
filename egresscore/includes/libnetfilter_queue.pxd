# libnetfilter_queue's netlink message API (the libmnl-based one, not the deprecated
# nfq_handle API) and the kernel's nfnetlink_queue constants it ships. Names only.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from egresscore.includes.libmnl cimport nlattr, nlmsghdr

cdef extern from "<linux/netfilter.h>" nogil:
    enum:
        NF_DROP
        NF_ACCEPT
        NF_REPEAT
    enum:
        NF_INET_PRE_ROUTING
        NF_INET_LOCAL_IN
        NF_INET_FORWARD
        NF_INET_LOCAL_OUT
        NF_INET_POST_ROUTING

cdef extern from "<linux/netfilter/nfnetlink.h>" nogil:
    struct nfgenmsg:
        uint8_t nfgen_family
        uint8_t version
        uint16_t res_id
    enum:
        NFNL_SUBSYS_QUEUE

cdef extern from "<libnetfilter_queue/libnetfilter_queue.h>" nogil:
    struct nfqnl_msg_packet_hdr:
        uint32_t packet_id      # network order
        uint16_t hw_protocol    # network order
        uint8_t hook
    enum:
        NFQNL_MSG_PACKET
        NFQNL_MSG_VERDICT
        NFQNL_MSG_CONFIG
        NFQNL_MSG_VERDICT_BATCH
    enum:
        NFQNL_CFG_CMD_BIND
        NFQNL_CFG_CMD_UNBIND
    enum:
        NFQNL_COPY_NONE
        NFQNL_COPY_META
        NFQNL_COPY_PACKET
    enum:
        NFQA_PACKET_HDR
        NFQA_MARK
        NFQA_IFINDEX_INDEV
        NFQA_IFINDEX_OUTDEV
        NFQA_PAYLOAD
        NFQA_CT_INFO
        NFQA_CAP_LEN
        NFQA_SKB_INFO
        NFQA_MAX
    enum:
        NFQA_CFG_MASK
        NFQA_CFG_FLAGS
    enum:
        NFQA_CFG_F_FAIL_OPEN
        NFQA_CFG_F_CONNTRACK
        NFQA_CFG_F_GSO
        NFQA_SKB_CSUMNOTREADY
        NFQA_SKB_GSO
        NFQA_SKB_CSUM_NOTVERIFIED
    void nfq_nlmsg_cfg_put_cmd(nlmsghdr *nlh, uint16_t pf, uint8_t cmd)
    void nfq_nlmsg_cfg_put_params(nlmsghdr *nlh, uint8_t mode, int range)
    void nfq_nlmsg_cfg_put_qmaxlen(nlmsghdr *nlh, uint32_t qmaxlen)
    void nfq_nlmsg_verdict_put(nlmsghdr *nlh, int id, int verdict)
    void nfq_nlmsg_verdict_put_mark(nlmsghdr *nlh, uint32_t mark)
    int nfq_nlmsg_parse(const nlmsghdr *nlh, nlattr **attr)
    nlmsghdr *nfq_nlmsg_put(char *buf, int type, uint32_t queue_num)
