# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Longest-prefix match over IPv4 and IPv6 prefixes.

Layout (one per address family):

* ``dir``: 65536 words indexed by the first 16 bits of the address. A word is either
  a tagged slot, the longest prefix of length 0..16 covering that /16 (leaf-pushed,
  so a lookup never searches short prefixes), or, when longer prefixes exist under
  that /16, a pointer to the node at depth 16, which carries the short answer in
  ``short_best``.
* Nodes with a stride of 8 bits at depths 16, 24, 32, ... A node at depth ``d``
  holds the prefixes of lengths ``d+1 .. d+8`` under its ``d`` bits, in two forms:
  - the *rib*: the exact prefixes, sorted by (length, bits), for exact get/remove
    and iteration;
  - the *runs*: for each of the 256 values of the next byte, the slot of the longest
    rib prefix covering it (or NO_SLOT), compressed into runs of equal answers.
    ``runmap`` has a bit set where a run starts; the answer for byte ``c`` is
    ``runs[popcount(runmap bits 0..c) - 1]``. The same rank finds children.
  Header, runs, children and rib are one allocation, so a lookup in a typical IPv4
  table reads the dir word and one node: two cache misses at most.

Memory: a node is 56 bytes plus 4 per run and 6 per prefix, and 32 + 8 per child
when it has children; a prefix of length <= 16 costs 4 bytes in ``short_slots``;
every prefix owns a value slot of 8 bytes. The dir (576 KiB) exists only while its
family has prefixes.

Concurrency: every mutation runs with the GIL held and the write lock taken, and
single lookups run with the GIL held, so they never see a half-made change. Batch
lookups release the GIL and take the read lock instead.

Slots: a prefix's value lives in a slot whose number ``lookup_many`` returns; a slot
number stays valid until its prefix is removed or the table cleared, then it is
reused. Free slots are linked through the value array with the low bit set (object
pointers are aligned, so the low bit of a live entry is always 0); the dir tags its
slots the same way.
"""

cimport cython
from cpython cimport array
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_RawFree, PyMem_RawMalloc, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uintptr_t
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, memset

from egresscore.core._types cimport NO_SLOT
from egresscore.core.inet cimport coerce_address, coerce_prefix, key_to_network
from egresscore.includes.libc_extra cimport (
    PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP,
    __builtin_popcountll,
    __builtin_prefetch,
    pthread_rwlock_destroy,
    pthread_rwlock_init,
    pthread_rwlock_rdlock,
    pthread_rwlock_unlock,
    pthread_rwlock_wrlock,
    pthread_rwlockattr_destroy,
    pthread_rwlockattr_init,
    pthread_rwlockattr_setkind_np,
    pthread_rwlockattr_t,
)

import array as _array
import types as _types

from egresscore.errors import InvalidAddressError

NO_MATCH = -1

cdef array.array INT64_TEMPLATE = _array.array('q')

# The child bitmap of every node without children (zero-initialised static storage).
cdef uint64_t ZERO_BITMAP[4]

# A node with one run answering NO_SLOT and no children. Batch lookups point the
# lanes that have no node (or no more nodes) at it, so that every lane does the same
# work without a branch; its runs follow the header as in every node.
cdef struct EmptyNode:
    LpmNode header
    slot_t runs[2]

cdef EmptyNode EMPTY_NODE
# new_node copies it as the start of every node.
assert sizeof(EmptyNode) == node_size(1, 0, 0)
memset(&EMPTY_NODE, 0, sizeof(EMPTY_NODE))
EMPTY_NODE.header.runmap[0] = 1
set_bases(EMPTY_NODE.header.runmap, EMPTY_NODE.header.run_base)
EMPTY_NODE.header.nruns = 1
EMPTY_NODE.header.short_best = NO_SLOT
EMPTY_NODE.runs[0] = NO_SLOT
EMPTY_NODE.runs[1] = NO_SLOT
cdef object MISSING = object()

cdef enum:
    DIR_SIZE = 65536
    MAX_RIB = 510         # prefixes of lengths 1..8 under one node: 2 + 4 + ... + 256
    MAX_DEPTH_NODES = 15  # nodes on one IPv6 path: depths 16, 24, ..., 120
    BATCH_GROUP = 32      # addresses walked together by lookup_many (misses in flight)


# ---------------------------------------------------------------------------
# Small helpers: bitmap rank, node layout, dir words.

cdef inline uint32_t rank_through(const uint64_t *bitmap, const uint8_t *base, uint32_t c) noexcept nogil:
    """Number of set bits at positions 0..c (inclusive) of a 256-bit bitmap whose
    per-word prefix counts are *base*."""
    # 2 << 63 is 0 in uint64_t, and 0 - 1 is all ones: the mask for c & 63 == 63.
    return base[c >> 6] + <uint32_t>__builtin_popcountll(
        bitmap[c >> 6] & ((<uint64_t>2 << (c & 63)) - 1))


cdef inline void set_bases(const uint64_t *bitmap, uint8_t *base) noexcept nogil:
    base[0] = 0
    base[1] = <uint8_t>__builtin_popcountll(bitmap[0])
    base[2] = <uint8_t>(base[1] + __builtin_popcountll(bitmap[1]))
    base[3] = <uint8_t>(base[2] + __builtin_popcountll(bitmap[2]))


cdef inline uint32_t run_index(const LpmNode *node, uint32_t c) noexcept nogil:
    return rank_through(node.runmap, node.run_base, c) - 1


cdef inline Py_ssize_t child_index(LpmNode *node, uint32_t c) noexcept nogil:
    """Index of c's child in the child array (-1 when c has none and none below)."""
    return <Py_ssize_t>rank_through(child_bitmap(node), node.child_base, c) - 1


cdef inline bint bit_is_set(const uint64_t *bitmap, uint32_t c) noexcept nogil:
    return (bitmap[c >> 6] >> (c & 63)) & 1


