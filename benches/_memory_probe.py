"""Measure what one prefix table costs in resident memory, in a fresh interpreter.

Usage::

    python benches/_memory_probe.py IMPLEMENTATION COUNT [PREFIX_FILE]
    python benches/_memory_probe.py --write-prefixes COUNT PREFIX_FILE

IMPLEMENTATION is one of ``egresscore``, ``pytricia``, ``py-radix``. The first form prints one JSON
object on stdout; without PREFIX_FILE the seeded prefixes are first written to a temporary file by
the second form, run as a child process.

What is measured: the growth of the process's anonymous resident memory (RssAnon; VmRSS is reported
too) while the table is built, i.e. the pages the table's structures occupy, allocator overhead and
fragmentation included. Care is taken that nothing else moves that number:

* the run is its own process, so nothing the benchmark session allocated is counted or reused;
* the modules are imported, the prefix strings read and the value list made before the baseline,
  and every prefix maps to the same value object (``True``), so values cost nothing;
* the prefixes are generated in another process and read here in one piece, so no garbage from
  generating them sits in resident pages the table could quietly reuse;
* glibc's mmap threshold is pinned to its default before anything big is freed, so the table gets
  the allocator a fresh process has (big arrays grow by mremap, not by copies leaving holes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

# Run as a script, Python puts benches/ on sys.path but not the project; an egresscore that is
# installed or on PYTHONPATH still comes first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import _workload

# glibc <malloc.h>: the mallopt parameter number of M_MMAP_THRESHOLD, and that threshold's default.
M_MMAP_THRESHOLD: Final = -3
DEFAULT_MMAP_THRESHOLD: Final = 128 * 1024


def pin_mmap_threshold() -> None:
    """Stop glibc from raising its mmap threshold when big blocks are freed (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)


def resident_bytes() -> dict[str, int]:
    """RssAnon and VmRSS of this process in bytes, from /proc/self/status (reported there in kB)."""
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            field, _, value = line.partition(":")
            if field in ("RssAnon", "VmRSS"):
                found[field] = int(value.split()[0]) * 1024
    if "VmRSS" not in found:
        raise RuntimeError("no VmRSS in /proc/self/status: the memory probe needs Linux procfs")
    found.setdefault("RssAnon", found["VmRSS"])
    return found


def read_prefixes(path: Path) -> list[str]:
    # One read and one split: the strings are allocated back to back, and the only temporary, the
    # file's text, is one block that goes straight back to the kernel.
    with open(path, encoding="ascii") as source:
        return source.read().split()


def import_implementation(implementation: str) -> None:
    """Import the implementation's module now, so its import is part of the baseline."""
    if implementation == "egresscore":
        import egresscore.core.prefix_table  # noqa: F401
    elif implementation == "pytricia":
        import pytricia  # noqa: F401
    elif implementation == "py-radix":
        import radix  # noqa: F401
    else:
        raise SystemExit(
            f"unknown implementation {implementation!r}; expected one of {_workload.IMPLEMENTATIONS}"
        )


def check_table(implementation: str, table: Any, prefixes: list[str]) -> None:
    stored = _workload.table_length(implementation, table)
    if stored != len(prefixes):
        raise SystemExit(f"{implementation}: table holds {stored} prefixes after inserting {len(prefixes)}")
    # The network address of an inserted prefix must find a value (every value is True).
    address = prefixes[0].split("/")[0]
    if implementation == "py-radix":
        node = table.search_best(address)
        found = None if node is None else node.data.get("value")
    elif implementation == "pytricia":
        found = table.get(address)
    else:
        found = table.lookup(address)
    if found is not True:
        raise SystemExit(f"{implementation}: lookup({address!r}) gave {found!r}, expected True")


def measure(implementation: str, count: int, prefix_file: Path) -> dict[str, Any]:
    pin_mmap_threshold()
    import_implementation(implementation)
    prefixes = read_prefixes(prefix_file)
    if len(prefixes) != count:
        raise SystemExit(f"{prefix_file} holds {len(prefixes)} prefixes, expected {count}")
    values = [True] * count

    gc.collect()
    before = resident_bytes()
    table = _workload.build_table(implementation, prefixes, values)
    gc.collect()
    after = resident_bytes()

    check_table(implementation, table, prefixes)
    growth = after["RssAnon"] - before["RssAnon"]
    return {
        "implementation": implementation,
        "prefixes": count,
        "rss_before": before["RssAnon"],
        "rss_after": after["RssAnon"],
        "rss_growth": growth,
        "vmrss_growth": after["VmRSS"] - before["VmRSS"],
        "bytes_per_prefix": growth / count,
        "memory_usage": table.memory_usage() if implementation == "egresscore" else None,
    }


def main(argv: list[str]) -> int:
    usage = (
        f"usage: {argv[0]} {{{'|'.join(_workload.IMPLEMENTATIONS)}}} COUNT [PREFIX_FILE]\n"
        f"       {argv[0]} --write-prefixes COUNT PREFIX_FILE"
    )
    if len(argv) == 4 and argv[1] == "--write-prefixes":
        _workload.write_ipv4_prefix_file(int(argv[2]), Path(argv[3]))
        return 0
    if len(argv) == 4:
        print(json.dumps(measure(argv[1], int(argv[2]), Path(argv[3]))))
        return 0
    if len(argv) == 3:
        with tempfile.TemporaryDirectory() as directory:
            prefix_file = Path(directory) / "prefixes.txt"
            subprocess.run(
                [sys.executable, __file__, "--write-prefixes", argv[2], str(prefix_file)], check=True
            )
            print(json.dumps(measure(argv[1], int(argv[2]), prefix_file)))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
