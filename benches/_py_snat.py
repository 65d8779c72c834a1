"""A pure-Python, dict-based SNAT translator: the baseline peer of ``bench_snat_table.py``.

It does the per-packet work ``egresscore.core.snat_table.SnatTable`` does for TCP and UDP over IPv4
(docs/snat.md), written the way a careful Python programmer would write it, with no effort spared and
none wasted:

* the IPv4 and TCP/UDP headers are read with precompiled ``struct.Struct`` objects (``unpack_from``
  at the packet's offset, so a batch is never sliced into copies);
* flows live in two dicts keyed by plain int tuples: the outbound tuple ``(protocol, pod address, pod
  port, remote address, remote port)`` and the reply tuple ``(protocol, remote address, remote port,
  egress address, egress port)``; both point at one slotted :class:`Flow`;
* a new flow keeps the pod's port when the reply tuple is free and probes from a random start
  otherwise (at most ``max_port_probes`` ports), like the compiled table;
* the rewrite writes the source (outbound) or destination (inbound) address and port and updates the
  IPv4 header checksum and the TCP/UDP checksum incrementally (RFC 1624 eqn. 3). A flow's address and
  port never change, so the one's-complement delta of each direction is computed once when the flow
  is created; a packet then costs one addition and one fold per checksum;
* every translated packet sets the flow's expiry from the timeout of its (new) state; expired flows
  are never matched, and each call reclaims at most ``reclaim_budget`` of them from per-timeout FIFO
  queues (a flow whose expiry moved on since it was queued is queued again, not freed).

What it leaves out, because no benchmark reaches it: IPv6, ICMP, ``checksum_partial``, evicting
unreplied flows from a full table (a full table refuses the new flow with ``DROP_TABLE_FULL``).
Verdicts are the numbers of ``egresscore.Verdict``; batch calls write them into a ``bytearray``.
``snapshot``/``restore`` write and read the version-1 format of docs/snat.md (IPv4 records only).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from typing_extensions import Buffer

from egresscore.core.snat_table import DEFAULT_TIMEOUTS as _SNAT_DEFAULT_TIMEOUTS

__all__ = ["DEFAULT_TIMEOUTS", "Flow", "PySnatTable"]

# Verdicts (egresscore.Verdict).
TRANSLATED: Final = 0
NOT_OURS: Final = 1
DROP_TRUNCATED: Final = 2
DROP_MALFORMED: Final = 3
DROP_UNSUPPORTED: Final = 4
DROP_FRAGMENT: Final = 5
DROP_INVALID: Final = 6
DROP_TABLE_FULL: Final = 7
DROP_PORT_EXHAUSTED: Final = 8
DROP_WRONG_FAMILY: Final = 9

# States (egresscore.core.snat_table.SnatState).
SYN_SENT: Final = 1
SYN_RECV: Final = 2
ESTABLISHED: Final = 3
FIN_WAIT: Final = 4
CLOSE_WAIT: Final = 5
LAST_ACK: Final = 6
TIME_WAIT: Final = 7
CLOSE: Final = 8
UNREPLIED: Final = 9
REPLIED: Final = 10

TCP: Final = 6
UDP: Final = 17
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
ACK: Final = 0x10

# Which direction sent the first FIN (the snapshot's flag bits 1 and 2).
FIN_NONE: Final = 0
FIN_OUTBOUND: Final = 1
FIN_INBOUND: Final = 2

# The same configuration defaults as SnatTable (Linux conntrack's): the baseline differs in
# how it works, not in what it is configured to do.
DEFAULT_TIMEOUTS: Final[Mapping[str, float]] = _SNAT_DEFAULT_TIMEOUTS
_STATE_TIMEOUT_KEY: Final = {
    SYN_SENT: "tcp_syn_sent",
    SYN_RECV: "tcp_syn_recv",
    ESTABLISHED: "tcp_established",
    FIN_WAIT: "tcp_fin_wait",
    CLOSE_WAIT: "tcp_close_wait",
    LAST_ACK: "tcp_last_ack",
    TIME_WAIT: "tcp_time_wait",
    CLOSE: "tcp_close",
    UNREPLIED: "udp_unreplied",
    REPLIED: "udp_replied",
}
# A full table reclaims this many expired flows before it gives up on a new one (docs/snat.md).
FULL_TABLE_RECLAIM: Final = 64

# IPv4 header: version/IHL, total length, flags/fragment offset, protocol, checksum, source, destination.
_IPV4: Final = struct.Struct("!BxHxxHxBHII")
# The IPv4 checksum and the source address are adjacent (offsets 10-15): one write for both.
_IPV4_CHECKSUM_SOURCE: Final = struct.Struct("!HI")
# The destination address (offset 16) is written on its own; the checksum separately.
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
# TCP: ports, data offset byte, flags, checksum (offset 16).
_TCP: Final = struct.Struct("!HH8xBB2xH")
# UDP: ports, length, checksum.
_UDP: Final = struct.Struct("!HHxxH")

SNAPSHOT_MAGIC: Final = b"EGSN"
SNAPSHOT_VERSION: Final = 1
_SNAPSHOT_HEADER: Final = struct.Struct("!4sHHQ")
# family, protocol, state, flags, pod port, remote port, egress port, reserved, ms left, then three
# 16-byte addresses: an IPv4 address is 4 bytes and 12 zero bytes.
_SNAPSHOT_RECORD: Final = struct.Struct("!BBBBHHH2xII12xI12xI12x")
_MAX_MS: Final = 0xFFFF_FFFF


def _fold(value: int) -> int:
    """One's-complement fold of a sum of 16-bit words (a few words: two folds are enough)."""
    value = (value & 0xFFFF) + (value >> 16)
    return (value & 0xFFFF) + (value >> 16)


