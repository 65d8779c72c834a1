# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Label-selector evaluation over interned labels (the policy compiler's engine).

A ``LabelIndex`` interns every (key, value) pair of a set of objects (pods,
namespaces or nodes) and keeps, per pair and per key, the list of objects that carry
it. A selector compiled into a ``Program`` is then evaluated for all objects at once,
as operations on bitsets of objects:

- ``PAIRS p1 .. pn``: the objects carrying any of the pairs (``k in {..}``; a
  ``starts with`` test is the pairs of key k whose value passes it);
- ``KEY k``: the objects carrying key k; ``ALL``: every object;
- ``NOT``, ``AND n``, ``OR n`` over the top of the stack.

With 10,000 pods a set is 157 words, so an AND is a few hundred instructions; the
cost of a selector is its posting lists, not the number of objects it is tested
against. The core knows nothing of selector syntax: egresscore.policy.compiler turns
the selector tree into these instructions.
"""

from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from egresscore.core._types cimport uint32_t, uint64_t
from egresscore.includes.libc_extra cimport __builtin_ctzll, __builtin_popcountll

# Opcodes of a selector program (a flat list of ints).
OP_ALL = 0
OP_PAIRS = 1   # followed by n, then n pair ids
OP_KEY = 2     # followed by a key id
OP_NOT = 3
OP_AND = 4     # followed by n: AND of the top n sets
OP_OR = 5      # followed by n: OR of the top n sets

cdef enum:
    C_OP_ALL = 0
    C_OP_PAIRS = 1
    C_OP_KEY = 2
    C_OP_NOT = 3
    C_OP_AND = 4
    C_OP_OR = 5


cdef Bitset new_bitset(Py_ssize_t size):
    cdef Bitset result = Bitset.__new__(Bitset)
    result.size = size
    result.nwords = (size + 63) >> 6
    result.words = <uint64_t *>calloc(result.nwords if result.nwords else 1, sizeof(uint64_t))
    if result.words == NULL:
        raise MemoryError()
    return result


cdef inline void clear_tail(Bitset bits) noexcept nogil:
    # Bits past size stay zero, so that NOT, counting and iteration need no mask.
    if bits.size & 63:
        bits.words[bits.nwords - 1] &= (<uint64_t>1 << (bits.size & 63)) - 1


cdef class Bitset:
    """A fixed-size set of object indices, the result of evaluating a selector."""

    def __cinit__(self):
        self.words = NULL

    def __dealloc__(self):
        free(self.words)

    def __init__(self, *args, **kwargs):
        raise TypeError("Bitset objects are made by LabelIndex.evaluate and Bitset.from_indices")

    @staticmethod
    def from_indices(Py_ssize_t size, indices):
        """A set of ``size`` bits with ``indices`` set."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        cdef Bitset result = new_bitset(size)
        cdef Py_ssize_t i
        for i in indices:
            if i < 0 or i >= size:
                raise IndexError(f"index {i} out of range for a set of {size}")
            result.words[i >> 6] |= <uint64_t>1 << (i & 63)
        return result

    cdef bint test(self, Py_ssize_t index) noexcept nogil:
        return (self.words[index >> 6] >> (index & 63)) & 1

    @property
    def size(self):
        return self.size

    def __contains__(self, Py_ssize_t index):
        return 0 <= index < self.size and self.test(index)

    def __len__(self):
        cdef Py_ssize_t total = 0, w
        for w in range(self.nwords):
            total += __builtin_popcountll(self.words[w])
        return total

    def __iter__(self):
        cdef Py_ssize_t w
        cdef uint64_t word
        for w in range(self.nwords):
            word = self.words[w]
            while word:
                yield (w << 6) + __builtin_ctzll(word)
                word &= word - 1

    def __eq__(self, other):
        if not isinstance(other, Bitset):
            return NotImplemented
        cdef Bitset o = <Bitset>other
        cdef Py_ssize_t w
        if o.size != self.size:
            return False
        for w in range(self.nwords):
            if o.words[w] != self.words[w]:
                return False
        return True

    __hash__ = None

    def __repr__(self):
        return f"Bitset({self.size}, {list(self)})"

    def __and__(self, Bitset other not None):
        return self.combine(other, 0)

    def __or__(self, Bitset other not None):
        return self.combine(other, 1)

    cdef Bitset combine(self, Bitset other, int union):
        if other.size != self.size:
            raise ValueError(f"sets of different sizes: {self.size} and {other.size}")
        cdef Bitset result = new_bitset(self.size)
        cdef Py_ssize_t w
        for w in range(self.nwords):
            result.words[w] = (self.words[w] | other.words[w]) if union else (self.words[w] & other.words[w])
        return result

    def expand(self, const uint32_t[::1] owner not None):
        """The set of objects ``i`` whose ``owner[i]`` is in this set (for example
        the pods whose namespace was selected). An owner of 0xFFFFFFFF is in no set."""
        cdef Bitset result = new_bitset(owner.shape[0])
        cdef Py_ssize_t i
        cdef uint32_t o
        with nogil:
            for i in range(owner.shape[0]):
                o = owner[i]
                if o < <uint64_t>self.size and self.test(o):
                    result.words[i >> 6] |= <uint64_t>1 << (i & 63)
        return result


