"""Tests for the longest-prefix-match table, egresscore.core.prefix_table.PrefixTable.

Every behaviour test runs twice, through the ``impl`` fixture: once against the
compiled table and once against the plain-Python oracle in tests/reference, which
keeps the oracle honest. The Hypothesis tests at the end then drive both with the
same random operations and demand identical answers.

Literal addresses come from the documentation ranges only (RFC 5737, RFC 2544's
198.18.0.0/15, RFC 3849's 2001:db8::/32). Where an edge case needs a prefix that
covers a documentation range (a /0, an IPv6 /16) or the address just outside one,
it is computed from the documentation range rather than written out.

The compiled table keeps prefixes of /1../16 in a /16-indexed direct array and longer
ones in 8-bit-stride nodes at depths 16, 24, 32, ..., so many cases sit just either
side of /16, /24, /32 (and /64, /128 for IPv6).
"""

from __future__ import annotations

import gc
import ipaddress
import os
import pickle
import random
import select
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

# tests/ has no __init__.py, so pytest puts tests/ itself on sys.path: the oracle is "reference".
from reference.prefix_table import PrefixTable as ReferencePrefixTable

from egresscore.errors import InvalidAddressError, InvalidPrefixError

if TYPE_CHECKING:
    from egresscore.core.prefix_table import PrefixTable as CompiledPrefixTable

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Table: TypeAlias = "CompiledPrefixTable[Any] | ReferencePrefixTable[Any]"
TableClass: TypeAlias = "type[CompiledPrefixTable[Any]] | type[ReferencePrefixTable[Any]]"

NO_MATCH = -1
IPV4_MAX = 2**32 - 1
IPV6_MAX = 2**128 - 1

A = ipaddress.ip_address
N = ipaddress.ip_network


def load_compiled() -> type[CompiledPrefixTable[Any]]:
    """The compiled class. If the extension is not built this raises: a failure, never a skip."""
    from egresscore.core.prefix_table import PrefixTable

    return PrefixTable


@pytest.fixture(params=["compiled", "reference"])
def impl(request: pytest.FixtureRequest) -> TableClass:
    if request.param == "compiled":
        return load_compiled()
    return ReferencePrefixTable


def module_of(table_class: TableClass) -> Any:
    return sys.modules[table_class.__module__]


def decoded(table: Table, slots: Iterable[int]) -> list[tuple[Any, ...]]:
    """lookup_many's slots as ("match", value) or ("none",); a stored None stays distinct from no match."""
    result: list[tuple[Any, ...]] = []
    for slot in slots:
        assert isinstance(slot, int)
        if slot == NO_MATCH:
            result.append(("none",))
        else:
            assert slot >= 0, f"slot {slot} is neither NO_MATCH nor a valid slot"
            result.append(("match", table.value_at(slot)))
    return result


def as_match(found: tuple[Network, Any] | None) -> tuple[Any, ...]:
    return ("none",) if found is None else ("match", found[1])


def quotes(message: str, bad: object) -> bool:
    return repr(bad) in message or str(bad) in message


def packed(addresses: Iterable[str | Address]) -> bytes:
    return b"".join(A(address).packed for address in addresses)


def uint32s(addresses: Iterable[str | Address]) -> array[int]:
    return array("I", [int(A(address)) for address in addresses])


# --- fixtures of data ------------------------------------------------------------------

# A strictly nested IPv4 chain around the /16 and /24 node boundaries, valued by its length.
V4_CHAIN: dict[str, str] = {
    "198.18.0.0/15": "/15",
    "198.19.0.0/16": "/16",
    "198.19.0.0/17": "/17",
    "198.19.2.0/23": "/23",
    "198.19.3.0/24": "/24",
    "198.19.3.128/25": "/25",
    "198.19.3.130/31": "/31",
    "198.19.3.131/32": "/32",
}
V4_OUTER = N("198.18.0.0/15")
V4_CHAIN_PROBES: list[tuple[str | Address, str | None]] = [
    (V4_OUTER.network_address - 1, None),
    ("198.18.0.0", "/15"),
    ("198.18.255.255", "/15"),
    ("198.19.0.0", "/17"),
    ("198.19.1.255", "/17"),
    ("198.19.2.0", "/23"),
    ("198.19.2.255", "/23"),
    ("198.19.3.0", "/24"),
    ("198.19.3.127", "/24"),
    ("198.19.3.128", "/25"),
    ("198.19.3.129", "/25"),
    ("198.19.3.130", "/31"),
    ("198.19.3.131", "/32"),
    ("198.19.3.132", "/25"),
    ("198.19.3.255", "/25"),
    ("198.19.4.0", "/17"),
    ("198.19.127.255", "/17"),
    ("198.19.128.0", "/16"),
    ("198.19.255.255", "/16"),
    (V4_OUTER.broadcast_address + 1, None),
    ("192.0.2.1", None),
    ("203.0.113.255", None),
]

DOC6 = ipaddress.IPv6Network("2001:db8::/32")
V6_15 = DOC6.supernet(new_prefix=15)  # the /15, /16 and /17 that cover the documentation /32
V6_16 = DOC6.supernet(new_prefix=16)
V6_17 = DOC6.supernet(new_prefix=17)
# A strictly nested IPv6 chain around the /16, /64 and /128 boundaries.
V6_CHAIN: dict[str, str] = {
    str(V6_15): "/15",
    str(V6_16): "/16",
    str(V6_17): "/17",
    "2001:db8::/32": "/32",
    "2001:db8:0:2::/63": "/63",
    "2001:db8:0:3::/64": "/64",
    "2001:db8:0:3:8000::/65": "/65",
    "2001:db8:0:3:8000::2/127": "/127",
    "2001:db8:0:3:8000::3/128": "/128",
}
V6_CHAIN_PROBES: list[tuple[str | Address, str | None]] = [
    (V6_15.network_address - 1, None),
    (V6_15.network_address, "/15"),
    (V6_16.network_address - 1, "/15"),
    (V6_16.network_address, "/17"),
    (V6_17.broadcast_address, "/17"),
    (V6_17.broadcast_address + 1, "/16"),
    (V6_15.broadcast_address, "/16"),
    (V6_15.broadcast_address + 1, None),
    (DOC6.network_address - 1, "/17"),
    ("2001:db8::", "/32"),
    ("2001:db8:0:1:ffff:ffff:ffff:ffff", "/32"),
    ("2001:db8:0:2::", "/63"),
    ("2001:db8:0:2:ffff:ffff:ffff:ffff", "/63"),
    ("2001:db8:0:3::", "/64"),
    ("2001:db8:0:3:7fff:ffff:ffff:ffff", "/64"),
    ("2001:db8:0:3:8000::", "/65"),
    ("2001:db8:0:3:8000::1", "/65"),
    ("2001:db8:0:3:8000::2", "/127"),
    ("2001:db8:0:3:8000::3", "/128"),
    ("2001:db8:0:3:8000::4", "/65"),
    ("2001:db8:0:3:ffff:ffff:ffff:ffff", "/65"),
    ("2001:db8:0:4::", "/32"),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "/32"),
    (DOC6.broadcast_address + 1, "/17"),
]

CHAINS = {"v4": (V4_CHAIN, V4_CHAIN_PROBES), "v6": (V6_CHAIN, V6_CHAIN_PROBES)}
CHAIN_CASES = [(family, label) for family, (chain, _) in CHAINS.items() for label in chain.values()]


def parent_label(chain: dict[str, str], label: str) -> str | None:
    """In a strictly nested chain, the prefix that takes over a removed prefix's addresses."""
    labels = list(chain.values())
    index = labels.index(label)
    return labels[index - 1] if index > 0 else None


def check_probes(
    table: Table, chain: dict[str, str], probes: Sequence[tuple[str | Address, str | None]]
) -> None:
    networks = {label: N(prefix) for prefix, label in chain.items()}
    for address, expected in probes:
        assert table.lookup(address) == expected, f"lookup({address})"
        found = table.lookup_prefix(address)
        if expected is None:
            assert found is None, f"lookup_prefix({address})"
        else:
            assert found == (networks[expected], expected), f"lookup_prefix({address})"


# Covering prefix and a longer prefix inside it, spanning the direct array and node depths.
COVER_CASES: list[tuple[str, str]] = [
    ("198.18.0.0/16", "198.18.128.0/17"),
    ("198.18.0.0/16", "198.18.200.0/23"),
    ("198.18.0.0/16", "198.18.201.0/24"),
    ("198.18.0.0/16", "198.18.201.128/25"),
    ("198.18.0.0/16", "198.18.201.130/31"),
    ("198.18.0.0/16", "198.18.201.131/32"),
    ("198.18.0.0/16", "198.18.0.0/24"),
    ("198.18.0.0/16", "198.18.255.255/32"),
    ("198.18.0.0/15", "198.19.0.0/16"),
    ("0.0.0.0/0", "198.18.0.0/15"),
    ("0.0.0.0/0", "192.0.2.1/32"),
    ("2001:db8::/32", "2001:db8:8000::/33"),
    ("2001:db8::/32", "2001:db8:1::/48"),
    ("2001:db8::/32", "2001:db8:1:2::/63"),
    ("2001:db8::/32", "2001:db8:1:2::/64"),
    ("2001:db8::/32", "2001:db8:1:2:8000::/65"),
    ("2001:db8::/32", "2001:db8:1:2::6/127"),
    ("2001:db8::/32", "2001:db8:1:2::7/128"),
    ("2001:db8::/32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/128"),
    (str(V6_15), str(V6_16)),
    (str(V6_16), str(V6_17)),
    ("::/0", str(V6_16)),
    ("::/0", "2001:db8::1/128"),
]