def _address_delta(old: int, new: int) -> int:
    """The folded one's-complement change ``~old + new`` over the two 16-bit words of IPv4 addresses."""
    return _fold((~old >> 16 & 0xFFFF) + (new >> 16) + (~old & 0xFFFF) + (new & 0xFFFF))


class Flow:
    """One translation, shared by the outbound and the reply dict."""

    __slots__ = (
        "egress_ip",
        "egress_port",
        "expires",
        "fin_direction",
        "in_ip_delta",
        "in_l4_delta",
        "out_ip_delta",
        "out_l4_delta",
        "pod_ip",
        "pod_port",
        "protocol",
        "queued",
        "remote_ip",
        "remote_port",
        "removed",
        "replied",
        "state",
    )

    def __init__(
        self,
        protocol: int,
        pod_ip: int,
        pod_port: int,
        remote_ip: int,
        remote_port: int,
        egress_ip: int,
        egress_port: int,
        state: int,
        expires: float,
    ) -> None:
        self.protocol = protocol
        self.pod_ip = pod_ip
        self.pod_port = pod_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.egress_ip = egress_ip
        self.egress_port = egress_port
        self.state = state
        self.replied = False
        self.fin_direction = FIN_NONE
        self.expires = expires
        # The deadline of the newest queue item for this flow; older items for it are stale.
        self.queued = expires
        self.removed = False
        # RFC 1624: the same address and port replace each other in every packet of the flow.
        self.out_ip_delta = _address_delta(pod_ip, egress_ip)
        self.out_l4_delta = _fold(self.out_ip_delta + (~pod_port & 0xFFFF) + egress_port)
        self.in_ip_delta = _address_delta(egress_ip, pod_ip)
        self.in_l4_delta = _fold(self.in_ip_delta + (~egress_port & 0xFFFF) + pod_port)


