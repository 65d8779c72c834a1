"""egresscore's longest-prefix-match table against pytricia, py-radix and a numpy batch proxy.

Each measurement is one benchmark group holding every implementation, so pytest-benchmark's table
and the summary printed by conftest.py compare them side by side. Rounds loop over many operations;
``extra_info["ops_per_round"]`` turns a round's time into a time per lookup or per insert.

Timings are never asserted. Answers are: after being timed, every implementation is checked against
the plain-Python reference in ``_workload``, so a benchmark of something broken fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import _workload
import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

# One untimed round first (caches and branch predictors warm, the output array's pages mapped),
# then at least 10 timed ones; pedantic benchmarks (build, memory) set their own rounds.
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=1, min_rounds=10)

PROBE: Final = Path(__file__).resolve().parent / "_memory_probe.py"
PROBE_TIMEOUT_SECONDS: Final = 600
BUILD_ROUNDS: Final = 3
# Slots of lookup_many are checked against the reference and the numpy proxy for this many addresses.
BATCH_CHECKED_COUNT: Final = 10_000


def describe(
    benchmark: BenchmarkFixture, group: str, implementation: str, kind: str, method: str, ops: int, size: int
) -> None:
    benchmark.group = group
    benchmark.extra_info.update(
        implementation=implementation, kind=kind, method=method, ops_per_round=ops, prefixes=size
    )


def record_per_op(benchmark: BenchmarkFixture) -> None:
    """Store the mean time per operation (absent with --benchmark-disable, where nothing is timed)."""
    if benchmark.stats:
        mean = float(benchmark.stats.stats.mean)
        benchmark.extra_info["ns_per_op"] = mean / benchmark.extra_info["ops_per_round"] * 1e9


def single_lookup(implementation: str, table: Any) -> Callable[[str], Any]:
    if implementation == "egresscore":
        return table.lookup  # type: ignore[no-any-return]
    if implementation == "pytricia":
        return table.get  # type: ignore[no-any-return]
    if implementation == "py-radix":
        return table.search_best  # type: ignore[no-any-return]
    raise ValueError(f"no single lookup for {implementation!r}")


def found_index(implementation: str, found: Any) -> int:
    """The prefix index a single lookup answered (the inserted value), or -1 for no match."""
    if found is None:
        return -1
    if implementation == "py-radix":
        return int(found.data["value"])
    return int(found)


def check_single(
    implementation: str,
    lookup: Callable[[str], Any],
    addresses: Sequence[str],
    expected: Sequence[tuple[int, int]],
) -> None:
    """The first ``len(expected)`` addresses must find the reference's prefix (by its index)."""
    answers = [found_index(implementation, lookup(address)) for address in addresses[: len(expected)]]
    wrong = [
        (address, got, best)
        for address, got, (best, _length) in zip(addresses, answers, expected, strict=False)
        if got != best
    ]
    assert not wrong, (
        f"{implementation}: {len(wrong)} of {len(expected)} lookups disagree with the reference: {wrong[:5]}"
    )


SINGLE_METHODS: Final = {"egresscore": "lookup(str)", "pytricia": "get(str)", "py-radix": "search_best(str)"}


def bench_single_lookups(
    benchmark: BenchmarkFixture,
    group: str,
    implementation: str,
    kind: str,
    method: str,
    table: Any,
    workload: Any,
) -> None:
    """Time one single-address lookup per string of the workload, then check the answers."""
    lookup = single_lookup(implementation, table)
    addresses = workload.lookup_strings
    describe(benchmark, group, implementation, kind, method, len(addresses), workload.size)

    def run() -> None:
        for address in addresses:
            lookup(address)

    benchmark(run)
    record_per_op(benchmark)
    check_single(implementation, lookup, addresses, workload.expected)


def slot_indices(table: Any, slots: Any, count: int) -> list[int]:
    """The inserted value (prefix index) behind each of the first ``count`` slots, -1 for no match."""
    return [-1 if slot == -1 else int(table.value_at(slot)) for slot in slots[:count]]