def edge_probes(cover: Network, long: Network) -> list[tuple[Address, str | None]]:
    """First and last address of ``long`` and their outer neighbours, with the right answer."""
    inside = [long.network_address, long.broadcast_address]
    outside = []
    if int(long.network_address) > 0:
        outside.append(long.network_address - 1)
    if int(long.broadcast_address) < (IPV4_MAX if long.version == 4 else IPV6_MAX):
        outside.append(long.broadcast_address + 1)
    probes: list[tuple[Address, str | None]] = [(address, "long") for address in inside]
    probes += [(address, "cover" if address in cover else None) for address in outside]
    return probes


def batch_lookup(table: Table, addresses: Sequence[Address]) -> list[tuple[Any, ...]]:
    if addresses[0].version == 4:
        return decoded(table, table.lookup_many(uint32s(addresses)))
    return decoded(table, table.lookup_many6(packed(addresses)))


# --- construction -------------------------------------------------------------------------


def test_empty_table(impl: TableClass) -> None:
    table = impl()
    assert len(table) == 0
    assert list(table) == []
    assert list(table.items()) == []
    assert list(table.prefixes()) == []
    assert table.lookup("192.0.2.1") is None
    assert table.lookup("2001:db8::1") is None
    assert table.lookup_prefix("192.0.2.1") is None
    assert table.lookup_prefix("2001:db8::1") is None
    assert table.get("192.0.2.0/24") is None
    assert "192.0.2.0/24" not in table
    assert list(table.lookup_many(uint32s(["192.0.2.1", "198.51.100.1"]))) == [NO_MATCH, NO_MATCH]
    assert list(table.lookup_many6(packed(["2001:db8::1"]))) == [NO_MATCH]


def test_no_match_constant(impl: TableClass) -> None:
    assert module_of(impl).NO_MATCH == -1


def test_package_exports_the_compiled_table() -> None:
    import egresscore
    import egresscore.core.prefix_table as compiled_module

    assert egresscore.PrefixTable is compiled_module.PrefixTable
    assert compiled_module.NO_MATCH == NO_MATCH


def test_class_is_subscriptable(impl: TableClass) -> None:
    table = cast(Any, impl)[int]()
    table["192.0.2.0/24"] = 1
    assert table.lookup("192.0.2.9") == 1


def test_construct_from_mapping(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "a", N("2001:db8::/32"): "b", A("198.51.100.1"): "c"})
    assert list(table) == [(N("192.0.2.0/24"), "a"), (N("198.51.100.1/32"), "c"), (N("2001:db8::/32"), "b")]


def test_construct_from_iterable_of_pairs(impl: TableClass) -> None:
    pairs = [("192.0.2.0/24", "a"), ("2001:db8::/32", "b")]
    assert list(impl(pairs)) == [(N("192.0.2.0/24"), "a"), (N("2001:db8::/32"), "b")]
    assert list(impl(iter(pairs))) == list(impl(pairs))
    assert list(impl(pair for pair in pairs)) == list(impl(pairs))


def test_construct_from_another_table(impl: TableClass) -> None:
    original = impl({"192.0.2.0/24": "a", "2001:db8::/32": "b"})
    copy = impl(original)
    assert list(copy) == list(original)
    copy.remove("192.0.2.0/24")
    assert "192.0.2.0/24" in original


def test_pickle_round_trip_keeps_prefixes_values_and_lookups(impl: TableClass) -> None:
    original = impl({"192.0.2.0/24": "a", "192.0.2.128/25": "b", "0.0.0.0/0": "default", "2001:db8::/32": 6})
    restored = pickle.loads(pickle.dumps(original))
    assert type(restored) is impl
    assert list(restored) == list(original)
    assert restored.lookup("192.0.2.200") == "b"
    assert restored.lookup("198.51.100.1") == "default"
    assert restored.lookup("2001:db8::1") == 6


def test_construct_with_duplicates_keeps_the_last_value(impl: TableClass) -> None:
    table = impl([("192.0.2.1", "first"), ("192.0.2.0/24", "net"), ("192.0.2.1/32", "second")])
    assert len(table) == 2
    assert table["192.0.2.1"] == "second"


def test_construct_rejects_a_bad_prefix(impl: TableClass) -> None:
    with pytest.raises(InvalidPrefixError) as excinfo:
        impl([("192.0.2.0/24", "good"), ("198.51.100.7/24", "host bits")])
    assert "198.51.100.7/24" in str(excinfo.value)


# --- exact access -------------------------------------------------------------------------

SPELLINGS: list[tuple[object, Network]] = [
    ("198.51.100.0/24", N("198.51.100.0/24")),
    (N("198.51.100.0/24"), N("198.51.100.0/24")),
    ("192.0.2.1", N("192.0.2.1/32")),
    ("192.0.2.1/32", N("192.0.2.1/32")),
    (A("192.0.2.1"), N("192.0.2.1/32")),
    ("0.0.0.0/0", N("0.0.0.0/0")),
    ("2001:db8::/32", N("2001:db8::/32")),
    ("2001:0db8:0000:0000:0000:0000:0000:0000/32", N("2001:db8::/32")),
    (N("2001:db8::/32"), N("2001:db8::/32")),
    ("2001:db8::1", N("2001:db8::1/128")),
    (A("2001:db8::1"), N("2001:db8::1/128")),
    ("::/0", N("::/0")),
]


@pytest.mark.parametrize(("prefix", "network"), SPELLINGS, ids=repr)
def test_prefix_spellings(impl: TableClass, prefix: Any, network: Network) -> None:
    table = impl()
    table.insert(prefix, "value")
    assert list(table.items()) == [(network, "value")]
    (stored,) = table.prefixes()
    assert type(stored) is type(network)
    for spelling in (prefix, network, str(network)):
        assert table[spelling] == "value"
        assert table.get(spelling) == "value"
        assert spelling in table
    if network.prefixlen == network.max_prefixlen:
        assert table[network.network_address] == "value"
        assert table[str(network.network_address)] == "value"
    table.remove(prefix)
    assert len(table) == 0


def test_setitem_and_insert_replace_the_value(impl: TableClass) -> None:
    table = impl()
    table["198.51.100.0/24"] = "old"
    table["198.51.100.0/24"] = "new"
    assert len(table) == 1
    assert table.lookup("198.51.100.9") == "new"
    table.insert(N("198.51.100.0/24"), "newer")
    assert len(table) == 1
    assert table["198.51.100.0/24"] == "newer"
    assert list(table) == [(N("198.51.100.0/24"), "newer")]


def test_remove_and_del(impl: TableClass) -> None:
    table = impl({"198.51.100.0/24": "a", "2001:db8::/32": "b", "192.0.2.0/24": "c"})
    table.remove("198.51.100.0/24")
    del table[N("2001:db8::/32")]
    assert list(table) == [(N("192.0.2.0/24"), "c")]
    assert table.lookup("198.51.100.1") is None
    assert table.lookup("2001:db8::1") is None
    with pytest.raises(KeyError):
        table.remove("198.51.100.0/24")
    with pytest.raises(KeyError):
        del table["2001:db8::/32"]
    assert len(table) == 1


def test_exact_access_is_exact(impl: TableClass) -> None:
    table = impl({"198.51.100.0/24": "a"})
    for other in ("198.51.100.0/25", "198.51.100.0/23", "198.51.100.1", "198.51.100.0"):
        assert other not in table
        assert table.get(other) is None
        assert table.get(other, "default") == "default"
        with pytest.raises(KeyError):
            table[other]
        with pytest.raises(KeyError):
            table.remove(other)
    assert len(table) == 1