class PySnatTable:
    """Dict-based SNAT for IPv4 TCP and UDP; the API follows ``SnatTable`` where the benchmarks use it."""

    def __init__(
        self,
        egress_ips: Iterable[str],
        *,
        port_range: tuple[int, int] = (1024, 65535),
        max_entries: int = 262144,
        timeouts: Mapping[str, float] | None = None,
        max_port_probes: int = 128,
        reclaim_budget: int = 4,
        seed: int | None = None,
    ) -> None:
        self.port_low, self.port_high = port_range
        self.max_entries = max_entries
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        span = self.port_high - self.port_low + 1
        self.max_port_probes = min(max_port_probes, span)
        self.reclaim_budget = reclaim_budget
        self.rng = random.Random(seed)
        # Any spelling of an egress address a caller may pass -> the address as an int.
        self.egress: dict[object, int] = {}
        for text in egress_ips:
            address = ipaddress.IPv4Address(text)
            for spelling in (text, str(address), address, int(address), address.packed):
                self.egress[spelling] = int(address)
        self.egress_set = frozenset(self.egress.values())
        self.outbound: dict[tuple[int, int, int, int, int], Flow] = {}
        self.inbound: dict[tuple[int, int, int, int, int], Flow] = {}
        self.state_timeout = {state: self.timeouts[key] for state, key in _STATE_TIMEOUT_KEY.items()}
        # Per timeout value, (deadline, flow) in the order they were queued.
        self.queues: dict[float, deque[tuple[float, Flow]]] = {
            timeout: deque() for timeout in set(self.state_timeout.values())
        }
        self.next_deadline = float("inf")
        self.clock = float("-inf")
        self.port_exhaustion: dict[tuple[int, int], int] = {}
        self.restore_skipped = 0

    def __len__(self) -> int:
        return len(self.outbound)

    # --- Expiry -----------------------------------------------------------------------------------

    def _queue(self, flow: Flow) -> None:
        deadline = flow.expires
        flow.queued = deadline
        self.queues[self.state_timeout[flow.state]].append((deadline, flow))
        if deadline < self.next_deadline:
            self.next_deadline = deadline

    def _remove(self, flow: Flow) -> None:
        flow.removed = True
        del self.outbound[(flow.protocol, flow.pod_ip, flow.pod_port, flow.remote_ip, flow.remote_port)]
        del self.inbound[(flow.protocol, flow.remote_ip, flow.remote_port, flow.egress_ip, flow.egress_port)]

    def expire(self, now: float, budget: int | None = None) -> int:
        """Free up to ``budget`` expired flows (all of them without a budget); returns how many."""
        now = self._tick(now)
        left = -1 if budget is None else budget
        freed = 0
        for queue in self.queues.values():
            while queue and left != 0 and queue[0][0] <= now:
                deadline, flow = queue.popleft()
                if flow.removed or deadline != flow.queued:
                    continue
                if flow.expires <= now:
                    self._remove(flow)
                    freed += 1
                    left -= 1
                else:
                    self._queue(flow)
        heads = [queue[0][0] for queue in self.queues.values() if queue]
        self.next_deadline = min(heads, default=float("inf"))
        return freed

    def _tick(self, now: float) -> float:
        if now > self.clock:
            self.clock = now
        return self.clock

    # --- TCP state --------------------------------------------------------------------------------

    def _tcp(self, flow: Flow, flags: int, direction: int) -> None:
        """docs/snat.md's TCP transitions for a packet travelling in ``direction`` (FIN_OUTBOUND/INBOUND)."""
        state = flow.state
        if flags & RST:
            flow.state = CLOSE
        elif flags & SYN:
            if flags & ACK:
                if direction == FIN_INBOUND and state == SYN_SENT:
                    flow.state = SYN_RECV
            elif direction == FIN_OUTBOUND and state in (TIME_WAIT, CLOSE):
                flow.state = SYN_SENT
                flow.replied = False
                flow.fin_direction = FIN_NONE
        elif flags & FIN:
            if state in (SYN_RECV, ESTABLISHED):
                flow.state = FIN_WAIT
                flow.fin_direction = direction
            elif state in (FIN_WAIT, CLOSE_WAIT) and direction != flow.fin_direction:
                flow.state = LAST_ACK
        elif flags & ACK:
            if state == SYN_RECV:
                if direction == FIN_OUTBOUND:
                    flow.state = ESTABLISHED
            elif state == FIN_WAIT:
                if direction != flow.fin_direction:
                    flow.state = CLOSE_WAIT
            elif state == LAST_ACK and direction == flow.fin_direction:
                flow.state = TIME_WAIT

    # --- Translation ------------------------------------------------------------------------------

    def _allocate(self, protocol: int, pod_port: int, remote_ip: int, remote_port: int, egress: int) -> int:
        """An egress port whose reply tuple is free, or -1."""
        inbound = self.inbound
        low = self.port_low
        if (
            low <= pod_port <= self.port_high
            and (protocol, remote_ip, remote_port, egress, pod_port) not in inbound
        ):
            return pod_port
        span = self.port_high - low + 1
        offset = self.rng.randrange(span)
        for _ in range(self.max_port_probes):
            port = low + offset
            if (protocol, remote_ip, remote_port, egress, port) not in inbound:
                return port
            offset += 1
            if offset == span:
                offset = 0
        key = (egress, remote_ip)
        self.port_exhaustion[key] = self.port_exhaustion.get(key, 0) + 1
        return -1

    @staticmethod
    def _parse(
        buffer: Buffer, start: int, end: int
    ) -> tuple[int, int, int, int, int, int, int, int, int, int]:
        """(verdict, protocol, IP checksum, source, destination, L4 offset, source port, destination
        port, TCP flags, L4 checksum); ``verdict`` is TRANSLATED for a TCP or UDP packet the table can
        translate, and the other fields are meaningful only then."""
        if end - start < 20:
            return DROP_TRUNCATED, 0, 0, 0, 0, 0, 0, 0, 0, 0
        version_ihl, total_length, fragment, protocol, checksum, source, destination = _IPV4.unpack_from(
            buffer, start
        )
        header_length = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4:
            return (DROP_UNSUPPORTED if version_ihl >> 4 == 6 else DROP_MALFORMED), 0, 0, 0, 0, 0, 0, 0, 0, 0
        if header_length < 20 or total_length < header_length:
            return DROP_MALFORMED, 0, 0, 0, 0, 0, 0, 0, 0, 0
        if total_length > end - start:
            return DROP_TRUNCATED, 0, 0, 0, 0, 0, 0, 0, 0, 0
        if fragment & 0x1FFF:
            return DROP_FRAGMENT, 0, 0, 0, 0, 0, 0, 0, 0, 0
        l4 = start + header_length
        available = total_length - header_length
        if protocol == TCP:
            if available < 20:
                return DROP_TRUNCATED, 0, 0, 0, 0, 0, 0, 0, 0, 0
            source_port, destination_port, data_offset, flags, l4_checksum = _TCP.unpack_from(buffer, l4)
            if data_offset >> 4 < 5:
                return DROP_MALFORMED, 0, 0, 0, 0, 0, 0, 0, 0, 0
            if (data_offset >> 4) * 4 > available:
                return DROP_TRUNCATED, 0, 0, 0, 0, 0, 0, 0, 0, 0
            return (
                TRANSLATED,
                protocol,
                checksum,
                source,
                destination,
                l4,
                source_port,
                destination_port,
                flags,
                l4_checksum,
            )
        if protocol == UDP:
            if available < 8:
                return DROP_TRUNCATED, 0, 0, 0, 0, 0, 0, 0, 0, 0
            source_port, destination_port, l4_checksum = _UDP.unpack_from(buffer, l4)
            return (
                TRANSLATED,
                protocol,
                checksum,
                source,
                destination,
                l4,
                source_port,
                destination_port,
                0,
                l4_checksum,
            )
        return DROP_UNSUPPORTED, protocol, 0, 0, 0, 0, 0, 0, 0, 0

    def _outbound(self, buffer: Buffer, start: int, end: int, egress: int, now: float) -> int:
        (
            verdict,
            protocol,
            checksum,
            source,
            destination,
            l4,
            source_port,
            destination_port,
            flags,
            l4_checksum,
        ) = self._parse(buffer, start, end)
        if verdict:
            return verdict
        if now >= self.next_deadline:
            self.expire(now, self.reclaim_budget)
        flow = self.outbound.get((protocol, source, source_port, destination, destination_port))
        if flow is not None and flow.expires <= now:
            self._remove(flow)
            flow = None
        if flow is None:
            if flags & RST:
                return DROP_INVALID
            if len(self.outbound) >= self.max_entries:
                self.expire(now, FULL_TABLE_RECLAIM)
                if len(self.outbound) >= self.max_entries:
                    return DROP_TABLE_FULL
            port = self._allocate(protocol, source_port, destination, destination_port, egress)
            if port < 0:
                return DROP_PORT_EXHAUSTED
            if protocol == TCP:
                state = SYN_SENT if flags & (SYN | ACK) == SYN else ESTABLISHED
            else:
                state = UNREPLIED
            flow = Flow(
                protocol,
                source,
                source_port,
                destination,
                destination_port,
                egress,
                port,
                state,
                now + self.state_timeout[state],
            )
            self.outbound[(protocol, source, source_port, destination, destination_port)] = flow
            self.inbound[(protocol, destination, destination_port, egress, port)] = flow
            self._queue(flow)
        else:
            # Most packets belong to an established flow and change nothing but its expiry.
            if protocol == TCP and not (flow.state == ESTABLISHED and not flags & (FIN | RST)):
                self._tcp(flow, flags, FIN_OUTBOUND)
            flow.expires = expires = now + self.state_timeout[flow.state]
            if expires < flow.queued:
                self._queue(flow)  # a state with a shorter timeout: queue it where it now expires

        # Rewrite the source address and port; RFC 1624 eqn. 3 on both checksums. The deltas are
        # folded to 16 bits, so ~checksum + delta needs a single fold.
        folded = (~checksum & 0xFFFF) + flow.out_ip_delta
        _IPV4_CHECKSUM_SOURCE.pack_into(
            buffer, start + 10, ~((folded & 0xFFFF) + (folded >> 16)) & 0xFFFF, flow.egress_ip
        )
        _U16.pack_into(buffer, l4, flow.egress_port)
        self._write_l4_checksum(buffer, protocol, l4, l4_checksum, flow.out_l4_delta)
        return TRANSLATED

    def _inbound(self, buffer: Buffer, start: int, end: int, now: float) -> int:
        (
            verdict,
            protocol,
            checksum,
            source,
            destination,
            l4,
            source_port,
            destination_port,
            flags,
            l4_checksum,
        ) = self._parse(buffer, start, end)
        if verdict:
            return NOT_OURS if verdict == DROP_UNSUPPORTED else verdict
        if now >= self.next_deadline:
            self.expire(now, self.reclaim_budget)
        flow = self.inbound.get((protocol, source, source_port, destination, destination_port))
        if flow is None:
            return NOT_OURS
        if flow.expires <= now:
            self._remove(flow)
            return NOT_OURS
        flow.replied = True
        if protocol == TCP:
            if not (flow.state == ESTABLISHED and not flags & (FIN | RST)):
                self._tcp(flow, flags, FIN_INBOUND)
        elif flow.state == UNREPLIED:
            flow.state = REPLIED
        flow.expires = expires = now + self.state_timeout[flow.state]
        if expires < flow.queued:
            self._queue(flow)

        # Rewrite the destination address and port back to the pod's.
        folded = (~checksum & 0xFFFF) + flow.in_ip_delta
        _U16.pack_into(buffer, start + 10, ~((folded & 0xFFFF) + (folded >> 16)) & 0xFFFF)
        _U32.pack_into(buffer, start + 16, flow.pod_ip)
        _U16.pack_into(buffer, l4 + 2, flow.pod_port)
        self._write_l4_checksum(buffer, protocol, l4, l4_checksum, flow.in_l4_delta)
        return TRANSLATED

    @staticmethod
    def _write_l4_checksum(buffer: Buffer, protocol: int, l4: int, checksum: int, delta: int) -> None:
        folded = (~checksum & 0xFFFF) + delta
        if protocol == TCP:
            _U16.pack_into(buffer, l4 + 16, ~((folded & 0xFFFF) + (folded >> 16)) & 0xFFFF)
        elif checksum:  # RFC 768: UDP checksum 0 is "none" and stays 0; a computed 0 is sent as 0xFFFF
            _U16.pack_into(buffer, l4 + 6, ~((folded & 0xFFFF) + (folded >> 16)) & 0xFFFF or 0xFFFF)

    # --- Public calls -----------------------------------------------------------------------------

    def _egress(self, egress_ip: object) -> int:
        try:
            return self.egress[egress_ip]
        except KeyError:
            raise ValueError(f"egress address {egress_ip!r} is not one of this table's") from None

    def translate_outbound(self, packet: bytearray | memoryview, egress_ip: object, now: float) -> int:
        egress = self._egress(egress_ip)
        return self._outbound(packet, 0, len(packet), egress, self._tick(now))

    def translate_inbound(self, packet: bytearray | memoryview, now: float) -> int:
        return self._inbound(packet, 0, len(packet), self._tick(now))

    def translate_outbound_many(
        self,
        buffer: Buffer,
        offsets: Sequence[int],
        egress_ip: object,
        now: float,
        *,
        verdicts: bytearray | None = None,
    ) -> bytearray:
        """Packet ``i`` is ``buffer[offsets[i]:offsets[i + 1]]``; one verdict per packet."""
        egress = self._egress(egress_ip)
        now = self._tick(now)
        outbound = self._outbound
        if verdicts is None:
            verdicts = bytearray(len(offsets) - 1)
        start = offsets[0]
        for i in range(len(offsets) - 1):
            end = offsets[i + 1]
            verdicts[i] = outbound(buffer, start, end, egress, now)
            start = end
        return verdicts

    def translate_inbound_many(
        self, buffer: Buffer, offsets: Sequence[int], now: float, *, verdicts: bytearray | None = None
    ) -> bytearray:
        now = self._tick(now)
        inbound = self._inbound
        if verdicts is None:
            verdicts = bytearray(len(offsets) - 1)
        start = offsets[0]
        for i in range(len(offsets) - 1):
            end = offsets[i + 1]
            verdicts[i] = inbound(buffer, start, end, now)
            start = end
        return verdicts

    def lookup_outbound(
        self, protocol: int, pod_ip: int, pod_port: int, remote_ip: int, remote_port: int
    ) -> Flow | None:
        return self.outbound.get((protocol, pod_ip, pod_port, remote_ip, remote_port))

    # --- Snapshot ---------------------------------------------------------------------------------

    def snapshot(self, now: float) -> bytes:
        """docs/snat.md version 1: a 16-byte header, then one 64-byte record per live flow."""
        now = self._tick(now)
        live = [flow for flow in self.outbound.values() if flow.expires > now]
        data = bytearray(_SNAPSHOT_HEADER.size + _SNAPSHOT_RECORD.size * len(live))
        _SNAPSHOT_HEADER.pack_into(
            data, 0, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, _SNAPSHOT_RECORD.size, len(live)
        )
        pack = _SNAPSHOT_RECORD.pack_into
        offset = _SNAPSHOT_HEADER.size
        for flow in live:
            flags = flow.replied | (flow.fin_direction << 1)
            pack(
                data,
                offset,
                4,
                flow.protocol,
                flow.state,
                flags,
                flow.pod_port,
                flow.remote_port,
                flow.egress_port,
                min(int((flow.expires - now) * 1000), _MAX_MS),
                flow.pod_ip,
                flow.remote_ip,
                flow.egress_ip,
            )
            offset += _SNAPSHOT_RECORD.size
        return bytes(data)

    def restore(self, data: Buffer, now: float) -> int:
        """Read every record first (a bad one raises ``ValueError`` and adds nothing), then add them."""
        now = self._tick(now)
        view = memoryview(data).cast("B")
        if len(view) < _SNAPSHOT_HEADER.size:
            raise ValueError(f"snapshot of {len(view)} bytes is shorter than its 16-byte header")
        magic, version, record_size, count = _SNAPSHOT_HEADER.unpack_from(view, 0)
        if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_VERSION or record_size != _SNAPSHOT_RECORD.size:
            raise ValueError(f"snapshot header {magic!r} v{version} record {record_size}: not a v1 snapshot")
        if len(view) != _SNAPSHOT_HEADER.size + count * record_size:
            raise ValueError(f"snapshot of {len(view)} bytes does not hold {count} records")
        records = list(_SNAPSHOT_RECORD.iter_unpack(view[_SNAPSHOT_HEADER.size :]))
        for index, (family, protocol, state, _flags, *_rest) in enumerate(records):
            if family != 4:
                raise ValueError(f"record {index}: family {family}, this table holds IPv4 only")
            if protocol not in (TCP, UDP):
                raise ValueError(f"record {index}: protocol {protocol}, expected 6 or 17")
            if state not in self.state_timeout:
                raise ValueError(f"record {index}: state {state}, expected 1 to 10")
        added = 0
        for protocol, state, flags, pod_port, remote_port, egress_port, ms, pod, remote, egress in (
            record[1:] for record in records
        ):
            outbound_key = (protocol, pod, pod_port, remote, remote_port)
            inbound_key = (protocol, remote, remote_port, egress, egress_port)
            if egress not in self.egress_set or outbound_key in self.outbound or inbound_key in self.inbound:
                self.restore_skipped += 1
                continue
            flow = Flow(
                protocol, pod, pod_port, remote, remote_port, egress, egress_port, state, now + ms / 1000
            )
            flow.replied = bool(flags & 1)
            flow.fin_direction = (flags >> 1) & 3
            self.outbound[outbound_key] = flow
            self.inbound[inbound_key] = flow
            self._queue(flow)
            added += 1
        return added
