"""Fixtures, table sizes and the peer-ratio summary for the egresscore benchmarks.

Sizes depend on the mode. With ``--benchmark-disable`` (the CI smoke run: every benchmark body runs
once, untimed) the 100k/500k tables are replaced by small ones so the run stays short while every
implementation, group and the memory probe still execute. ``EGRESSCORE_BENCH_SIZES=quick|full``
overrides that choice in either direction.

After a timed run, :func:`pytest_terminal_summary` prints, for every benchmark group, each
implementation's mean time per operation and its ratio to egresscore, then the project's
performance targets and whether this run met them. Nothing here fails a run for being slow.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

BENCH_DIR: Final = Path(__file__).resolve().parent
# With --import-mode=importlib pytest does not put this directory on sys.path; the helpers live here.
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _workload  # noqa: E402

SIZES_ENV: Final = "EGRESSCORE_BENCH_SIZES"
MEMORY_RESULTS: Final = pytest.StashKey[dict[tuple[str, int], dict[str, Any]]]()
FAILED_TESTS: Final = pytest.StashKey[set[str]]()
SUMMARY_SECTION: Final = "egresscore vs peers"

# Performance targets. Speed targets are speedups: the peer's mean time per operation divided by
# egresscore's, in the groups named in bench_prefix_table.py.
LOOKUP_STR_VS_PYTRICIA: Final = 2.0
BATCH_VS_PYTRICIA: Final = 100.0
BATCH_VS_NUMPY: Final = 2.0
BUILD_VS_PYTRICIA: Final = 1.0
MAX_BYTES_PER_PREFIX: Final = 40.0
MAX_SMALL_TABLE_BYTES: Final = 2_000_000


def quick_mode(config: pytest.Config) -> bool:
    override = os.environ.get(SIZES_ENV, "").strip().lower()
    if override in ("quick", "full"):
        return override == "quick"
    if override:
        raise pytest.UsageError(f"{SIZES_ENV}={override!r}: expected 'quick' or 'full'")
    return bool(config.getoption("benchmark_disable")) and not config.getoption("benchmark_enable")


def ipv4_sizes(config: pytest.Config) -> tuple[int, ...]:
    return _workload.QUICK_IPV4_SIZES if quick_mode(config) else _workload.FULL_IPV4_SIZES


def build_sizes(config: pytest.Config) -> tuple[int, ...]:
    return _workload.QUICK_BUILD_SIZES if quick_mode(config) else _workload.FULL_BUILD_SIZES


def memory_sizes(config: pytest.Config) -> tuple[int, ...]:
    return _workload.QUICK_MEMORY_SIZES if quick_mode(config) else _workload.FULL_MEMORY_SIZES


def pytest_configure(config: pytest.Config) -> None:
    config.stash[MEMORY_RESULTS] = {}
    config.stash[FAILED_TESTS] = set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    # A benchmark whose answers were wrong is timed before its check fails; keep it out of the ratios.
    if call.excinfo is not None and call.when == "call":
        item.config.stash[FAILED_TESTS].add(item.nodeid)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parameters = {
        "ipv4_size": ipv4_sizes,
        "build_size": build_sizes,
        "memory_size": memory_sizes,
    }
    for name, sizes in parameters.items():
        if name in metafunc.fixturenames:
            chosen = sizes(metafunc.config)
            metafunc.parametrize(name, chosen, ids=[_workload.size_label(s) for s in chosen])


@pytest.fixture(scope="session")
def tables(pytestconfig: pytest.Config) -> _workload.Tables:
    """Seeded workloads and filled tables, shared by every benchmark of the session."""
    quick = quick_mode(pytestconfig)
    return _workload.Tables(_workload.QUICK_BATCH_COUNT if quick else _workload.FULL_BATCH_COUNT)


@pytest.fixture(scope="session")
def prefix_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The memory probe's input: a file of the seeded IPv4 prefixes of a size, written once."""
    directory = tmp_path_factory.mktemp("prefixes")

    def path_for(count: int) -> Path:
        path = directory / f"ipv4-{count}.txt"
        if not path.exists():
            _workload.write_ipv4_prefix_file(count, path)
        return path

    return path_for