def check_slots(table: Any, slots: Any, expected_count: int, expected: Sequence[tuple[int, int]]) -> None:
    assert isinstance(slots, array), f"lookup_many returned {type(slots).__name__}, expected array('q')"
    assert slots.typecode == "q", f"lookup_many returned array({slots.typecode!r}), expected array('q')"
    assert len(slots) == expected_count, (
        f"lookup_many returned {len(slots)} slots for {expected_count} addresses"
    )
    found = slot_indices(table, slots, len(expected))
    wrong = [
        (i, got, best)
        for i, (got, (best, _length)) in enumerate(zip(found, expected, strict=True))
        if got != best
    ]
    assert not wrong, (
        f"lookup_many: {len(wrong)} of {len(expected)} slots disagree with the reference: {wrong[:5]}"
    )


# --- IPv4 single lookups ---------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", _workload.IMPLEMENTATIONS)
def test_lookup_str(
    benchmark: BenchmarkFixture, tables: _workload.Tables, ipv4_size: int, implementation: str
) -> None:
    """One ``lookup(str)`` per address from Python: text parsing plus the walk, per call."""
    workload = tables.ipv4(ipv4_size)
    table = tables.ipv4_table(implementation, ipv4_size)
    if implementation == "egresscore":
        benchmark.extra_info["memory_usage"] = table.memory_usage()
    bench_single_lookups(
        benchmark,
        f"lookup-str-{workload.label}",
        implementation,
        "lookup-str",
        SINGLE_METHODS[implementation],
        table,
        workload,
    )


# --- IPv4 batch lookups ----------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["egresscore", "numpy-proxy", "pytricia"])
def test_lookup_batch(
    benchmark: BenchmarkFixture, tables: _workload.Tables, ipv4_size: int, implementation: str
) -> None:
    """``lookup_many`` over the whole batch vs ``proxy[addresses >> 8]``; pytricia's single lookups are
    the per-address reference a caller without a batch API pays."""
    workload = tables.ipv4(ipv4_size)
    group = f"lookup-batch-{workload.label}"
    batch = workload.batch

    if implementation == "egresscore":
        table = tables.ipv4_table("egresscore", ipv4_size)
        describe(
            benchmark, group, implementation, "lookup-batch", "lookup_many(uint32[])", len(batch), ipv4_size
        )
        slots = benchmark(table.lookup_many, batch)
        record_per_op(benchmark)
        check_slots(table, slots, len(batch), workload.expected)
        # The proxy is exact wherever the best match is /24 or shorter, so there the two must agree.
        proxy = tables.numpy_proxy(ipv4_size)[batch[:BATCH_CHECKED_COUNT] >> 8].tolist()
        found = slot_indices(table, slots, BATCH_CHECKED_COUNT)
        short = [
            (i, got, painted)
            for i, (got, painted) in enumerate(zip(found, proxy, strict=True))
            if (got == -1 or workload.lengths[got] <= 24) and got != painted
        ]
        assert not short, f"lookup_many and the numpy proxy disagree on {len(short)} addresses: {short[:5]}"
    elif implementation == "numpy-proxy":
        proxy_table = tables.numpy_proxy(ipv4_size)
        describe(
            benchmark,
            group,
            implementation,
            "lookup-batch",
            "int32[2^24][addresses >> 8]",
            len(batch),
            ipv4_size,
        )

        def run_proxy() -> np.ndarray[Any, np.dtype[np.int32]]:
            slots: np.ndarray[Any, np.dtype[np.int32]] = proxy_table[batch >> 8]
            return slots

        painted = benchmark(run_proxy)
        record_per_op(benchmark)
        wrong = [
            (i, int(painted[i]), best)
            for i, (best, length) in enumerate(workload.expected)
            if length <= 24 and int(painted[i]) != best
        ]
        assert not wrong, f"numpy proxy disagrees with the reference on {len(wrong)} addresses: {wrong[:5]}"
    else:
        table = tables.ipv4_table("pytricia", ipv4_size)
        bench_single_lookups(
            benchmark, group, implementation, "lookup-batch", "get(str), one call each", table, workload
        )


# --- IPv6 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", _workload.IMPLEMENTATIONS)
def test_lookup6_str(benchmark: BenchmarkFixture, tables: _workload.Tables, implementation: str) -> None:
    """``lookup(str)`` on the IPv6 table; pytricia is built with 128-bit keys."""
    workload = tables.ipv6()
    bench_single_lookups(
        benchmark,
        f"lookup6-str-{workload.label}",
        implementation,
        "lookup6-str",
        SINGLE_METHODS[implementation],
        tables.ipv6_table(implementation),
        workload,
    )


