"""Type stubs for egresscore.core.packet (compiled)."""

from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from egresscore.core.prefix_table import BufferLike

class PacketInfo(NamedTuple):
    family: int
    protocol: int
    kind: str
    source: IPv4Address | IPv6Address
    destination: IPv4Address | IPv6Address
    source_port: int
    destination_port: int
    tcp_flags: int
    icmp_type: int
    quoted: PacketInfo | None

def parse(packet: BufferLike) -> PacketInfo: ...