cdef Py_ssize_t operand(list code, Py_ssize_t pc, Py_ssize_t end, Py_ssize_t lowest) except -1:
    """The program's operand at pc: present, an int, and at least ``lowest``."""
    if pc >= end:
        raise ValueError(f"the program ends at {end} where an operand was expected")
    value = code[pc]
    if not isinstance(value, int) or not lowest <= value < 0xFFFFFFFF:
        raise ValueError(f"operand {value!r} at {pc}: expected an integer from {lowest} to 4294967294")
    return value


cdef uint32_t *rows_to_arrays(list rows, uint32_t **objects_out) except NULL:
    """Compressed rows from a list of lists of object indices."""
    cdef Py_ssize_t n = len(rows), total = 0, r, at = 0
    cdef list row
    for row in rows:
        total += len(row)
    cdef uint32_t *start = <uint32_t *>malloc((n + 1) * sizeof(uint32_t))
    cdef uint32_t *objects = <uint32_t *>malloc((total if total else 1) * sizeof(uint32_t))
    if start == NULL or objects == NULL:
        free(start)
        free(objects)
        raise MemoryError()
    for r in range(n):
        start[r] = <uint32_t>at
        for index in <list>rows[r]:
            objects[at] = <uint32_t>index
            at += 1
    start[n] = <uint32_t>at
    objects_out[0] = objects
    return start


