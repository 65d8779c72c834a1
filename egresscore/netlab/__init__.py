"""A small network built from Linux network namespaces, for tests, benchmarks and the demo.

Everything is created inside namespaces whose names start with a prefix unique to
the run (``egc<pid>x<n>-``); nothing in the caller's own namespace changes. Closing
the :class:`Lab` stops every process it started and deletes its namespaces.
Addresses come from the documentation and benchmarking ranges only (RFC 5737,
RFC 2544's 198.18.0.0/15).
"""

from egresscore.netlab.cluster import ClusterTopology, Pod, cilium_policy, inventory_document
from egresscore.netlab.namespaces import GatewayTopology, Lab, LabError, checksum_errors, nstat

__all__ = [
    "ClusterTopology",
    "GatewayTopology",
    "Lab",
    "LabError",
    "Pod",
    "checksum_errors",
    "cilium_policy",
    "inventory_document",
    "nstat",
]
