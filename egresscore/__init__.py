"""egresscore: stable egress IPs for selected Kubernetes pods.

The library's layers, from the bottom: ``egresscore.core`` (Cython: prefix tables,
the SNAT table and packet rewriting, selector evaluation and the classifier),
``egresscore.policy`` (documents in, a compiled classifier out), and later the node
agent. ``egresscore.cli`` is the command line.
"""

from egresscore import errors
from egresscore.core.packet import PacketInfo, parse
from egresscore.core.prefix_table import NO_MATCH, PrefixTable
from egresscore.core.snat_table import SnatEntry, SnatState, SnatTable, Verdict

__version__ = "0.1.0"

__all__ = [
    "NO_MATCH",
    "PacketInfo",
    "PrefixTable",
    "SnatEntry",
    "SnatState",
    "SnatTable",
    "Verdict",
    "__version__",
    "errors",
    "parse",
]
