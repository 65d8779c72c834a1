"""A plain-Python oracle for :class:`egresscore.core.snat_table.SnatTable` (docs/snat.md).

It works on abstract flow events (protocol, direction, addresses, ports, TCP flags),
never on packet bytes: the tests build the packets, run them through the compiled table,
and ask this oracle what must have happened.

The table is two dicts of live entries, one keyed by the original tuple
``(protocol, pod address, pod port, remote address, remote port)`` and one by the
translated tuple ``(protocol, remote address, remote port, egress address, egress port)``.
An entry is live while ``now < expires``; the oracle forgets an entry the moment its
clock reaches the expiry (it has no notion of "stored but not reclaimed", so it says
nothing about ``len``).

The compiled table makes choices the specification leaves open: a random port, which
unreplied entry to evict, and (where docs/snat.md reads two ways) the order of the
table-full and port checks and the state a few odd opening segments lead to. Every
event method therefore takes the choice the compiled table made (``port=``,
``evicted=``, ``verdict=``, ``opened_state=``), checks that it is one the specification
allows, raises :class:`OracleMismatch` (an AssertionError) with the reason if not, and
then applies it. Without those arguments the oracle chooses by itself (the pod port folded
into the range, or the lowest free port, the oldest unreplied entry, the table-full check first).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from egresscore.errors import SnapshotError

__all__ = [
    "ACK",
    "DEFAULT_TIMEOUTS",
    "FIN",
    "ICMP",
    "ICMPV6",
    "IN",
    "OUT",
    "PSH",
    "RST",
    "SNAPSHOT_HEADER",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_RECORD",
    "SYN",
    "TCP",
    "UDP",
    "Flow",
    "OracleMismatch",
    "Outcome",
    "ReferenceSnatTable",
    "Reply",
    "SnapshotRecord",
    "State",
    "Verdict",
    "decode_snapshot",
    "encode_snapshot",
    "tcp_transition",
]

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
OriginalKey: TypeAlias = tuple[int, Address, int, Address, int]
TranslatedKey: TypeAlias = tuple[int, Address, int, Address, int]
PublicEntry: TypeAlias = tuple[int, Address, int, Address, int, Address, int, int, bool, float]

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
OUT, IN = "out", "in"


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


class State(IntEnum):
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


DEFAULT_TIMEOUTS: dict[str, float] = {
    "tcp_syn_sent": 120,
    "tcp_syn_recv": 60,
    "tcp_established": 432000,
    "tcp_fin_wait": 120,
    "tcp_close_wait": 60,
    "tcp_last_ack": 30,
    "tcp_time_wait": 120,
    "tcp_close": 10,
    "udp_unreplied": 30,
    "udp_replied": 120,
    "icmp": 30,
}

_TCP_TIMEOUT_KEY = {
    State.SYN_SENT: "tcp_syn_sent",
    State.SYN_RECV: "tcp_syn_recv",
    State.ESTABLISHED: "tcp_established",
    State.FIN_WAIT: "tcp_fin_wait",
    State.CLOSE_WAIT: "tcp_close_wait",
    State.LAST_ACK: "tcp_last_ack",
    State.TIME_WAIT: "tcp_time_wait",
    State.CLOSE: "tcp_close",
}
TCP_STATES = frozenset(_TCP_TIMEOUT_KEY)
DATAGRAM_STATES = frozenset({State.UNREPLIED, State.REPLIED})

# A full table reclaims up to this many expired entries before it evicts (docs/snat.md). The
# oracle keeps live entries only, so "full" means max_entries live entries: exact while
# max_entries <= FULL_TABLE_RECLAIM, which is how the tests drive it.
FULL_TABLE_RECLAIM = 64

SPACE_FIRST = "table-full check before port allocation"
PORT_FIRST = "port allocation before table-full check"


class OracleMismatch(AssertionError):
    """The compiled table did something docs/snat.md does not allow."""


def _address(value: object) -> Address:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    return ipaddress.ip_address(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Flow:
    """An outbound packet: TCP or UDP, or an ICMP/ICMPv6 echo request (port = identifier)."""

    protocol: int
    pod_ip: Address
    pod_port: int
    remote_ip: Address
    remote_port: int
    tcp_flags: int = 0

    @property
    def key(self) -> OriginalKey:
        return (self.protocol, self.pod_ip, self.pod_port, self.remote_ip, self.remote_port)


@dataclass(frozen=True)
class Reply:
    """An inbound packet to an egress address: TCP, UDP or an echo reply (egress port = identifier)."""

    protocol: int
    remote_ip: Address
    remote_port: int
    egress_ip: Address
    egress_port: int
    tcp_flags: int = 0

    @property
    def key(self) -> TranslatedKey:
        return (self.protocol, self.remote_ip, self.remote_port, self.egress_ip, self.egress_port)


@dataclass
class _Entry:
    protocol: int
    pod_ip: Address
    pod_port: int
    remote_ip: Address
    remote_port: int
    egress_ip: Address
    egress_port: int
    state: State
    replied: bool
    expires: float
    fin_direction: str | None
    created: int

    @property
    def original(self) -> OriginalKey:
        return (self.protocol, self.pod_ip, self.pod_port, self.remote_ip, self.remote_port)

    @property
    def translated(self) -> TranslatedKey:
        return (self.protocol, self.remote_ip, self.remote_port, self.egress_ip, self.egress_port)

    def public(self) -> PublicEntry:
        """The fields of an ``egresscore.SnatEntry``, in its order."""
        return (
            self.protocol,
            self.pod_ip,
            self.pod_port,
            self.remote_ip,
            self.remote_port,
            self.egress_ip,
            self.egress_port,
            int(self.state),
            self.replied,
            self.expires,
        )


@dataclass(frozen=True)
class Outcome:
    """What a packet led to: its verdict, and the entry it was translated with (after the packet)."""

    verdict: Verdict
    entry: PublicEntry | None = None


def tcp_transition(state: State, direction: str, flags: int, fin_direction: str | None) -> tuple[State, bool]:
    """The TCP state after a segment of an existing flow, and whether the flow reopened.

    The rules of docs/snat.md, in its order; the first that applies wins.
    """
    syn, ack, fin, rst = bool(flags & SYN), bool(flags & ACK), bool(flags & FIN), bool(flags & RST)
    pure_ack = ack and not (syn or fin or rst)
    other_direction = fin_direction is not None and direction != fin_direction
    if rst:
        return State.CLOSE, False
    if syn and not ack and direction == OUT and state in (State.TIME_WAIT, State.CLOSE):
        return State.SYN_SENT, True
    if syn and ack and direction == IN and state == State.SYN_SENT:
        return State.SYN_RECV, False
    if pure_ack and direction == OUT and state == State.SYN_RECV:
        return State.ESTABLISHED, False
    if fin and state in (State.SYN_RECV, State.ESTABLISHED):
        return State.FIN_WAIT, False
    if fin and other_direction and state in (State.FIN_WAIT, State.CLOSE_WAIT):
        return State.LAST_ACK, False
    if ack and not fin and other_direction and state == State.FIN_WAIT:
        return State.CLOSE_WAIT, False
    if pure_ack and direction == fin_direction and state == State.LAST_ACK:
        return State.TIME_WAIT, False
    return state, False


def tcp_opening_options(flags: int) -> list[tuple[State, str | None]]:
    """The (state, first FIN direction) a new TCP flow may open in; the first is the literal reading.

    docs/snat.md: "A new flow opens in SYN_SENT on a SYN, or in ESTABLISHED for any other
    segment but RST". Two segments read two ways: a SYN+ACK is a segment with SYN set
    (SYN_SENT) or "any other segment" (ESTABLISHED); and a FIN that opens a flow in
    ESTABLISHED may also count as that state's first FIN (FIN_WAIT, as Linux does when it
    picks a connection up and then runs the segment through its state machine).
    """
    if flags & RST:
        return []
    if flags & SYN and not flags & ACK:
        return [(State.SYN_SENT, None)]
    if flags & SYN:
        return [(State.SYN_SENT, None), (State.ESTABLISHED, None)]
    if flags & FIN:
        return [(State.ESTABLISHED, None), (State.FIN_WAIT, OUT)]
    return [(State.ESTABLISHED, None)]


# --- the snapshot format (docs/snat.md, version 1) ---------------------------------------

SNAPSHOT_MAGIC = b"EGSN"
SNAPSHOT_VERSION = 1
SNAPSHOT_HEADER = struct.Struct(">4sHHQ")
SNAPSHOT_RECORD = struct.Struct(">BBBBHHHHI16s16s16s")
assert SNAPSHOT_HEADER.size == 16 and SNAPSHOT_RECORD.size == 64

FLAG_REPLIED = 0x01
FLAG_FIN_OUT = 0x02
FLAG_FIN_IN = 0x04

_PROTOCOL_FAMILY = {TCP: (4, 6), UDP: (4, 6), ICMP: (4,), ICMPV6: (6,)}


@dataclass(frozen=True)
class SnapshotRecord:
    family: int
    protocol: int
    state: int
    flags: int
    pod_port: int
    remote_port: int
    egress_port: int
    ms_left: int
    pod_ip: Address
    remote_ip: Address
    egress_ip: Address
    reserved: int = 0


def _pack_address(address: Address) -> bytes:
    return address.packed.ljust(16, b"\0")


def encode_snapshot(records: Iterable[SnapshotRecord], *, count: int | None = None) -> bytes:
    """Snapshot bytes holding ``records``; ``count`` overrides the header's record count."""
    body = [
        SNAPSHOT_RECORD.pack(
            r.family,
            r.protocol,
            r.state,
            r.flags,
            r.pod_port,
            r.remote_port,
            r.egress_port,
            r.reserved,
            r.ms_left,
            _pack_address(r.pod_ip),
            _pack_address(r.remote_ip),
            _pack_address(r.egress_ip),
        )
        for r in records
    ]
    header = SNAPSHOT_HEADER.pack(
        SNAPSHOT_MAGIC, SNAPSHOT_VERSION, SNAPSHOT_RECORD.size, len(body) if count is None else count
    )
    return header + b"".join(body)