@pytest.mark.parametrize("implementation", ["egresscore", "pytricia"])
def test_lookup6_batch(benchmark: BenchmarkFixture, tables: _workload.Tables, implementation: str) -> None:
    """``lookup_many6`` over packed 16-byte addresses vs pytricia's single lookups."""
    workload = tables.ipv6()
    group = f"lookup6-batch-{workload.label}"
    if implementation == "egresscore":
        table = tables.ipv6_table("egresscore")
        describe(
            benchmark,
            group,
            implementation,
            "lookup6-batch",
            "lookup_many6(bytes)",
            workload.batch_count,
            workload.size,
        )
        slots = benchmark(table.lookup_many6, workload.batch)
        record_per_op(benchmark)
        check_slots(table, slots, workload.batch_count, workload.expected)
    else:
        bench_single_lookups(
            benchmark,
            group,
            implementation,
            "lookup6-batch",
            "get(str), one call each",
            tables.ipv6_table("pytricia"),
            workload,
        )


# --- Build -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", _workload.IMPLEMENTATIONS)
def test_build(
    benchmark: BenchmarkFixture, tables: _workload.Tables, build_size: int, implementation: str
) -> None:
    """Insert every prefix of one size into a new, empty table, one call per prefix."""
    workload = tables.ipv4(build_size)
    method = {"egresscore": "insert(str, v)", "pytricia": "t[str] = v", "py-radix": "add(str).data[k] = v"}
    describe(
        benchmark,
        f"build-{workload.label}",
        implementation,
        "build",
        method[implementation],
        build_size,
        build_size,
    )
    built = benchmark.pedantic(  # type: ignore[no-untyped-call]
        _workload.build_table,
        args=(implementation, workload.prefixes, workload.values),
        rounds=BUILD_ROUNDS,
        iterations=1,
    )
    record_per_op(benchmark)
    stored = _workload.table_length(implementation, built)
    assert stored == build_size, (
        f"{implementation}: built table holds {stored} prefixes, inserted {build_size}"
    )
    check_single(
        implementation, single_lookup(implementation, built), workload.lookup_strings, workload.expected
    )


# --- Memory ----------------------------------------------------------------------------------------


def probe_environment() -> dict[str, str]:
    """The parent's environment, with the egresscore this session imports first on PYTHONPATH.

    The probe runs as a script from benches/, so without this it might not find the package (or find
    a different copy of it).
    """
    paths: list[str] = []
    spec = importlib.util.find_spec("egresscore")
    if spec is not None and spec.submodule_search_locations:
        paths.extend(str(Path(location).parent) for location in spec.submodule_search_locations)
    paths.append(str(PROBE.parent.parent))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_memory_probe(benchmark: BenchmarkFixture, command: list[str], timeout: float) -> dict[str, Any]:
    """Run a memory probe script once under ``benchmark`` and return the JSON it prints.

    The time pytest-benchmark records is the probe's wall time; the result is the measurement.
    """
    environment = probe_environment()

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
            check=False,
        )

    completed = benchmark.pedantic(probe, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    assert completed.returncode == 0, (
        f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr}"
    )
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


@pytest.mark.parametrize("implementation", _workload.IMPLEMENTATIONS)
def test_memory(
    benchmark: BenchmarkFixture,
    memory_results: dict[tuple[str, int], dict[str, Any]],
    prefix_file: Callable[[int], Path],
    memory_size: int,
    implementation: str,
) -> None:
    """RSS growth while one table of ``memory_size`` IPv4 prefixes is built in a fresh interpreter.

    Uses the benchmark fixture only so that ``--benchmark-only`` runs it and saved runs carry the
    numbers in ``extra_info``; the timing it records is the probe's wall time and means nothing.
    """
    label = _workload.size_label(memory_size)
    benchmark.group = f"memory-{label}"
    command = [sys.executable, str(PROBE), implementation, str(memory_size), str(prefix_file(memory_size))]
    result = run_memory_probe(benchmark, command, PROBE_TIMEOUT_SECONDS)
    assert result["prefixes"] == memory_size
    benchmark.extra_info.update(result, kind="memory", ops_per_round=1)
    memory_results[(implementation, memory_size)] = result
