"""A plain-Python oracle for :class:`egresscore.core.prefix_table.PrefixTable`.

This is the reading of the API that the compiled table is tested against, so it is
written to be obviously correct rather than fast: the table is a dict from
``ipaddress`` network to value, and every lookup is a linear scan over all of it,
keeping the longest network that contains the address.

Slots (what ``lookup_many`` returns) are numbered from a counter that only grows, so a
slot freed by ``remove`` or ``clear`` is never handed out again and ``value_at`` on
it raises ``IndexError`` for as long as this table lives.

Every public method reads or changes the table under one lock, so the threaded test
can run against the oracle as well; no other concurrency is attempted.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from egresscore.errors import InvalidAddressError, InvalidPrefixError

__all__ = ["NO_MATCH", "PrefixTable", "parse_address", "parse_prefix"]

NO_MATCH = -1

_V = TypeVar("_V")
_T = TypeVar("_T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The values `family` may take, and the IP version each one means.
_FAMILY_VERSION = {4: 4, socket.AF_INET: 4, 6: 6, socket.AF_INET6: 6}

# Buffer formats that are a native 4-byte unsigned integer (lookup_many's input) and a
# native 8-byte signed integer (its output); memoryview reports numpy int64 as "l".
_UINT32_FORMATS = ("I", "@I", "=I", "L", "@L", "=L")
_INT64_FORMATS = ("q", "@q", "=q", "l", "@l", "=l")


def parse_prefix(prefix: object) -> Network:
    """Return the network ``prefix`` names, or raise InvalidPrefixError quoting it."""
    if isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return prefix
    if not isinstance(prefix, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise InvalidPrefixError(
            f"invalid prefix {prefix!r}: expected a str, an ipaddress network or an ipaddress address, "
            f"got {type(prefix).__name__}"
        )
    try:
        # strict=True: a prefix with host bits set is an error, never silently masked.
        # A bare address (str or object) is the host prefix /32 or /128.
        return ipaddress.ip_network(prefix, strict=True)
    except ValueError as exc:
        raise InvalidPrefixError(f"invalid prefix {prefix!r}: {exc}") from None


def parse_address(address: object, family: int | None = None) -> Address:
    """Return the address ``address`` names, or raise InvalidAddressError quoting it."""
    if family is not None and family not in _FAMILY_VERSION:
        raise InvalidAddressError(
            f"invalid family {family!r} for address {address!r}: expected 4, 6, AF_INET or AF_INET6"
        )
    version = None if family is None else _FAMILY_VERSION[family]

    if isinstance(address, int):
        if version is None:
            raise InvalidAddressError(f"integer address {address!r} needs a family (4 or 6)")
        try:
            if version == 4:
                return ipaddress.IPv4Address(address)
            return ipaddress.IPv6Address(address)
        except ValueError:
            raise InvalidAddressError(
                f"integer address {address!r} is out of range for IPv{version}"
            ) from None

    parsed: Address
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        parsed = address
    elif isinstance(address, str):
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise InvalidAddressError(f"invalid address {address!r}: not IPv4 or IPv6 text") from None
    elif isinstance(address, bytes):
        if len(address) not in (4, 16):
            raise InvalidAddressError(
                f"invalid address {address!r}: packed addresses are 4 or 16 bytes, got {len(address)}"
            )
        parsed = ipaddress.ip_address(address)
    else:
        raise InvalidAddressError(
            f"invalid address {address!r}: expected str, bytes, int with family, or an ipaddress address, "
            f"got {type(address).__name__}"
        )
    if version is not None and parsed.version != version:
        raise InvalidAddressError(f"address {address!r} is not an IPv{version} address")
    return parsed


def _sort_key(item: tuple[Network, Any]) -> tuple[int, Address, int]:
    network = item[0]
    return (network.version, network.network_address, network.prefixlen)


class PrefixTable(Generic[_V]):
    """Longest-prefix-match table: a dict and a linear scan."""

    def __init__(self, items: Mapping[Any, _V] | Iterable[tuple[Any, _V]] | None = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[Network, _V] = {}
        self._slots: dict[Network, int] = {}
        self._next_slot = 0
        if items is None:
            return
        pairs = items.items() if isinstance(items, Mapping) else items
        for prefix, value in pairs:
            self.insert(prefix, value)

    # -- exact access ------------------------------------------------------------

    def insert(self, prefix: object, value: _V) -> None:
        network = parse_prefix(prefix)
        with self._lock:
            if network not in self._slots:
                self._slots[network] = self._next_slot
                self._next_slot += 1
            self._values[network] = value

    def remove(self, prefix: object) -> None:
        network = parse_prefix(prefix)
        with self._lock:
            if network not in self._values:
                raise KeyError(prefix)
            del self._values[network]
            del self._slots[network]

    @overload
    def get(self, prefix: object) -> _V | None: ...
    @overload
    def get(self, prefix: object, default: _T) -> _V | _T: ...
    def get(self, prefix: object, default: object = None) -> object:
        network = parse_prefix(prefix)
        with self._lock:
            if network in self._values:
                return self._values[network]
            return default

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._slots.clear()

    def __setitem__(self, prefix: object, value: _V) -> None:
        self.insert(prefix, value)

    def __getitem__(self, prefix: object) -> _V:
        network = parse_prefix(prefix)
        with self._lock:
            if network not in self._values:
                raise KeyError(prefix)
            return self._values[network]

    def __delitem__(self, prefix: object) -> None:
        self.remove(prefix)

    def __contains__(self, prefix: object) -> bool:
        network = parse_prefix(prefix)
        with self._lock:
            return network in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    # -- longest prefix match ------------------------------------------------------

    def _longest_match(self, address: Address) -> Network | None:
        """The longest network containing ``address``; the caller holds the lock."""
        best: Network | None = None
        for network in self._values:
            if network.version != address.version:
                continue
            if address not in network:
                continue
            if best is None or network.prefixlen > best.prefixlen:
                best = network
        return best

    def lookup(self, address: object, family: int | None = None) -> _V | None:
        parsed = parse_address(address, family)
        with self._lock:
            best = self._longest_match(parsed)
            if best is None:
                return None
            return self._values[best]

    def lookup_prefix(self, address: object, family: int | None = None) -> tuple[Network, _V] | None:
        parsed = parse_address(address, family)
        with self._lock:
            best = self._longest_match(parsed)
            if best is None:
                return None
            return (best, self._values[best])

    def _slots_for(self, addresses: list[Address]) -> list[int]:
        with self._lock:
            slots = []
            for address in addresses:
                best = self._longest_match(address)
                slots.append(NO_MATCH if best is None else self._slots[best])
            return slots

    def lookup_many(self, addresses: Any, out: Any = None) -> Any:
        view = memoryview(addresses)
        if view.itemsize != 4 or view.format not in _UINT32_FORMATS:
            raise InvalidAddressError(
                "lookup_many needs a buffer of 4-byte unsigned integers in host byte order, "
                f"got format {view.format!r} with item size {view.itemsize}"
            )
        if not view.c_contiguous:
            raise InvalidAddressError("lookup_many needs a C-contiguous buffer of addresses")
        numbers = view.cast("B").cast("I").tolist()
        out_view = self._check_out(out, len(numbers))
        slots = self._slots_for([ipaddress.IPv4Address(number) for number in numbers])
        return self._deliver(slots, out, out_view)

    def lookup_many6(self, addresses: Any, out: Any = None) -> Any:
        view = memoryview(addresses)
        if not view.c_contiguous:
            raise InvalidAddressError("lookup_many6 needs a C-contiguous buffer of packed addresses")
        raw = view.tobytes()
        if len(raw) % 16 != 0:
            raise InvalidAddressError(
                f"lookup_many6 needs 16 bytes per address, got {len(raw)} bytes (not a multiple of 16)"
            )
        count = len(raw) // 16
        out_view = self._check_out(out, count)
        packed = [raw[16 * i : 16 * i + 16] for i in range(count)]
        slots = self._slots_for([ipaddress.IPv6Address(one) for one in packed])
        return self._deliver(slots, out, out_view)

    @staticmethod
    def _check_out(out: Any, count: int) -> memoryview | None:
        if out is None:
            return None
        out_view = memoryview(out)
        if out_view.readonly:
            raise ValueError("out must be a writable buffer")
        if out_view.itemsize != 8 or out_view.format not in _INT64_FORMATS:
            raise ValueError(
                f"out must be a buffer of int64, got format {out_view.format!r} "
                f"with item size {out_view.itemsize}"
            )
        if not out_view.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if out_view.nbytes // 8 != count:
            raise ValueError(f"out has {out_view.nbytes // 8} items but there are {count} addresses")
        return out_view.cast("B").cast("q")

    @staticmethod
    def _deliver(slots: list[int], out: Any, out_view: memoryview | None) -> Any:
        if out_view is None:
            return array("q", slots)
        for index, slot in enumerate(slots):
            out_view[index] = slot
        return out

    def value_at(self, slot: int) -> _V:
        if not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        with self._lock:
            for network, owned_slot in self._slots.items():
                if owned_slot == slot:
                    return self._values[network]
        raise IndexError(f"no value at slot {slot!r}")

    # -- iteration -----------------------------------------------------------------

    def _sorted_items(self) -> list[tuple[Network, _V]]:
        """A snapshot: IPv4 before IPv6, then network address, then shorter first."""
        with self._lock:
            return sorted(self._values.items(), key=_sort_key)

    def items(self) -> Iterator[tuple[Network, _V]]:
        return iter(self._sorted_items())

    def prefixes(self) -> Iterator[Network]:
        return iter([network for network, _ in self._sorted_items()])

    def __iter__(self) -> Iterator[tuple[Network, _V]]:
        return iter(self._sorted_items())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._sorted_items(),))

    def memory_usage(self) -> int:
        with self._lock:
            return (
                sys.getsizeof(self)
                + sys.getsizeof(self._values)
                + sys.getsizeof(self._slots)
                + sum(sys.getsizeof(network) for network in self._values)
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._sorted_items())!r})"
