"""The exceptions egresscore raises.

Everything egresscore raises on purpose derives from :class:`EgressCoreError`, so a
caller can catch the library's errors apart from bugs. Errors about bad input also
derive from the built-in exception a Python programmer would expect (``ValueError``
for a malformed address), so existing ``except ValueError`` code keeps working.

Every message says what was wrong, where, and what was expected.
"""

from __future__ import annotations

__all__ = [
    "EgressCoreError",
    "InvalidAddressError",
    "InvalidPrefixError",
    "KernelError",
    "PacketError",
    "PolicyError",
    "PolicyErrorGroup",
    "SnapshotError",
    "TableFullError",
]


class EgressCoreError(Exception):
    """Root of every exception egresscore raises on purpose."""


class InvalidAddressError(EgressCoreError, ValueError):
    """An IP address could not be read: wrong syntax, wrong type or out of range."""


class InvalidPrefixError(InvalidAddressError):
    """A CIDR prefix could not be read: bad syntax, length out of range, host bits set."""


class PolicyError(EgressCoreError, ValueError):
    """A policy or endpoint document is invalid.

    ``source`` names the file (or ``"<string>"``), ``document`` the document inside
    it, and ``path`` the field path of the fault, for example
    ``spec.selectors[0].podSelector.matchExpressions[1].operator``.
    """

    def __init__(self, message: str, *, source: str = "", document: str = "", path: str = "") -> None:
        self.source = source
        self.document = document
        self.path = path
        where = ": ".join(part for part in (source, document, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PolicyErrorGroup(PolicyError):
    """Every error found in a set of policy and endpoint files.

    ``errors`` lists them all, in file and document order; the message is the first
    error and how many more there are. Raised by ``egresscore.policy.load_files`` so
    that an operator sees every fault at once.
    """

    def __init__(self, errors: list[PolicyError]) -> None:
        if not errors:
            raise ValueError("PolicyErrorGroup needs at least one error")
        self.errors = list(errors)
        first = errors[0]
        more = len(errors) - 1
        suffix = f" (and {more} more error{'s' if more != 1 else ''})" if more else ""
        PolicyError.__init__(self, str(first) + suffix)
        self.source, self.document, self.path = first.source, first.document, first.path


class TableFullError(EgressCoreError):
    """A bounded table has no room for another entry."""


class PacketError(EgressCoreError, ValueError):
    """A packet could not be parsed or rewritten."""


class KernelError(EgressCoreError, OSError):
    """The kernel refused an operation; ``errno`` says why."""


class SnapshotError(EgressCoreError, ValueError):
    """A SNAT table snapshot could not be read: bad header, version or record."""