cdef class LabelIndex:
    """Interned labels of ``count`` objects, for evaluating selector programs.

    ``LabelIndex([{"app": "web"}, {"app": "db", "tier": "1"}])``: object 0 and 1.
    """

    def __cinit__(self):
        self.pair_start = NULL
        self.pair_objects = NULL
        self.key_start = NULL
        self.key_objects = NULL

    def __dealloc__(self):
        free(self.pair_start)
        free(self.pair_objects)
        free(self.key_start)
        free(self.key_objects)

    def __init__(self, labels):
        cdef dict key_ids = {}
        cdef dict pair_ids = {}
        cdef list values_by_key = []
        cdef list pair_rows = []
        cdef list key_rows = []
        cdef Py_ssize_t index = 0
        cdef object key_id, pair_id
        for mapping in labels:
            for key, value in mapping.items():
                pair = (key, value)
                pair_id = pair_ids.get(pair)
                if pair_id is None:
                    key_id = key_ids.get(key)
                    if key_id is None:
                        key_id = len(key_rows)
                        key_ids[key] = key_id
                        key_rows.append([])
                        values_by_key.append([])
                    pair_id = len(pair_rows)
                    pair_ids[pair] = pair_id
                    pair_rows.append([])
                    (<list>values_by_key[key_id]).append((value, pair_id))
                    (<list>key_rows[key_id]).append(index)
                else:
                    (<list>key_rows[key_ids[key]]).append(index)
                (<list>pair_rows[pair_id]).append(index)
            index += 1
        if index >= 0xFFFFFFFF:
            raise OverflowError(f"a LabelIndex holds at most 4294967294 objects, got {index}")
        self.count = index
        self.key_ids = key_ids
        self.pair_ids = pair_ids
        self.values_by_key = values_by_key
        self.npairs = len(pair_rows)
        self.nkeys = len(key_rows)
        self.pair_start = rows_to_arrays(pair_rows, &self.pair_objects)
        self.key_start = rows_to_arrays(key_rows, &self.key_objects)

    def __len__(self):
        return self.count

    def key_id(self, key):
        """Id of label ``key``, or -1 when no object carries it."""
        return self.key_ids.get(key, -1)

    def pair_id(self, key, value):
        """Id of the pair ``key=value``, or -1 when no object carries it."""
        return self.pair_ids.get((key, value), -1)

    def values(self, key):
        """``[(value, pair id), ...]`` of every value ``key`` has on some object."""
        key_id = self.key_ids.get(key)
        return [] if key_id is None else list(self.values_by_key[key_id])

    cdef int or_postings(self, Bitset target, const uint32_t *start, const uint32_t *objects,
                         uint32_t row) except -1:
        cdef uint32_t i, o
        for i in range(start[row], start[row + 1]):
            o = objects[i]
            target.words[o >> 6] |= <uint64_t>1 << (o & 63)
        return 0

    def evaluate(self, program):
        """The set of objects the selector ``program`` (a sequence of ints, see the
        module docstring) matches."""
        cdef list stack = []
        cdef Py_ssize_t pc = 0, n, end = len(program), i, j, w
        cdef Bitset top, other
        cdef uint32_t arg
        code = list(program)
        while pc < end:
            op = code[pc]
            pc += 1
            if op == C_OP_ALL:
                top = new_bitset(self.count)
                if top.nwords:
                    memset(top.words, 0xFF, top.nwords * sizeof(uint64_t))
                    clear_tail(top)
                stack.append(top)
            elif op == C_OP_PAIRS:
                n = operand(code, pc, end, 0)
                pc += 1
                if pc + n > end:
                    raise ValueError(f"PAIRS at {pc - 2} names {n} pairs, but the program ends after {end - pc}")
                top = new_bitset(self.count)
                for i in range(n):
                    arg = operand(code, pc + i, end, 0)
                    if arg >= <uint64_t>self.npairs:
                        raise ValueError(f"pair id {arg} out of range (the index has {self.npairs})")
                    self.or_postings(top, self.pair_start, self.pair_objects, arg)
                pc += n
                stack.append(top)
            elif op == C_OP_KEY:
                arg = operand(code, pc, end, 0)
                pc += 1
                if arg >= <uint64_t>self.nkeys:
                    raise ValueError(f"key id {arg} out of range (the index has {self.nkeys})")
                top = new_bitset(self.count)
                self.or_postings(top, self.key_start, self.key_objects, arg)
                stack.append(top)
            elif op == C_OP_NOT:
                if not stack:
                    raise ValueError(f"NOT at {pc - 1} with an empty stack")
                top = stack[len(stack) - 1]
                for w in range(top.nwords):
                    top.words[w] = ~top.words[w]
                clear_tail(top)
            elif op == C_OP_AND or op == C_OP_OR:
                n = operand(code, pc, end, 0)
                pc += 1
                if n > len(stack):
                    raise ValueError(f"{'AND' if op == C_OP_AND else 'OR'} of {n} sets at {pc - 2}, "
                                     f"but the stack holds {len(stack)}")
                if n == 0:
                    top = new_bitset(self.count)
                    if op == C_OP_AND and top.nwords:
                        memset(top.words, 0xFF, top.nwords * sizeof(uint64_t))
                        clear_tail(top)
                    stack.append(top)
                    continue
                top = stack[len(stack) - n]
                for j in range(len(stack) - n + 1, len(stack)):
                    other = stack[j]
                    if op == C_OP_AND:
                        for w in range(top.nwords):
                            top.words[w] &= other.words[w]
                    else:
                        for w in range(top.nwords):
                            top.words[w] |= other.words[w]
                del stack[len(stack) - n + 1:]
            else:
                raise ValueError(f"unknown opcode {op} at {pc - 1}")
        if len(stack) != 1:
            raise ValueError(f"a selector program must leave one set, left {len(stack)}")
        return stack[0]
