"""The demonstration behind ``make demo``: the prefix table every egress decision uses."""

from __future__ import annotations

import array
import random
import time
from collections.abc import Callable

from egresscore.core.prefix_table import NO_MATCH, PrefixTable

__all__ = ["run_demo"]

# Destination CIDRs of three egress policies, as an operator would write them
# (documentation ranges only).
DESTINATIONS = {
    "203.0.113.0/24": "payment-processor -> egress 192.0.2.10",
    "203.0.113.128/25": "excluded (partner's internal range)",
    "198.51.100.0/24": "reporting -> egress 192.0.2.11",
    "198.51.100.64/26": "reporting-eu -> egress 192.0.2.12",
    "2001:db8:100::/48": "payment-processor -> egress 2001:db8:e::10",
}

QUERIES = ["203.0.113.7", "203.0.113.200", "198.51.100.70", "198.51.100.7", "198.18.0.9", "2001:db8:100::1"]


def _random_table(count: int, rng: random.Random) -> PrefixTable[int]:
    table: PrefixTable[int] = PrefixTable()
    while len(table) < count:
        length = rng.choice((16, 20, 22, 24, 24, 24))
        network = rng.getrandbits(32) & ~((1 << (32 - length)) - 1) & 0xFFFFFFFF
        table.insert(
            f"{network >> 24}.{network >> 16 & 255}.{network >> 8 & 255}.{network & 255}/{length}", 0
        )
    return table


def run_demo(echo: Callable[[str], object] = print) -> None:
    """Print a small policy table, lookups in it, and a measured batch lookup."""
    table: PrefixTable[str] = PrefixTable(DESTINATIONS)
    echo("egresscore: the longest-prefix-match table behind every egress decision\n")
    echo(f"{'destination CIDR':<22} policy")
    for network, value in table:
        echo(f"{network!s:<22} {value}")
    echo("")
    echo(f"{'address':<18} {'longest match':<22} policy")
    for address in QUERIES:
        match = table.lookup_prefix(address)
        prefix, policy = (str(match[0]), match[1]) if match else ("-", "no policy: normal routing")
        echo(f"{address:<18} {prefix:<22} {policy}")

    rng = random.Random(2026)
    big = _random_table(100_000, rng)
    addresses = array.array("I", (rng.getrandbits(32) for _ in range(1_000_000)))
    started = time.perf_counter()
    slots = big.lookup_many(addresses)
    elapsed = time.perf_counter() - started
    matched = sum(1 for slot in slots if slot != NO_MATCH)
    echo(
        f"\nbatch: {len(addresses):,} IPv4 lookups in a table of {len(big):,} prefixes took "
        f"{elapsed * 1e3:.1f} ms ({elapsed * 1e9 / len(addresses):.1f} ns each, GIL released); "
        f"{matched:,} matched; table memory {big.memory_usage() / len(big):.0f} bytes per prefix"
    )
