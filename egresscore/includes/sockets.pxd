# Socket calls the NFQUEUE binding makes directly: batch receive (recvmmsg) and
# gathered sends (sendmsg). Names only; values come from the headers.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *ts)

cdef extern from "<linux/netlink.h>" nogil:
    struct sockaddr_nl:
        uint16_t nl_family
        uint16_t nl_pad
        uint32_t nl_pid
        uint32_t nl_groups

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    enum:
        AF_NETLINK
        SOL_SOCKET
        SO_RCVBUF
        SO_RCVBUFFORCE
        SO_SNDBUF
        SO_SNDBUFFORCE
        SO_RCVTIMEO
        MSG_DONTWAIT
        MSG_WAITFORONE
        MSG_TRUNC
    int recvmmsg(int fd, mmsghdr *vmessages, unsigned int vlen, int flags, timespec *timeout)
    ssize_t sendmsg(int fd, const msghdr *message, int flags)
    int setsockopt(int fd, int level, int option, const void *value, socklen_t length)
    int getsockopt(int fd, int level, int option, void *value, socklen_t *length)

cdef extern from "<sys/socket.h>" nogil:
    enum:
        SOL_NETLINK

cdef extern from "<sys/uio.h>" nogil:
    enum:
        # The most iovec entries one sendmsg takes (1024 on Linux).
        UIO_MAXIOV

cdef extern from "<errno.h>" nogil:
    enum:
        ENOBUFS
        EAGAIN
        EWOULDBLOCK
        EINTR
        ENOENT
