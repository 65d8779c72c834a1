"""Addresses through netlink (pyroute2), for the egress IPs the gateway carries."""

from __future__ import annotations

import ipaddress
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egresscore.errors import KernelError

__all__ = ["add_address", "has_address", "interface_index", "remove_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_index(ipr: Any, interface: str, field: str = "") -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        hint = f" (check {field})" if field else ""
        raise KernelError(19, f"interface {interface!r} does not exist on this host{hint}")
    return int(found[0])


def has_address(interface: str, address: IPAddress) -> bool:
    with IPRoute() as ipr:
        index = interface_index(ipr, interface, "gateway.interface")
        family = 2 if address.version == 4 else 10
        for item in ipr.get_addr(family=family, index=index):
            if item.get_attr("IFA_ADDRESS") == str(address):
                return True
    return False


def add_address(interface: str, address: IPAddress) -> bool:
    """Add ``address`` as a host address on ``interface``; False when it was there already
    (then it is not ours, and stays when egresscore exits)."""
    if has_address(interface, address):
        return False
    prefix = 32 if address.version == 4 else 128
    with IPRoute() as ipr:
        try:
            ipr.addr(
                "add",
                index=interface_index(ipr, interface, "gateway.interface"),
                address=str(address),
                prefixlen=prefix,
            )
        except NetlinkError as error:
            if error.code == 17:  # EEXIST: added meanwhile by someone else
                return False
            raise KernelError(error.code, f"cannot add {address}/{prefix} to {interface}: {error}") from error
    return True


def remove_address(interface: str, address: IPAddress) -> bool:
    """Remove ``address`` from ``interface``; False when it was not there."""
    prefix = 32 if address.version == 4 else 128
    with IPRoute() as ipr:
        try:
            index = interface_index(ipr, interface)
        except KernelError:
            return False
        try:
            ipr.addr("del", index=index, address=str(address), prefixlen=prefix)
        except NetlinkError as error:
            if error.code in (99, 19, 2):  # EADDRNOTAVAIL, ENODEV, ENOENT: already gone
                return False
            raise KernelError(
                error.code, f"cannot remove {address}/{prefix} from {interface}: {error}"
            ) from error
    return True