def test_get_default(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": 0})
    sentinel = object()
    assert table.get("192.0.2.0/24", sentinel) == 0
    assert table.get("198.51.100.0/24", sentinel) is sentinel
    assert table.get("198.51.100.0/24") is None


def test_none_is_a_value_like_any_other(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": None})
    assert len(table) == 1
    assert "192.0.2.0/24" in table
    assert table["192.0.2.0/24"] is None
    assert table.get("192.0.2.0/24", "default") is None
    assert table.lookup_prefix("192.0.2.1") == (N("192.0.2.0/24"), None)
    assert decoded(table, table.lookup_many(uint32s(["192.0.2.1", "198.51.100.1"]))) == [
        ("match", None),
        ("none",),
    ]


def test_values_are_returned_by_identity(impl: TableClass) -> None:
    value = object()
    table = impl({"2001:db8::/48": value, "192.0.2.0/24": value})
    assert table.lookup("2001:db8::1") is value
    assert table["2001:db8::/48"] is value
    (slot,) = table.lookup_many(uint32s(["192.0.2.1"]))
    assert table.value_at(slot) is value


def test_same_numbers_in_both_families_are_different_prefixes(impl: TableClass) -> None:
    # 0.0.0.0/0 and ::/0, or 192.0.2.0/24 and ::c000:200/120, share their integers.
    v4_default, v6_default = N("0.0.0.0/0"), N("::/0")
    v4_net = N("192.0.2.0/24")
    v6_net = ipaddress.IPv6Network((int(v4_net.network_address), 120))
    table = impl({v4_default: "v4 default", v6_default: "v6 default", v4_net: "v4 net", v6_net: "v6 net"})
    assert len(table) == 4
    table.remove(v4_default)
    assert v6_default in table
    assert table.lookup(int(v4_net.network_address) + 1, family=4) == "v4 net"
    assert table.lookup(int(v4_net.network_address) + 1, family=6) == "v6 net"
    table.remove(v6_net)
    assert table.lookup(int(v4_net.network_address) + 1, family=4) == "v4 net"
    assert table.lookup(int(v4_net.network_address) + 1, family=6) == "v6 default"


def test_clear(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": 1, "0.0.0.0/0": 2, "2001:db8::/32": 3, "2001:db8::1": 4})
    table.clear()
    assert len(table) == 0
    assert list(table) == []
    assert table.lookup("192.0.2.1") is None
    assert table.lookup("2001:db8::1") is None
    assert list(table.lookup_many(uint32s(["192.0.2.1"]))) == [NO_MATCH]
    table.clear()
    table["192.0.2.0/25"] = 5
    assert list(table) == [(N("192.0.2.0/25"), 5)]
    assert table.lookup("192.0.2.1") == 5


# --- bad prefixes ---------------------------------------------------------------------------

BAD_PREFIXES: list[object] = [
    "198.51.100.7/24",  # host bits set: rejected, never masked
    "203.0.113.0/23",  # host bits set in the third octet
    "2001:db8::1/32",
    "2001:db8:0:3:8000::/64",
    "198.51.100.0/33",
    "2001:db8::/129",
    "198.51.100.0/-1",
    "198.51.100.0/",
    "198.51.100.0/24/24",
    "192.0.2.256",
    "2001:db8:::/48",
    "not a prefix",
    "",
    None,
    1.5,
    3221225984,  # the integer of 192.0.2.0: integers are not prefixes
    b"\xc0\x00\x02\x00",
    ("192.0.2.0", 24),
]

PREFIX_OPERATIONS: dict[str, Callable[[Table, Any], object]] = {
    "insert": lambda table, prefix: table.insert(prefix, "value"),
    "setitem": lambda table, prefix: table.__setitem__(prefix, "value"),
    "remove": lambda table, prefix: table.remove(prefix),
    "delitem": lambda table, prefix: table.__delitem__(prefix),
    "getitem": lambda table, prefix: table[prefix],
    "get": lambda table, prefix: table.get(prefix),
    "contains": lambda table, prefix: prefix in table,
}


@pytest.mark.parametrize("operation", PREFIX_OPERATIONS)
@pytest.mark.parametrize("bad", BAD_PREFIXES, ids=repr)
def test_bad_prefix_is_rejected(impl: TableClass, bad: object, operation: str) -> None:
    table = impl({"198.51.100.0/24": "a", "2001:db8::/32": "b"})
    with pytest.raises(InvalidPrefixError) as excinfo:
        PREFIX_OPERATIONS[operation](table, bad)
    assert isinstance(excinfo.value, ValueError)
    assert quotes(str(excinfo.value), bad), f"message {str(excinfo.value)!r} does not quote {bad!r}"
    assert list(table) == [(N("198.51.100.0/24"), "a"), (N("2001:db8::/32"), "b")]


# --- longest prefix match ------------------------------------------------------------------


@pytest.mark.parametrize(("address", "expected"), V4_CHAIN_PROBES, ids=str)
def test_v4_chain(impl: TableClass, address: str | Address, expected: str | None) -> None:
    table = impl(V4_CHAIN)
    check_probes(table, V4_CHAIN, [(address, expected)])
    assert decoded(table, table.lookup_many(uint32s([address]))) == [as_match(table.lookup_prefix(address))]


@pytest.mark.parametrize(("address", "expected"), V6_CHAIN_PROBES, ids=str)
def test_v6_chain(impl: TableClass, address: str | Address, expected: str | None) -> None:
    table = impl(V6_CHAIN)
    check_probes(table, V6_CHAIN, [(address, expected)])
    assert decoded(table, table.lookup_many6(packed([address]))) == [as_match(table.lookup_prefix(address))]


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize(
    "order", ["shortest first", "longest first", "shuffled 1", "shuffled 2", "shuffled 3"]
)
def test_insertion_order_does_not_matter(impl: TableClass, family: str, order: str) -> None:
    chain, probes = CHAINS[family]
    prefixes = list(chain)
    if order == "longest first":
        prefixes.reverse()
    elif order.startswith("shuffled"):
        random.Random(order).shuffle(prefixes)
    table = impl()
    for prefix in prefixes:
        table.insert(prefix, chain[prefix])
    check_probes(table, chain, probes)


@pytest.mark.parametrize(("family", "removed"), CHAIN_CASES)
def test_removing_one_prefix_of_a_chain_hands_its_addresses_to_its_parent(
    impl: TableClass, family: str, removed: str
) -> None:
    chain, probes = CHAINS[family]
    table = impl(chain)
    prefix = next(prefix for prefix, label in chain.items() if label == removed)
    table.remove(prefix)
    remaining = {p: label for p, label in chain.items() if label != removed}
    after = [
        (address, parent_label(chain, removed) if label == removed else label) for address, label in probes
    ]
    check_probes(table, remaining, after)
    assert [label for _, label in table] == list(remaining.values())
    # And back again.
    table.insert(prefix, removed)
    check_probes(table, chain, probes)


@pytest.mark.parametrize(("cover", "long"), COVER_CASES)
def test_removing_a_long_prefix_falls_back_to_the_cover(impl: TableClass, cover: str, long: str) -> None:
    table = impl({cover: "cover"})
    table.insert(long, "long")
    probes = edge_probes(N(cover), N(long))
    for address, expected in probes:
        assert table.lookup(address) == expected, f"lookup({address}) with both"
    table.remove(long)
    assert list(table) == [(N(cover), "cover")]
    for address, expected in probes:
        wanted = None if expected is None else (N(cover), "cover")
        assert table.lookup_prefix(address) == wanted, f"lookup_prefix({address}) after removing {long}"
        assert table.lookup(address) == (None if wanted is None else "cover"), f"lookup({address})"
    expected_batch = [("none",) if expected is None else ("match", "cover") for _, expected in probes]
    assert batch_lookup(table, [address for address, _ in probes]) == expected_batch
    table.insert(long, "long again")
    assert table.lookup(N(long).network_address) == "long again"
    assert table.lookup(N(long).broadcast_address) == "long again"


@pytest.mark.parametrize(("cover", "long"), COVER_CASES)
def test_removing_the_cover_keeps_the_long_prefix(impl: TableClass, cover: str, long: str) -> None:
    table = impl({long: "long", cover: "cover"})
    table.remove(cover)
    probes = edge_probes(N(cover), N(long))
    for address, expected in probes:
        wanted = None if expected == "cover" else expected
        assert table.lookup(address) == wanted, f"lookup({address}) after removing {cover}"
    expected_batch = [("none",) if expected != "long" else ("match", "long") for _, expected in probes]
    assert batch_lookup(table, [address for address, _ in probes]) == expected_batch


@pytest.mark.parametrize(
    ("cover", "first", "second"),
    [
        ("198.18.0.0/16", "198.18.5.0/25", "198.18.5.128/25"),
        ("198.18.0.0/16", "198.18.5.1/32", "198.18.5.2/32"),
        ("198.18.0.0/16", "198.18.5.0/24", "198.18.6.0/24"),
        ("198.18.0.0/16", "198.18.0.0/17", "198.18.128.0/17"),
        ("2001:db8::/32", "2001:db8::1/128", "2001:db8::2/128"),
        ("2001:db8::/32", "2001:db8:0:1::/65", "2001:db8:0:1:8000::/65"),
    ],
)
def test_removing_a_sibling_leaves_the_other(impl: TableClass, cover: str, first: str, second: str) -> None:
    table = impl({cover: "cover", first: "first", second: "second"})
    table.remove(first)
    assert table.lookup(N(first).network_address) == "cover"
    assert table.lookup(N(first).broadcast_address) == "cover"
    assert table.lookup(N(second).network_address) == "second"
    assert table.lookup(N(second).broadcast_address) == "second"
    table.remove(second)
    assert table.lookup(N(second).network_address) == "cover"
    assert list(table) == [(N(cover), "cover")]


def test_default_routes_match_every_address_of_their_family_only(impl: TableClass) -> None:
    table = impl({"0.0.0.0/0": "v4 default"})
    for number in (0, 1, 2**31, IPV4_MAX):
        assert table.lookup(number, family=4) == "v4 default"
    assert table.lookup_prefix("198.51.100.1") == (N("0.0.0.0/0"), "v4 default")
    for number in (0, IPV6_MAX):
        assert table.lookup(number, family=6) is None
    assert (
        decoded(table, table.lookup_many(array("I", [0, 2**31, IPV4_MAX]))) == [("match", "v4 default")] * 3
    )
    assert list(table.lookup_many6(bytes(16) + b"\xff" * 16)) == [NO_MATCH, NO_MATCH]

    table = impl({"::/0": "v6 default"})
    for number in (0, 1, 2**127, IPV6_MAX):
        assert table.lookup(number, family=6) == "v6 default"
    for number in (0, IPV4_MAX):
        assert table.lookup(number, family=4) is None
    assert list(table.lookup_many(array("I", [0, IPV4_MAX]))) == [NO_MATCH, NO_MATCH]
    assert decoded(table, table.lookup_many6(bytes(16) + b"\xff" * 16)) == [("match", "v6 default")] * 2


@pytest.mark.parametrize("host", ["192.0.2.77", "2001:db8::77"])
def test_host_prefix_matches_only_its_address(impl: TableClass, host: str) -> None:
    address = A(host)
    table = impl({host: "host"})
    assert table.lookup(address) == "host"
    assert table.lookup(address - 1) is None
    assert table.lookup(address + 1) is None
    assert table.lookup_prefix(address) == (N(host), "host")


def test_no_ipv4_mapped_magic(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "v4", "0.0.0.0/0": "v4 default"})
    for address in ("::ffff:192.0.2.1", "::192.0.2.1"):  # IPv4-mapped and IPv4-compatible forms
        assert table.lookup(address) is None
    assert table.lookup(int(A("192.0.2.1")), family=6) is None
    assert table.lookup(A("::ffff:192.0.2.1").packed) is None
    assert list(table.lookup_many6(packed(["::ffff:192.0.2.1"]))) == [NO_MATCH]

    table = impl({"::ffff:192.0.2.0/120": "mapped", "::/0": "v6 default"})
    assert table.lookup("192.0.2.1") is None
    assert table.lookup(A("192.0.2.1").packed) is None
    assert list(table.lookup_many(uint32s(["192.0.2.1"]))) == [NO_MATCH]
    assert table.lookup("::ffff:192.0.2.1") == "mapped"


# --- address forms -------------------------------------------------------------------------


def address_forms(address: Address) -> dict[str, tuple[Any, int | None]]:
    families = (4, socket.AF_INET) if address.version == 4 else (6, socket.AF_INET6)
    return {
        "str": (str(address), None),
        "exploded str": (address.exploded, None),
        "ipaddress": (address, None),
        "packed bytes": (address.packed, None),
        "int with version": (int(address), families[0]),
        "int with AF constant": (int(address), families[1]),
    }


@pytest.mark.parametrize("form", list(address_forms(A("192.0.2.1"))))
@pytest.mark.parametrize("text", ["198.51.100.7", "2001:db8::7"])
def test_address_forms(impl: TableClass, text: str, form: str) -> None:
    table = impl({"198.51.100.0/24": "v4", "2001:db8::/32": "v6", "2001:db8::7": "v6 host"})
    address, family = address_forms(A(text))[form]
    expected = {4: (N("198.51.100.0/24"), "v4"), 6: (N("2001:db8::7/128"), "v6 host")}[A(text).version]
    assert table.lookup(address, family=family) == expected[1]
    assert table.lookup_prefix(address, family=family) == expected
    if family is None:
        assert table.lookup(address) == expected[1]
    else:
        assert table.lookup(address, family) == expected[1]


BAD_ADDRESSES: list[tuple[object, int | None]] = [
    ("not an address", None),
    ("", None),
    ("192.0.2.256", None),
    ("192.0.2.0/24", None),
    ("2001:db8:::1", None),
    (3221225985, None),  # an integer needs a family
    (2**32, 4),
    (2**32, socket.AF_INET),
    (-1, 4),
    (2**128, 6),
    (-1, socket.AF_INET6),
    (b"\xc0\x00\x02", None),
    (b"\xc0\x00\x02\x01\x00", None),
    (b"", None),
    (None, None),
    (1.5, None),
]


@pytest.mark.parametrize("method", ["lookup", "lookup_prefix"])
@pytest.mark.parametrize(("bad", "family"), BAD_ADDRESSES, ids=repr)
def test_bad_address_is_rejected(impl: TableClass, bad: object, family: int | None, method: str) -> None:
    table = impl({"0.0.0.0/0": "v4", "::/0": "v6"})
    with pytest.raises(InvalidAddressError) as excinfo:
        getattr(table, method)(bad, family=family)
    assert isinstance(excinfo.value, ValueError)
    assert quotes(str(excinfo.value), bad), f"message {str(excinfo.value)!r} does not quote {bad!r}"


@pytest.mark.parametrize("family", [0, 5, 7, -4])
def test_bad_family_is_rejected(impl: TableClass, family: int) -> None:
    table = impl({"0.0.0.0/0": "v4", "::/0": "v6"})
    with pytest.raises(ValueError):
        table.lookup(3221225985, family=family)


# --- iteration --------------------------------------------------------------------------------


def test_iteration_order(impl: TableClass) -> None:
    expected = [
        N("0.0.0.0/0"),
        N("192.0.2.0/24"),
        N("192.0.2.64/26"),  # numerically before .128 although "128" < "64" as text
        N("192.0.2.128/25"),
        N("198.51.100.0/24"),  # same address: shorter first
        N("198.51.100.0/25"),
        N("198.51.100.0/32"),
        N("203.0.113.0/24"),
        N("::/0"),  # every IPv6 prefix after every IPv4 one
        N("2001:db8::/32"),
        N("2001:db8::/48"),
        N("2001:db8::1/128"),
        N("2001:db8:a::/48"),  # numerically before 2001:db8:1000:: although "a" > "1" as text
        N("2001:db8:1000::/48"),
    ]
    scrambled = list(expected)
    random.Random(7).shuffle(scrambled)
    table = impl()
    for network in scrambled:
        table[str(network)] = str(network)
    pairs = [(network, str(network)) for network in expected]
    assert list(table) == pairs
    assert list(table.items()) == pairs
    assert list(table.prefixes()) == expected
    assert [type(network) for network in table.prefixes()] == [type(network) for network in expected]


def test_iteration_is_a_snapshot(impl: TableClass) -> None:
    initial = {"192.0.2.0/24": 1, "198.51.100.0/24": 2, "2001:db8::/32": 3, "2001:db8::1": 4}
    expected_items = [(N(prefix), value) for prefix, value in initial.items()]
    expected_prefixes = [network for network, _ in expected_items]
    iterators: dict[str, tuple[Callable[[Table], Iterable[Any]], list[Any]]] = {
        "iter": (iter, expected_items),
        "items": (lambda table: table.items(), expected_items),
        "prefixes": (lambda table: table.prefixes(), expected_prefixes),
    }
    for name, (make_iterator, expected) in iterators.items():
        table = impl(initial)
        iterator = iter(make_iterator(table))
        first = next(iterator)
        table.clear()
        table["203.0.113.0/24"] = 5
        table["2001:db8::/48"] = 6
        del table["203.0.113.0/24"]
        assert [first, *iterator] == expected, name


def test_mutating_inside_a_for_loop(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": 1, "198.51.100.0/24": 2, "2001:db8::/32": 3})
    expected = list(table)
    seen = []
    for index, (network, value) in enumerate(table):
        seen.append((network, value))
        table.remove(network)
        table[f"203.0.113.{index}"] = index
        table["2001:db8:1::/48"] = index
    assert seen == expected
    assert [str(network) for network in table.prefixes()] == [
        "203.0.113.0/32",
        "203.0.113.1/32",
        "203.0.113.2/32",
        "2001:db8:1::/48",
    ]


# --- lookup_many, lookup_many6, value_at ----------------------------------------------------


def v4_probe_addresses() -> list[Address]:
    return [A(address) for address, _ in V4_CHAIN_PROBES]


def v6_probe_addresses() -> list[Address]:
    return [A(address) for address, _ in V6_CHAIN_PROBES]


def expected_batch(table: Table, addresses: Sequence[Address]) -> list[tuple[Any, ...]]:
    return [as_match(table.lookup_prefix(address)) for address in addresses]


V4_INPUTS: dict[str, Callable[[list[int]], Any]] = {
    "array I": lambda numbers: array("I", numbers),
    "numpy uint32": lambda numbers: np.array(numbers, dtype=np.uint32),
    "read-only numpy uint32": lambda numbers: np.array(numbers, dtype=np.uint32),
    "memoryview": lambda numbers: memoryview(array("I", numbers)),
}


@pytest.mark.parametrize("kind", V4_INPUTS)
def test_lookup_many(impl: TableClass, kind: str) -> None:
    table = impl({**V4_CHAIN, "2001:db8::/32": "v6"})
    addresses = v4_probe_addresses()
    buffer: Any = V4_INPUTS[kind]([int(address) for address in addresses])
    if kind.startswith("read-only"):
        buffer.setflags(write=False)
    slots = table.lookup_many(buffer)
    assert isinstance(slots, array)
    assert slots.typecode == "q"
    assert len(slots) == len(addresses)
    expected = [("none",) if label is None else ("match", label) for _, label in V4_CHAIN_PROBES]
    assert decoded(table, slots) == expected


def test_lookup_many_uses_host_byte_order(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "doc"})
    number = int(A("192.0.2.1"))
    swapped = int.from_bytes(number.to_bytes(4, "big"), "little")
    assert decoded(table, table.lookup_many(array("I", [number, swapped]))) == [("match", "doc"), ("none",)]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "numpy uint8"])
