"""egresscore's SNAT table against a pure-Python dict-based translator, measured in the same run.

Every group holds both implementations, so pytest-benchmark's table and the summary printed by
conftest.py compare them side by side (``python-dict`` is ``_py_snat.PySnatTable``). Rounds loop over
many packets; ``extra_info["ops_per_round"]`` turns a round's time into a time per packet, per flow or
per call. Each round gets fresh copies of its packets (made in the untimed setup), because a
translation rewrites them in place.

Groups (``{n}`` is the number of live flows, 1M in a timed run, 10k in the smoke run):

* ``snat-out-{n}``: ``translate_outbound_many`` over a batch of packets of existing flows, random order;
* ``snat-in-{n}``: ``translate_inbound_many`` over the replies to them;
* ``snat-out1-{n}``: one ``translate_outbound`` call from Python per packet;
* ``snat-new-{n}``: a batch of SYNs opening fresh flows (port allocation and insertion) in the table
  of ``{n}`` flows; the setup of every round expires the previous round's flows again;
* ``snat-snapshot-{n}`` / ``snat-restore-{n}``: one snapshot of the table / one restore of
  egresscore's snapshot into an empty table (the baseline reads the same bytes);
* ``snat-memory-{n}``: RSS growth of a fresh process while it fills a table (``_snat_memory_probe.py``).

Timings are never asserted. Results are: every benchmark checks its verdicts, table sizes and
rewritten packets (addresses, ports, both checksums recomputed with numpy), so a broken benchmark fails
instead of measuring nothing.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import _snat_workload as workload
import numpy as np
import numpy.typing as npt
import pytest
from _py_snat import PySnatTable
from bench_prefix_table import run_memory_probe
from pytest_benchmark.fixture import BenchmarkFixture

IMPLEMENTATIONS: Final = ("egresscore", "python-dict")
PROBE: Final = Path(__file__).resolve().parent / "_snat_memory_probe.py"
PROBE_TIMEOUT_SECONDS: Final = 900
# The tables are filled at this clock; every later step of a table's clock is taken from SnatBench.
START: Final = 1_000_000.0
# Seeds of the table's random port choices (both implementations) and of the batch's flow order.
TABLE_SEED: Final = 7
SAMPLE_SEED: Final = 0x5EED_5A48
# The SYN_SENT timeout (120 s by default) plus a second: flows opened by a round are expired by then.
NEW_FLOW_LIFETIME: Final = 121.0
# Checksums of the filled table's packets are recomputed for this many of them (all for smaller tables).
CHECKED_PACKETS: Final = 65_536
TRANSLATED: Final = 0

U8Array = npt.NDArray[np.uint8]
U32Array = npt.NDArray[np.uint32]


def new_table(implementation: str, capacity: int) -> Any:
    if implementation == "python-dict":
        return PySnatTable(
            workload.EGRESS_IPS, port_range=workload.PORT_RANGE, max_entries=capacity, seed=TABLE_SEED
        )
    try:
        from egresscore.core.snat_table import SnatTable
    except ImportError as exc:
        raise RuntimeError(
            "egresscore.core.snat_table cannot be imported; build the extension first (`make build`)"
        ) from exc
    return SnatTable(
        workload.EGRESS_IPS, port_range=workload.PORT_RANGE, max_entries=capacity, seed=TABLE_SEED
    )


class Batch:
    """One batch of packets in the form an implementation takes: egresscore reads a numpy buffer and
    uint32 offsets and writes verdicts into a reused uint8 array; the baseline takes a bytearray, a list
    of offsets and a bytearray of verdicts."""

    def __init__(self, implementation: str, packets: U8Array) -> None:
        self.implementation = implementation
        self.count = len(packets)
        self.source = np.ascontiguousarray(packets).reshape(-1)
        self.raw = self.source.tobytes()
        offsets = workload.offsets(self.count)
        self.offsets: U32Array | list[int] = offsets if implementation == "egresscore" else offsets.tolist()
        self.verdicts: U8Array | bytearray = (
            np.zeros(self.count, dtype=np.uint8) if implementation == "egresscore" else bytearray(self.count)
        )

    def fresh(self) -> U8Array | bytearray:
        """An untranslated copy of the packets."""
        return self.source.copy() if self.implementation == "egresscore" else bytearray(self.raw)

    def outbound(self, table: Any, buffer: U8Array | bytearray, now: float) -> None:
        table.translate_outbound_many(buffer, self.offsets, workload.EGRESS_IP, now, verdicts=self.verdicts)

    def inbound(self, table: Any, buffer: U8Array | bytearray, now: float) -> None:
        table.translate_inbound_many(buffer, self.offsets, now, verdicts=self.verdicts)

    def verdict_array(self) -> U8Array:
        return np.frombuffer(self.verdicts, dtype=np.uint8)


def as_packets(buffer: U8Array | bytearray | bytes) -> U8Array:
    return np.frombuffer(buffer, dtype=np.uint8).reshape(-1, workload.PACKET_LENGTH)


def check_verdicts(implementation: str, verdicts: U8Array) -> None:
    wrong = np.flatnonzero(verdicts != TRANSLATED)
    assert len(wrong) == 0, (
        f"{implementation}: {len(wrong)} of {len(verdicts)} packets not TRANSLATED; first "
        f"(index, verdict): {[(int(i), int(verdicts[i])) for i in wrong[:5]]}"
    )


def check_checksums(implementation: str, packets: U8Array) -> None:
    ip_ok, tcp_ok = workload.checksums_valid(packets)
    assert ip_ok.all() and tcp_ok.all(), (
        f"{implementation}: {int((~ip_ok).sum())} bad IPv4 and {int((~tcp_ok).sum())} bad TCP checksums "
        f"in {len(packets)} rewritten packets"
    )


def check_outbound(
    implementation: str,
    packets: U8Array,
    original: U8Array,
    egress_ports: npt.NDArray[np.uint16] | None,
) -> None:
    """Translated outbound packets: egress source address, the expected source ports (when known),
    valid checksums, and nothing else changed."""
    source, _ = workload.addresses(packets)
    egress = workload.ipv4_int(workload.EGRESS_IP)
    assert (source == egress).all(), f"{implementation}: {int((source != egress).sum())} sources not {egress}"
    if egress_ports is not None:
        source_port, _ = workload.ports(packets)
        assert (source_port == egress_ports).all(), (
            f"{implementation}: {int((source_port != egress_ports).sum())} source ports differ from "
            "the flows' egress ports"
        )
    untouched = np.r_[0:10, 16:20, 22:36, 38:52]
    assert (packets[:, untouched] == original[:, untouched]).all(), (
        f"{implementation}: bytes other than source address, port and checksums changed"
    )
    check_checksums(implementation, packets)


def check_inbound(implementation: str, packets: U8Array, flows: workload.Flows) -> None:
    _, destination = workload.addresses(packets)
    _, destination_port = workload.ports(packets)
    assert (destination == flows.pod_ip).all(), (
        f"{implementation}: {int((destination != flows.pod_ip).sum())} replies not sent back to the pod"
    )
    assert (destination_port == flows.pod_port).all(), f"{implementation}: reply ports not the pods'"
    check_checksums(implementation, packets)


class SnatBench:
    """The flows, packets and filled tables every SNAT benchmark of the session shares."""

    def __init__(self, sizes: workload.SnatSizes) -> None:
        self.sizes = sizes
        everything = workload.make_flows(sizes.entries + max(sizes.new_flows, sizes.python_new_flows))
        self.flows = everything.take(slice(0, sizes.entries))
        # Flows no table holds: the SYNs of the new-flow group open them.
        self.new_flows = everything.take(slice(sizes.entries, None))
        self.packets = workload.outbound_packets(self.flows)
        self.new_packets = workload.outbound_packets(self.new_flows, workload.FLAG_SYN)
        rng = np.random.default_rng(SAMPLE_SEED)
        # Existing flows in random order: the outbound batch, and (as replies) the inbound batch.
        self.sample = rng.choice(sizes.entries, min(sizes.batch, sizes.entries), replace=False)
        self.tables: dict[str, Any] = {}
        self.clocks: dict[str, float] = {}
        self.egress_ports: dict[str, npt.NDArray[np.uint16]] = {}
        self.translated_sample: dict[str, U8Array] = {}
        self._snapshot: bytes | None = None

    def table(self, implementation: str) -> Any:
        """The implementation's table holding ``sizes.entries`` established flows (filled once)."""
        if implementation not in self.tables:
            table = new_table(implementation, self.sizes.capacity)
            batch = Batch(implementation, self.packets)
            buffer = batch.fresh()
            batch.outbound(table, buffer, START)
            check_verdicts(implementation, batch.verdict_array())
            assert len(table) == self.sizes.entries, (
                f"{implementation}: {len(table)} entries after opening {self.sizes.entries} flows"
            )
            translated = as_packets(buffer)
            checked = slice(0, CHECKED_PACKETS)
            check_outbound(implementation, translated[checked], self.packets[checked], None)
            self.egress_ports[implementation] = workload.ports(translated)[0]
            self.translated_sample[implementation] = translated[self.sample].copy()
            self.tables[implementation] = table
            self.clocks[implementation] = START
        return self.tables[implementation]

    def now(self, implementation: str, advance: float = 1.0) -> float:
        """Move the implementation's clock on by ``advance`` seconds and return it."""
        self.table(implementation)
        self.clocks[implementation] += advance
        return self.clocks[implementation]

    def snapshot(self) -> bytes:
        """egresscore's snapshot of its filled table, taken once: the input of both restore benchmarks."""
        if self._snapshot is None:
            self._snapshot = self.table("egresscore").snapshot(self.now("egresscore"))
        return self._snapshot


