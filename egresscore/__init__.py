"""egresscore: stable egress IPs for selected Kubernetes pods.

The library's layers, from the bottom: ``egresscore.core`` (Cython: prefix tables,
and later the classifier, SNAT table and packet rewriting), the policy model, and
the node agent. ``egresscore.cli`` is the command line.
"""

from egresscore import errors
from egresscore.core.prefix_table import NO_MATCH, PrefixTable

__version__ = "0.1.0"

__all__ = ["NO_MATCH", "PrefixTable", "__version__", "errors"]
