"""Type stubs for egresscore.core.kernel_conntrack (compiled). Semantics: docs/nfqueue.md."""

from typing import Final

from egresscore.core.prefix_table import AddressLike

class KernelConntrack:
    mark: Final[int]
    syn_timeout: Final[int]
    def __init__(
        self,
        *,
        mark: int,
        syn_timeout: int = 120,
        events: bool = True,
        capacity: int = 65536,
        event_buffer: int = 33554432,
    ) -> None: ...
    def create_snat(
        self,
        source: AddressLike,
        destination: AddressLike,
        source_port: int,
        destination_port: int,
        egress: AddressLike,
        egress_port: int,
    ) -> int: ...
    def destroyed_flows(self) -> list[tuple[str, int, str, int]]: ...
    def live_flows(self) -> set[tuple[str, int, str, int]]: ...
    @property
    def events_lost(self) -> bool: ...
    def clear_events_lost(self) -> None: ...
    def counters(self) -> dict[str, int]: ...