def decode_snapshot(data: bytes | bytearray | memoryview) -> list[SnapshotRecord]:
    """The records of a snapshot, or SnapshotError naming what is wrong (record and field)."""
    raw = bytes(data)
    if len(raw) < SNAPSHOT_HEADER.size:
        raise SnapshotError(f"snapshot truncated: {len(raw)} bytes, the header alone is 16")
    magic, version, record_size, count = SNAPSHOT_HEADER.unpack_from(raw)
    if magic != SNAPSHOT_MAGIC:
        raise SnapshotError(f"snapshot magic is {magic!r}, expected {SNAPSHOT_MAGIC!r}")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(f"snapshot version {version} is not supported (expected 1)")
    if record_size != SNAPSHOT_RECORD.size:
        raise SnapshotError(f"snapshot record size {record_size}, expected 64")
    if len(raw) != SNAPSHOT_HEADER.size + count * SNAPSHOT_RECORD.size:
        raise SnapshotError(f"snapshot truncated or too long: {len(raw)} bytes for {count} records")
    records = []
    for index in range(count):
        fields = SNAPSHOT_RECORD.unpack_from(raw, SNAPSHOT_HEADER.size + index * SNAPSHOT_RECORD.size)
        family, protocol, state, flags, pod_port, remote_port, egress_port, reserved, ms_left = fields[:9]
        if family not in (4, 6):
            raise SnapshotError(f"snapshot record {index}: family {family} is not 4 or 6")
        if protocol not in _PROTOCOL_FAMILY or family not in _PROTOCOL_FAMILY[protocol]:
            raise SnapshotError(f"snapshot record {index}: protocol {protocol} with family {family}")
        allowed_states = TCP_STATES if protocol == TCP else DATAGRAM_STATES
        if state not in {int(s) for s in allowed_states}:
            raise SnapshotError(f"snapshot record {index}: state {state} for protocol {protocol}")
        width = 4 if family == 4 else 16
        addresses = []
        for packed in fields[9:]:
            if any(packed[width:]):
                raise SnapshotError(f"snapshot record {index}: IPv4 address padding is not zero")
            addresses.append(ipaddress.ip_address(packed[:width]))
        records.append(
            SnapshotRecord(
                family,
                protocol,
                state,
                flags,
                pod_port,
                remote_port,
                egress_port,
                ms_left,
                addresses[0],
                addresses[1],
                addresses[2],
                reserved,
            )
        )
    return records