@pytest.fixture(scope="session")
def snat(snat_sizes: workload.SnatSizes) -> SnatBench:
    return SnatBench(snat_sizes)


def describe(
    benchmark: BenchmarkFixture,
    group: str,
    implementation: str,
    method: str,
    ops: int,
    sizes: workload.SnatSizes,
    **extra: Any,
) -> None:
    benchmark.group = group
    benchmark.extra_info.update(
        implementation=implementation,
        kind=group.rsplit("-", 1)[0],
        method=method,
        ops_per_round=ops,
        entries=sizes.entries,
        **extra,
    )


def record_per_op(benchmark: BenchmarkFixture) -> None:
    """Store the mean time per operation (absent with --benchmark-disable, where nothing is timed)."""
    if benchmark.stats:
        mean = float(benchmark.stats.stats.mean)
        benchmark.extra_info["ns_per_op"] = mean / benchmark.extra_info["ops_per_round"] * 1e9


def rounds(sizes: workload.SnatSizes, implementation: str) -> int:
    return sizes.rounds if implementation == "egresscore" else sizes.python_rounds


def batch_size(sizes: workload.SnatSizes, implementation: str) -> int:
    return min(sizes.batch if implementation == "egresscore" else sizes.python_batch, sizes.entries)


def timed_batches(
    benchmark: BenchmarkFixture,
    batch: Batch,
    run: Callable[[U8Array | bytearray, float], None],
    now: Callable[[], float],
    round_count: int,
) -> U8Array:
    """Time ``run`` on a fresh copy of the batch per round; returns the last round's packets."""
    last: list[U8Array | bytearray] = []

    def setup() -> tuple[tuple[U8Array | bytearray, float], dict[str, Any]]:
        buffer = batch.fresh()
        last[:] = [buffer]
        return (buffer, now()), {}

    benchmark.pedantic(  # type: ignore[no-untyped-call]
        run, setup=setup, rounds=round_count, warmup_rounds=1, iterations=1
    )
    record_per_op(benchmark)
    return as_packets(last[0])


