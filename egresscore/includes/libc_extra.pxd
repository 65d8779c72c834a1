# C library declarations that Cython's bundled .pxd files do not provide.
# Constants come from the real headers at compile time; none is copied here.

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    unsigned int ntohl(unsigned int value)
    unsigned int htonl(unsigned int value)
    unsigned short ntohs(unsigned short value)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    enum:
        # glibc: prefer writers so that a steady stream of batch readers cannot starve updates.
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP
    int pthread_rwlockattr_init(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref)
    int pthread_rwlock_init(pthread_rwlock_t *lock, const pthread_rwlockattr_t *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t *lock)
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)

cdef extern from * nogil:
    # GCC/Clang builtins; setup.py enables the POPCNT instruction where the CPU has it.
    int __builtin_popcountll(unsigned long long x)
    int __builtin_ctzll(unsigned long long x)    # undefined for 0: callers test first
    void __builtin_prefetch(const void *addr)

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    enum:
        MADV_HUGEPAGE
    int madvise(void *addr, size_t length, int advice)