cdef inline void prefetch(const void *address) noexcept nogil:
    # A module-level wrapper: inside a class body Cython would mangle the
    # double-underscore builtin's name.
    __builtin_prefetch(address)


cdef inline uint32_t padded_runs(uint32_t nruns) noexcept nogil:
    # Runs are 4 bytes and children 8: an even run count keeps children aligned.
    return (nruns + 1) & ~(<uint32_t>1)


cdef inline slot_t *node_runs(LpmNode *node) noexcept nogil:
    return <slot_t *>(<char *>node + sizeof(LpmNode))


cdef inline uint64_t *node_childmap(LpmNode *node) noexcept nogil:
    """Where the child bitmap is stored; only meaningful when node.nchildren > 0."""
    return <uint64_t *>(<char *>node + sizeof(LpmNode) + 4 * padded_runs(node.nruns))


cdef inline const uint64_t *child_bitmap(LpmNode *node) noexcept nogil:
    """The node's child bitmap: stored after the runs, or all zeros without children."""
    return node_childmap(node) if node.nchildren else ZERO_BITMAP


cdef inline LpmNode **node_children(LpmNode *node) noexcept nogil:
    return <LpmNode **>(node_childmap(node) + (4 if node.nchildren else 0))


cdef inline slot_t *node_rib_slots(LpmNode *node) noexcept nogil:
    return <slot_t *>(node_children(node) + node.nchildren)


cdef inline uint16_t *node_rib_keys(LpmNode *node) noexcept nogil:
    return <uint16_t *>(node_rib_slots(node) + node.nrib)


cdef inline size_t node_size(uint32_t nruns, uint32_t nchildren, uint32_t nrib) noexcept nogil:
    cdef size_t size = (sizeof(LpmNode) + 4 * padded_runs(nruns) + (32 if nchildren else 0)
                        + 8 * nchildren + 6 * nrib)
    return (size + 7) & ~(<size_t>7)


cdef inline LpmNode *child_of(LpmNode *node, uint32_t c) noexcept nogil:
    if not bit_is_set(child_bitmap(node), c):
        return NULL
    return node_children(node)[child_index(node, c)]


cdef inline uint16_t rib_key(uint32_t relative_length, uint8_t chunk) noexcept nogil:
    # Keys sort by length first, so painting the runs in key order lets longer
    # prefixes overwrite shorter ones.
    return <uint16_t>((relative_length << 8) | (chunk & (0xFF00 >> relative_length) & 0xFF))


cdef inline uint32_t dir_index(const uint8_t *address) noexcept nogil:
    return (<uint32_t>address[0] << 8) | address[1]


cdef inline bint dir_is_slot(void *word) noexcept nogil:
    return (<uintptr_t>word) & 1


cdef inline void *dir_slot_word(slot_t s) noexcept nogil:
    return <void *>((<uintptr_t>s << 1) | 1)


cdef inline slot_t dir_short_best(void *word) noexcept nogil:
    """The short-prefix answer of a dir word, whichever kind it is."""
    if dir_is_slot(word):
        return <slot_t>(<uintptr_t>word >> 1)
    return (<LpmNode *>word).short_best


cdef inline void dir_set_short_best(void **word, slot_t s) noexcept nogil:
    if dir_is_slot(word[0]):
        word[0] = dir_slot_word(s)
    else:
        (<LpmNode *>word[0]).short_best = s


cdef inline void mask_key(IpKey *key, int length) noexcept nogil:
    cdef int i
    for i in range(16):
        if i * 8 >= length:
            key.addr[i] = 0
        elif i * 8 + 8 > length:
            key.addr[i] &= <uint8_t>(0xFF00 >> (length - i * 8))
    key.length = <uint8_t>length


cdef int compare_entries(const void *a, const void *b) noexcept nogil:
    cdef const Entry *x = <const Entry *>a
    cdef const Entry *y = <const Entry *>b
    cdef int order
    if x.family != y.family:
        return -1 if x.family < y.family else 1
    order = memcmp(x.addr, y.addr, 16)
    if order:
        return order
    return <int>x.length - <int>y.length


@cython.final
cdef class PrefixTableIterator:
    """Iterator over a snapshot of a PrefixTable, in its documented order."""

    def __cinit__(self):
        self.entries = NULL

    def __init__(self):
        raise TypeError("PrefixTableIterator cannot be created directly; iterate a PrefixTable")

    def __dealloc__(self):
        PyMem_Free(self.entries)

    def __iter__(self):
        return self

    def __next__(self):
        cdef IpKey key
        cdef Entry *entry
        if self.position >= self.count:
            raise StopIteration
        entry = &self.entries[self.position]
        key.family = entry.family
        key.length = entry.length
        memcpy(key.addr, entry.addr, 16)
        network = key_to_network(&key)
        self.position += 1
        if self.with_values:
            return (network, self.snapshot_values[self.position - 1])
        return network

    def __length_hint__(self):
        return self.count - self.position


# ---------------------------------------------------------------------------

