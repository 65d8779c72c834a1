"""Type stubs for egresscore.core.gateway (compiled). Semantics: docs/nfqueue.md."""

from collections.abc import Iterable
from typing import Final

from egresscore.core.classifier import Classifier
from egresscore.core.kernel_conntrack import KernelConntrack
from egresscore.core.nfqueue import NfQueue
from egresscore.core.snat_table import SnatTable

OUTCOME_NAMES: Final[tuple[str, ...]]

class GatewayDatapath:
    @property
    def queue(self) -> NfQueue: ...
    @property
    def table(self) -> SnatTable: ...
    @property
    def classifier(self) -> Classifier: ...
    def __init__(
        self,
        queue: NfQueue,
        table: SnatTable,
        classifier: Classifier,
        egress_of_gateway: Iterable[int | None],
        *,
        mark: int | None = None,
        kernel: KernelConntrack | None = None,
        pass_mark: int = 0,
        tunnel_ifindex: int | None = None,
        node_mask: int = 0,
        node_pass: int = 0,
        node_flag: int = 0,
    ) -> None: ...
    def set_policy(
        self, classifier: Classifier, egress_of_gateway: Iterable[int | None], table: SnatTable | None = None
    ) -> None: ...
    @property
    def kernel(self) -> KernelConntrack | None: ...
    def follow_kernel(self) -> int: ...
    def process(self, seconds: float) -> int: ...
    def drain(self) -> int: ...
    def counters(self) -> dict[str, float]: ...
