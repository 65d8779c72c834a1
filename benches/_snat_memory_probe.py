"""Measure what a SNAT table of COUNT flows costs in resident memory, in a fresh interpreter.

Usage::

    python benches/_snat_memory_probe.py {egresscore|python-dict} COUNT

Prints one JSON object on stdout. The table is made with ``max_entries=COUNT`` and filled with the
seeded flows of ``_snat_workload`` (IPv4 TCP, one ACK each, translated in one batch call). What is
measured is the growth of the process's anonymous resident memory (RssAnon; VmRSS too) from just
before the table is made to just after it is full: entries, hash tables, allocator overhead. As in
``_memory_probe.py``, everything else is in place before the first reading: the modules are imported,
glibc's mmap threshold is pinned, and the packets, offsets and verdict buffer exist (packets are
rewritten in place, so translating them allocates nothing).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

# Run as a script, Python puts benches/ on sys.path but not the project; an egresscore that is
# installed or on PYTHONPATH still comes first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import _snat_workload as workload
import numpy as np
from _memory_probe import pin_mmap_threshold, resident_bytes

IMPLEMENTATIONS = ("egresscore", "python-dict")
NOW = 1_000_000.0


def measure(implementation: str, count: int) -> dict[str, Any]:
    pin_mmap_threshold()
    if implementation == "egresscore":
        from egresscore.core.snat_table import SnatTable as Table
    elif implementation == "python-dict":
        from _py_snat import PySnatTable as Table  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")

    packets = workload.outbound_packets(workload.make_flows(count)).reshape(-1)
    offsets = workload.offsets(count)
    if implementation == "egresscore":
        buffer: Any = packets
        offset_list: Any = offsets
        verdicts: Any = np.zeros(count, dtype=np.uint8)
    else:
        buffer = bytearray(packets.tobytes())
        offset_list = offsets.tolist()
        verdicts = bytearray(count)
        del packets, offsets

    gc.collect()
    before = resident_bytes()
    table = Table(workload.EGRESS_IPS, port_range=workload.PORT_RANGE, max_entries=count, seed=7)
    table.translate_outbound_many(buffer, offset_list, workload.EGRESS_IP, NOW, verdicts=verdicts)
    gc.collect()
    after = resident_bytes()

    translated = int((np.frombuffer(verdicts, dtype=np.uint8) == 0).sum())
    if translated != count or len(table) != count:
        raise SystemExit(
            f"{implementation}: {translated} of {count} packets translated, {len(table)} entries"
        )
    growth = after["RssAnon"] - before["RssAnon"]
    own = table.memory_usage() if implementation == "egresscore" else None
    return {
        "implementation": implementation,
        "entries": count,
        "rss_before": before["RssAnon"],
        "rss_after": after["RssAnon"],
        "rss_growth": growth,
        "vmrss_growth": after["VmRSS"] - before["VmRSS"],
        "bytes_per_entry": growth / count,
        "memory_usage": own,
        "memory_usage_per_entry": None if own is None else own / count,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} {{{'|'.join(IMPLEMENTATIONS)}}} COUNT", file=sys.stderr)
        return 2
    print(json.dumps(measure(argv[1], int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