@cython.final
cdef class PrefixTable:
    """A longest-prefix-match table of IPv4 and IPv6 prefixes, each mapped to a value.

    Prefixes are given as CIDR text (``"198.51.100.0/24"``, ``"2001:db8::/32"``; a
    bare address means a host prefix) or ``ipaddress`` networks. Host bits are
    rejected, not masked: ``"198.51.100.7/24"`` raises
    :class:`egresscore.errors.InvalidPrefixError`.

    Iteration yields ``(network, value)`` pairs, IPv4 before IPv6, each family in
    ascending order of network address and then prefix length, from a snapshot
    taken when the iteration starts.

    Lookups from other threads may run while the table changes: each sees the table
    before or after a change, never during it.
    """

    def __cinit__(self):
        cdef pthread_rwlockattr_t attributes
        memset(&self.v4, 0, sizeof(FamilyTrie))
        memset(&self.v6, 0, sizeof(FamilyTrie))
        self.v4.family = 4
        self.v6.family = 6
        self.values = NULL
        self.value_capacity = 0
        self.value_high = 0
        self.free_slot = NO_SLOT
        self.node_bytes = 0
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        if pthread_rwlock_init(&self.lock, &attributes) != 0:
            pthread_rwlockattr_destroy(&attributes)
            raise MemoryError("cannot initialise the PrefixTable lock")
        pthread_rwlockattr_destroy(&attributes)
        self.lock_ready = True

    def __init__(self, items=None):
        if items is None:
            return
        if hasattr(items, "items"):
            items = items.items()
        for prefix, value in items:
            self.insert(prefix, value)

    def __dealloc__(self):
        self.release_all()
        if self.lock_ready:
            pthread_rwlock_destroy(&self.lock)

    def __class_getitem__(cls, item):
        return _types.GenericAlias(cls, item)

    # -- storage -------------------------------------------------------------------

    cdef void release_all(self) noexcept:
        """Free every C structure and drop every value reference (GIL held)."""
        cdef slot_t s
        cdef void *entry
        if self.values != NULL:
            for s in range(self.value_high):
                entry = self.values[s]
                if not (<uintptr_t>entry & 1):
                    Py_DECREF(<object>entry)
            PyMem_Free(self.values)
        self.free_trie(&self.v4)
        self.free_trie(&self.v6)
        self.values = NULL
        self.value_capacity = 0
        self.value_high = 0
        self.free_slot = NO_SLOT
        self.node_bytes = 0

    cdef void free_subtree(self, LpmNode *node) noexcept:
        cdef uint32_t i
        for i in range(node.nchildren):
            self.free_subtree(node_children(node)[i])
        self.release_node(node)

    cdef void free_trie(self, FamilyTrie *trie) noexcept:
        cdef int length
        cdef uint32_t i
        if trie.dir != NULL:
            for i in range(<uint32_t>DIR_SIZE):
                if not dir_is_slot(trie.dir[i]):
                    self.free_subtree(<LpmNode *>trie.dir[i])
        PyMem_Free(trie.dir)
        PyMem_Free(trie.dir_length)
        trie.dir = NULL
        trie.dir_length = NULL
        for length in range(17):
            PyMem_Free(trie.short_slots[length])
            trie.short_slots[length] = NULL
        trie.count = 0

    cdef int ensure_dir(self, FamilyTrie *trie) except -1:
        cdef uint32_t i
        if trie.dir != NULL:
            return 0
        trie.dir = <void **>PyMem_Malloc(DIR_SIZE * sizeof(void *))
        trie.dir_length = <uint8_t *>PyMem_Malloc(DIR_SIZE)
        if trie.dir == NULL or trie.dir_length == NULL:
            PyMem_Free(trie.dir)
            PyMem_Free(trie.dir_length)
            trie.dir = NULL
            trie.dir_length = NULL
            raise MemoryError("cannot allocate the PrefixTable directory")
        for i in range(<uint32_t>DIR_SIZE):
            trie.dir[i] = dir_slot_word(NO_SLOT)
        memset(trie.dir_length, 0, DIR_SIZE)
        return 0

    cdef int ensure_short(self, FamilyTrie *trie, int length) except -1:
        cdef uint32_t i, size = <uint32_t>1 << length
        if trie.short_slots[length] != NULL:
            return 0
        trie.short_slots[length] = <slot_t *>PyMem_Malloc(size * sizeof(slot_t))
        if trie.short_slots[length] == NULL:
            raise MemoryError("cannot allocate the PrefixTable short-prefix array")
        for i in range(size):
            trie.short_slots[length][i] = NO_SLOT
        return 0

    cdef int reserve_slot(self) except -1:
        cdef slot_t capacity
        cdef void **grown
        if self.free_slot != NO_SLOT or self.value_high < self.value_capacity:
            return 0
        if self.value_capacity >= 0x40000000:
            raise MemoryError("PrefixTable holds 2**30 values, its limit")
        capacity = self.value_capacity * 2 if self.value_capacity else 16
        grown = <void **>PyMem_Realloc(self.values, capacity * sizeof(void *))
        if grown == NULL:
            raise MemoryError("cannot grow the PrefixTable value array")
        self.values = grown
        self.value_capacity = capacity
        return 0

    cdef slot_t next_slot(self) noexcept:
        return self.free_slot if self.free_slot != NO_SLOT else self.value_high

    cdef slot_t take_slot(self, object value) noexcept:
        """Store *value* in the slot next_slot() named; reserve_slot() came first."""
        cdef slot_t s
        if self.free_slot != NO_SLOT:
            s = self.free_slot
            self.free_slot = <slot_t>(<uintptr_t>self.values[s] >> 1)
        else:
            s = self.value_high
            self.value_high += 1
        Py_INCREF(value)
        self.values[s] = <void *>value
        return s

    cdef object release_slot(self, slot_t s):
        """Free slot *s*; return its value, whose reference the caller now owns."""
        value = <object>self.values[s]
        Py_DECREF(value)
        self.values[s] = <void *>((<uintptr_t>self.free_slot << 1) | 1)
        self.free_slot = s
        return value

    cdef object replace_value(self, slot_t s, object value):
        old = <object>self.values[s]
        Py_DECREF(old)
        Py_INCREF(value)
        self.values[s] = <void *>value
        return old

    cdef LpmNode *new_node(self, slot_t short_best) except NULL:
        """A node with no prefixes and no children: one run answering NO_SLOT.

        Nodes come from the C allocator, not pymalloc: they are reallocated through
        many sizes as prefixes arrive, and pymalloc keeps the freed blocks of each
        size class apart (measured: 49 against 40 bytes of RSS per prefix at 500k),
        where glibc merges them.
        """
        cdef size_t size = node_size(1, 0, 0)
        cdef LpmNode *node = <LpmNode *>PyMem_RawMalloc(size)
        if node == NULL:
            raise MemoryError("cannot allocate a PrefixTable node")
        # EMPTY_NODE is exactly such a node: header, one NO_SLOT run and its padding.
        memcpy(node, &EMPTY_NODE, size)
        node.short_best = short_best
        node.allocated_words = <uint16_t>(size // 8)
        self.node_bytes += size
        return node

    cdef void release_node(self, LpmNode *node) noexcept:
        self.node_bytes -= 8 * <size_t>node.allocated_words
        PyMem_RawFree(node)

    cdef LpmNode *commit_node(self, LpmNode *node, const uint64_t *childmap, LpmNode **children,
                              uint32_t nchildren, const slot_t *rib_slots, const uint16_t *rib_keys,
                              uint32_t nrib) except NULL:
        """Give *node* these children and rib, recompute its runs; return the node.

        The returned node may have moved: the caller stores it where the old one was
        referenced. Nothing changes if an allocation fails. A node that shrinks is
        rewritten in place, so removals never fail. *children* may point into the
        node itself; *rib_slots* and *rib_keys* must be the caller's own copies.
        """
        cdef LpmNode *children_copy[256]
        cdef slot_t paint[256]
        cdef slot_t runs[256]
        cdef uint64_t runmap[4]
        cdef uint64_t childmap_copy[4]
        cdef uint32_t i, c, nruns = 0, span, start
        cdef LpmNode *target
        cdef size_t size
        memcpy(children_copy, children, nchildren * sizeof(LpmNode *))
        memcpy(childmap_copy, childmap, sizeof(childmap_copy))
        for c in range(256):
            paint[c] = NO_SLOT
        for i in range(nrib):
            span = 256 >> (rib_keys[i] >> 8)
            start = rib_keys[i] & 0xFF
            for c in range(start, start + span):
                paint[c] = rib_slots[i]
        # Every node has at least one run (NO_SLOT when it holds no prefix), so a
        # lookup can read its run without first checking that there is one.
        memset(runmap, 0, sizeof(runmap))
        for c in range(256):
            if c == 0 or paint[c] != paint[c - 1]:
                runmap[c >> 6] |= <uint64_t>1 << (c & 63)
                runs[nruns] = paint[c]
                nruns += 1
        size = node_size(nruns, nchildren, nrib)
        if size <= 8 * <size_t>node.allocated_words:
            target = node
        else:
            target = <LpmNode *>PyMem_RawMalloc(size)
            if target == NULL:
                raise MemoryError("cannot grow a PrefixTable node")
            target.short_best = node.short_best
            target.allocated_words = <uint16_t>(size // 8)
            self.node_bytes += size
        memcpy(target.runmap, runmap, sizeof(runmap))
        set_bases(target.runmap, target.run_base)
        target.nruns = <uint16_t>nruns
        target.nchildren = <uint16_t>nchildren
        target.nrib = <uint16_t>nrib
        if nchildren:
            memcpy(node_childmap(target), childmap_copy, sizeof(childmap_copy))
        set_bases(child_bitmap(target), target.child_base)
        memcpy(node_runs(target), runs, nruns * sizeof(slot_t))
        memcpy(node_children(target), children_copy, nchildren * sizeof(LpmNode *))
        memcpy(node_rib_slots(target), rib_slots, nrib * sizeof(slot_t))
        memcpy(node_rib_keys(target), rib_keys, nrib * sizeof(uint16_t))
        if target != node:
            self.release_node(node)
        return target

    cdef Py_ssize_t rib_find(self, LpmNode *node, uint16_t key, bint *found) noexcept:
        """Position of *key* in the node's sorted rib, or where it would be inserted."""
        cdef uint16_t *keys = node_rib_keys(node)
        cdef Py_ssize_t low = 0, high = node.nrib, middle
        while low < high:
            middle = (low + high) >> 1
            if keys[middle] < key:
                low = middle + 1
            else:
                high = middle
        found[0] = low < node.nrib and keys[low] == key
        return low

    # -- mutation (GIL and write lock held) --------------------------------------

    cdef object insert_key(self, const IpKey *key, object value):
        """Insert or replace; return the replaced value or MISSING."""
        cdef FamilyTrie *trie = &self.v4 if key.family == 4 else &self.v6
        cdef uint32_t high = dir_index(key.addr), index, first, i, span
        cdef int length = key.length
        cdef slot_t s
        self.ensure_dir(trie)
        if length > 16:
            return self.insert_long(trie, key, value)
        self.ensure_short(trie, length)
        index = high >> (16 - length)
        s = trie.short_slots[length][index]
        if s != NO_SLOT:
            return self.replace_value(s, value)
        self.reserve_slot()
        s = self.take_slot(value)
        trie.short_slots[length][index] = s
        span = <uint32_t>1 << (16 - length)
        first = index << (16 - length)
        for i in range(first, first + span):
            if dir_short_best(trie.dir[i]) == NO_SLOT or trie.dir_length[i] < length:
                dir_set_short_best(&trie.dir[i], s)
                trie.dir_length[i] = <uint8_t>length
        trie.count += 1
        return MISSING

    cdef object insert_long(self, FamilyTrie *trie, const IpKey *key, object value):
        cdef LpmNode *children[256]
        cdef slot_t rib_slots[MAX_RIB]
        cdef uint16_t rib_keys[MAX_RIB]
        cdef uint64_t childmap[4]
        cdef void **reference = &trie.dir[dir_index(key.addr)]
        cdef LpmNode *node
        cdef LpmNode *child
        cdef uint32_t depth = 16, c, position, count
        cdef uint16_t rkey
        cdef bint found
        cdef Py_ssize_t at
        # *reference* is always the word that points at *node*: the dir word or an
        # entry of the parent's child array, rewritten whenever the node moves.
        if dir_is_slot(reference[0]):
            reference[0] = self.new_node(dir_short_best(reference[0]))
        node = <LpmNode *>reference[0]
        while key.length > depth + 8:
            c = key.addr[depth >> 3]
            position = rank_through(child_bitmap(node), node.child_base, c)
            if not bit_is_set(child_bitmap(node), c):
                child = self.new_node(NO_SLOT)
                count = node.nchildren
                memcpy(children, node_children(node), position * sizeof(LpmNode *))
                children[position] = child
                memcpy(children + position + 1, node_children(node) + position,
                       (count - position) * sizeof(LpmNode *))
                memcpy(rib_slots, node_rib_slots(node), node.nrib * sizeof(slot_t))
                memcpy(rib_keys, node_rib_keys(node), node.nrib * sizeof(uint16_t))
                memcpy(childmap, child_bitmap(node), sizeof(childmap))
                childmap[c >> 6] |= <uint64_t>1 << (c & 63)
                try:
                    node = self.commit_node(node, childmap, children, count + 1, rib_slots, rib_keys,
                                            node.nrib)
                except MemoryError:
                    self.release_node(child)
                    raise
                reference[0] = node
                position += 1
            reference = <void **>&node_children(node)[position - 1]
            node = <LpmNode *>reference[0]
            depth += 8
        rkey = rib_key(key.length - depth, key.addr[depth >> 3])
        at = self.rib_find(node, rkey, &found)
        if found:
            return self.replace_value(node_rib_slots(node)[at], value)
        self.reserve_slot()
        memcpy(rib_slots, node_rib_slots(node), at * sizeof(slot_t))
        memcpy(rib_keys, node_rib_keys(node), at * sizeof(uint16_t))
        rib_slots[at] = self.next_slot()
        rib_keys[at] = rkey
        memcpy(rib_slots + at + 1, node_rib_slots(node) + at, (node.nrib - at) * sizeof(slot_t))
        memcpy(rib_keys + at + 1, node_rib_keys(node) + at, (node.nrib - at) * sizeof(uint16_t))
        reference[0] = self.commit_node(node, child_bitmap(node), node_children(node), node.nchildren,
                                        rib_slots, rib_keys, node.nrib + 1)
        self.take_slot(value)
        trie.count += 1
        return MISSING

    cdef slot_t find_key(self, const IpKey *key) noexcept:
        """Slot of exactly this prefix, or NO_SLOT."""
        cdef FamilyTrie *trie = &self.v4 if key.family == 4 else &self.v6
        cdef uint32_t high, depth = 16
        cdef LpmNode *node
        cdef bint found
        cdef Py_ssize_t at
        if trie.dir == NULL:
            return NO_SLOT
        high = dir_index(key.addr)
        if key.length <= 16:
            if trie.short_slots[key.length] == NULL:
                return NO_SLOT
            return trie.short_slots[key.length][high >> (16 - key.length)]
        if dir_is_slot(trie.dir[high]):
            return NO_SLOT
        node = <LpmNode *>trie.dir[high]
        while node != NULL and key.length > depth + 8:
            node = child_of(node, key.addr[depth >> 3])
            depth += 8
        if node == NULL:
            return NO_SLOT
        at = self.rib_find(node, rib_key(key.length - depth, key.addr[depth >> 3]), &found)
        return node_rib_slots(node)[at] if found else NO_SLOT

    cdef object remove_key(self, const IpKey *key):
        """Remove exactly this prefix; return its value, or MISSING if absent."""
        cdef FamilyTrie *trie = &self.v4 if key.family == 4 else &self.v6
        cdef uint32_t high, index, first, i, span
        cdef int length = key.length, shorter
        cdef slot_t s, best
        if trie.dir == NULL:
            return MISSING
        high = dir_index(key.addr)
        if length > 16:
            value = self.remove_long(trie, key)
        else:
            if trie.short_slots[length] == NULL:
                return MISSING
            index = high >> (16 - length)
            s = trie.short_slots[length][index]
            if s == NO_SLOT:
                return MISSING
            trie.short_slots[length][index] = NO_SLOT
            span = <uint32_t>1 << (16 - length)
            first = index << (16 - length)
            for i in range(first, first + span):
                if dir_short_best(trie.dir[i]) != s:
                    continue
                # Fall back to the longest shorter prefix still covering this /16.
                best = NO_SLOT
                trie.dir_length[i] = 0
                for shorter in range(length - 1, -1, -1):
                    if trie.short_slots[shorter] != NULL:
                        best = trie.short_slots[shorter][i >> (16 - shorter)]
                        if best != NO_SLOT:
                            trie.dir_length[i] = <uint8_t>shorter
                            break
                dir_set_short_best(&trie.dir[i], best)
            value = self.release_slot(s)
        if value is not MISSING:
            trie.count -= 1
            if trie.count == 0:
                self.free_trie(trie)    # no fixed cost for a family without prefixes
        return value

    cdef object remove_long(self, FamilyTrie *trie, const IpKey *key):
        cdef slot_t rib_slots[MAX_RIB]
        cdef uint16_t rib_keys[MAX_RIB]
        cdef uint64_t childmap[4]
        cdef void **references[MAX_DEPTH_NODES]
        cdef uint8_t chunks[MAX_DEPTH_NODES]
        cdef LpmNode *node
        cdef uint32_t depth = 16, c, position
        cdef int level = 0
        cdef bint found
        cdef Py_ssize_t at
        cdef slot_t s
        references[0] = &trie.dir[dir_index(key.addr)]
        if dir_is_slot(references[0][0]):
            return MISSING
        node = <LpmNode *>references[0][0]
        while key.length > depth + 8:
            c = key.addr[depth >> 3]
            if not bit_is_set(child_bitmap(node), c):
                return MISSING
            chunks[level] = <uint8_t>c
            level += 1
            references[level] = <void **>&node_children(node)[child_index(node, c)]
            node = <LpmNode *>references[level][0]
            depth += 8
        at = self.rib_find(node, rib_key(key.length - depth, key.addr[depth >> 3]), &found)
        if not found:
            return MISSING
        s = node_rib_slots(node)[at]
        memcpy(rib_slots, node_rib_slots(node), at * sizeof(slot_t))
        memcpy(rib_keys, node_rib_keys(node), at * sizeof(uint16_t))
        memcpy(rib_slots + at, node_rib_slots(node) + at + 1, (node.nrib - at - 1) * sizeof(slot_t))
        memcpy(rib_keys + at, node_rib_keys(node) + at + 1, (node.nrib - at - 1) * sizeof(uint16_t))
        node = self.commit_node(node, child_bitmap(node), node_children(node), node.nchildren,
                                rib_slots, rib_keys, node.nrib - 1)
        references[level][0] = node
        # Prune nodes left with neither prefixes nor children, bottom up. Shrinking
        # rewrites in place, so the references above stay valid.
        while node.nrib == 0 and node.nchildren == 0:
            if level == 0:
                references[0][0] = dir_slot_word(node.short_best)
                self.release_node(node)
                break
            self.release_node(node)
            level -= 1
            node = <LpmNode *>references[level][0]
            c = chunks[level]
            position = <uint32_t>child_index(node, c)
            memcpy(childmap, child_bitmap(node), sizeof(childmap))
            childmap[c >> 6] &= ~(<uint64_t>1 << (c & 63))
            memcpy(rib_slots, node_rib_slots(node), node.nrib * sizeof(slot_t))
            memcpy(rib_keys, node_rib_keys(node), node.nrib * sizeof(uint16_t))
            # Close the gap in the child array in place, then commit the shorter array.
            memcpy(node_children(node) + position, node_children(node) + position + 1,
                   (node.nchildren - position - 1) * sizeof(LpmNode *))
            node = self.commit_node(node, childmap, node_children(node), node.nchildren - 1,
                                    rib_slots, rib_keys, node.nrib)
            references[level][0] = node
        return self.release_slot(s)

    cdef int write_lock(self) except -1:
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
        return 0

    cdef void write_unlock(self) noexcept:
        pthread_rwlock_unlock(&self.lock)

    # -- lookups ------------------------------------------------------------------

    cdef slot_t lookup_packed(self, const FamilyTrie *trie, const uint8_t *address,
                              int *matched_length) noexcept nogil:
        """Longest match for a packed address; its length goes to *matched_length*."""
        cdef void *word
        cdef LpmNode *node
        cdef LpmNode *best_node = NULL
        cdef slot_t best, s
        cdef uint32_t c, depth = 16, best_depth = 0, i
        if trie.dir == NULL:
            return NO_SLOT
        word = trie.dir[dir_index(address)]
        if dir_is_slot(word):
            best = <slot_t>(<uintptr_t>word >> 1)
        else:
            node = <LpmNode *>word
            best = node.short_best
            while True:
                c = address[depth >> 3]
                s = node_runs(node)[run_index(node, c)]
                if s != NO_SLOT:
                    best = s
                    best_node = node
                    best_depth = depth
                if not bit_is_set(child_bitmap(node), c):
                    break
                node = node_children(node)[child_index(node, c)]
                depth += 8
        if matched_length != NULL and best != NO_SLOT:
            if best_node == NULL:
                matched_length[0] = trie.dir_length[dir_index(address)]
            else:
                for i in range(best_node.nrib):
                    if node_rib_slots(best_node)[i] == best:
                        matched_length[0] = <int>(best_depth + (node_rib_keys(best_node)[i] >> 8))
                        break
        return best

    cdef slot_t lookup_key(self, const IpKey *key, int *matched_length) noexcept nogil:
        return self.lookup_packed(&self.v4 if key.family == 4 else &self.v6, key.addr, matched_length)

    cdef void lookup_batch(self, const FamilyTrie *trie, const uint32_t *ipv4, const uint8_t *ipv6,
                           Py_ssize_t count, int64_t *out) noexcept nogil:
        """Longest match for *count* addresses (``ipv4`` host-order words, or ``ipv6``
        packed 16-byte addresses when ``ipv4`` is NULL), slots or -1 into *out*.

        One lookup is a chain of dependent memory reads (dir word, node, child), each
        likely a cache and TLB miss in a large table. Walking a group of addresses one
        level at a time, prefetching the next level of every address in the group,
        overlaps those misses instead of paying them one after another. The inner
        loop has no data-dependent branch: with random addresses every such branch
        mispredicts half the time, which costs more than the memory.
        """
        cdef slot_t best[BATCH_GROUP]
        cdef LpmNode *current[BATCH_GROUP]
        cdef uint32_t high[BATCH_GROUP]
        cdef Py_ssize_t base = 0, j, size
        cdef uint32_t depth, c, has_child
        cdef uint32_t any_child
        cdef LpmNode *node
        cdef LpmNode *empty = &EMPTY_NODE.header
        cdef LpmNode *next_node
        cdef uintptr_t word
        cdef slot_t s
        if trie.dir == NULL:
            for j in range(count):
                out[j] = -1
            return
        while base < count:
            size = min(<Py_ssize_t>BATCH_GROUP, count - base)
            for j in range(size):
                high[j] = (ipv4[base + j] >> 16) if ipv4 != NULL else dir_index(ipv6 + 16 * (base + j))
                prefetch(&trie.dir[high[j]])
            any_child = 0
            for j in range(size):
                word = <uintptr_t>trie.dir[high[j]]
                # A slot word answers at once (and walks the empty node); a node word
                # is not read yet (a miss): it is prefetched for the first level.
                best[j] = <slot_t>(word >> 1) if (word & 1) else NO_SLOT
                current[j] = empty if (word & 1) else <LpmNode *>word
                any_child |= <uint32_t>(1 - (word & 1))
                prefetch(current[j])
                prefetch(<char *>current[j] + 64)
            depth = 16
            while any_child:
                any_child = 0
                for j in range(size):
                    node = current[j]
                    if ipv4 != NULL:
                        c = (ipv4[base + j] >> (24 - depth)) & 0xFF
                    else:
                        c = ipv6[16 * (base + j) + (depth >> 3)]
                    if depth == 16:
                        best[j] = node.short_best if node != empty else best[j]
                    s = node_runs(node)[run_index(node, c)]
                    best[j] = s if s != NO_SLOT else best[j]
                    # Read the child entry even when there is none (index -1 reads
                    # the node's own runs: valid memory), then select.
                    has_child = bit_is_set(child_bitmap(node), c)
                    next_node = node_children(node)[child_index(node, c)]
                    current[j] = next_node if has_child else empty
                    any_child |= has_child
                    prefetch(current[j])
                    prefetch(<char *>current[j] + 64)
                depth += 8
            for j in range(size):
                out[base + j] = -1 if best[j] == NO_SLOT else <int64_t>best[j]
            base += size

    # -- Python API -------------------------------------------------------------

    def insert(self, prefix, value):
        """Map *prefix* to *value*, replacing any value it had."""
        cdef IpKey key
        coerce_prefix(prefix, &key)
        self.write_lock()
        try:
            replaced = self.insert_key(&key, value)
        finally:
            self.write_unlock()
        # The replaced value is released here, after the lock: its finaliser may run
        # arbitrary code, which must not find the table locked.
        del replaced

    def __setitem__(self, prefix, value):
        self.insert(prefix, value)

    def remove(self, prefix):
        """Remove exactly *prefix*; raise ``KeyError`` if it is not in the table."""
        cdef IpKey key
        coerce_prefix(prefix, &key)
        self.write_lock()
        try:
            removed = self.remove_key(&key)
        finally:
            self.write_unlock()
        if removed is MISSING:
            raise KeyError(prefix)
        del removed

    def __delitem__(self, prefix):
        self.remove(prefix)

    def get(self, prefix, default=None):
        """Value of exactly *prefix* (no longest match), or *default*."""
        cdef IpKey key
        cdef slot_t s
        coerce_prefix(prefix, &key)
        s = self.find_key(&key)
        return default if s == NO_SLOT else <object>self.values[s]

    def __getitem__(self, prefix):
        cdef IpKey key
        cdef slot_t s
        coerce_prefix(prefix, &key)
        s = self.find_key(&key)
        if s == NO_SLOT:
            raise KeyError(prefix)
        return <object>self.values[s]

    def __contains__(self, prefix):
        cdef IpKey key
        coerce_prefix(prefix, &key)
        return self.find_key(&key) != NO_SLOT

    def __len__(self):
        return self.v4.count + self.v6.count

    def __bool__(self):
        return (self.v4.count + self.v6.count) > 0

    def clear(self):
        """Remove every prefix."""
        cdef slot_t s
        cdef list values = []
        self.write_lock()
        try:
            for s in range(self.value_high):
                if not (<uintptr_t>self.values[s] & 1):
                    values.append(<object>self.values[s])
            self.release_all()
        finally:
            self.write_unlock()
        del values

    def lookup(self, address, family=None):
        """Value of the longest prefix containing *address*, or ``None``.

        *address* is IPv4 or IPv6 text, an ``ipaddress`` address, packed ``bytes``
        (4 or 16, network byte order), or an ``int`` with ``family`` 4 or 6.
        """
        cdef IpKey key
        cdef slot_t s
        coerce_address(address, family, &key)
        s = self.lookup_key(&key, NULL)
        return None if s == NO_SLOT else <object>self.values[s]

    def lookup_prefix(self, address, family=None):
        """``(network, value)`` of the longest prefix containing *address*, or ``None``."""
        cdef IpKey key
        cdef slot_t s
        cdef int length = 0
        coerce_address(address, family, &key)
        s = self.lookup_key(&key, &length)
        if s == NO_SLOT:
            return None
        # Take the value before building the network: that runs Python code, during
        # which another thread may change the table and free slot s.
        value = <object>self.values[s]
        mask_key(&key, length)
        return (key_to_network(&key), value)

    def lookup_many(self, addresses, out=None):
        """Look up a batch of IPv4 addresses without the GIL.

        *addresses* is a C-contiguous buffer of 32-bit unsigned integers in host
        byte order (``array.array('I')``, a numpy ``uint32`` array). Returns an
        ``array.array('q')`` of value slots, ``NO_MATCH`` (-1) where nothing
        matched; ``value_at(slot)`` gives the value. If *out* (a writable int64
        buffer of the same length) is given, it is filled and returned instead.
        """
        cdef const uint32_t[::1] source
        cdef int64_t[::1] result
        cdef Py_ssize_t count
        try:
            source = addresses
        except (ValueError, TypeError) as error:
            raise InvalidAddressError(
                f"lookup_many needs a C-contiguous buffer of uint32 IPv4 addresses in host byte "
                f"order (array.array('I'), numpy uint32): {error}") from None
        count = source.shape[0]
        if out is None:
            out = array.clone(INT64_TEMPLATE, count, False)
        result = checked_output(out, count)
        if count == 0:
            return out
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            self.lookup_batch(&self.v4, &source[0], NULL, count, &result[0])
            pthread_rwlock_unlock(&self.lock)
        return out

    def lookup_many6(self, addresses, out=None):
        """Look up a batch of IPv6 addresses without the GIL.

        *addresses* is a bytes-like object of 16 bytes per address, each packed in
        network byte order. Returns slots as :meth:`lookup_many` does.
        """
        cdef const uint8_t[::1] source
        cdef int64_t[::1] result
        cdef Py_ssize_t count
        try:
            source = memoryview(addresses).cast("B")
        except (ValueError, TypeError) as error:
            raise InvalidAddressError(
                f"lookup_many6 needs a C-contiguous bytes-like object of packed 16-byte IPv6 "
                f"addresses: {error}") from None
        if source.shape[0] % 16:
            raise InvalidAddressError(
                f"lookup_many6 got {source.shape[0]} bytes: expected a multiple of 16 "
                f"(one packed IPv6 address each)")
        count = source.shape[0] // 16
        if out is None:
            out = array.clone(INT64_TEMPLATE, count, False)
        result = checked_output(out, count)
        if count == 0:
            return out
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            self.lookup_batch(&self.v6, NULL, &source[0], count, &result[0])
            pthread_rwlock_unlock(&self.lock)
        return out

    def value_at(self, Py_ssize_t slot):
        """Value stored in *slot*, a number returned by :meth:`lookup_many`."""
        if slot < 0 or slot >= self.value_high or (<uintptr_t>self.values[slot] & 1):
            raise IndexError(f"slot {slot} holds no value: expected a slot returned by lookup_many "
                             f"for a prefix still in the table")
        return <object>self.values[slot]

    # -- iteration -----------------------------------------------------------------

    cdef Py_ssize_t collect_node(self, LpmNode *node, uint8_t *prefix, int depth, uint8_t family,
                                 Entry *entries, Py_ssize_t count) noexcept:
        cdef uint16_t *keys = node_rib_keys(node)
        cdef slot_t *slots = node_rib_slots(node)
        cdef uint32_t i, c, child = 0
        for i in range(node.nrib):
            memcpy(entries[count].addr, prefix, 16)
            entries[count].addr[depth >> 3] = keys[i] & 0xFF
            entries[count].length = <uint8_t>(depth + (keys[i] >> 8))
            entries[count].family = family
            entries[count].slot = slots[i]
            count += 1
        for c in range(256):
            if bit_is_set(child_bitmap(node), c):
                prefix[depth >> 3] = <uint8_t>c
                count = self.collect_node(node_children(node)[child], prefix, depth + 8, family,
                                          entries, count)
                child += 1
        prefix[depth >> 3] = 0
        return count

    cdef Py_ssize_t collect_trie(self, FamilyTrie *trie, Entry *entries, Py_ssize_t count) noexcept:
        cdef uint8_t prefix[16]
        cdef uint32_t length, index, high
        if trie.dir == NULL:
            return count
        for length in range(17):
            if trie.short_slots[length] == NULL:
                continue
            for index in range(<uint32_t>1 << length):
                if trie.short_slots[length][index] == NO_SLOT:
                    continue
                memset(entries[count].addr, 0, 16)
                high = index << (16 - length)
                entries[count].addr[0] = <uint8_t>(high >> 8)
                entries[count].addr[1] = <uint8_t>high
                entries[count].length = <uint8_t>length
                entries[count].family = trie.family
                entries[count].slot = trie.short_slots[length][index]
                count += 1
        memset(prefix, 0, 16)
        for high in range(<uint32_t>DIR_SIZE):
            if not dir_is_slot(trie.dir[high]):
                prefix[0] = <uint8_t>(high >> 8)
                prefix[1] = <uint8_t>high
                count = self.collect_node(<LpmNode *>trie.dir[high], prefix, 16, trie.family,
                                          entries, count)
        return count

    cdef PrefixTableIterator snapshot(self, bint with_values):
        # Nothing between reading the table and owning references to its values may
        # allocate a Python object: that may run the garbage collector, finalisers and
        # so other threads, which could change the table and free slots under us.
        cdef Py_ssize_t total = self.v4.count + self.v6.count, count, captured, i
        cdef Entry *entries = <Entry *>PyMem_Malloc(max(total, 1) * sizeof(Entry))
        cdef void **references
        cdef PrefixTableIterator iterator
        if entries == NULL:
            raise MemoryError("cannot allocate a PrefixTable iteration snapshot")
        count = self.collect_trie(&self.v4, entries, 0)
        count = self.collect_trie(&self.v6, entries, count)
        qsort(entries, count, sizeof(Entry), compare_entries)
        references = <void **>PyMem_Malloc(max(count, 1) * sizeof(void *))
        if references == NULL:
            PyMem_Free(entries)
            raise MemoryError("cannot allocate a PrefixTable iteration snapshot")
        captured = count if with_values else 0
        for i in range(captured):
            references[i] = self.values[entries[i].slot]
            Py_INCREF(<object>references[i])
        try:
            iterator = PrefixTableIterator.__new__(PrefixTableIterator)
            if with_values:
                iterator.snapshot_values = PyList_New(count)
        except BaseException:
            for i in range(captured):
                Py_DECREF(<object>references[i])
            PyMem_Free(references)
            PyMem_Free(entries)
            raise
        for i in range(captured):
            PyList_SET_ITEM(iterator.snapshot_values, i, <object>references[i])   # steals
        PyMem_Free(references)
        iterator.entries = entries
        iterator.count = count
        iterator.position = 0
        iterator.with_values = with_values
        return iterator

    def items(self):
        """Iterate ``(network, value)`` pairs in the documented order (a snapshot)."""
        return self.snapshot(True)

    def __iter__(self):
        return self.snapshot(True)

    def prefixes(self):
        """Iterate the networks in the documented order (a snapshot)."""
        return self.snapshot(False)

    def memory_usage(self):
        """Bytes held by the table's C structures (value objects not included)."""
        return (sizeof(PrefixTable) + self.node_bytes + self.value_capacity * sizeof(void *)
                + trie_bytes(&self.v4) + trie_bytes(&self.v6))

    def __repr__(self):
        return f"<PrefixTable: {self.v4.count} IPv4 and {self.v6.count} IPv6 prefixes>"

    def __reduce__(self):
        return (PrefixTable, (list(self.snapshot(True)),))


cdef size_t trie_bytes(const FamilyTrie *trie) noexcept:
    cdef size_t total = 0
    cdef int length
    if trie.dir != NULL:
        total += DIR_SIZE * (sizeof(void *) + 1)
    for length in range(17):
        if trie.short_slots[length] != NULL:
            total += (<size_t>1 << length) * sizeof(slot_t)
    return total


cdef int64_t[::1] checked_output(object out, Py_ssize_t count) except *:
    cdef int64_t[::1] result
    try:
        result = out
    except (ValueError, TypeError) as error:
        raise ValueError(f"out must be a writable C-contiguous int64 buffer such as "
                         f"array.array('q'): {error}") from None
    if result.shape[0] != count:
        raise ValueError(f"out holds {result.shape[0]} slots: expected {count}, one per address")
    return result
