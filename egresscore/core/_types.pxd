# Fixed-width types of the Cython core, declared once (CONVENTIONS habit 3).
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# Index of a value slot in a table's value array.
ctypedef uint32_t slot_t
# Index of a node in a table's node pool; 0 is "no node".
ctypedef uint32_t node_index_t

cdef enum:
    # A slot index that is never allocated: "no value here".
    NO_SLOT = 0xFFFFFFFF