# --- Existing flows, batch -------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outbound_existing(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """``translate_outbound_many`` over packets of established flows in random order: parse, lookup,
    state and expiry update, source rewrite and both checksums, per packet."""
    sizes = snat.sizes
    table = snat.table(implementation)
    count = batch_size(sizes, implementation)
    chosen = snat.sample[:count]
    batch = Batch(implementation, snat.packets[chosen])
    method = "translate_outbound_many" if implementation == "egresscore" else "Python loop, dicts"
    extra: dict[str, Any] = {"packets": count, "capacity": sizes.capacity}
    if implementation == "egresscore":
        extra["memory_usage"] = table.memory_usage()
        extra["memory_usage_per_entry"] = table.memory_usage() / len(table)
    describe(benchmark, f"snat-out-{sizes.label}", implementation, method, count, sizes, **extra)
    packets = timed_batches(
        benchmark,
        batch,
        lambda buffer, now: batch.outbound(table, buffer, now),
        lambda: snat.now(implementation),
        rounds(sizes, implementation),
    )
    check_verdicts(implementation, batch.verdict_array())
    check_outbound(implementation, packets, snat.packets[chosen], snat.egress_ports[implementation][chosen])
    assert len(table) == sizes.entries, f"{implementation}: existing flows changed the table's size"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inbound_existing(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """``translate_inbound_many`` over replies to established flows: reply-tuple lookup, destination
    rewrite back to the pod, both checksums, per packet."""
    sizes = snat.sizes
    table = snat.table(implementation)
    count = batch_size(sizes, implementation)
    batch = Batch(implementation, workload.replies(snat.translated_sample[implementation][:count]))
    method = "translate_inbound_many" if implementation == "egresscore" else "Python loop, dicts"
    describe(benchmark, f"snat-in-{sizes.label}", implementation, method, count, sizes, packets=count)
    packets = timed_batches(
        benchmark,
        batch,
        lambda buffer, now: batch.inbound(table, buffer, now),
        lambda: snat.now(implementation),
        rounds(sizes, implementation),
    )
    check_verdicts(implementation, batch.verdict_array())
    check_inbound(implementation, packets, snat.flows.take(snat.sample[:count]))


# --- Existing flows, one call per packet ----------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_outbound_single(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """One ``translate_outbound(bytearray, egress_ip, now)`` call from Python per packet (the loop is
    part of the time, for both implementations)."""
    sizes = snat.sizes
    table = snat.table(implementation)
    count = min(sizes.single, sizes.entries)
    chosen = snat.sample[:count] if count <= len(snat.sample) else np.arange(count)
    raw = snat.packets[chosen].tobytes()
    length = workload.PACKET_LENGTH
    translate = table.translate_outbound
    egress = workload.EGRESS_IP
    describe(
        benchmark,
        f"snat-out1-{sizes.label}",
        implementation,
        "translate_outbound(bytearray)",
        count,
        sizes,
        calls=count,
    )
    last: list[list[bytearray]] = []

    def setup() -> tuple[tuple[list[bytearray], float], dict[str, Any]]:
        packets = [bytearray(raw[i : i + length]) for i in range(0, len(raw), length)]
        last[:] = [packets]
        return (packets, snat.now(implementation)), {}

    def run(packets: list[bytearray], now: float) -> None:
        for packet in packets:
            translate(packet, egress, now)

    benchmark.pedantic(  # type: ignore[no-untyped-call]
        run, setup=setup, rounds=rounds(sizes, implementation), warmup_rounds=1, iterations=1
    )
    record_per_op(benchmark)
    # A packet that was not TRANSLATED is left as it was, so its source gives it away.
    packets = as_packets(b"".join(last[0]))
    check_outbound(implementation, packets, snat.packets[chosen], snat.egress_ports[implementation][chosen])


# --- New flows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_new_flows(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """A batch of SYNs of flows the table does not hold: lookup miss, port allocation (the pod's port
    kept when free, else a probe), insertion both ways, rewrite. Before every round the clock moves past
    the SYN_SENT timeout and ``expire`` frees the previous round's flows, so each round opens the same
    flows again in a table of ``entries`` flows."""
    sizes = snat.sizes
    table = snat.table(implementation)
    count = sizes.new_flows if implementation == "egresscore" else sizes.python_new_flows
    batch = Batch(implementation, snat.new_packets[:count])
    method = "translate_outbound_many (SYN)" if implementation == "egresscore" else "Python loop, dicts"
    describe(
        benchmark,
        f"snat-new-{sizes.label}",
        implementation,
        method,
        count,
        sizes,
        flows=count,
        capacity=sizes.capacity,
    )

    def expire_new_flows() -> float:
        now = snat.now(implementation, NEW_FLOW_LIFETIME)
        table.expire(now)
        assert len(table) == sizes.entries, (
            f"{implementation}: {len(table)} entries after expiring the new flows, {sizes.entries} expected"
        )
        return now

    packets = timed_batches(
        benchmark,
        batch,
        lambda buffer, now: batch.outbound(table, buffer, now),
        expire_new_flows,
        rounds(sizes, implementation),
    )
    check_verdicts(implementation, batch.verdict_array())
    assert len(table) == sizes.entries + count, (
        f"{implementation}: {len(table)} entries after opening {count} new flows in {sizes.entries}"
    )
    check_outbound(implementation, packets, snat.new_packets[:count], None)
    expire_new_flows()


# --- Snapshot and restore -----------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_snapshot(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """``snapshot(now)`` of the whole table (format version 1, 64 bytes a flow)."""
    sizes = snat.sizes
    table = snat.table(implementation)
    now = snat.now(implementation)
    describe(
        benchmark,
        f"snat-snapshot-{sizes.label}",
        implementation,
        "snapshot(now)" if implementation == "egresscore" else "struct.pack_into per flow",
        1,
        sizes,
    )
    data = benchmark.pedantic(  # type: ignore[no-untyped-call]
        table.snapshot,
        args=(now,),
        rounds=sizes.snapshot_rounds if implementation == "egresscore" else sizes.python_snapshot_rounds,
        iterations=1,
    )
    record_per_op(benchmark)
    benchmark.extra_info["records"] = len(table)
    assert isinstance(data, bytes), f"{implementation}: snapshot returned {type(data).__name__}"
    assert data[:8] == b"EGSN\x00\x01\x00\x40", f"{implementation}: snapshot header {data[:8]!r}"
    assert int.from_bytes(data[8:16], "big") == len(table) == sizes.entries
    assert len(data) == 16 + 64 * sizes.entries, f"{implementation}: snapshot of {len(data)} bytes"


def check_restored(implementation: str, table: Any, snat: SnatBench, added: int) -> None:
    assert added == snat.sizes.entries, f"{implementation}: restore added {added} of {snat.sizes.entries}"
    assert len(table) == snat.sizes.entries, f"{implementation}: {len(table)} entries after restore"
    # A few flows must map to the egress port egresscore gave them.
    egress_ports = snat.egress_ports["egresscore"]
    for i in range(0, snat.sizes.entries, max(1, snat.sizes.entries // 50)):
        flow = table.lookup_outbound(
            workload.TCP_PROTOCOL,
            snat_address(implementation, int(snat.flows.pod_ip[i])),
            int(snat.flows.pod_port[i]),
            snat_address(implementation, int(snat.flows.remote_ip[i])),
            int(snat.flows.remote_port[i]),
        )
        assert flow is not None, f"{implementation}: restored table lacks flow {i}"
        assert flow.egress_port == egress_ports[i], (
            f"{implementation}: flow {i} restored with port {flow.egress_port}, the snapshot's is "
            f"{egress_ports[i]}"
        )


def snat_address(implementation: str, address: int) -> int | ipaddress.IPv4Address:
    # The baseline keys its dicts by int; SnatTable takes any address object.
    return address if implementation == "python-dict" else ipaddress.IPv4Address(address)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_restore(benchmark: BenchmarkFixture, snat: SnatBench, implementation: str) -> None:
    """``restore(snapshot, now)`` of egresscore's snapshot into an empty table (made in the setup)."""
    sizes = snat.sizes
    data = snat.snapshot()
    describe(
        benchmark,
        f"snat-restore-{sizes.label}",
        implementation,
        "restore(bytes, now)" if implementation == "egresscore" else "struct.iter_unpack, dicts",
        1,
        sizes,
    )
    last: list[Any] = []

    def setup() -> tuple[tuple[bytes, float], dict[str, Any]]:
        table = new_table(implementation, sizes.capacity)
        last[:] = [table]
        return (data, START + 10.0), {}

    def run(snapshot: bytes, now: float) -> int:
        added: int = last[0].restore(snapshot, now)
        return added

    added = benchmark.pedantic(  # type: ignore[no-untyped-call]
        run,
        setup=setup,
        rounds=sizes.snapshot_rounds if implementation == "egresscore" else sizes.python_snapshot_rounds,
        iterations=1,
    )
    record_per_op(benchmark)
    benchmark.extra_info["records"] = sizes.entries
    check_restored(implementation, last[0], snat, int(added))


# --- Memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_memory(
    benchmark: BenchmarkFixture,
    snat_sizes: workload.SnatSizes,
    snat_memory_results: dict[tuple[str, int], dict[str, Any]],
    implementation: str,
) -> None:
    """RSS growth while a fresh interpreter fills a table of ``memory_entries`` flows (max_entries equal
    to that count). The time pytest-benchmark shows is the probe's wall time and means nothing."""
    count = snat_sizes.memory_entries
    benchmark.group = f"snat-memory-{workload.count_label(count)}"
    command = [sys.executable, str(PROBE), implementation, str(count)]
    result = run_memory_probe(benchmark, command, PROBE_TIMEOUT_SECONDS)
    assert result["entries"] == count
    benchmark.extra_info.update(result, kind="memory", ops_per_round=1)
    snat_memory_results[(implementation, count)] = result