def test_lookup_many6(impl: TableClass, kind: str) -> None:
    table = impl({**V6_CHAIN, "0.0.0.0/0": "v4"})
    addresses = v6_probe_addresses()
    raw = packed(addresses)
    buffer: Any = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "numpy uint8": np.frombuffer(raw, dtype=np.uint8),
    }[kind]
    slots = table.lookup_many6(buffer)
    assert isinstance(slots, array)
    assert slots.typecode == "q"
    expected = [("none",) if label is None else ("match", label) for _, label in V6_CHAIN_PROBES]
    assert decoded(table, slots) == expected


@pytest.mark.parametrize("out_kind", ["array q", "numpy int64"])
def test_lookup_many_fills_out(impl: TableClass, out_kind: str) -> None:
    table = impl({**V4_CHAIN, **V6_CHAIN})
    for addresses, method in ((v4_probe_addresses(), "lookup_many"), (v6_probe_addresses(), "lookup_many6")):
        count = len(addresses)
        # Garbage first, so an element the table forgets to write shows.
        out: Any = array("q", [12345] * count) if out_kind == "array q" else np.full(count, 12345, np.int64)
        buffer = uint32s(addresses) if method == "lookup_many" else packed(addresses)
        returned = getattr(table, method)(buffer, out=out)
        assert returned is out
        assert decoded(table, [int(slot) for slot in out]) == expected_batch(table, addresses)


