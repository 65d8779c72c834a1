"""Seeded flows and the packets that carry them, for the SNAT benchmarks and their memory probe.

Shared by ``bench_snat_table.py`` (inside pytest) and ``_snat_memory_probe.py`` (in a fresh
interpreter), so both build tables from exactly the same flows. Everything comes from fixed seeds.

A flow is an IPv4 TCP 5-tuple: one of 4096 pod addresses in 10.0.0.0/8 with a port from Linux's
ephemeral range, toward one of 3000 remote addresses on one of a few well-known ports. Packets are
built whole with numpy: a 20-byte IPv4 header and a 32-byte TCP header (the timestamp option of a
Linux ACK), 52 bytes, with valid checksums, back to back in one ``uint8`` buffer. Checksums of a
whole batch can be verified in numpy too, which is how the benchmarks check the rewrite without a
Python loop over the packets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# Bump only on purpose: saved runs before and after stop being comparable.
FLOW_SEED: Final = 0x5EED_5A47

POD_COUNT: Final = 4096
REMOTE_COUNT: Final = 3000
# Remote ports and how often flows go to each (HTTPS dominates egress traffic).
REMOTE_PORTS: Final = (443, 80, 8443, 5432, 6379, 9092, 22, 25)
REMOTE_PORT_WEIGHTS: Final = (0.70, 0.12, 0.06, 0.04, 0.03, 0.02, 0.02, 0.01)
EPHEMERAL_LOW: Final = 32768
EPHEMERAL_HIGH: Final = 60999

# The egress side: documentation addresses (RFC 5737), and the default port range.
EGRESS_IPS: Final = ("192.0.2.10", "192.0.2.11")
EGRESS_IP: Final = EGRESS_IPS[0]
PORT_RANGE: Final = (1024, 65535)

IPV4_HEADER: Final = 20
TCP_HEADER: Final = 32
PACKET_LENGTH: Final = IPV4_HEADER + TCP_HEADER
WORDS: Final = PACKET_LENGTH // 2
TCP_PROTOCOL: Final = 6
FLAG_FIN: Final = 0x01
FLAG_SYN: Final = 0x02
FLAG_ACK: Final = 0x10

U8Array = npt.NDArray[np.uint8]
U16Array = npt.NDArray[np.uint16]
U32Array = npt.NDArray[np.uint32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class SnatSizes:
    """How big each SNAT benchmark is: ``FULL_SIZES`` for timed runs, ``QUICK_SIZES`` for the smoke run."""

    entries: int  # live flows in the shared tables
    batch: int  # packets per translate_*_many round (egresscore)
    python_batch: int  # the same for the pure-Python baseline (the first packets of the same batch)
    single: int  # single translate_outbound calls per round
    new_flows: int  # fresh flows opened per round (egresscore)
    python_new_flows: int
    rounds: int  # timed rounds of the batch and single-call groups (egresscore)
    python_rounds: int
    snapshot_rounds: int
    python_snapshot_rounds: int
    memory_entries: int  # flows in the memory probe's table

    @property
    def label(self) -> str:
        return count_label(self.entries)

    @property
    def capacity(self) -> int:
        """``max_entries`` of the shared tables: the next power of two that holds the new flows too."""
        capacity = 16
        while capacity < self.entries + max(self.new_flows, self.python_new_flows):
            capacity <<= 1
        return capacity


FULL_SIZES: Final = SnatSizes(
    entries=1_000_000,
    batch=65_536,
    python_batch=16_384,
    single=10_000,
    new_flows=32_768,
    python_new_flows=8_192,
    rounds=20,
    python_rounds=5,
    snapshot_rounds=5,
    python_snapshot_rounds=1,
    memory_entries=1_000_000,
)
QUICK_SIZES: Final = SnatSizes(
    entries=10_000,
    batch=2_048,
    python_batch=1_024,
    single=500,
    new_flows=1_024,
    python_new_flows=512,
    rounds=5,
    python_rounds=3,
    snapshot_rounds=3,
    python_snapshot_rounds=1,
    memory_entries=10_000,
)


def count_label(count: int) -> str:
    """``1000000`` -> ``"1M"``, ``10000`` -> ``"10k"``: the spelling in group names and test ids."""
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1_000 and count % 1_000 == 0:
        return f"{count // 1_000}k"
    return str(count)


@dataclass(frozen=True)
class Flows:
    """Parallel arrays, one element per flow: the outbound 5-tuple (protocol is always TCP)."""

    pod_ip: U32Array
    pod_port: U16Array
    remote_ip: U32Array
    remote_port: U16Array

    def __len__(self) -> int:
        return len(self.pod_ip)

    def take(self, index: npt.NDArray[Any] | slice) -> Flows:
        return Flows(self.pod_ip[index], self.pod_port[index], self.remote_ip[index], self.remote_port[index])


def make_flows(count: int, seed: int = FLOW_SEED) -> Flows:
    """``count`` distinct flows in random order."""
    rng = np.random.default_rng(seed)
    # Distinct pod and remote addresses: pods in 10.0.0.0/8, remotes anywhere in 1.0.0.0-223.255.255.255.
    pods = 0x0A00_0000 + rng.choice(1 << 24, POD_COUNT, replace=False).astype(np.uint32)
    remotes = (0x0100_0000 + rng.choice(0xDF00_0000, REMOTE_COUNT, replace=False)).astype(np.uint32)
    ports = np.array(REMOTE_PORTS, dtype=np.uint16)
    pod_index = np.empty(0, dtype=np.uint64)
    pod_port = np.empty(0, dtype=np.uint64)
    remote_index = np.empty(0, dtype=np.uint64)
    port_index = np.empty(0, dtype=np.uint64)
    while len(pod_index) < count:
        draw = count - len(pod_index) + count // 8 + 64
        pod_index = np.concatenate([pod_index, rng.integers(0, POD_COUNT, draw, dtype=np.uint64)])
        pod_port = np.concatenate(
            [pod_port, rng.integers(EPHEMERAL_LOW, EPHEMERAL_HIGH, draw, dtype=np.uint64, endpoint=True)]
        )
        remote_index = np.concatenate([remote_index, rng.integers(0, REMOTE_COUNT, draw, dtype=np.uint64)])
        port_index = np.concatenate(
            [port_index, rng.choice(len(REMOTE_PORTS), draw, p=REMOTE_PORT_WEIGHTS).astype(np.uint64)]
        )
        keys = (pod_index << np.uint64(32)) | (pod_port << np.uint64(16)) | (remote_index << np.uint64(4))
        keys |= port_index
        _, first = np.unique(keys, return_index=True)
        first.sort()
        pod_index, pod_port, remote_index, port_index = (
            pod_index[first],
            pod_port[first],
            remote_index[first],
            port_index[first],
        )
    order = rng.permutation(count)
    return Flows(
        pod_ip=pods[pod_index[:count][order]],
        pod_port=pod_port[:count][order].astype(np.uint16),
        remote_ip=remotes[remote_index[:count][order]],
        remote_port=ports[port_index[:count][order]],
    )


# --- Packets ---------------------------------------------------------------------------------------


def _fold_complement(sums: npt.NDArray[np.uint64]) -> U16Array:
    for _ in range(3):
        sums = (sums & np.uint64(0xFFFF)) + (sums >> np.uint64(16))
    return (~sums & np.uint64(0xFFFF)).astype(np.uint16)


def tcp_packets(
    source: U32Array,
    source_port: U16Array,
    destination: U32Array,
    destination_port: U16Array,
    flags: int,
    seed: int = FLOW_SEED + 2,
) -> U8Array:
    """One 52-byte IPv4/TCP packet per element, shape (n, 52), with valid checksums."""
    count = len(source)
    rng = np.random.default_rng(seed)
    words = np.zeros((count, WORDS), dtype=np.uint64)
    words[:, 0] = 0x4500
    words[:, 1] = PACKET_LENGTH
    words[:, 2] = np.arange(count, dtype=np.uint64) & np.uint64(0xFFFF)  # identification
    words[:, 3] = 0x4000  # don't fragment
    words[:, 4] = (64 << 8) | TCP_PROTOCOL
    words[:, 6] = source >> np.uint32(16)
    words[:, 7] = source & np.uint32(0xFFFF)
    words[:, 8] = destination >> np.uint32(16)
    words[:, 9] = destination & np.uint32(0xFFFF)
    tcp = 10
    words[:, tcp + 0] = source_port
    words[:, tcp + 1] = destination_port
    words[:, tcp + 2 : tcp + 6] = rng.integers(0, 1 << 16, (count, 4), dtype=np.uint64)  # seq, ack
    words[:, tcp + 6] = ((TCP_HEADER // 4) << 12) | flags
    words[:, tcp + 7] = 502  # window
    words[:, tcp + 10] = 0x0101  # NOP, NOP
    words[:, tcp + 11] = 0x080A  # timestamps, length 10
    words[:, tcp + 12 : tcp + 16] = rng.integers(0, 1 << 16, (count, 4), dtype=np.uint64)
    words[:, 5] = _fold_complement(words[:, :10].sum(axis=1))
    pseudo = words[:, 6:10].sum(axis=1) + np.uint64(TCP_PROTOCOL + TCP_HEADER)
    words[:, tcp + 8] = _fold_complement(words[:, tcp:].sum(axis=1) + pseudo)
    return words.astype(">u2").view(np.uint8).reshape(count, PACKET_LENGTH)


def outbound_packets(flows: Flows, flags: int = FLAG_ACK) -> U8Array:
    """Packets from the pods to the remotes, before translation."""
    return tcp_packets(flows.pod_ip, flows.pod_port, flows.remote_ip, flows.remote_port, flags)


def replies(translated: U8Array) -> U8Array:
    """Inbound replies to translated outbound packets: addresses and ports swapped.

    Swapping two fields of the same size leaves both checksums valid (the one's-complement sum does
    not depend on the order of the words).
    """
    packets = translated.copy()
    packets[:, 12:16], packets[:, 16:20] = translated[:, 16:20], translated[:, 12:16]
    packets[:, 20:22], packets[:, 22:24] = translated[:, 22:24], translated[:, 20:22]
    return packets


def offsets(count: int, length: int = PACKET_LENGTH) -> U32Array:
    """Start of every packet in a back-to-back buffer, and the buffer's end: ``count + 1`` entries."""
    return np.arange(0, (count + 1) * length, length, dtype=np.uint32)


