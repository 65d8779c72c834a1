"""The policy snapshot in force, and reloading it without ever half-applying a change.

``PolicyStore`` owns the compiled snapshot an agent classifies with. ``reload()``
reads and compiles the files into a new snapshot and only then swaps it in (one
attribute assignment, atomic for other threads). A file with an error raises
``PolicyErrorGroup`` and leaves the snapshot in force untouched: flows keep being
classified by the last good policies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from egresscore.core.classifier import Classifier
from egresscore.policy.compiler import compile_policies
from egresscore.policy.loader import load_files
from egresscore.policy.model import PolicySet

__all__ = ["PolicySnapshot", "PolicyStore"]


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """One compiled generation: what was read, what it compiled to, and when."""

    generation: int
    policy_set: PolicySet
    classifier: Classifier
    compiled_at: float  # time.time() when it was swapped in
    compile_seconds: float


class PolicyStore:
    """The snapshot compiled from ``files`` for ``local_node``.

    The constructor loads the files once and raises ``PolicyErrorGroup`` if they
    are bad: there is no last good snapshot yet to fall back on.
    """

    def __init__(self, files: Iterable[str | os.PathLike[str]], local_node: str | None = None) -> None:
        self.files = tuple(files)
        self.local_node = local_node
        self._current = self._compile(1)

    @property
    def current(self) -> PolicySnapshot:
        """The snapshot in force."""
        return self._current

    @property
    def classifier(self) -> Classifier:
        return self._current.classifier

    def reload(self) -> PolicySnapshot:
        """Read and compile the files again; swap the result in only if all is well.

        Raises ``PolicyErrorGroup`` (with every error and its location) and keeps the
        current snapshot when any file is bad."""
        snapshot = self._compile(self._current.generation + 1)
        self._current = snapshot
        return snapshot

    def _compile(self, generation: int) -> PolicySnapshot:
        started = time.perf_counter()
        policy_set = load_files(self.files)
        classifier = compile_policies(policy_set, self.local_node)
        elapsed = time.perf_counter() - started
        return PolicySnapshot(generation, policy_set, classifier, time.time(), elapsed)