@pytest.mark.parametrize("method", ["lookup_many", "lookup_many6"])
def test_lookup_many_of_nothing(impl: TableClass, method: str) -> None:
    table = impl({"0.0.0.0/0": 1, "::/0": 2})
    empty: Any = array("I") if method == "lookup_many" else b""
    result = getattr(table, method)(empty)
    assert isinstance(result, array)
    assert result.typecode == "q"
    assert len(result) == 0
    out = array("q")
    assert getattr(table, method)(empty, out=out) is out


BAD_V4_BATCHES: dict[str, Any] = {
    "array H": array("H", [1, 2]),
    "array Q": array("Q", [1, 2]),
    "array B": array("B", [192, 0, 2, 1]),
    "bytes": bytes(8),
    "numpy uint16": np.zeros(2, dtype=np.uint16),
    "numpy uint64": np.zeros(2, dtype=np.uint64),
    "numpy float32": np.zeros(2, dtype=np.float32),
}


@pytest.mark.parametrize("kind", BAD_V4_BATCHES)
def test_lookup_many_rejects_wrong_item_size(impl: TableClass, kind: str) -> None:
    table = impl({"0.0.0.0/0": 1})
    with pytest.raises(ValueError) as excinfo:
        table.lookup_many(BAD_V4_BATCHES[kind])
    assert str(excinfo.value)


@pytest.mark.parametrize("size", [1, 4, 15, 17, 33])
def test_lookup_many6_rejects_a_partial_address(impl: TableClass, size: int) -> None:
    table = impl({"::/0": 1})
    with pytest.raises(ValueError) as excinfo:
        table.lookup_many6(bytes(size))
    assert str(excinfo.value)


def test_lookup_many_on_a_strided_array_is_refused_or_right(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "doc"})
    numbers = np.array([int(A("192.0.2.1")), 7, int(A("192.0.2.2")), 7], dtype=np.uint32)[::2]
    try:
        slots = table.lookup_many(numbers)
    except ValueError:
        return
    assert decoded(table, slots) == [("match", "doc"), ("match", "doc")]


BAD_OUTS: dict[str, Callable[[int], Any]] = {
    "too short": lambda count: array("q", [0] * (count - 1)),
    "too long": lambda count: np.zeros(count + 1, dtype=np.int64),
    "int32": lambda count: array("i", [0] * count),
    "float64": lambda count: np.zeros(count, dtype=np.float64),
    "read-only": lambda count: bytes(8 * count),
}


@pytest.mark.parametrize("method", ["lookup_many", "lookup_many6"])
@pytest.mark.parametrize("kind", BAD_OUTS)
def test_lookup_many_rejects_a_bad_out(impl: TableClass, kind: str, method: str) -> None:
    table = impl({"0.0.0.0/0": 1, "::/0": 2})
    buffer: Any = array("I", [1, 2, 3]) if method == "lookup_many" else bytes(48)
    out = BAD_OUTS[kind](3)
    expected: tuple[type[Exception], ...] = (ValueError,)
    if kind == "read-only":
        expected = (ValueError, TypeError, BufferError)
    with pytest.raises(expected) as excinfo:
        getattr(table, method)(buffer, out=out)
    assert str(excinfo.value)


def test_value_at_rejects_bad_slots(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "a"})
    (slot,) = table.lookup_many(uint32s(["192.0.2.1"]))
    assert table.value_at(slot) == "a"
    for bad in (-1, -2, NO_MATCH, 10**6, 2**62):
        with pytest.raises(IndexError):
            table.value_at(bad)


def test_value_at_after_remove_and_clear(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "a", "198.51.100.0/24": "b", "2001:db8::/32": "c"})
    slot_a, slot_b = table.lookup_many(uint32s(["192.0.2.1", "198.51.100.1"]))
    (slot_c,) = table.lookup_many6(packed(["2001:db8::1"]))
    table.remove("192.0.2.0/24")
    with pytest.raises(IndexError):
        table.value_at(slot_a)
    assert table.value_at(slot_b) == "b"
    assert table.value_at(slot_c) == "c"
    table.clear()
    for slot in (slot_a, slot_b, slot_c):
        with pytest.raises(IndexError):
            table.value_at(slot)


