"""Type stubs for egresscore.core.classifier (compiled)."""

import enum
from array import array
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, NamedTuple, TypeVar

from typing_extensions import Buffer

from egresscore.core.selector import Bitset

_B = TypeVar("_B", bound=Buffer)

class Action(enum.IntEnum):
    PASS = 0
    REDIRECT = 1
    SNAT = 2
    DROP = 3

class Reason(enum.IntEnum):
    NOT_AN_ENDPOINT = 0
    CLUSTER_INTERNAL = 1
    NO_POLICY = 2
    EXCLUDED = 3
    RULE_PASS = 4
    RULE_DROP = 5
    NO_GATEWAY = 6
    GATEWAY = 7

class Gateway(NamedTuple):
    node: str
    egress_ip: IPv4Address | IPv6Address

class Decision(NamedTuple):
    action: Action
    reason: Reason
    policy: str | None
    gateway: Gateway | None

RULE_REDIRECT: int
RULE_PASS: int
RULE_DROP: int

AddressLike = str | bytes | IPv4Address | IPv6Address

class Classifier:
    @property
    def unit_names(self) -> tuple[str, ...]: ...
    @property
    def gateways(self) -> tuple[Gateway, ...]: ...
    @property
    def policy_count(self) -> int: ...
    @staticmethod
    def _build(
        endpoint_addresses: Sequence[tuple[Any, int]],
        endpoint_nodes: Sequence[int],
        unit_names: Sequence[str],
        unit_members: Sequence[Bitset],
        destinations: Sequence[tuple[IPv4Network | IPv6Network, int, int]],
        internal: Sequence[IPv4Network | IPv6Network | IPv4Address | IPv6Address],
        rules: Sequence[tuple[int, bool, int, Sequence[int], Sequence[int]]],
        gateways: Sequence[tuple[int, int, bool, Gateway]],
    ) -> Classifier: ...
    def classify(self, src: AddressLike, dst: AddressLike) -> Decision: ...
    def classify_code(self, src: AddressLike, dst: AddressLike) -> tuple[int, int]: ...
    def decode(self, code: int) -> Decision: ...
    def classify_many(self, pairs: Buffer, out: _B | None = None) -> array[int]: ...
    def classify_many6(self, pairs: Buffer, out: _B | None = None) -> array[int]: ...
    def memory_usage(self) -> int: ...
