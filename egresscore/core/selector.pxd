# Label-selector evaluation over interned labels: a selector is a small stack program
# whose operands are sets of objects (bitsets), so one evaluation answers for every
# object at once. See selector.pyx.
cimport cython

from egresscore.core._types cimport uint32_t, uint64_t


@cython.final
cdef class Bitset:
    cdef uint64_t *words
    cdef Py_ssize_t size        # bits
    cdef Py_ssize_t nwords

    cdef bint test(self, Py_ssize_t index) noexcept nogil
    cdef Bitset combine(self, Bitset other, int union)


cdef Bitset new_bitset(Py_ssize_t size)


@cython.final
cdef class LabelIndex:
    cdef Py_ssize_t count
    cdef dict key_ids               # key -> key id
    cdef dict pair_ids              # (key, value) -> pair id
    cdef list values_by_key         # key id -> list of (value, pair id)
    # Posting lists, compressed rows: objects of pair p are
    # pair_objects[pair_start[p]:pair_start[p + 1]], likewise for keys.
    cdef uint32_t *pair_start
    cdef uint32_t *pair_objects
    cdef uint32_t *key_start
    cdef uint32_t *key_objects
    cdef Py_ssize_t npairs
    cdef Py_ssize_t nkeys

    cdef int or_postings(self, Bitset target, const uint32_t *start, const uint32_t *objects,
                         uint32_t row) except -1
