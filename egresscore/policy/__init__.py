"""The policy layer: documents in, one compiled classifier out (docs/policy.md).

``load_files`` reads Cilium, Calico and native documents into the frozen model of
``egresscore.policy.model``; ``compile_policies`` turns that model into an
``egresscore.core.classifier.Classifier``; ``PolicyStore`` keeps the snapshot in
force across reloads; ``explain`` says why a packet gets its decision.
"""

from egresscore.core.classifier import Action, Classifier, Decision, Gateway, Reason
from egresscore.policy.compiler import compile_policies
from egresscore.policy.explain import Explanation, explain
from egresscore.policy.loader import load_files, load_texts, validate_files
from egresscore.policy.model import PolicySet
from egresscore.policy.store import PolicySnapshot, PolicyStore

__all__ = [
    "Action",
    "Classifier",
    "Decision",
    "Explanation",
    "Gateway",
    "PolicySet",
    "PolicySnapshot",
    "PolicyStore",
    "Reason",
    "compile_policies",
    "explain",
    "load_files",
    "load_texts",
    "validate_files",
]
