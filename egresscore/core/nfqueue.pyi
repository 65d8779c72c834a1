"""Type stubs for egresscore.core.nfqueue (compiled). Semantics: docs/nfqueue.md."""

from typing import Final, NamedTuple

ACCEPT: Final[int]
DROP: Final[int]
REPEAT: Final[int]
MAX_COPY_RANGE: Final[int]
HOOK_NAMES: Final[dict[int, str]]

class Packet(NamedTuple):
    id: int
    hook: int
    hw_protocol: int
    mark: int
    indev: int
    outdev: int
    ct_info: int | None
    wire_length: int
    checksum_partial: bool
    gso: bool
    payload: bytearray

def kernel_error(number: int, error: int, what: str) -> OSError: ...

class NfQueue:
    number: Final[int]
    batch_size: Final[int]
    copy_range: Final[int]
    max_length: Final[int]
    fail_open: Final[bool]
    gso: Final[bool]
    conntrack: Final[bool]
    def __init__(
        self,
        number: int,
        *,
        batch_size: int = 64,
        copy_range: int = ...,
        max_length: int = 4096,
        fail_open: bool = False,
        gso: bool = True,
        conntrack: bool = False,
        receive_buffer: int = 16777216,
        timeout: float = 0.1,
    ) -> None: ...
    def fileno(self) -> int: ...
    def receive(self, *, wait: bool = True) -> list[Packet]: ...
    def verdict(
        self,
        packet: Packet | int,
        verdict: int,
        *,
        mark: int | None = None,
        payload: bytes | bytearray | None = None,
    ) -> None: ...
    def counters(self) -> dict[str, int]: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> NfQueue: ...
    def __exit__(self, *exc_info: object) -> None: ...
