# PrefixTable: longest-prefix match for IPv4 and IPv6 (see prefix_table.pyx for the layout).
cimport cython

from egresscore.core._types cimport int64_t, slot_t, uint8_t, uint16_t, uint32_t, uint64_t
from egresscore.core.inet cimport IpKey
from egresscore.includes.libc_extra cimport pthread_rwlock_t

# A node covers 8 bits at depth 16, 24, 32, ... and is ONE allocation: this header,
# then runs[nruns] (slot_t, padded to an even count), and only when the node has
# children childmap[4] (uint64_t: bit c set when a child exists for next-byte value
# c) and children[nchildren] (LpmNode *); then rib_slots[nrib] (slot_t) and
# rib_keys[nrib] (uint16_t: relative length << 8 | bits). A lookup touches one
# place per level, and most IPv4 nodes (no children) carry no child bitmap.
cdef struct LpmNode:
    # Bit c set: a run of next-byte values with one longest match starts at c.
    uint64_t runmap[4]
    # For a node at depth 16: the longest prefix of length <= 16 covering it.
    slot_t short_best
    uint16_t nruns
    uint16_t nchildren
    uint16_t nrib
    uint16_t allocated_words   # size of this allocation in 8-byte words
    # run_base[w]: set bits of runmap in words before w (at most 192, so a byte);
    # a rank is then one popcount. child_base likewise for childmap.
    uint8_t run_base[4]
    uint8_t child_base[4]

cdef struct FamilyTrie:
    # 65536 words indexed by the first 16 bits of an address: either a tagged slot
    # (slot << 1 | 1; the longest prefix of length <= 16, NO_SLOT if none) when no
    # longer prefix exists under that /16, or a pointer to the node at depth 16.
    void **dir
    uint8_t *dir_length          # length of the longest prefix <= 16 covering each /16
    slot_t *short_slots[17]      # short_slots[l][i]: the /l prefix number i (l <= 16), lazily allocated
    uint32_t count               # prefixes of this family
    uint8_t family               # 4 or 6

# One prefix in an iteration snapshot.
cdef struct Entry:
    uint8_t family
    uint8_t length
    uint8_t addr[16]
    slot_t slot


@cython.final
cdef class PrefixTableIterator:
    cdef Entry *entries
    cdef Py_ssize_t count
    cdef Py_ssize_t position
    cdef list snapshot_values
    cdef bint with_values


@cython.final
cdef class PrefixTable:
    cdef FamilyTrie v4
    cdef FamilyTrie v6
    cdef void **values
    cdef slot_t value_capacity
    cdef slot_t value_high
    cdef slot_t free_slot
    cdef size_t node_bytes
    cdef pthread_rwlock_t lock
    cdef bint lock_ready

    # Lookups: the GIL is not needed; batch callers hold the read lock.
    cdef slot_t lookup_packed(self, const FamilyTrie *trie, const uint8_t *address,
                              int *matched_length) noexcept nogil
    cdef slot_t lookup_key(self, const IpKey *key, int *matched_length) noexcept nogil
    cdef void lookup_batch(self, const FamilyTrie *trie, const uint32_t *ipv4, const uint8_t *ipv6,
                           Py_ssize_t count, int64_t *out) noexcept nogil
    cdef slot_t find_key(self, const IpKey *key) noexcept

    # Mutation: GIL and write lock held.
    cdef object insert_key(self, const IpKey *key, object value)
    cdef object insert_long(self, FamilyTrie *trie, const IpKey *key, object value)
    cdef object remove_key(self, const IpKey *key)
    cdef object remove_long(self, FamilyTrie *trie, const IpKey *key)
    cdef int write_lock(self) except -1
    cdef void write_unlock(self) noexcept

    # Storage.
    cdef void release_all(self) noexcept
    cdef void free_trie(self, FamilyTrie *trie) noexcept
    cdef void free_subtree(self, LpmNode *node) noexcept
    cdef int ensure_dir(self, FamilyTrie *trie) except -1
    cdef int ensure_short(self, FamilyTrie *trie, int length) except -1
    cdef int reserve_slot(self) except -1
    cdef slot_t next_slot(self) noexcept
    cdef slot_t take_slot(self, object value) noexcept
    cdef object release_slot(self, slot_t s)
    cdef object replace_value(self, slot_t s, object value)
    cdef LpmNode *new_node(self, slot_t short_best) except NULL
    cdef void release_node(self, LpmNode *node) noexcept
    cdef LpmNode *commit_node(self, LpmNode *node, const uint64_t *childmap, LpmNode **children,
                              uint32_t nchildren, const slot_t *rib_slots, const uint16_t *rib_keys,
                              uint32_t nrib) except NULL
    cdef Py_ssize_t rib_find(self, LpmNode *node, uint16_t key, bint *found) noexcept

    # Iteration.
    cdef Py_ssize_t collect_node(self, LpmNode *node, uint8_t *prefix, int depth, uint8_t family,
                                 Entry *entries, Py_ssize_t count) noexcept
    cdef Py_ssize_t collect_trie(self, FamilyTrie *trie, Entry *entries, Py_ssize_t count) noexcept
    cdef PrefixTableIterator snapshot(self, bint with_values)