def checksums_valid(packets: U8Array) -> tuple[BoolArray, BoolArray]:
    """(IPv4 header checksum valid, TCP checksum valid) per packet of shape (n, 52)."""
    words = packets.view(">u2").astype(np.uint64)
    ip_sum = words[:, :10].sum(axis=1)
    pseudo = words[:, 6:10].sum(axis=1) + np.uint64(TCP_PROTOCOL + TCP_HEADER)
    tcp_sum = words[:, 10:].sum(axis=1) + pseudo
    return _fold_complement(ip_sum) == 0, _fold_complement(tcp_sum) == 0


def addresses(packets: U8Array) -> tuple[U32Array, U32Array]:
    """(source, destination) addresses of packets of shape (n, 52)."""
    words = packets[:, 12:20].copy().view(">u4")
    return words[:, 0].astype(np.uint32), words[:, 1].astype(np.uint32)


def ports(packets: U8Array) -> tuple[U16Array, U16Array]:
    """(source port, destination port) of packets of shape (n, 52)."""
    words = packets[:, 20:24].copy().view(">u2")
    return words[:, 0].astype(np.uint16), words[:, 1].astype(np.uint16)


def ipv4_int(text: str) -> int:
    first, second, third, fourth = (int(part) for part in text.split("."))
    return (first << 24) | (second << 16) | (third << 8) | fourth
