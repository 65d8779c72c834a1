# Protocol numbers, header flags and ICMP types from the system's netinet headers.
# Only names are declared here; the values come from the headers at compile time.

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_HOPOPTS
        IPPROTO_ICMP
        IPPROTO_TCP
        IPPROTO_UDP
        IPPROTO_ROUTING
        IPPROTO_FRAGMENT
        IPPROTO_AH
        IPPROTO_ICMPV6
        IPPROTO_NONE
        IPPROTO_DSTOPTS

cdef extern from "<netinet/ip.h>" nogil:
    enum:
        IP_MF
        IP_OFFMASK

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TH_FIN
        TH_SYN
        TH_RST
        TH_ACK

cdef extern from "<netinet/ip_icmp.h>" nogil:
    enum:
        ICMP_ECHOREPLY
        ICMP_DEST_UNREACH
        ICMP_SOURCE_QUENCH
        ICMP_REDIRECT
        ICMP_ECHO
        ICMP_TIME_EXCEEDED
        ICMP_PARAMETERPROB

cdef extern from "<netinet/icmp6.h>" nogil:
    enum:
        ICMP6_DST_UNREACH
        ICMP6_PACKET_TOO_BIG
        ICMP6_TIME_EXCEEDED
        ICMP6_PARAM_PROB
        ICMP6_ECHO_REQUEST
        ICMP6_ECHO_REPLY