def test_slot_survives_replacing_the_value(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": "old"})
    (slot,) = table.lookup_many(uint32s(["192.0.2.1"]))
    table["192.0.2.0/24"] = "new"
    assert table.value_at(slot) == "new"


def test_live_slots_survive_churn(impl: TableClass) -> None:
    table = impl()
    hosts = [A("198.18.0.0") + 256 * index + 1 for index in range(64)]
    for index, host in enumerate(hosts):
        table.insert(ipaddress.IPv4Network((int(host) - 1, 24)), index)
    slots = list(table.lookup_many(uint32s(hosts)))
    for index in range(0, 64, 2):
        table.remove(ipaddress.IPv4Network((int(hosts[index]) - 1, 24)))
    for index in range(200):
        table.insert(ipaddress.IPv4Network((int(A("203.0.113.0")) + index, 32)), f"new {index}")
    for index in range(1, 64, 2):
        assert table.value_at(slots[index]) == index
    assert decoded(table, table.lookup_many(uint32s(hosts))) == [
        ("none",) if index % 2 == 0 else ("match", index) for index in range(64)
    ]


def test_memory_usage(impl: TableClass) -> None:
    table = impl()
    before = table.memory_usage()
    assert type(before) is int
    assert before > 0
    base4 = int(A("198.18.0.0"))
    base6 = int(DOC6.network_address)
    for index in range(512):  # every /24 of 198.18.0.0/15, and the upper /25 of each
        table.insert(ipaddress.IPv4Network((base4 + (index << 8), 24)), index)
        table.insert(ipaddress.IPv4Network((base4 + (index << 8) + 128, 25)), index)
    for index in range(1000):
        table.insert(ipaddress.IPv6Network((base6 + (index << 64), 64)), index)
        table.insert(ipaddress.IPv6Network((base6 + (0xFFFF << 80) + index * 257, 128)), index)
    after = table.memory_usage()
    assert type(after) is int
    assert after > before


# --- references to values ------------------------------------------------------------------


class Marker:
    """A value that is not interned or cached, so its lifetime is the table's doing."""

    def __init__(self, name: str) -> None:
        self.name = name


RELEASES: dict[str, Callable[[Table], None]] = {
    "remove": lambda table: table.remove("192.0.2.0/24"),
    "del": lambda table: table.__delitem__(N("192.0.2.0/24")),
    "replace": lambda table: table.insert("192.0.2.0/24", Marker("replacement")),
    "clear": lambda table: table.clear(),
}


@pytest.mark.parametrize("release", RELEASES)
def test_values_are_released(impl: TableClass, release: str) -> None:
    table = impl({"2001:db8::/32": Marker("other")})
    table.insert("192.0.2.0/24", Marker("value"))
    alive = weakref.ref(table["192.0.2.0/24"])
    # Every read path hands out (and must give back) references to the value.
    for _ in range(100):
        assert cast(Marker, table.lookup("192.0.2.1")).name == "value"
        assert cast(tuple[Network, Marker], table.lookup_prefix(A("192.0.2.2")))[1].name == "value"
        assert cast(Marker, table.get("192.0.2.0/24")).name == "value"
        (slot,) = table.lookup_many(uint32s(["192.0.2.3"]))
        assert table.value_at(slot).name == "value"
    assert [value.name for _, value in table.items()] == ["value", "other"]
    partly_used = iter(table)
    next(partly_used)
    del partly_used
    gc.collect()
    assert alive() is not None, "the table lost its reference to a value it still holds"
    RELEASES[release](table)
    gc.collect()
    assert alive() is None, f"the value is still referenced after {release}"


def test_values_are_released_with_the_table(impl: TableClass) -> None:
    table = impl({"192.0.2.0/24": Marker("v4"), "2001:db8::/32": Marker("v6")})
    alive = [weakref.ref(value) for _, value in table]
    del table
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


# --- a large table ----------------------------------------------------------------------------


def longest_by_probing(exact: dict[tuple[int, int, int], Any], version: int, number: int) -> tuple[Any, ...]:
    """Longest match by trying every length from the longest down: slow, and obviously right."""
    bits = bits_of(version)
    for length in range(bits, -1, -1):
        host_bits = bits - length
        key = (version, number >> host_bits << host_bits, length)
        if key in exact:
            return ("match", exact[key])
    return ("none",)


def random_prefixes(rng: random.Random, version: int, count: int) -> list[tuple[int, int]]:
    """(network integer, length) pairs, half of them crowded into a few hot /16s or /48s."""
    bits = bits_of(version)
    hot_bits = 16 if version == 4 else 48
    hot = [rng.getrandbits(hot_bits) for _ in range(16)]
    lengths = V4_LENGTHS if version == 4 else V6_LENGTHS
    prefixes = []
    for _ in range(count):
        if rng.random() < 0.5:
            number = (rng.choice(hot) << (bits - hot_bits)) | rng.getrandbits(bits - hot_bits)
        else:
            number = rng.getrandbits(bits)
        length = rng.choice(lengths) if rng.random() < 0.5 else rng.randint(0, bits)
        host_bits = bits - length
        prefixes.append((number >> host_bits << host_bits, length))
    return prefixes


def random_probes(rng: random.Random, version: int, prefixes: list[tuple[int, int]], count: int) -> list[int]:
    """Addresses at the edges of, inside, and just outside ``prefixes``, and anywhere."""
    bits = bits_of(version)
    numbers = []
    for _ in range(count):
        number, length = rng.choice(prefixes)
        size = 1 << (bits - length)
        numbers.append(
            rng.choice([number, number + size - 1, number - 1, number + size, number + rng.randrange(size)])
            % (1 << bits)
        )
    numbers += [rng.getrandbits(bits) for _ in range(count // 4)]
    return numbers


def test_large_random_table() -> None:
    """Thousands of prefixes: node and value storage must grow, and shrink, without a wrong answer."""
    rng = random.Random(5737)
    table = load_compiled()()
    exact: dict[tuple[int, int, int], Any] = {}
    generated = {4: random_prefixes(rng, 4, 20_000), 6: random_prefixes(rng, 6, 4_000)}
    for version, prefixes in generated.items():
        for index, (number, length) in enumerate(prefixes):
            table.insert(make_network(version, number, length), index)
            exact[(version, number, length)] = index

    def check(round_: str) -> None:
        assert len(table) == len(exact), round_
        expected_order = sorted(exact, key=lambda key: (key[0], key[1], key[2]))
        items = list(table.items())
        assert [
            (network.version, int(network.network_address), network.prefixlen) for network, _ in items
        ] == (expected_order), round_
        assert [value for _, value in items] == [exact[key] for key in expected_order], round_
        numbers4 = random_probes(rng, 4, generated[4], 20_000)
        expected4 = [longest_by_probing(exact, 4, number) for number in numbers4]
        assert decoded(table, table.lookup_many(np.array(numbers4, dtype=np.uint32))) == expected4, round_
        numbers6 = random_probes(rng, 6, generated[6], 3_000)
        expected6 = [longest_by_probing(exact, 6, number) for number in numbers6]
        raw = b"".join(number.to_bytes(16, "big") for number in numbers6)
        assert decoded(table, table.lookup_many6(raw)) == expected6, round_
        for number, want in zip(numbers4[:500], expected4[:500], strict=True):
            assert as_match(table.lookup_prefix(number, family=4)) == want, round_

    check("after inserting")
    for key in rng.sample(sorted(exact), len(exact) // 2):
        version, number, length = key
        table.remove(make_network(version, number, length))
        del exact[key]
    check("after removing half")
    for version, prefixes in generated.items():
        for number, length in prefixes[::3]:
            table[make_network(version, number, length)] = -length
            exact[(version, number, length)] = -length
    check("after re-inserting a third")


# --- threads ------------------------------------------------------------------------------------


def run_in_child(scenario: Callable[[], None], timeout: float) -> None:
    """Run ``scenario`` in a forked child process and fail if it fails, crashes or hangs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of the parent's cleanup
        os.close(read_end)
        status = 1
        try:
            scenario()
            status = 0
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
        os._exit(status)
    os.close(write_end)
    report = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(
                    f"the scenario did not finish within {timeout} s (deadlock?); output so far:\n{report!r}"
                )
            chunk = pipe.read(65536)
            if not chunk:
                break
            report += chunk
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child process died of {signal.Signals(os.WTERMSIG(status)).name} (see its stderr)")
    assert os.WEXITSTATUS(status) == 0, report.decode(errors="replace")


def test_lookups_during_concurrent_churn(impl: TableClass) -> None:
    """Readers never crash and never see a wrong answer for prefixes nobody touches.

    The stable prefixes are never modified; the churning writer only toggles prefixes
    that are shorter than every stable prefix covering the same addresses, or that do
    not overlap them, so a stable address has exactly one right answer at all times.
    Churned prefixes are valued by their own text, so an answer for a churned address
    can be checked: it must name a prefix containing that address.

    It runs in a child process, so that a crash fails this test instead of ending the run.
    """

    def scenario() -> None:
        stable = {
            N("198.51.100.0/24"): "stable 198.51.100.0/24",
            N("192.0.2.128/25"): "stable 192.0.2.128/25",
            N("203.0.113.77/32"): "stable 203.0.113.77/32",
            N("2001:db8:5::/48"): "stable 2001:db8:5::/48",
            N("2001:db8:6::7/128"): "stable 2001:db8:6::7/128",
        }
        stable_probes = [
            (A("198.51.100.0"), N("198.51.100.0/24")),
            (A("198.51.100.255"), N("198.51.100.0/24")),
            (A("192.0.2.128"), N("192.0.2.128/25")),
            (A("192.0.2.255"), N("192.0.2.128/25")),
            (A("203.0.113.77"), N("203.0.113.77/32")),
            (A("2001:db8:5::"), N("2001:db8:5::/48")),
            (A("2001:db8:5:ffff:ffff:ffff:ffff:ffff"), N("2001:db8:5::/48")),
            (A("2001:db8:6::7"), N("2001:db8:6::7/128")),
        ]
        churn_prefixes = [
            N("0.0.0.0/0"),
            N("198.51.100.0/24").supernet(new_prefix=16),
            N("198.51.100.0/24").supernet(new_prefix=23),
            N("192.0.2.0/24"),
            N("192.0.2.0/25"),  # sibling of a stable /25 in the same /24 node
            N("192.0.2.0/26"),
            N("192.0.2.127/32"),
            N("203.0.113.0/24"),
            N("203.0.113.76/31"),  # covers a stable /32; shorter, so the /32 still wins
            N("203.0.113.78/32"),
            N("198.18.0.0/15"),
            N("198.18.0.0/17"),
            N("198.18.7.0/24"),
            N("198.18.7.128/25"),
            N("198.19.255.255/32"),
            N("::/0"),
            N("2001:db8::/32"),
            N("2001:db8:4::/46"),
            N("2001:db8:4::/48"),
            N("2001:db8:6::/64"),
            N("2001:db8:6::6/127"),
            N("2001:db8:6::8/128"),
            N("2001:db8:f000::/36"),
            N("2001:db8:f000::/65"),
            N("2001:db8:f000::1/128"),
        ]
        churn_probes = [
            A("192.0.2.1"),
            A("192.0.2.127"),
            A("203.0.113.76"),
            A("203.0.113.78"),
            A("198.18.7.200"),
            A("198.19.255.255"),
            A("2001:db8:4::1"),
            A("2001:db8:6::6"),
            A("2001:db8:6::8"),
            A("2001:db8:f000::1"),
        ]
        table = impl(stable)
        churn_values = {str(network) for network in churn_prefixes}
        errors: list[str] = []
        stop = threading.Event()

        def guarded(body: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    while not stop.is_set():
                        body()
                except BaseException:
                    errors.append(traceback.format_exc())
                    stop.set()

            return run

        rng = random.Random(2024)

        def churn() -> None:
            network = rng.choice(churn_prefixes)
            if network in table:
                table.remove(network)
            else:
                table.insert(network, str(network))

        def check_churned_answer(address: Address, found: tuple[Network, Any] | None) -> None:
            if found is not None:
                network, value = found
                assert value == str(network), (address, found)
                assert address in network, (address, found)

        def single_lookups() -> None:
            for address, network in stable_probes:
                assert table.lookup(address) == stable[network], address
                assert table.lookup_prefix(address) == (network, stable[network]), address
            for address in churn_probes:
                check_churned_answer(address, table.lookup_prefix(address))
                value = table.lookup(address)
                assert value is None or address in N(value), (address, value)
            snapshot = list(table.items())
            assert snapshot == sorted(
                snapshot, key=lambda kv: (kv[0].version, kv[0].network_address, kv[0].prefixlen)
            )
            assert set(stable.items()) <= set(snapshot)

        v4_stable = [(address, network) for address, network in stable_probes if address.version == 4]
        v6_stable = [(address, network) for address, network in stable_probes if address.version == 6]
        v4_churn = [address for address in churn_probes if address.version == 4]
        v6_churn = [address for address in churn_probes if address.version == 6]
        repeat = 200
        v4_batch = uint32s([address for address, _ in v4_stable] + v4_churn) * repeat
        v6_batch = packed([address for address, _ in v6_stable] + v6_churn) * repeat

        def check_batch(
            slots: Sequence[int], stable_part: Sequence[tuple[Address, Network]], width: int
        ) -> None:
            for index, slot in enumerate(slots):
                position = index % width
                if position < len(stable_part):
                    network = stable_part[position][1]
                    assert slot >= 0, (index, slot)
                    assert table.value_at(slot) == stable[network], (index, slot)
                else:
                    assert slot >= NO_MATCH, (index, slot)
                    if slot != NO_MATCH:
                        try:
                            value = table.value_at(slot)
                        except IndexError:
                            continue  # freed by the writer since: allowed
                        assert value in churn_values, (index, slot, value)

        def batch_lookups() -> None:
            check_batch(table.lookup_many(v4_batch), v4_stable, len(v4_stable) + len(v4_churn))
            check_batch(table.lookup_many6(v6_batch), v6_stable, len(v6_stable) + len(v6_churn))

        threads = [
            threading.Thread(target=guarded(churn), name="churn"),
            threading.Thread(target=guarded(single_lookups), name="single lookups"),
            threading.Thread(target=guarded(batch_lookups), name="batch lookups 1"),
            threading.Thread(target=guarded(batch_lookups), name="batch lookups 2"),
        ]
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # switch threads often, so operations interleave finely
        try:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not stop.is_set():
                time.sleep(0.01)
        finally:
            stop.set()
            sys.setswitchinterval(old_interval)
            for thread in threads:
                thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors[0]
        for network, value in stable.items():
            assert table[network] == value

    run_in_child(scenario, timeout=60)


# --- Hypothesis: the compiled table against the reference ----------------------------------

V4_BASES = tuple(
    int(A(text))
    for text in ("192.0.2.0", "192.0.2.255", "198.51.100.77", "198.18.0.0", "198.19.255.255", "203.0.113.128")
)
V6_BASES = tuple(
    int(A(text))
    for text in (
        "2001:db8::",
        "2001:db8::1",
        "2001:db8:0:3:8000::",
        "2001:db8:1:2:3:4:5:6",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
    )
)
V4_LENGTHS = (0, 1, 8, 15, 16, 17, 23, 24, 25, 31, 32)
V6_LENGTHS = (0, 1, 15, 16, 17, 32, 48, 63, 64, 65, 127, 128)


def bits_of(version: int) -> int:
    return 32 if version == 4 else 128


def address_numbers(version: int) -> st.SearchStrategy[int]:
    """Address integers, biased to a few bases (so prefixes overlap) and their neighbours."""
    return ADDRESS_NUMBERS[version]


def _address_numbers(version: int) -> st.SearchStrategy[int]:
    bits = bits_of(version)
    bases = V4_BASES if version == 4 else V6_BASES
    near_a_base = st.tuples(st.sampled_from(bases), st.integers(-300, 300)).map(
        lambda pair: (pair[0] + pair[1]) % 2**bits
    )
    return st.one_of(st.sampled_from(bases), near_a_base, st.integers(0, 2**bits - 1))


ADDRESS_NUMBERS = {4: _address_numbers(4), 6: _address_numbers(6)}


def numbers_around(prefixes: Sequence[Network], version: int) -> st.SearchStrategy[int]:
    """Address integers of ``version``: often the edges of, inside or just outside ``prefixes``."""
    inserted = [network for network in prefixes if network.version == version]
    if not inserted:
        return ADDRESS_NUMBERS[version]
    modulus = 1 << bits_of(version)
    ranges = [(int(network.network_address), network.num_addresses) for network in inserted]
    edges = sorted(
        {
            edge % modulus
            for first, size in ranges
            for edge in (first, first + size - 1, first - 1, first + size)
        }
    )
    inside = st.tuples(st.sampled_from(ranges), st.integers(0, modulus - 1)).map(
        lambda pair: pair[0][0] + pair[1] % pair[0][1]
    )
    return st.one_of(st.sampled_from(edges), inside, ADDRESS_NUMBERS[version])


def batches_around(prefixes: Sequence[Network], version: int) -> st.SearchStrategy[list[int]]:
    """A batch of address integers for lookup_many: mostly edges and midpoints of ``prefixes``.

    Cheaper to draw than a list of ``numbers_around``: one choice an address.
    """
    modulus = 1 << bits_of(version)
    candidates = set(V4_BASES if version == 4 else V6_BASES)
    for network in prefixes:
        if network.version == version:
            first, size = int(network.network_address), network.num_addresses
            candidates.update(edge % modulus for edge in (first, first + size - 1, first - 1, first + size))
            candidates.add(first + size // 2)
    anywhere = st.lists(st.integers(0, modulus - 1), max_size=4)
    near = st.lists(st.sampled_from(sorted(candidates)), max_size=BATCH_SIZE)
    return st.tuples(near, anywhere).map(lambda pair: pair[0] + pair[1])


def make_network(version: int, number: int, length: int) -> Network:
    if version == 4:
        return ipaddress.IPv4Network((number, length), strict=False)
    return ipaddress.IPv6Network((number, length), strict=False)


def networks_of(version: int) -> st.SearchStrategy[Network]:
    lengths = V4_LENGTHS if version == 4 else V6_LENGTHS
    return st.builds(
        lambda number, length: make_network(version, number, length),
        address_numbers(version),
        st.one_of(st.sampled_from(lengths), st.integers(0, bits_of(version))),
    )


networks = st.one_of(networks_of(4), networks_of(6))
BATCH_SIZE = 32  # addresses in one lookup_many call of the state machine
values = st.one_of(st.integers(-3, 10**6), st.text(max_size=3), st.none())


def spellings(network: Network) -> list[object]:
    """Every way of naming ``network`` that the API accepts."""
    forms: list[object] = [network, str(network)]
    if network.version == 6:
        forms.append(f"{network.network_address.exploded}/{network.prefixlen}")
    if network.prefixlen == network.max_prefixlen:
        forms += [network.network_address, str(network.network_address)]
    return forms


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("returned", call())
    except KeyError:
        return ("KeyError", None)
    except InvalidPrefixError:
        return ("InvalidPrefixError", None)
    except InvalidAddressError:
        return ("InvalidAddressError", None)


def host_bit_prefix_texts() -> st.SearchStrategy[str]:
    """Prefix text with host bits set, which must always be rejected."""

    def text(version: int, number: int, length: int) -> str:
        network = make_network(version, number, length)
        address = ipaddress.IPv4Address(number) if version == 4 else ipaddress.IPv6Address(number)
        assert address != network.network_address
        return f"{address}/{length}"

    def draw(version: int) -> st.SearchStrategy[str]:
        bits = bits_of(version)
        return (
            st.tuples(address_numbers(version), st.integers(0, bits - 1))
            .filter(lambda pair: pair[0] & ((1 << (bits - pair[1])) - 1) != 0)
            .map(lambda pair: text(version, pair[0], pair[1]))
        )

    return st.one_of(draw(4), draw(6))


class PrefixTableComparison(RuleBasedStateMachine):
    """The compiled table and the reference, driven by the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled: Any = load_compiled()()
        self.reference: ReferencePrefixTable[Any] = ReferencePrefixTable()
        # Compiled slots seen in lookup_many results, with the prefix each belongs to.
        self.slot_owner: dict[int, Network] = {}

    def existing(self, version: int | None = None) -> list[Network]:
        return [network for network in self.reference.prefixes() if version in (None, network.version)]

    def numbers(self, version: int) -> st.SearchStrategy[int]:
        """Address integers, often the edges of, inside or just outside an inserted prefix."""
        return numbers_around(self.existing(version), version)

    def forget_slots_of(self, network: Network) -> None:
        """``network`` was just removed: its slots must be free now."""
        for slot, owner in list(self.slot_owner.items()):
            if owner == network:
                with pytest.raises(IndexError):
                    self.compiled.value_at(slot)
                del self.slot_owner[slot]

    # -- changes

    @rule(network=networks, value=values, data=st.data())
    def insert(self, network: Network, value: Any, data: st.DataObject) -> None:
        prefix = data.draw(st.sampled_from(spellings(network)), label="spelling")
        if data.draw(st.booleans(), label="with setitem"):
            self.compiled[prefix] = value
            self.reference[prefix] = value
        else:
            self.compiled.insert(prefix, value)
            self.reference.insert(prefix, value)

    @rule(pairs=st.lists(st.tuples(networks, values), min_size=1, max_size=6))
    def insert_several(self, pairs: list[tuple[Network, Any]]) -> None:
        """Grow the table faster than one prefix a step, so it gets crowded and deep."""
        for network, value in pairs:
            self.compiled[network] = value
            self.reference[network] = value

    @precondition(lambda self: len(self.reference) > 0)
    @rule(value=values, data=st.data())
    def insert_overlapping(self, value: Any, data: st.DataObject) -> None:
        """A prefix sharing an address with an inserted one: a sub-, super- or the same prefix."""
        around = data.draw(st.sampled_from(self.existing()), label="around")
        first, last = int(around.network_address), int(around.broadcast_address)
        number = data.draw(st.integers(first, last), label="address")
        length = data.draw(st.integers(0, around.max_prefixlen), label="length")
        network = make_network(around.version, number, length)
        self.compiled.insert(network, value)
        self.reference.insert(network, value)

    @precondition(lambda self: len(self.reference) > 0)
    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        network = data.draw(st.sampled_from(self.existing()), label="network")
        prefix = data.draw(st.sampled_from(spellings(network)), label="spelling")
        if data.draw(st.booleans(), label="with del"):
            del self.compiled[prefix]
            del self.reference[prefix]
        else:
            self.compiled.remove(prefix)
            self.reference.remove(prefix)
        self.forget_slots_of(network)

    @rule(network=networks)
    def remove_any(self, network: Network) -> None:
        expected = outcome(lambda: self.reference.remove(network))
        assert outcome(lambda: self.compiled.remove(network)) == expected
        if expected[0] == "returned":
            self.forget_slots_of(network)

    @precondition(lambda self: len(self.reference) >= 5)
    @rule()
    def clear(self) -> None:
        self.compiled.clear()
        self.reference.clear()
        for slot in self.slot_owner:
            with pytest.raises(IndexError):
                self.compiled.value_at(slot)
        self.slot_owner.clear()

    @precondition(lambda self: len(self.reference) > 0)
    @rule(from_items=st.booleans())
    def rebuild(self, from_items: bool) -> None:
        """Replace both tables by copies built in one go (and drop the old ones)."""
        source = list(self.reference.items()) if from_items else self.compiled
        self.compiled = load_compiled()(source)
        self.reference = ReferencePrefixTable(list(self.reference))
        self.slot_owner.clear()

    @rule(
        bad=st.one_of(st.sampled_from(BAD_PREFIXES), host_bit_prefix_texts()),
        operation=st.sampled_from(list(PREFIX_OPERATIONS)),
    )
    def bad_prefix(self, bad: object, operation: str) -> None:
        for table in (self.compiled, self.reference):
            with pytest.raises(InvalidPrefixError):
                PREFIX_OPERATIONS[operation](table, bad)

    # -- exact reads

    @rule(data=st.data())
    def exact_reads(self, data: st.DataObject) -> None:
        inserted = self.existing()
        pick = st.sampled_from(inserted) if inserted else networks
        network = data.draw(st.one_of(pick, networks), label="network")
        prefix = data.draw(st.sampled_from(spellings(network)), label="spelling")
        sentinel = object()
        assert (prefix in self.compiled) == (prefix in self.reference)
        assert self.compiled.get(prefix) == self.reference.get(prefix)
        assert (self.compiled.get(prefix, sentinel) is sentinel) == (
            self.reference.get(prefix, sentinel) is sentinel
        )
        assert outcome(lambda: self.compiled[prefix]) == outcome(lambda: self.reference[prefix])

    @rule()
    def iterate(self) -> None:
        expected = list(self.reference.items())
        assert list(self.compiled) == expected
        assert list(self.compiled.prefixes()) == [network for network, _ in expected]

    # -- longest prefix match

    @rule(data=st.data(), version=st.sampled_from([4, 6]), form=st.sampled_from(list(address_forms(A("::")))))
    def lookup(self, data: st.DataObject, version: int, form: str) -> None:
        number = data.draw(self.numbers(version), label="address")
        parsed = ipaddress.IPv4Address(number) if version == 4 else ipaddress.IPv6Address(number)
        address, family = address_forms(parsed)[form]
        expected = self.reference.lookup_prefix(address, family=family)
        found = self.compiled.lookup_prefix(address, family=family)
        assert found == expected
        if found is not None:
            assert type(found[0]) is type(expected[0])  # type: ignore[index]
        assert self.compiled.lookup(address, family=family) == self.reference.lookup(address, family=family)

    @rule(
        data=st.data(),
        kind=st.sampled_from(["array", "numpy"]),
        out_kind=st.sampled_from([None, "array", "numpy"]),
    )
    def lookup_many(self, data: st.DataObject, kind: str, out_kind: str | None) -> None:
        numbers = data.draw(batches_around(self.existing(4), 4), label="addresses")
        buffer: Any = array("I", numbers) if kind == "array" else np.array(numbers, dtype=np.uint32)
        self.compare_batch(numbers, 4, buffer, out_kind)

    @rule(
        data=st.data(),
        kind=st.sampled_from(["bytes", "bytearray", "numpy"]),
        out_kind=st.sampled_from([None, "array", "numpy"]),
    )
    def lookup_many6(self, data: st.DataObject, kind: str, out_kind: str | None) -> None:
        numbers = data.draw(batches_around(self.existing(6), 6), label="addresses")
        raw = b"".join(number.to_bytes(16, "big") for number in numbers)
        buffer: Any = {"bytes": raw, "bytearray": bytearray(raw), "numpy": np.frombuffer(raw, np.uint8)}[kind]
        self.compare_batch(numbers, 6, buffer, out_kind)

    def compare_batch(self, numbers: list[int], version: int, buffer: Any, out_kind: str | None) -> None:
        method = "lookup_many" if version == 4 else "lookup_many6"
        out: Any = None
        if out_kind == "array":
            out = array("q", [99] * len(numbers))
        elif out_kind == "numpy":
            out = np.full(len(numbers), 99, dtype=np.int64)
        result = getattr(self.compiled, method)(buffer, out=out)
        if out is None:
            assert isinstance(result, array)
            assert result.typecode == "q"
        else:
            assert result is out
        slots = [int(slot) for slot in result]
        assert len(slots) == len(numbers)
        expected = [self.reference.lookup_prefix(number, family=version) for number in numbers]
        assert decoded(self.compiled, slots) == [as_match(found) for found in expected]
        for slot, found in zip(slots, expected, strict=True):
            if found is not None:
                self.slot_owner[slot] = found[0]
        reference_slots = getattr(self.reference, method)(buffer)
        assert decoded(self.reference, reference_slots) == [as_match(found) for found in expected]

    # -- invariants

    @invariant()
    def same_contents(self) -> None:
        assert len(self.compiled) == len(self.reference)
        assert list(self.compiled.items()) == list(self.reference.items())

    @invariant()
    def seen_slots_stay_valid(self) -> None:
        for slot, network in self.slot_owner.items():
            assert self.compiled.value_at(slot) == self.reference[network], (slot, network)


TestPrefixTableAgainstReference = PrefixTableComparison.TestCase
TestPrefixTableAgainstReference.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    version=st.sampled_from([4, 6]),
    number=st.integers(0, IPV6_MAX),
    length=st.integers(-1, 130),
    bare=st.booleans(),
)
def test_prefix_text_is_read_alike(version: int, number: int, length: int, bare: bool) -> None:
    """Arbitrary "address/length" text: both accept it as the same prefix, or both reject it."""
    compiled_class = load_compiled()
    address = ipaddress.IPv4Address(number % 2**32) if version == 4 else ipaddress.IPv6Address(number)
    text = str(address) if bare else f"{address}/{length}"
    compiled, reference = compiled_class(), ReferencePrefixTable[int]()
    expected = outcome(lambda: reference.insert(text, 1))
    assert outcome(lambda: compiled.insert(text, 1)) == expected
    assert list(compiled) == list(reference)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(networks, values), max_size=100),
    as_mapping=st.booleans(),
    data=st.data(),
)
def test_bulk_build_then_lookup_many(
    pairs: list[tuple[Network, Any]], as_mapping: bool, data: st.DataObject
) -> None:
    source: Any = dict(pairs) if as_mapping else pairs
    compiled = load_compiled()(source)
    reference = ReferencePrefixTable[Any](source)
    assert list(compiled) == list(reference)

    for version in (4, 6):
        numbers_strategy = numbers_around([network for network, _ in pairs], version)
        numbers = data.draw(st.lists(numbers_strategy, max_size=200), label=f"IPv{version} addresses")
        expected = [as_match(reference.lookup_prefix(number, family=version)) for number in numbers]
        if version == 4:
            buffers: list[Any] = [array("I", numbers), np.array(numbers, dtype=np.uint32)]
            method: Any = compiled.lookup_many
        else:
            raw = b"".join(number.to_bytes(16, "big") for number in numbers)
            buffers = [raw, np.frombuffer(raw, dtype=np.uint8)]
            method = compiled.lookup_many6
        for buffer in buffers:
            slots = method(buffer)
            assert isinstance(slots, array)
            assert slots.typecode == "q"
            assert decoded(compiled, slots) == expected
            out = np.full(len(numbers), 99, dtype=np.int64)
            assert method(buffer, out=out) is out
            assert decoded(compiled, [int(slot) for slot in out]) == expected
        for number in numbers[:20]:
            assert compiled.lookup_prefix(number, family=version) == reference.lookup_prefix(
                number, family=version
            )
