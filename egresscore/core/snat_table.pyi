"""Type stubs for egresscore.core.snat_table (compiled). Semantics: docs/snat.md."""

from array import array
from collections.abc import Iterable, Iterator, Mapping
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Final, NamedTuple, TypeVar

from egresscore.core.prefix_table import AddressLike, BufferLike

_B = TypeVar("_B", bound=BufferLike)

class Verdict(IntEnum):
    TRANSLATED = 0
    NOT_OURS = 1
    DROP_TRUNCATED = 2
    DROP_MALFORMED = 3
    DROP_UNSUPPORTED = 4
    DROP_FRAGMENT = 5
    DROP_INVALID = 6
    DROP_TABLE_FULL = 7
    DROP_PORT_EXHAUSTED = 8
    DROP_WRONG_FAMILY = 9
    @property
    def is_drop(self) -> bool: ...

class SnatState(IntEnum):
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    UNREPLIED = 9
    REPLIED = 10

DEFAULT_TIMEOUTS: Final[Mapping[str, float]]
SNAPSHOT_VERSION: Final[int]

class SnatEntry(NamedTuple):
    protocol: int
    pod_ip: IPv4Address | IPv6Address
    pod_port: int
    remote_ip: IPv4Address | IPv6Address
    remote_port: int
    egress_ip: IPv4Address | IPv6Address
    egress_port: int
    state: SnatState
    replied: bool
    expires: float

class SnatTable:
    def __init__(
        self,
        egress_ips: Iterable[AddressLike],
        *,
        port_range: tuple[int, int] = (1024, 65535),
        max_entries: int = 262144,
        timeouts: Mapping[str, float] | None = None,
        max_port_probes: int = 128,
        reclaim_budget: int = 4,
        seed: int | None = None,
    ) -> None: ...
    @property
    def egress_ips(self) -> tuple[IPv4Address | IPv6Address, ...]: ...
    @property
    def port_range(self) -> tuple[int, int]: ...
    @property
    def max_entries(self) -> int: ...
    @property
    def timeouts(self) -> dict[str, float]: ...
    @property
    def clock(self) -> float: ...
    def translate_outbound(
        self, packet: BufferLike, egress_ip: AddressLike, now: float, *, checksum_partial: bool = False
    ) -> Verdict: ...
    def translate_inbound(
        self, packet: BufferLike, now: float, *, checksum_partial: bool = False
    ) -> Verdict: ...
    def translate_outbound_many(
        self,
        buffer: BufferLike,
        offsets: BufferLike,
        egress_ip: AddressLike | None,
        now: float,
        *,
        egress_indices: BufferLike | None = None,
        checksum_partial: BufferLike | None = None,
        verdicts: _B | None = None,
    ) -> array[int] | _B: ...
    def translate_inbound_many(
        self,
        buffer: BufferLike,
        offsets: BufferLike,
        now: float,
        *,
        checksum_partial: BufferLike | None = None,
        verdicts: _B | None = None,
    ) -> array[int] | _B: ...
    def lookup_outbound(
        self, protocol: int, pod_ip: AddressLike, pod_port: int, remote_ip: AddressLike, remote_port: int
    ) -> SnatEntry | None: ...
    def lookup_inbound(
        self,
        protocol: int,
        remote_ip: AddressLike,
        remote_port: int,
        egress_ip: AddressLike,
        egress_port: int,
    ) -> SnatEntry | None: ...
    def hold(
        self,
        protocol: int,
        pod_ip: AddressLike,
        pod_port: int,
        remote_ip: AddressLike,
        remote_port: int,
        now: float,
    ) -> bool: ...
    def release(
        self, protocol: int, pod_ip: AddressLike, pod_port: int, remote_ip: AddressLike, remote_port: int
    ) -> bool: ...
    def expire(self, now: float, budget: int | None = None) -> int: ...
    def entries(self, now: float | None = None) -> Iterator[SnatEntry]: ...
    def counters(self) -> dict[str, int]: ...
    def counts_by_state(self) -> dict[tuple[int, SnatState], int]: ...
    def ports_in_use(self) -> dict[IPv4Address | IPv6Address, int]: ...
    def port_exhaustion(self) -> dict[tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address], int]: ...
    def snapshot(self, now: float) -> bytes: ...
    def restore(self, data: BufferLike, now: float) -> int: ...
    def memory_usage(self) -> int: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