# --- the table ----------------------------------------------------------------------------


class ReferenceSnatTable:
    """The SNAT table of docs/snat.md as dicts of live entries."""

    def __init__(
        self,
        egress_ips: Iterable[object],
        *,
        port_range: tuple[int, int] = (1024, 65535),
        max_entries: int = FULL_TABLE_RECLAIM,
        timeouts: Mapping[str, float] | None = None,
        max_port_probes: int = 128,
    ) -> None:
        self.egress_ips = tuple(_address(ip) for ip in egress_ips)
        low, high = port_range
        if not (0 < low <= high <= 65535):
            raise ValueError(f"port_range {port_range!r} is not (low, high) with 0 < low <= high <= 65535")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if max_port_probes < 1:
            raise ValueError(f"max_port_probes must be at least 1, got {max_port_probes}")
        if max_entries > FULL_TABLE_RECLAIM:
            raise ValueError(f"the oracle models tables of at most {FULL_TABLE_RECLAIM} entries")
        self.port_range = (low, high)
        self.max_entries = max_entries
        self.max_port_probes = max_port_probes
        self.timeouts = dict(DEFAULT_TIMEOUTS)
        for key, value in (timeouts or {}).items():
            if key not in DEFAULT_TIMEOUTS:
                raise ValueError(f"timeouts: unknown key {key!r}")
            if not value >= 0:
                raise ValueError(f"timeouts[{key!r}] must not be negative, got {value!r}")
            self.timeouts[key] = float(value)
        self.clock = -math.inf
        self._by_original: dict[OriginalKey, _Entry] = {}
        self._by_translated: dict[TranslatedKey, _Entry] = {}
        self._serial = itertools.count()
        self.evicted = 0
        self.restore_skipped = 0
        self.port_exhaustion: Counter[tuple[Address, Address]] = Counter()
        # Readings of docs/snat.md still consistent with everything the compiled table did.
        self.orders = {SPACE_FIRST, PORT_FIRST}
        # Ambiguous opening segments and the state the compiled table chose for each kind.
        self.openings: dict[str, set[State]] = {}

    # -- time -----------------------------------------------------------------------

    def advance(self, now: float) -> float:
        """Take ``now`` as seen (never running backwards), forget expired entries, return the clock."""
        self.clock = max(self.clock, now)
        for entry in [e for e in self._by_original.values() if not self.clock < e.expires]:
            self._remove(entry)
        return self.clock

    def timeout_of(self, entry: _Entry) -> float:
        if entry.protocol == TCP:
            return self.timeouts[_TCP_TIMEOUT_KEY[entry.state]]
        if entry.protocol == UDP:
            return self.timeouts["udp_replied" if entry.state == State.REPLIED else "udp_unreplied"]
        return self.timeouts["icmp"]

    # -- storage ----------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        assert entry.original not in self._by_original and entry.translated not in self._by_translated
        self._by_original[entry.original] = entry
        self._by_translated[entry.translated] = entry

    def _remove(self, entry: _Entry) -> None:
        del self._by_original[entry.original]
        del self._by_translated[entry.translated]

    def _live(self, now: float | None) -> list[_Entry]:
        at = self.clock if now is None else max(now, self.clock)
        return [e for e in self._by_original.values() if at < e.expires]

    def live_keys(self, now: float | None = None) -> set[OriginalKey]:
        """Original tuples of the entries live at ``now`` (the clock, clamped, when None)."""
        return {e.original for e in self._live(now)}

    def entries(self, now: float | None = None) -> list[PublicEntry]:
        return sorted((e.public() for e in self._live(now)), key=sort_key)

    def __len__(self) -> int:
        return len(self._by_original)

    def lookup_outbound(self, key: OriginalKey) -> PublicEntry | None:
        entry = self._by_original.get(key)
        return None if entry is None or not self.clock < entry.expires else entry.public()

    def lookup_inbound(self, key: TranslatedKey) -> PublicEntry | None:
        entry = self._by_translated.get(key)
        return None if entry is None or not self.clock < entry.expires else entry.public()

    def fin_direction(self, key: OriginalKey) -> str | None:
        return self._by_original[key].fin_direction

    def counts_by_state(self) -> dict[tuple[int, int], int]:
        return dict(Counter((e.protocol, int(e.state)) for e in self._live(None)))

    # -- packets ------------------------------------------------------------------------

    def outbound(
        self,
        flow: Flow,
        egress_ip: object,
        now: float,
        *,
        verdict: int | None = None,
        port: int | None = None,
        evicted: OriginalKey | None = None,
        opened_state: int | None = None,
    ) -> Outcome:
        """An outbound packet of ``flow``, left with ``egress_ip`` by the caller.

        ``verdict``, ``port`` (the egress port the packet left with), ``evicted`` (the
        original tuple of the entry that disappeared) and ``opened_state`` (the state a new
        entry opened in) are what the compiled table did; they are checked, then applied.
        """
        egress = _address(egress_ip)
        if egress not in self.egress_ips:
            raise ValueError(f"egress_ip {egress} is not configured")
        now = self.advance(now)

        def expect(expected: Verdict) -> Outcome:
            if verdict is not None and verdict != expected:
                raise OracleMismatch(f"{flow}: verdict {verdict!r}, expected {expected!r}")
            if evicted is not None:
                raise OracleMismatch(f"{flow}: entry {evicted} disappeared, but nothing may be evicted")
            return Outcome(expected)

        if egress.version != flow.pod_ip.version:
            return expect(Verdict.DROP_WRONG_FAMILY)
        entry = self._by_original.get(flow.key)
        if entry is not None:
            outcome = expect(Verdict.TRANSLATED)
            if port is not None and port != entry.egress_port:
                raise OracleMismatch(f"{flow}: left with port {port}, its entry has {entry.egress_port}")
            self._on_packet(entry, OUT, flow.tcp_flags, now)
            return Outcome(outcome.verdict, entry.public())

        options: list[tuple[State, str | None]]
        options = tcp_opening_options(flow.tcp_flags) if flow.protocol == TCP else [(State.UNREPLIED, None)]
        if not options:
            return expect(Verdict.DROP_INVALID)
        return self._open(flow, egress, now, options, verdict, port, evicted, opened_state)

    def inbound(self, reply: Reply, now: float) -> Outcome:
        """An inbound TCP/UDP packet or echo reply addressed to an egress address and port."""
        now = self.advance(now)
        entry = self._by_translated.get(reply.key)
        if entry is None:
            return Outcome(Verdict.NOT_OURS)
        self._on_packet(entry, IN, reply.tcp_flags, now)
        return Outcome(Verdict.TRANSLATED, entry.public())

    def inbound_error(self, quoted: TranslatedKey, now: float) -> Outcome:
        """An inbound ICMP error quoting a translated outbound packet (``quoted``: its translated tuple)."""
        self.advance(now)
        entry = self._by_translated.get(quoted)
        if entry is None:
            return Outcome(Verdict.NOT_OURS)
        return Outcome(Verdict.TRANSLATED, entry.public())

    def expire(self, now: float) -> None:
        self.advance(now)

    def _on_packet(self, entry: _Entry, direction: str, flags: int, now: float) -> None:
        if entry.protocol == TCP:
            state, reopened = tcp_transition(entry.state, direction, flags, entry.fin_direction)
            if reopened:
                entry.replied = False
                entry.fin_direction = None
            elif state == State.FIN_WAIT and entry.state != State.FIN_WAIT:
                entry.fin_direction = direction
            entry.state = state
        elif direction == IN:
            entry.state = State.REPLIED
        if direction == IN:
            entry.replied = True
        entry.expires = now + self.timeout_of(entry)

    # -- opening a flow ----------------------------------------------------------------

    def _port_taken(self, flow: Flow, egress: Address, port: int, without: _Entry | None) -> bool:
        holder = self._by_translated.get((flow.protocol, flow.remote_ip, flow.remote_port, egress, port))
        return holder is not None and holder is not without

    def _port_problem(self, flow: Flow, egress: Address, port: int, without: _Entry | None) -> str | None:
        """Why ``port`` may not be allocated to ``flow`` (None: it may)."""
        low, high = self.port_range
        if not low <= port <= high:
            return f"port {port} is outside port_range {self.port_range}"
        if self._port_taken(flow, egress, port, without):
            return f"port {port} is taken toward {flow.remote_ip} port {flow.remote_port}"
        preferred = self.preferred_port(flow.pod_port)
        if self._pod_port_free(flow, egress, without) and port != preferred:
            return f"port {port} allocated although {preferred} (pod port {flow.pod_port}, folded) is free"
        return None

    def preferred_port(self, pod_port: int) -> int:
        """The first choice for a new flow (docs/snat.md): the pod's port, folded into
        ``port_range`` when outside it."""
        low, high = self.port_range
        return low + (pod_port - low) % (high - low + 1)

    def _pod_port_free(self, flow: Flow, egress: Address, without: _Entry | None) -> bool:
        return not self._port_taken(flow, egress, self.preferred_port(flow.pod_port), without)

    def _may_exhaust(self, flow: Flow, egress: Address, without: _Entry | None) -> bool:
        """Whether a probe of min(max_port_probes, range size) ports from some start finds none free."""
        if self._pod_port_free(flow, egress, without):
            return False
        low, high = self.port_range
        size = high - low + 1
        probes = min(self.max_port_probes, size)
        taken = [self._port_taken(flow, egress, low + i, without) for i in range(size)]
        return any(all(taken[(start + i) % size] for i in range(probes)) for start in range(size))

    def _first_free_port(self, flow: Flow, egress: Address, without: _Entry | None) -> int | None:
        if self._pod_port_free(flow, egress, without):
            return self.preferred_port(flow.pod_port)
        low, high = self.port_range
        return next((p for p in range(low, high + 1) if not self._port_taken(flow, egress, p, without)), None)

    def _open(
        self,
        flow: Flow,
        egress: Address,
        now: float,
        options: list[tuple[State, str | None]],
        verdict: int | None,
        port: int | None,
        evicted: OriginalKey | None,
        opened_state: int | None,
    ) -> Outcome:
        live = self._live(None)
        full = len(live) >= self.max_entries
        unreplied = {e.original: e for e in live if not e.replied}
        victim = None
        if evicted is not None:
            victim = self._by_original.get(evicted)
            if victim is None:
                raise OracleMismatch(f"{flow}: {evicted} disappeared but was not a live entry")

        if verdict is None:  # choose by ourselves: table-full check first, oldest unreplied entry
            victim = min(unreplied.values(), key=lambda e: e.created) if full and unreplied else None
            if full and victim is None:
                verdict = Verdict.DROP_TABLE_FULL
            else:
                port = self._first_free_port(flow, egress, victim)
                verdict = Verdict.DROP_PORT_EXHAUSTED if port is None else Verdict.TRANSLATED
            opened_state = options[0][0]

        problems: dict[str, str] = {}
        for order in (SPACE_FIRST, PORT_FIRST):
            problem = self._check_order(order, flow, egress, full, unreplied, verdict, port, victim)
            if problem is not None:
                problems[order] = problem
        legal = {SPACE_FIRST, PORT_FIRST} - set(problems)
        if not legal:
            raise OracleMismatch(
                f"{flow} at {now} (full={full}, unreplied={len(unreplied)}): verdict {verdict!r}, "
                f"port {port}, evicted {evicted}: {problems}"
            )
        if not legal & self.orders:
            raise OracleMismatch(
                f"{flow}: verdict {verdict!r} is only legal with {legal}, "
                f"but earlier packets needed {self.orders}"
            )
        self.orders &= legal

        if victim is not None:
            self._remove(victim)
            self.evicted += 1
        if verdict == Verdict.DROP_PORT_EXHAUSTED:
            self.port_exhaustion[(egress, flow.remote_ip)] += 1
        if verdict != Verdict.TRANSLATED:
            return Outcome(Verdict(verdict))

        assert port is not None
        chosen = [option for option in options if opened_state in (None, option[0])]
        if not chosen:
            raise OracleMismatch(
                f"{flow}: opened in {opened_state!r}, expected one of {[s for s, _ in options]}"
            )
        state, fin_direction = chosen[0]
        if len(options) > 1:
            kind = "SYN+ACK" if flow.tcp_flags & SYN else "FIN"
            self.openings.setdefault(kind, set()).add(state)
        entry = _Entry(
            flow.protocol,
            flow.pod_ip,
            flow.pod_port,
            flow.remote_ip,
            flow.remote_port,
            egress,
            port,
            state,
            False,
            now,
            fin_direction,
            next(self._serial),
        )
        entry.expires = now + self.timeout_of(entry)
        self._add(entry)
        return Outcome(Verdict.TRANSLATED, entry.public())

    def _check_order(
        self,
        order: str,
        flow: Flow,
        egress: Address,
        full: bool,
        unreplied: dict[OriginalKey, _Entry],
        verdict: int,
        port: int | None,
        victim: _Entry | None,
    ) -> str | None:
        """Why (verdict, port, victim) is not what the table may do under ``order`` (None: it may)."""
        if victim is not None and victim.original not in unreplied:
            return f"evicted {victim.original}, which has seen a reply"
        if victim is not None and not full:
            return f"evicted {victim.original} although the table had room"

        def allocation(without: _Entry | None) -> str | None:
            if verdict == Verdict.TRANSLATED:
                if port is None:
                    return "translated without a port"
                return self._port_problem(flow, egress, port, without)
            if verdict == Verdict.DROP_PORT_EXHAUSTED:
                return None if self._may_exhaust(flow, egress, without) else "a port was free"
            return f"verdict {verdict!r} where a port allocation was due"

        if not full:
            return allocation(None)
        if order == SPACE_FIRST:
            if not unreplied:
                return (
                    None if verdict == Verdict.DROP_TABLE_FULL and victim is None else "expected table full"
                )
            if victim is None:
                return "the table was full and had an unreplied entry to evict"
            return allocation(victim)
        # PORT_FIRST: a port is allocated before anything is evicted.
        if verdict == Verdict.DROP_PORT_EXHAUSTED:
            if victim is not None:
                return "evicted an entry, then found no port"
            return allocation(None)
        if verdict == Verdict.DROP_TABLE_FULL:
            if unreplied:
                return "table full although an unreplied entry could be evicted"
            return None if self._first_free_port(flow, egress, None) is not None else "no port was free"
        if victim is None:
            return "a new entry in a full table without an eviction"
        return allocation(None)

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_records(self, now: float) -> list[SnapshotRecord]:
        """The records ``snapshot(now)`` must hold (in no particular order)."""
        now = self.advance(now)
        records = []
        for e in self._live(None):
            flags = (FLAG_REPLIED if e.replied else 0) | {None: 0, OUT: FLAG_FIN_OUT, IN: FLAG_FIN_IN}[
                e.fin_direction
            ]
            records.append(
                SnapshotRecord(
                    e.pod_ip.version,
                    e.protocol,
                    int(e.state),
                    flags,
                    e.pod_port,
                    e.remote_port,
                    e.egress_port,
                    round((e.expires - now) * 1000),
                    e.pod_ip,
                    e.remote_ip,
                    e.egress_ip,
                )
            )
        return records

    def snapshot(self, now: float) -> bytes:
        return encode_snapshot(sorted(self.snapshot_records(now), key=_record_key))

    def restore(self, data: bytes | bytearray | memoryview, now: float) -> int:
        records = decode_snapshot(data)
        now = self.advance(now)
        added = 0
        for r in records:
            fin_direction = OUT if r.flags & FLAG_FIN_OUT else IN if r.flags & FLAG_FIN_IN else None
            entry = _Entry(
                r.protocol,
                r.pod_ip,
                r.pod_port,
                r.remote_ip,
                r.remote_port,
                r.egress_ip,
                r.egress_port,
                State(r.state),
                bool(r.flags & FLAG_REPLIED),
                now + r.ms_left / 1000,
                fin_direction,
                next(self._serial),
            )
            if (
                entry.egress_ip not in self.egress_ips
                or entry.original in self._by_original
                or entry.translated in self._by_translated
            ):
                self.restore_skipped += 1
                continue
            self._add(entry)
            added += 1
        return added


def _record_key(record: SnapshotRecord) -> tuple[object, ...]:
    return (record.family, record.protocol, int(record.pod_ip), record.pod_port, int(record.remote_ip))


def sort_key(entry: tuple[object, ...]) -> tuple[object, ...]:
    """A total order on entries of both families (addresses as (version, integer))."""
    return tuple(
        (v.version, int(v)) if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else v
        for v in entry
    )
