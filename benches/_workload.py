"""Seeded prefix sets, lookup addresses, reference answers and table builders for the benchmarks.

Shared by ``conftest.py`` (inside pytest) and ``_memory_probe.py`` (in a fresh interpreter), so both
measure exactly the same prefixes. Everything is derived from a fixed seed: two runs on two machines
build the same tables and look up the same addresses, which is what makes saved runs comparable.

Values inserted into the tables are the prefix's index in the generated list, so every
implementation's answer can be checked against :func:`expected_ipv4` / :func:`expected_ipv6`, a
plain-Python longest-prefix match (one dict probe per prefix length).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# Bump a seed only on purpose: it changes every table and every address, so runs saved before and
# after the change stop being comparable.
IPV4_SEED: Final = 0x5EED_0004
IPV6_SEED: Final = 0x5EED_0006

ALL_ONES_32: Final = 0xFFFF_FFFF
ALL_ONES_64: Final = 0xFFFF_FFFF_FFFF_FFFF

# Sizes of the timed tables. Quick mode (``--benchmark-disable``, the CI smoke run) keeps every code
# path but drops the 100k/500k sets, whose generation and build dominate a short run.
FULL_IPV4_SIZES: Final = (1_000, 100_000, 500_000)
QUICK_IPV4_SIZES: Final = (1_000, 10_000)
FULL_BUILD_SIZES: Final = (100_000, 500_000)
QUICK_BUILD_SIZES: Final = (1_000, 10_000)
FULL_MEMORY_SIZES: Final = (10, 500_000)
QUICK_MEMORY_SIZES: Final = (10, 1_000)
IPV6_SIZE: Final = 10_000

# Addresses looked up one at a time (each benchmark round walks the whole list) and in one batch.
SINGLE_LOOKUP_COUNT: Final = 10_000
FULL_BATCH_COUNT: Final = 1_000_000
QUICK_BATCH_COUNT: Final = 20_000
# How many of the lookup addresses every implementation is checked on after it has been timed.
CHECKED_COUNT: Final = 1_000

U32Array = npt.NDArray[np.uint32]
U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
I32Array = npt.NDArray[np.int32]


def size_label(size: int) -> str:
    """``500000`` -> ``"500k"``, ``10`` -> ``"10"``: the spelling used in group names and test ids."""
    if size >= 1_000 and size % 1_000 == 0:
        return f"{size // 1_000}k"
    return str(size)


def _first_occurrences(keys: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """Indices of the first occurrence of each distinct key, in their original order."""
    _, first = np.unique(keys, return_index=True)
    first.sort()
    return first


# --- IPv4 ------------------------------------------------------------------------------------------


def _ipv4_lengths(rng: np.random.Generator, count: int) -> U8Array:
    # Roughly the shape of a full routing table: /24 is the longest prefix most networks accept,
    # provider aggregates sit between /16 and /23, and only a few short prefixes exist.
    draw = rng.random(count)
    lengths = np.where(
        draw < 0.60,
        24,
        np.where(draw < 0.95, rng.integers(16, 24, count), rng.integers(8, 16, count)),
    )
    return lengths.astype(np.uint8)


def _ipv4_masks(lengths: npt.NDArray[Any]) -> U32Array:
    shifts = 32 - lengths.astype(np.uint64)
    return ((np.uint64(ALL_ONES_32) << shifts) & np.uint64(ALL_ONES_32)).astype(np.uint32)


def ipv4_prefixes(count: int, seed: int = IPV4_SEED) -> tuple[U32Array, U8Array]:
    """``count`` distinct IPv4 prefixes as (network addresses, lengths), host bits cleared.

    Lengths: about 60 % /24, 35 % /16../23, 5 % /8../15 (a little less after duplicates are
    dropped, since short prefixes collide more often).
    """
    rng = np.random.default_rng(seed)
    networks = np.empty(0, dtype=np.uint32)
    lengths = np.empty(0, dtype=np.uint8)
    while len(networks) < count:
        draw = 2 * (count - len(networks)) + 64
        new_lengths = _ipv4_lengths(rng, draw)
        new_addresses = rng.integers(0, 1 << 32, draw, dtype=np.uint64).astype(np.uint32)
        networks = np.concatenate([networks, new_addresses & _ipv4_masks(new_lengths)])
        lengths = np.concatenate([lengths, new_lengths])
        keep = _first_occurrences((networks.astype(np.uint64) << np.uint64(8)) | lengths)
        networks, lengths = networks[keep], lengths[keep]
    return networks[:count], lengths[:count]


def ipv4_text(address: int) -> str:
    return f"{address >> 24}.{(address >> 16) & 255}.{(address >> 8) & 255}.{address & 255}"


def ipv4_prefix_strings(networks: U32Array, lengths: U8Array) -> list[str]:
    return [f"{ipv4_text(n)}/{length}" for n, length in zip(networks.tolist(), lengths.tolist(), strict=True)]


def write_ipv4_prefix_file(count: int, path: Path) -> None:
    """The seeded prefixes of one size as text, one per line (the memory probe's input)."""
    networks, lengths = ipv4_prefixes(count)
    path.write_text("\n".join(ipv4_prefix_strings(networks, lengths)) + "\n", encoding="ascii")


def ipv4_lookup_addresses(networks: U32Array, lengths: U8Array, count: int, seed: int) -> U32Array:
    """``count`` addresses: half inside a random inserted prefix, half uniform over 2^32, shuffled."""
    rng = np.random.default_rng(seed)
    inside = count // 2
    chosen = rng.integers(0, len(networks), inside)
    host_bits = rng.integers(0, 1 << 32, inside, dtype=np.uint64).astype(np.uint32)
    inside_addresses = networks[chosen] | (host_bits & ~_ipv4_masks(lengths[chosen]))
    uniform = rng.integers(0, 1 << 32, count - inside, dtype=np.uint64).astype(np.uint32)
    addresses = np.concatenate([inside_addresses, uniform])
    return np.ascontiguousarray(rng.permutation(addresses), dtype=np.uint32)


def longest_matches(
    networks: Sequence[int], lengths: Sequence[int], bits: int, addresses: Sequence[int]
) -> list[tuple[int, int]]:
    """Reference longest-prefix match over integer prefixes of a *bits*-wide family: (index of the
    best prefix or -1, its length or -1) per address, trying each present length longest first."""
    index = {(n, length): i for i, (n, length) in enumerate(zip(networks, lengths, strict=True))}
    present = sorted(set(lengths), reverse=True)
    all_ones = (1 << bits) - 1
    masks = {length: (all_ones << (bits - length)) & all_ones for length in present}
    answers = []
    for address in addresses:
        best = (-1, -1)
        for length in present:
            found = index.get((address & masks[length], length))
            if found is not None:
                best = (found, length)
                break
        answers.append(best)
    return answers


def expected_ipv4(networks: U32Array, lengths: U8Array, addresses: Sequence[int]) -> list[tuple[int, int]]:
    """Reference longest-prefix match for 32-bit integer addresses."""
    return longest_matches(networks.tolist(), lengths.tolist(), 32, addresses)


def paint_numpy_proxy(networks: U32Array, lengths: U8Array) -> I32Array:
    """A 2^24-entry array indexed by ``address >> 8`` holding the index of the best prefix of /24 or less.

    Only a speed proxy for a batch lookup: it is exact for prefixes up to /24, and prefixes longer
    than /24 are ignored. Painting shortest first lets longer prefixes overwrite the ranges they
    refine, which is what longest-prefix match means.
    """
    proxy = np.full(1 << 24, -1, dtype=np.int32)
    order = np.argsort(lengths, kind="stable")
    for i in order.tolist():
        length = int(lengths[i])
        if length > 24:
            continue
        first = int(networks[i]) >> 8
        proxy[first : first + (1 << (24 - length))] = i
    return proxy


# --- IPv6 ------------------------------------------------------------------------------------------


def _ipv6_lengths(rng: np.random.Generator, count: int) -> U8Array:
    draw = rng.random(count)
    lengths = np.where(
        draw < 0.80,
        rng.integers(32, 65, count),
        np.where(draw < 0.90, rng.integers(16, 32, count), rng.integers(65, 129, count)),
    )
    return lengths.astype(np.uint8)


def _ipv6_masks(lengths: U8Array) -> tuple[U64Array, U64Array]:
    """(upper 64 bits, lower 64 bits) of each netmask; shifts stay in 0..63 (a 64-bit shift is UB)."""
    wide = lengths.astype(np.uint64)
    ones = np.uint64(ALL_ONES_64)
    high = np.where(wide >= 64, ones, ones << (np.uint64(64) - np.minimum(wide, np.uint64(63))))
    low = np.where(wide <= 64, np.uint64(0), ones << (np.uint64(128) - np.maximum(wide, np.uint64(65))))
    return high.astype(np.uint64), low.astype(np.uint64)


@dataclass(frozen=True)
class IPv6Prefixes:
    """Prefixes as the two 64-bit halves of the network address plus the length."""

    high: U64Array
    low: U64Array
    lengths: U8Array

    def __len__(self) -> int:
        return len(self.lengths)


def ipv6_prefixes(count: int, seed: int = IPV6_SEED) -> IPv6Prefixes:
    """``count`` distinct IPv6 prefixes, about 80 % /32../64, 10 % /16../31, 10 % /65../128."""
    rng = np.random.default_rng(seed)
    high = np.empty(0, dtype=np.uint64)
    low = np.empty(0, dtype=np.uint64)
    lengths = np.empty(0, dtype=np.uint8)
    while len(lengths) < count:
        draw = 2 * (count - len(lengths)) + 64
        new_lengths = _ipv6_lengths(rng, draw)
        mask_high, mask_low = _ipv6_masks(new_lengths)
        high = np.concatenate(
            [high, rng.integers(0, ALL_ONES_64, draw, dtype=np.uint64, endpoint=True) & mask_high]
        )
        low = np.concatenate(
            [low, rng.integers(0, ALL_ONES_64, draw, dtype=np.uint64, endpoint=True) & mask_low]
        )
        lengths = np.concatenate([lengths, new_lengths])
        keys = np.rec.fromarrays([high, low, lengths])
        keep = _first_occurrences(keys)
        high, low, lengths = high[keep], low[keep], lengths[keep]
    return IPv6Prefixes(high[:count], low[:count], lengths[:count])


def ipv6_ints(high: U64Array, low: U64Array) -> list[int]:
    return [(h << 64) | lo for h, lo in zip(high.tolist(), low.tolist(), strict=True)]


def ipv6_prefix_strings(prefixes: IPv6Prefixes) -> list[str]:
    return [
        f"{ipaddress.IPv6Address(n)}/{length}"
        for n, length in zip(ipv6_ints(prefixes.high, prefixes.low), prefixes.lengths.tolist(), strict=True)
    ]


def ipv6_lookup_addresses(prefixes: IPv6Prefixes, count: int, seed: int) -> tuple[U64Array, U64Array]:
    """(high, low) halves of ``count`` addresses: half inside an inserted prefix, half uniform."""
    rng = np.random.default_rng(seed)
    inside = count // 2
    chosen = rng.integers(0, len(prefixes), inside)
    mask_high, mask_low = _ipv6_masks(prefixes.lengths[chosen])
    random_high = rng.integers(0, ALL_ONES_64, count, dtype=np.uint64, endpoint=True)
    random_low = rng.integers(0, ALL_ONES_64, count, dtype=np.uint64, endpoint=True)
    high = random_high.copy()
    low = random_low.copy()
    high[:inside] = prefixes.high[chosen] | (random_high[:inside] & ~mask_high)
    low[:inside] = prefixes.low[chosen] | (random_low[:inside] & ~mask_low)
    order = rng.permutation(count)
    return high[order], low[order]


def ipv6_packed(high: U64Array, low: U64Array) -> bytes:
    """16 bytes per address in network byte order, the input of ``lookup_many6``."""
    return np.stack([high, low], axis=1).astype(">u8").tobytes()


def expected_ipv6(prefixes: IPv6Prefixes, addresses: Sequence[int]) -> list[tuple[int, int]]:
    """Reference longest-prefix match for 128-bit integer addresses."""
    return longest_matches(ipv6_ints(prefixes.high, prefixes.low), prefixes.lengths.tolist(), 128, addresses)


# --- Workloads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPv4Workload:
    """One IPv4 table size: its prefixes and the addresses every implementation looks up."""

    size: int
    networks: U32Array
    lengths: U8Array
    prefixes: list[str]
    values: list[int]
    lookup_strings: list[str]
    batch: U32Array
    # Reference answers for the first CHECKED_COUNT addresses of ``batch`` (``lookup_strings`` are the
    # text form of the first addresses of ``batch``, so they share these answers).
    expected: list[tuple[int, int]] = field(repr=False)

    @property
    def label(self) -> str:
        return size_label(self.size)


def make_ipv4_workload(size: int, batch_count: int) -> IPv4Workload:
    networks, lengths = ipv4_prefixes(size)
    batch = ipv4_lookup_addresses(networks, lengths, max(batch_count, SINGLE_LOOKUP_COUNT), IPV4_SEED + size)
    head = batch[:SINGLE_LOOKUP_COUNT].tolist()
    return IPv4Workload(
        size=size,
        networks=networks,
        lengths=lengths,
        prefixes=ipv4_prefix_strings(networks, lengths),
        values=list(range(size)),
        lookup_strings=[ipv4_text(a) for a in head],
        batch=batch,
        expected=expected_ipv4(networks, lengths, head[:CHECKED_COUNT]),
    )


@dataclass(frozen=True)
class IPv6Workload:
    """The IPv6 table: prefixes, lookup strings and the packed batch for ``lookup_many6``."""

    size: int
    prefixes: list[str]
    values: list[int]
    lookup_strings: list[str]
    batch: bytes
    batch_count: int
    expected: list[tuple[int, int]] = field(repr=False)

    @property
    def label(self) -> str:
        return size_label(self.size)


def make_ipv6_workload(size: int, batch_count: int) -> IPv6Workload:
    prefixes = ipv6_prefixes(size)
    count = max(batch_count, SINGLE_LOOKUP_COUNT)
    high, low = ipv6_lookup_addresses(prefixes, count, IPV6_SEED + size)
    head = ipv6_ints(high[:SINGLE_LOOKUP_COUNT], low[:SINGLE_LOOKUP_COUNT])
    return IPv6Workload(
        size=size,
        prefixes=ipv6_prefix_strings(prefixes),
        values=list(range(size)),
        lookup_strings=[str(ipaddress.IPv6Address(a)) for a in head],
        batch=ipv6_packed(high, low),
        batch_count=count,
        expected=expected_ipv6(prefixes, head[:CHECKED_COUNT]),
    )


# --- Table builders --------------------------------------------------------------------------------
# The same loop shape for every implementation, so a build benchmark compares inserts, not loops.

IMPLEMENTATIONS: Final = ("egresscore", "pytricia", "py-radix")


def build_egresscore(prefixes: Sequence[str], values: Sequence[object]) -> Any:
    try:
        from egresscore.core.prefix_table import PrefixTable
    except ImportError as exc:
        raise RuntimeError(
            "egresscore.core.prefix_table cannot be imported; build the extension first "
            "(`python setup.py build_ext --inplace`)"
        ) from exc

    table: Any = PrefixTable()
    insert = table.insert
    for prefix, value in zip(prefixes, values, strict=True):
        insert(prefix, value)
    return table


def build_pytricia(prefixes: Sequence[str], values: Sequence[object], bits: int = 32) -> Any:
    import pytricia

    table = pytricia.PyTricia(bits)
    for prefix, value in zip(prefixes, values, strict=True):
        table[prefix] = value
    return table


def build_radix(prefixes: Sequence[str], values: Sequence[object]) -> Any:
    import radix

    tree = radix.Radix()
    add = tree.add
    for prefix, value in zip(prefixes, values, strict=True):
        add(prefix).data["value"] = value
    return tree


def build_table(
    implementation: str, prefixes: Sequence[str], values: Sequence[object], bits: int = 32
) -> Any:
    if implementation == "egresscore":
        return build_egresscore(prefixes, values)
    if implementation == "pytricia":
        return build_pytricia(prefixes, values, bits)
    if implementation == "py-radix":
        return build_radix(prefixes, values)
    raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")


def table_length(implementation: str, table: Any) -> int:
    if implementation == "py-radix":
        return len(table.nodes())
    return len(table)


class Tables:
    """Workloads and filled tables, built on first use and kept for the whole session.

    Generating and inserting 500k prefixes takes seconds per implementation, so every benchmark of
    one size shares one table per implementation (lookups do not modify it).
    """

    def __init__(self, batch_count: int) -> None:
        self.batch_count = batch_count
        self._ipv4: dict[int, IPv4Workload] = {}
        self._ipv6: IPv6Workload | None = None
        self._tables: dict[tuple[str, int, int], Any] = {}
        self._proxies: dict[int, I32Array] = {}

    def ipv4(self, size: int) -> IPv4Workload:
        if size not in self._ipv4:
            self._ipv4[size] = make_ipv4_workload(size, self.batch_count)
        return self._ipv4[size]

    def ipv6(self) -> IPv6Workload:
        if self._ipv6 is None:
            self._ipv6 = make_ipv6_workload(IPV6_SIZE, self.batch_count)
        return self._ipv6

    def ipv4_table(self, implementation: str, size: int) -> Any:
        key = (implementation, 4, size)
        if key not in self._tables:
            workload = self.ipv4(size)
            self._tables[key] = build_table(implementation, workload.prefixes, workload.values, 32)
        return self._tables[key]

    def ipv6_table(self, implementation: str) -> Any:
        key = (implementation, 6, IPV6_SIZE)
        if key not in self._tables:
            workload = self.ipv6()
            self._tables[key] = build_table(implementation, workload.prefixes, workload.values, 128)
        return self._tables[key]

    def numpy_proxy(self, size: int) -> I32Array:
        if size not in self._proxies:
            workload = self.ipv4(size)
            self._proxies[size] = paint_numpy_proxy(workload.networks, workload.lengths)
        return self._proxies[size]