@pytest.fixture(scope="session")
def memory_results(pytestconfig: pytest.Config) -> dict[tuple[str, int], dict[str, Any]]:
    """(implementation, prefix count) -> the memory probe's report; read by the summary."""
    return pytestconfig.stash[MEMORY_RESULTS]


# --- Summary ---------------------------------------------------------------------------------------


def _timed_benchmarks(config: pytest.Config) -> list[Any]:
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return []
    failed = config.stash.get(FAILED_TESTS, set())
    return [
        bench
        for bench in session.benchmarks
        if bench and not bench.has_error and bench.fullname not in failed
    ]


def _ns_per_op(bench: Any, statistic: str) -> float:
    return float(getattr(bench.stats, statistic)) / int(bench.extra_info.get("ops_per_round", 1)) * 1e9


def _group_table(benchmarks: list[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """group -> implementation -> {ns_per_op, speedup (peer time / egresscore time), method}."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in benchmarks:
        info = bench.extra_info
        if info.get("kind") == "memory" or "implementation" not in info:
            continue
        groups.setdefault(bench.group or bench.name, {})[info["implementation"]] = {
            "ns_per_op": _ns_per_op(bench, "mean"),
            "min_ns_per_op": _ns_per_op(bench, "min"),
            "method": info.get("method", ""),
        }
    for rows in groups.values():
        reference = rows.get("egresscore")
        for row in rows.values():
            row["speedup"] = row["ns_per_op"] / reference["ns_per_op"] if reference else None
            row["speedup_min"] = row["min_ns_per_op"] / reference["min_ns_per_op"] if reference else None
    return dict(sorted(groups.items(), key=lambda item: _group_order(item[0])))


def _group_order(group: str) -> tuple[int, int, str]:
    kinds = [
        "lookup-str-",
        "lookup-batch-",
        "lookup6-str-",
        "lookup6-batch-",
        "build-",
        *SNAT_GROUP_ORDER,
        *CLASSIFIER_GROUP_ORDER,
    ]
    for position, kind in enumerate(kinds):
        if group.startswith(kind):
            label = group[len(kind) :]
            number = label[:-1] if label.endswith("k") else label
            scale = 1_000 if label.endswith("k") else 1
            return position, int(number) * scale if number.isdigit() else 0, group
    return len(kinds), 0, group


_RELATIONS: Final = {
    ">=": lambda value, threshold: value >= threshold,
    "<=": lambda value, threshold: value <= threshold,
    "<": lambda value, threshold: value < threshold,
}


def _target_line(target: dict[str, Any]) -> str:
    met = {True: "yes", False: "NO", None: "-"}[target["met"]]
    return f"{target['target']:<62}{_format_value(target['value'], target['unit']):>16}  {met}"


def _target(
    description: str, value: float | None, relation: str, threshold: float, unit: str
) -> dict[str, Any]:
    met = None if value is None else bool(_RELATIONS[relation](value, threshold))
    return {
        "target": description,
        "value": value,
        "relation": relation,
        "threshold": threshold,
        "unit": unit,
        "met": met,
    }


def _speedup(groups: dict[str, dict[str, dict[str, Any]]], group: str, peer: str) -> float | None:
    value = groups.get(group, {}).get(peer, {}).get("speedup")
    return None if value is None else float(value)


def build_summary(config: pytest.Config, benchmarks: list[Any]) -> dict[str, Any]:
    groups = _group_table(benchmarks)
    memory = config.stash.get(MEMORY_RESULTS, {})
    targets = []
    for size in ipv4_sizes(config):
        label = _workload.size_label(size)
        targets.append(
            _target(
                f"lookup(str) >= {LOOKUP_STR_VS_PYTRICIA:g}x pytricia @ {label}",
                _speedup(groups, f"lookup-str-{label}", "pytricia"),
                ">=",
                LOOKUP_STR_VS_PYTRICIA,
                "x",
            )
        )
    large = _workload.size_label(max(ipv4_sizes(config)))
    targets.append(
        _target(
            f"lookup_many >= {BATCH_VS_PYTRICIA:g}x pytricia single @ {large}",
            _speedup(groups, f"lookup-batch-{large}", "pytricia"),
            ">=",
            BATCH_VS_PYTRICIA,
            "x",
        )
    )
    targets.append(
        _target(
            f"lookup_many >= {BATCH_VS_NUMPY:g}x numpy proxy @ {large}",
            _speedup(groups, f"lookup-batch-{large}", "numpy-proxy"),
            ">=",
            BATCH_VS_NUMPY,
            "x",
        )
    )
    build_large = _workload.size_label(max(build_sizes(config)))
    targets.append(
        _target(
            f"build >= {BUILD_VS_PYTRICIA:g}x pytricia speed @ {build_large}",
            _speedup(groups, f"build-{build_large}", "pytricia"),
            ">=",
            BUILD_VS_PYTRICIA,
            "x",
        )
    )
    small_count, large_count = min(memory_sizes(config)), max(memory_sizes(config))
    large_probe = memory.get(("egresscore", large_count))
    targets.append(
        _target(
            f"memory <= {MAX_BYTES_PER_PREFIX:g} B/prefix (RSS) @ {_workload.size_label(large_count)}",
            None if large_probe is None else float(large_probe["bytes_per_prefix"]),
            "<=",
            MAX_BYTES_PER_PREFIX,
            "B/prefix",
        )
    )
    small_probe = memory.get(("egresscore", small_count))
    # Untouched pages of a big up-front allocation do not show in RSS, so the table's own account
    # (memory_usage) counts too: the larger of the two must stay under the limit.
    small_cost = None
    if small_probe is not None:
        small_cost = float(max(small_probe["rss_growth"], small_probe["memory_usage"] or 0))
    targets.append(
        _target(
            f"{small_count}-prefix table < {MAX_SMALL_TABLE_BYTES / 1e6:g} MB (max of RSS, memory_usage)",
            small_cost,
            "<",
            MAX_SMALL_TABLE_BYTES,
            "B",
        )
    )
    memory_rows = {
        _workload.size_label(count): {impl: result for (impl, n), result in memory.items() if n == count}
        for count in sorted({n for _, n in memory})
    }
    targets.extend(snat_targets(config, groups))
    targets.extend(classifier_targets(groups))
    targets.extend(gateway_targets(config))
    targets.extend(cluster_targets(config))
    return {
        "mode": "quick" if quick_mode(config) else "full",
        "speedup_means": "peer mean time per operation / egresscore mean time per operation",
        "groups": groups,
        "memory": memory_rows,
        "snat_memory": snat_memory_rows(config),
        "targets": targets,
    }


def _format_ns(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:,.2f} s"
    if value >= 1e6:
        return f"{value / 1e6:,.2f} ms"
    if value >= 1e3:
        return f"{value / 1e3:,.2f} us"
    return f"{value:,.2f} ns"


def _format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}x"


def _format_value(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "not measured"
    if unit == "x":
        return f"{value:,.2f}x"
    if unit == "B":
        return f"{value:,.0f} B"
    return f"{value:,.1f} {unit}"


def _summary_lines(summary: dict[str, Any]) -> Iterator[str]:
    yield f"mode: {summary['mode']}; speedup = {summary['speedup_means']} (> 1: egresscore is faster)"
    yield "targets use the mean; the min columns show how much of a ratio is noise"
    yield ""
    yield (
        f"{'group':<30}{'implementation':<18}{'method':<30}{'mean/op':>12}{'speedup':>10}"
        f"{'min/op':>12}{'(min)':>10}"
    )
    for group, rows in summary["groups"].items():
        ordered = sorted(rows.items(), key=lambda item: (item[0] != "egresscore", item[0]))
        for position, (implementation, row) in enumerate(ordered):
            yield (
                f"{group if position == 0 else '':<30}{implementation:<18}{row['method']:<30}"
                f"{_format_ns(row['ns_per_op']):>12}{_format_ratio(row['speedup']):>10}"
                f"{_format_ns(row['min_ns_per_op']):>12}{_format_ratio(row['speedup_min']):>10}"
            )
    if summary["memory"]:
        yield ""
        yield "memory: RssAnon growth of a fresh process while it builds the table (one shared value object)"
        yield (
            f"{'prefixes':<10}{'implementation':<16}{'RSS growth':>16}{'B/prefix':>12}{'memory_usage()':>18}"
        )
        for label, rows in summary["memory"].items():
            ordered = sorted(rows.items(), key=lambda item: (item[0] != "egresscore", item[0]))
            for position, (implementation, row) in enumerate(ordered):
                own = "" if row["memory_usage"] is None else f"{row['memory_usage']:,} B"
                yield (
                    f"{label if position == 0 else '':<10}{implementation:<16}{row['rss_growth']:>14,} B"
                    f"{row['bytes_per_prefix']:>12,.1f}{own:>18}"
                )
    yield from snat_memory_lines(summary)
    yield ""
    yield "TARGETS"
    yield f"{'target':<62}{'measured':>16}  met"
    yield from map(_target_line, summary["targets"])


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list[Any], output_json: dict[str, Any]
) -> None:
    """Keep the ratios and targets inside every saved run, so `compare` sessions can read them back."""
    timed = _timed_benchmarks(config)
    if timed:
        output_json["egresscore_summary"] = build_summary(config, timed)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if config.stash.get(GATEWAY_RESULTS, None):
        terminalreporter.write_sep("=", "gateway: egresscore vs kernel SNAT vs the netfilterqueue package")
        for line in gateway_lines(config):
            terminalreporter.write_line(line)
    if config.stash.get(CLUSTER_RESULTS, None):
        terminalreporter.write_sep("=", "cluster: egresscore vs a kernel-only egress gateway, pod to host")
        for line in cluster_lines(config):
            terminalreporter.write_line(line)
    timed = _timed_benchmarks(config)
    if not timed:
        return
    summary = build_summary(config, timed)
    terminalreporter.write_sep("=", SUMMARY_SECTION)
    for line in _summary_lines(summary):
        terminalreporter.write_line(line)
    json_path = config.getoption("benchmark_json")
    if json_path:
        path = Path(json_path)
        summary_path = path.with_name(f"{path.stem}.summary.json")
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        terminalreporter.write_line(f"summary written to {summary_path}")


# === SNAT table (bench_snat_table.py) ==============================================================
# Sizes, the memory probe's results, the SNAT lines of the summary and the SNAT targets. The speed
# ratios against the pure-Python baseline (implementation "python-dict") are the group table's speedup
# column; the targets below are absolute, egresscore's mean against the limit.

import _snat_workload  # noqa: E402

SNAT_MEMORY_RESULTS: Final = pytest.StashKey[dict[tuple[str, int], dict[str, Any]]]()
SNAT_GROUP_ORDER: Final = (
    "snat-out-",
    "snat-in-",
    "snat-out1-",
    "snat-new-",
    "snat-snapshot-",
    "snat-restore-",
)
SNAT_MAX_NS_PER_PACKET: Final = 100.0
SNAT_MAX_NS_PER_NEW_FLOW: Final = 500.0
SNAT_MAX_BYTES_PER_ENTRY: Final = 128.0
SNAT_MAX_SNAPSHOT_MS: Final = 1000.0


def snat_sizes_for(config: pytest.Config) -> _snat_workload.SnatSizes:
    return _snat_workload.QUICK_SIZES if quick_mode(config) else _snat_workload.FULL_SIZES


@pytest.fixture(scope="session")
def snat_sizes(pytestconfig: pytest.Config) -> _snat_workload.SnatSizes:
    """1M flows in a timed run, 10k in the smoke run (``EGRESSCORE_BENCH_SIZES`` overrides)."""
    return snat_sizes_for(pytestconfig)


@pytest.fixture(scope="session")
def snat_memory_results(pytestconfig: pytest.Config) -> dict[tuple[str, int], dict[str, Any]]:
    """(implementation, entries) -> the SNAT memory probe's report; read by the summary."""
    return pytestconfig.stash.setdefault(SNAT_MEMORY_RESULTS, {})


def _snat_ran(config: pytest.Config, groups: dict[str, dict[str, dict[str, Any]]]) -> bool:
    return bool(config.stash.get(SNAT_MEMORY_RESULTS, {})) or any(g.startswith("snat-") for g in groups)


def _egresscore_ns(groups: dict[str, dict[str, dict[str, Any]]], group: str) -> float | None:
    value = groups.get(group, {}).get("egresscore", {}).get("ns_per_op")
    return None if value is None else float(value)


def snat_targets(config: pytest.Config, groups: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The issue's limits, measured-vs-target; none when no SNAT benchmark ran."""
    if not _snat_ran(config, groups):
        return []
    sizes = snat_sizes_for(config)
    label = sizes.label
    snapshot_ns = _egresscore_ns(groups, f"snat-snapshot-{label}")
    memory_label = _snat_workload.count_label(sizes.memory_entries)
    probe = config.stash.get(SNAT_MEMORY_RESULTS, {}).get(("egresscore", sizes.memory_entries))
    return [
        _target(
            f"SNAT batch, existing flows <= {SNAT_MAX_NS_PER_PACKET:g} ns/packet @ {label}",
            _egresscore_ns(groups, f"snat-out-{label}"),
            "<=",
            SNAT_MAX_NS_PER_PACKET,
            "ns",
        ),
        _target(
            f"SNAT new flow <= {SNAT_MAX_NS_PER_NEW_FLOW:g} ns/flow @ {label}",
            _egresscore_ns(groups, f"snat-new-{label}"),
            "<=",
            SNAT_MAX_NS_PER_NEW_FLOW,
            "ns",
        ),
        _target(
            f"SNAT memory <= {SNAT_MAX_BYTES_PER_ENTRY:g} B/entry (RSS) @ {memory_label}",
            None if probe is None else float(probe["bytes_per_entry"]),
            "<=",
            SNAT_MAX_BYTES_PER_ENTRY,
            "B/entry",
        ),
        _target(
            f"SNAT memory <= {SNAT_MAX_BYTES_PER_ENTRY:g} B/entry (memory_usage) @ {memory_label}",
            None if probe is None else float(probe["memory_usage_per_entry"]),
            "<=",
            SNAT_MAX_BYTES_PER_ENTRY,
            "B/entry",
        ),
        _target(
            f"SNAT snapshot < {SNAT_MAX_SNAPSHOT_MS:g} ms @ {label}",
            None if snapshot_ns is None else snapshot_ns / 1e6,
            "<",
            SNAT_MAX_SNAPSHOT_MS,
            "ms",
        ),
    ]


def snat_memory_rows(config: pytest.Config) -> dict[str, dict[str, dict[str, Any]]]:
    results = config.stash.get(SNAT_MEMORY_RESULTS, {})
    return {
        _snat_workload.count_label(count): {
            impl: result for (impl, n), result in results.items() if n == count
        }
        for count in sorted({n for _, n in results})
    }


def snat_memory_lines(summary: dict[str, Any]) -> Iterator[str]:
    if not summary.get("snat_memory"):
        return
    yield ""
    yield "SNAT memory: RssAnon growth of a fresh process while it fills a table (max_entries = entries)"
    yield f"{'entries':<10}{'implementation':<16}{'RSS growth':>16}{'B/entry':>12}{'memory_usage()':>18}"
    for label, rows in summary["snat_memory"].items():
        ordered = sorted(rows.items(), key=lambda item: (item[0] != "egresscore", item[0]))
        for position, (implementation, row) in enumerate(ordered):
            own = "" if row["memory_usage"] is None else f"{row['memory_usage']:,} B"
            yield (
                f"{label if position == 0 else '':<10}{implementation:<16}{row['rss_growth']:>14,} B"
                f"{row['bytes_per_entry']:>12,.1f}{own:>18}"
            )


# === Classifier (bench_classifier.py) ==============================================================
# The limits for 1,000 policies, 10,000 endpoints and 100,000 prefixes; the ratios against the
# pure-Python classifier (implementation "python-reference") are the group table's speedup column.

CLASSIFIER_GROUP_ORDER: Final = ("classify-batch-", "classify-single-", "classify-compile-")
CLASSIFIER_MAX_BATCH_NS: Final = 100.0
CLASSIFIER_MAX_SINGLE_NS: Final = 1000.0
CLASSIFIER_MAX_COMPILE_MS: Final = 1000.0


def classifier_targets(groups: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Measured-vs-target for every classifier size that ran; none when no classifier benchmark ran."""
    labels = sorted({g.split("-", 2)[2] for g in groups if g.startswith(CLASSIFIER_GROUP_ORDER)})
    targets = []
    for label in labels:
        compile_ns = _egresscore_ns(groups, f"classify-compile-{label}")
        targets += [
            _target(
                f"classify_many <= {CLASSIFIER_MAX_BATCH_NS:g} ns/packet @ {label}",
                _egresscore_ns(groups, f"classify-batch-{label}"),
                "<=",
                CLASSIFIER_MAX_BATCH_NS,
                "ns",
            ),
            _target(
                f"classify() <= {CLASSIFIER_MAX_SINGLE_NS:g} ns/call @ {label}",
                _egresscore_ns(groups, f"classify-single-{label}"),
                "<=",
                CLASSIFIER_MAX_SINGLE_NS,
                "ns",
            ),
            _target(
                f"recompile < {CLASSIFIER_MAX_COMPILE_MS:g} ms @ {label}",
                None if compile_ns is None else compile_ns / 1e6,
                "<",
                CLASSIFIER_MAX_COMPILE_MS,
                "ms",
            ),
        ]
    return targets


# === Gateway (bench_gateway.py) ====================================================================
# Throughput, connections and small packets through the gateway namespace, per peer. Ratios are
# egresscore's value over the peer's (above 1: egresscore moves more); the targets are the issue's.

GATEWAY_RESULTS: Final = pytest.StashKey[dict[str, dict[str, dict[str, Any]]]]()
GATEWAY_METRICS: Final = ("tcp-1", "tcp-4", "conn", "udp64")
GATEWAY_PEERS: Final = ("egresscore", "egresscore-queue", "kernel-snat", "netfilterqueue")


def _gateway_ratio(results: dict[str, dict[str, dict[str, Any]]], metric: str, peer: str) -> float | None:
    rows = results.get(metric, {})
    ours, theirs = rows.get("egresscore"), rows.get(peer)
    if not ours or not theirs or not theirs.get("value"):
        return None
    return float(ours["value"]) / float(theirs["value"])


def gateway_targets(config: pytest.Config) -> list[dict[str, Any]]:
    results = config.stash.get(GATEWAY_RESULTS, {})
    if not results:
        return []
    targets = []
    for metric in ("tcp-1", "tcp-4"):
        kernel = _gateway_ratio(results, metric, "kernel-snat")
        package = _gateway_ratio(results, metric, "netfilterqueue")
        targets.append(_target(f"gateway {metric} >= 0.9x kernel SNAT", kernel, ">=", 0.9, "x"))
        targets.append(_target(f"gateway {metric} >= 10x netfilterqueue package", package, ">=", 10.0, "x"))
    targets.append(_target("gateway new connections/s >= 0.8x kernel SNAT",
                           _gateway_ratio(results, "conn", "kernel-snat"), ">=", 0.8, "x"))  # fmt: skip
    udp = results.get("udp64", {}).get("egresscore")
    targets.append(_target("gateway small-UDP loss = 0 at the generator's rate",
                           None if udp is None else float(udp["loss"]), "<=", 0.0, "x"))  # fmt: skip
    return targets


def gateway_lines(config: pytest.Config) -> Iterator[str]:
    results = config.stash.get(GATEWAY_RESULTS, {})
    yield "value per peer (one measurement each, same topology, same run); ratio = egresscore / peer"
    yield "CPU: user+system time of the peer's processes over the measurement / packets queued to them"
    yield (f"{'metric':<8}{'peer':<18}{'value':>16}  {'unit':<11}{'egresscore/peer':>16}"
           f"{'CPU s':>8}{'queued':>10}{'us/queued':>11}  other")  # fmt: skip
    for metric in GATEWAY_METRICS:
        rows = results.get(metric, {})
        for position, peer in enumerate(p for p in GATEWAY_PEERS if p in rows):
            row = rows[peer]
            ratio = "" if peer == "egresscore" else _format_ratio(_gateway_ratio(results, metric, peer))
            cpu = f"{row['cpu_seconds']:.2f}" if "cpu_seconds" in row else "-"
            queued = f"{row['packets_handed']:,}" if "packets_handed" in row else "-"
            per = f"{row['us_per_packet']:.1f}" if row.get("us_per_packet") is not None else "-"
            other = ", ".join(f"{key}={row[key]:.4g}" if isinstance(row[key], float) else f"{key}={row[key]}"
                              for key in ("failures", "sent", "received", "loss") if key in row)  # fmt: skip
            yield (f"{metric if position == 0 else '':<8}{peer:<18}{row['value']:>16,.2f}  {row['unit']:<11}"
                   f"{ratio:>16}{cpu:>8}{queued:>10}{per:>11}  {other}")  # fmt: skip
    yield ""
    yield from map(_target_line, gateway_targets(config))


# === Cluster (bench_cluster.py) ====================================================================
# The whole path from a pod to the external host, per peer, each on a namespace cluster of its own,
# measured in alternating rounds. A ratio is egresscore's value over the peer's within one round
# (above 1: egresscore moves more), and the median of the rounds' ratios is reported; for the
# first-packet latencies the column shows what egresscore adds instead (its median minus the peer's,
# per round, then the median). The targets are the issue's, against the kernel-only egress gateway.

CLUSTER_RESULTS: Final = pytest.StashKey[dict[str, dict[str, list[dict[str, Any]]]]]()
CLUSTER_METRICS: Final = ("tcp-1", "conn", "latency-tcp", "latency-udp")
CLUSTER_PEERS: Final = ("egresscore", "kernel-gateway", "direct")
CLUSTER_MAX_ADDED_LATENCY_US: Final = 50.0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rounds(
    results: dict[str, dict[str, list[dict[str, Any]]]], metric: str, peer: str, key: str
) -> list[float]:
    return [float(row[key]) for row in results.get(metric, {}).get(peer, []) if row.get(key) is not None]


def _cluster_compare(
    results: dict[str, dict[str, list[dict[str, Any]]]], metric: str, peer: str, statistic: str = "value"
) -> float | None:
    """Median over the rounds of egresscore's value over the peer's (rates), or of
    egresscore's minus the peer's (latencies, microseconds)."""
    ours, theirs = (
        _rounds(results, metric, "egresscore", statistic),
        _rounds(results, metric, peer, statistic),
    )
    if metric.startswith("latency-"):
        return _median([a - b for a, b in zip(ours, theirs, strict=False)])
    return _median([a / b for a, b in zip(ours, theirs, strict=False) if b])


def cluster_targets(config: pytest.Config) -> list[dict[str, Any]]:
    results = config.stash.get(CLUSTER_RESULTS, {})
    if not results:
        return []
    return [
        _target("cluster tcp-1 >= 0.9x kernel gateway",
                _cluster_compare(results, "tcp-1", "kernel-gateway"), ">=", 0.9, "x"),
        _target("cluster new connections/s >= 0.8x kernel gateway",
                _cluster_compare(results, "conn", "kernel-gateway"), ">=", 0.8, "x"),
        _target(f"cluster added first-packet latency (TCP median) < {CLUSTER_MAX_ADDED_LATENCY_US:g} us",
                _cluster_compare(results, "latency-tcp", "kernel-gateway"), "<",
                CLUSTER_MAX_ADDED_LATENCY_US, "us"),
    ]  # fmt: skip


def cluster_lines(config: pytest.Config) -> Iterator[str]:
    results = config.stash.get(CLUSTER_RESULTS, {})
    count = max((len(rows) for metric in results.values() for rows in metric.values()), default=0)
    yield f"pod pa1 -> 203.0.113.10; {count} round(s), each peer once a round on a cluster of its own"
    yield "value: each round's, median first; vs peer: median over rounds of egresscore / peer (rates)"
    yield "or egresscore - peer (latencies, added us); CPU: egresscore's agents and workers, all rounds"
    yield (f"{'metric':<13}{'peer':<16}{'values (median first)':>34}  {'unit':<11}{'vs peer':>11}"
           f"{'CPU s':>8}{'queued':>10}{'us/queued':>11}  other")  # fmt: skip
    for metric in CLUSTER_METRICS:
        rows = results.get(metric, {})
        for position, peer in enumerate(p for p in CLUSTER_PEERS if p in rows):
            values = _rounds(results, metric, peer, "value")
            median = _median(values)
            shown = (
                ("-" if median is None else f"{median:,.1f}")
                + " ("
                + " / ".join(f"{v:,.1f}" for v in values)
                + ")"
            )
            versus = ""
            if peer != "egresscore":
                compared = _cluster_compare(results, metric, peer)
                if compared is not None:
                    versus = (
                        f"{compared:+,.1f} us" if metric.startswith("latency-") else _format_ratio(compared)
                    )
            cpu = sum(_rounds(results, metric, peer, "cpu_seconds"))
            handed = sum(_rounds(results, metric, peer, "packets_handed"))
            has_cpu = bool(_rounds(results, metric, peer, "cpu_seconds"))
            per = f"{cpu / handed * 1e6:.1f}" if has_cpu and handed else "-"
            other = []
            p90 = _median(_rounds(results, metric, peer, "p90_us"))
            if p90 is not None:
                other.append(f"p90 median {p90:,.1f} us")
            for key in ("retransmits", "failures"):
                found = _rounds(results, metric, peer, key)
                if found:
                    other.append(f"{key}={int(sum(found))}")
            for role in ("node", "gateway"):
                role_cpu = _rounds(results, metric, peer, f"{role}_cpu_seconds")
                if role_cpu:
                    packets = int(sum(_rounds(results, metric, peer, f"{role}_packets_handed")))
                    other.append(f"{role} {sum(role_cpu):.2f} s {packets:,} pkt")
            unit = rows[peer][0].get("unit", "")
            yield (f"{metric if position == 0 else '':<13}{peer:<16}{shown:>34}  {unit:<11}{versus:>11}"
                   f"{(f'{cpu:.2f}' if has_cpu else '-'):>8}{(f'{int(handed):,}' if has_cpu else '-'):>10}"
                   f"{per:>11}  {', '.join(other)}")  # fmt: skip
    yield ""
    for metric in ("latency-tcp", "latency-udp"):
        median = _cluster_compare(results, metric, "kernel-gateway")
        p90 = _cluster_compare(results, metric, "kernel-gateway", "p90_us")
        if median is not None and p90 is not None:
            yield (f"added first-packet latency, {metric[8:].upper()} (egresscore - kernel gateway, "
                   f"median of rounds): median {median:+,.1f} us, p90 {p90:+,.1f} us")  # fmt: skip
    yield from map(_target_line, cluster_targets(config))
