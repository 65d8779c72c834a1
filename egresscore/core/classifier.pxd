# The compiled classifier: for a packet from S to D, pass / redirect / snat / drop,
# and which gateway. Built by egresscore.policy.compiler; see classifier.pyx.
cimport cython

from egresscore.core._types cimport int64_t, slot_t, uint8_t, uint32_t, uint64_t
from egresscore.core.inet cimport IpKey
from egresscore.core.prefix_table cimport PrefixTable

# Actions and reasons of a decision code (code = action | reason << 4 | (gateway + 1) << 8);
# the numbers of egresscore.core.classifier.Action and Reason.
cdef enum:
    A_PASS = 0
    A_REDIRECT = 1
    A_SNAT = 2
    A_DROP = 3
    R_NOT_AN_ENDPOINT = 0
    R_CLUSTER_INTERNAL = 1
    R_NO_POLICY = 2
    R_EXCLUDED = 3
    R_RULE_PASS = 4
    R_RULE_DROP = 5
    R_NO_GATEWAY = 6
    R_GATEWAY = 7

# A destination prefix of the compiled table. Its candidates are
# candidates[cand_start:cand_start + cand_count] (the prefix's own, best first, then
# those of short-listed ancestors); the walk goes on at parent, the nearest
# containing prefix whose candidates were not copied in.
cdef struct DstNode:
    uint32_t cand_start
    uint32_t cand_count
    uint32_t parent          # NO_NODE: none
    uint32_t internal        # 1: this prefix or one containing it is cluster-internal
    uint32_t bitmap          # long candidate lists: row of node_bitmaps (units present); else NO_NODE

# (policy, rule) in precedence order; rule EXCLUDED_RULE is an excluded CIDR.
cdef struct Candidate:
    uint32_t unit
    uint32_t rule

# One input prefix while the destinations are laid out.
cdef struct PrefixEntry:
    IpKey key
    uint32_t order       # position in the input (precedence); after layout, the node
    uint32_t unit        # INTERNAL_UNIT for a cluster-internal prefix
    uint32_t rule

cdef struct RuleInfo:
    uint8_t action           # RULE_* below
    uint8_t prefer_local
    uint32_t max_gateways    # 0: all
    uint32_t gw_start[2]     # usable gateways per family (0: IPv4, 1: IPv6)
    uint32_t gw_count[2]

cdef struct GatewayInfo:
    uint64_t gid             # the gateway's id in the score (docs/policy.md)
    uint32_t node            # node index
    uint8_t local            # the node the classifier was compiled for


@cython.final
cdef class Classifier:
    cdef PrefixTable sources         # host prefixes -> endpoint index
    cdef PrefixTable destinations    # prefixes; a slot is a DstNode index
    cdef uint32_t *endpoint_of_slot
    # IPv4 sources: open addressing, keys and endpoint indices (NO_NODE: empty).
    cdef uint32_t *source_keys
    cdef uint32_t *source_values
    cdef uint32_t source_mask
    cdef uint32_t source_shift
    cdef DstNode *nodes
    cdef Candidate *candidates
    cdef uint64_t *node_bitmaps       # rows of unit_words, for nodes with many candidates
    cdef RuleInfo *rules
    cdef uint32_t *rule_gateways
    cdef GatewayInfo *gateway_info
    cdef uint32_t *endpoint_node
    cdef uint64_t *endpoint_units    # endpoints x unit_words: bit u set when unit u selects it
    cdef uint8_t *endpoint_selected  # 1 when any unit selects the endpoint
    cdef Py_ssize_t unit_words
    cdef Py_ssize_t nendpoints
    cdef Py_ssize_t nnodes
    cdef Py_ssize_t ncandidates
    cdef Py_ssize_t bitmap_words
    cdef Py_ssize_t nunits
    cdef Py_ssize_t nrules
    cdef Py_ssize_t ngateways
    cdef readonly tuple unit_names
    cdef readonly tuple gateways
    cdef dict decision_cache
    cdef uint64_t load_sink

    cdef uint32_t decide(self, slot_t src_slot, slot_t dst_slot, int family, const uint64_t *src_words,
                         const uint64_t *dst_words, uint32_t *unit_out) noexcept nogil
    cdef uint32_t decide_endpoint(self, uint32_t endpoint, uint32_t n, int family, const uint64_t *src_words,
                                  const uint64_t *dst_words, uint32_t *unit_out) noexcept nogil
    cdef int build_destinations(self, destinations, internal) except -1
    cdef int build_source_hash(self, endpoint_addresses) except -1
    cdef uint32_t source_endpoint(self, uint32_t address) noexcept nogil
    cdef int flatten_chains(self) except -1
    cdef const Candidate *first_selected(self, const DstNode *node, const uint64_t *units) noexcept nogil
    cdef uint32_t choose_gateway(self, const RuleInfo *rule, int family, uint32_t endpoint,
                                 const uint64_t *src_words, const uint64_t *dst_words) noexcept nogil
    cdef void classify_batch(self, const uint32_t *pairs4, const uint8_t *pairs6, Py_ssize_t count,
                             uint32_t *out) noexcept nogil
    cdef object decision(self, uint32_t code, uint32_t unit)
    cdef int classify_one(self, src, dst, uint32_t *code, uint32_t *unit) except -1
