"""The VXLAN tunnel between nodes and gateways, and the node's routes into it (pyroute2).

One VXLAN link per host (``tunnel.device``, the same name, VNI and UDP port on every
host). Its MAC address is derived from the host's underlay address (:func:`vtep_mac`),
so a node can reach any gateway without learning or flooding: for each gateway it
writes a permanent neighbour entry (gateway's underlay address -> gateway's MAC) and a
forwarding-database entry (gateway's MAC -> gateway's underlay address).

Per gateway the node has a routing table and an ``ip rule``:

- ``fwmark SLOT_VALUE/MASK lookup TABLE`` at ``rule_priority``;
- in ``TABLE``: ``default via ENDPOINT dev TUNNEL onlink``, and ``throw ENDPOINT/32``.
  The throw route is for the tunnel's own outer packets: a VXLAN device's outer packet
  inherits the inner packet's mark, so the rule catches it too; the throw sends its
  lookup on to the main table, which routes the underlay (without it the outer packet
  would be routed into the tunnel itself and dropped as a loop).

Below the slots' rules two more catch what carries the redirect flag but found no slot
table (a table removed under a live flow, a slot renumbered): at ``rule_priority + 1``
``fwmark FLAG/FLAG iif lo lookup main`` lets the tunnel's own outer packets (sent by the
host, ``iif lo``) through after their slot table threw them on, and at
``rule_priority + 2`` ``fwmark FLAG/FLAG blackhole`` drops a pod's packet that would
otherwise leave by the main table untranslated.

The link carries the alias ``egresscore``: a link of that name without it is not
egresscore's, and is never changed or removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from egresscore.agent.netlink import interface_index
from egresscore.errors import KernelError

__all__ = [
    "ALIAS",
    "SlotRoute",
    "TunnelSpec",
    "ensure_tunnel",
    "installed_slots",
    "remove_guard_rules",
    "remove_slot",
    "remove_tunnel",
    "set_guard_rules",
    "set_peers",
    "set_slot",
    "tunnel_state",
    "vtep_mac",
]

ALIAS = "egresscore"
NUD_PERMANENT = 0x80  # include/uapi/linux/neighbour.h
RTNH_F_ONLINK = 4  # include/uapi/linux/rtnetlink.h
AF_INET = 2
# Errnos netlink answers with (include/uapi/asm-generic/errno-base.h, errno.h).
ENOENT, ESRCH, EEXIST, ENODEV, EADDRNOTAVAIL = 2, 3, 17, 19, 99


def vtep_mac(underlay: ipaddress.IPv4Address) -> str:
    """The tunnel MAC of the host whose underlay address is ``underlay``: ``0a:ec`` and
    the address's four bytes. 0x0a has the locally administered bit set and the group
    bit clear (IEEE 802, a unicast address no vendor assigns)."""
    return "0a:ec:" + ":".join(f"{byte:02x}" for byte in underlay.packed)


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """The VXLAN link this host should have."""

    device: str
    underlay_interface: str
    local: ipaddress.IPv4Address
    vni: int
    port: int
    mtu: int | None = None
    # Set on gateways: decapsulated packets arrive on the link, and reverse-path
    # filtering drops packets that arrive on a link without an address (loose mode too).
    address: ipaddress.IPv4Interface | None = None


@dataclass(frozen=True, slots=True)
class SlotRoute:
    """One gateway's tunnel route on a node: mark value, table and endpoint."""

    slot: int
    endpoint: ipaddress.IPv4Address
    table: int
    mark: int
    mask: int
    priority: int


def _error(error: NetlinkError, what: str) -> KernelError:
    return KernelError(error.code, f"{what}: {error}")


def _link(ipr: Any, name: str) -> Any | None:
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None


def tunnel_state(device: str) -> dict[str, Any] | None:
    """What the link ``device`` is now: None when absent, else its attributes and
    whether it is egresscore's."""
    with IPRoute() as ipr:
        link = _link(ipr, device)
        if link is None:
            return None
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        data = info.get_attr("IFLA_INFO_DATA") if info is not None and kind == "vxlan" else None
        return {
            "index": link["index"],
            "kind": kind,
            "ours": link.get_attr("IFLA_IFALIAS") == ALIAS,
            "vni": data.get_attr("IFLA_VXLAN_ID") if data is not None else None,
            "port": data.get_attr("IFLA_VXLAN_PORT") if data is not None else None,
            "local": data.get_attr("IFLA_VXLAN_LOCAL") if data is not None else None,
            "link": data.get_attr("IFLA_VXLAN_LINK") if data is not None else None,
            "mtu": link.get_attr("IFLA_MTU"),
            "address": link.get_attr("IFLA_ADDRESS"),
        }


def _write_sysctl(device: str, key: str, value: str) -> None:
    # Only for egresscore's own link; a dot in a device name stays a dot in /proc/sys.
    path = Path("/proc/sys/net/ipv4/conf") / device / key
    try:
        path.write_text(value)
    except OSError as error:
        raise KernelError(error.errno or 5, f"cannot set {path} to {value}: {error.strerror}") from error


def read_sysctl(device: str, key: str) -> str:
    return (Path("/proc/sys/net/ipv4/conf") / device / key).read_text().strip()


def ensure_tunnel(spec: TunnelSpec) -> tuple[int, int]:
    """Create or adopt the VXLAN link; returns ``(ifindex, mtu)``. A link of that name
    that is not egresscore's raises :class:`KernelError` and is left alone; one of ours
    with other settings (a changed configuration) is made anew."""
    state = tunnel_state(spec.device)
    with IPRoute() as ipr:
        underlay = interface_index(ipr, spec.underlay_interface, "tunnel.underlay_interface")
        if state is not None and not state["ours"]:
            raise KernelError(
                EEXIST,
                f"a link named {spec.device!r} exists and is not egresscore's (no alias {ALIAS!r}): "
                "choose another tunnel.device",
            )
        wanted = (spec.vni, spec.port, str(spec.local), underlay)
        if state is not None and (state["vni"], state["port"], state["local"], state["link"]) != wanted:
            try:
                ipr.link("del", index=state["index"])
            except NetlinkError as error:
                raise _error(error, f"cannot replace the tunnel link {spec.device}") from error
            state = None
        if state is None:
            try:
                ipr.link(
                    "add",
                    ifname=spec.device,
                    kind="vxlan",
                    vxlan_id=spec.vni,
                    vxlan_local=str(spec.local),
                    vxlan_port=spec.port,
                    vxlan_learning=0,
                    vxlan_link=underlay,
                    address=vtep_mac(spec.local),
                )
            except NetlinkError as error:
                raise _error(error, f"cannot create the VXLAN link {spec.device} (VNI {spec.vni})") from error
        index = interface_index(ipr, spec.device)
        settings: dict[str, Any] = {"ifalias": ALIAS, "address": vtep_mac(spec.local)}
        if spec.mtu is not None:
            settings["mtu"] = spec.mtu
        try:
            ipr.link("set", index=index, **settings)
            ipr.link("set", index=index, state="up")
        except NetlinkError as error:
            raise _error(error, f"cannot set up the VXLAN link {spec.device}") from error
        if spec.address is not None:
            present = {
                (item.get_attr("IFA_ADDRESS"), item["prefixlen"])
                for item in ipr.get_addr(family=AF_INET, index=index)
            }
            if (str(spec.address.ip), spec.address.network.prefixlen) not in present:
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(spec.address.ip),
                        prefixlen=spec.address.network.prefixlen,
                        scope=253,  # RT_SCOPE_LINK: never chosen as a source for other links
                    )
                except NetlinkError as error:
                    if error.code != EEXIST:
                        raise _error(error, f"cannot add {spec.address} to {spec.device}") from error
            # Loose reverse-path filtering: a pod's address is routed back through the CNI,
            # not through this link (the effective value is the larger of this and "all").
            _write_sysctl(spec.device, "rp_filter", "2")
        mtu = int(ipr.get_links(index)[0].get_attr("IFLA_MTU"))
    return index, mtu


def remove_tunnel(device: str) -> bool:
    """Delete the link if it is egresscore's; returns whether it was removed."""
    state = tunnel_state(device)
    if state is None or not state["ours"]:
        return False
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=state["index"])
        except NetlinkError as error:
            if error.code == ENODEV:
                return False
            raise _error(error, f"cannot remove the tunnel link {device}") from error
    return True


def set_peers(device: str, endpoints: Iterable[ipaddress.IPv4Address]) -> None:
    """Neighbour and forwarding entries on the link for exactly ``endpoints``."""
    wanted = {ipaddress.IPv4Address(e) for e in endpoints}
    with IPRoute() as ipr:
        index = interface_index(ipr, device)
        macs = {vtep_mac(e): e for e in wanted}
        present_fdb = {
            (entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST"))
            for entry in ipr.fdb("dump", ifindex=index)
            if entry.get_attr("NDA_DST")
        }
        for mac, endpoint in macs.items():
            if (mac, str(endpoint)) not in present_fdb:
                try:
                    ipr.fdb("append", ifindex=index, lladdr=mac, dst=str(endpoint), state=NUD_PERMANENT)
                except NetlinkError as error:
                    if error.code != EEXIST:
                        raise _error(error, f"cannot add the tunnel entry for {endpoint}") from error
        for mac, destination in present_fdb:
            if mac.startswith("0a:ec:") and mac not in macs:
                with contextlib.suppress(NetlinkError):
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=destination)
        present_neighbours = {
            entry.get_attr("NDA_DST") for entry in ipr.get_neighbours(ifindex=index, family=AF_INET)
        }
        for endpoint in wanted:
            try:
                ipr.neigh(
                    "replace",
                    dst=str(endpoint),
                    lladdr=vtep_mac(endpoint),
                    ifindex=index,
                    state=NUD_PERMANENT,
                )
            except NetlinkError as error:
                raise _error(error, f"cannot add the neighbour entry for {endpoint}") from error
        for address in present_neighbours - {str(e) for e in wanted}:
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", dst=address, ifindex=index)


def set_slot(route: SlotRoute, device: str) -> None:
    """The table and the rule of one gateway's slot, made to be exactly ``route``."""
    with IPRoute() as ipr:
        index = interface_index(ipr, device)
        try:
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                gateway=str(route.endpoint),
                oif=index,
                table=route.table,
                flags=RTNH_F_ONLINK,
            )
            ipr.route("replace", dst=f"{route.endpoint}/32", type="throw", table=route.table)
        except NetlinkError as error:
            raise _error(
                error, f"cannot route table {route.table} into {device} via {route.endpoint}"
            ) from error
        # Stale throw routes of an endpoint this table served before.
        for entry in ipr.get_routes(table=route.table, family=AF_INET):
            if entry["type"] == 9 and entry.get_attr("RTA_DST") != str(route.endpoint):  # RTN_THROW
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=f"{entry.get_attr('RTA_DST')}/{entry['dst_len']}", type="throw",
                              table=route.table)  # fmt: skip
        rules = [
            rule
            for rule in ipr.get_rules(family=AF_INET)
            if rule.get_attr("FRA_PRIORITY") == route.priority
            and rule.get_attr("FRA_FWMARK") == route.mark
            and rule.get_attr("FRA_FWMASK") == route.mask
        ]
        if not any(rule.get_attr("FRA_TABLE") == route.table for rule in rules):
            try:
                ipr.rule(
                    "add", fwmark=route.mark, fwmask=route.mask, table=route.table, priority=route.priority
                )
            except NetlinkError as error:
                if error.code != EEXIST:
                    raise _error(error, f"cannot add the rule for mark 0x{route.mark:x}") from error


FR_ACT_BLACKHOLE = "FR_ACT_BLACKHOLE"  # include/uapi/linux/fib_rules.h
MAIN_TABLE = 254  # RT_TABLE_MAIN


def _guard_rules(priority: int, flag: int) -> list[dict[str, Any]]:
    return [
        {"fwmark": flag, "fwmask": flag, "iifname": "lo", "table": MAIN_TABLE, "priority": priority + 1},
        {"fwmark": flag, "fwmask": flag, "action": FR_ACT_BLACKHOLE, "priority": priority + 2},
    ]


def set_guard_rules(priority: int, flag: int) -> None:
    """The two rules under the slots' (see the module's docstring), once each."""
    with IPRoute() as ipr:
        present = {
            (rule.get_attr("FRA_PRIORITY"), rule.get_attr("FRA_FWMARK"), rule.get_attr("FRA_FWMASK"))
            for rule in ipr.get_rules(family=AF_INET)
        }
        for rule in _guard_rules(priority, flag):
            if (rule["priority"], flag, flag) in present:
                continue
            try:
                ipr.rule("add", **rule)
            except NetlinkError as error:
                if error.code != EEXIST:
                    raise _error(error, f"cannot add the rule at priority {rule['priority']}") from error


def remove_guard_rules(priority: int, flag: int) -> bool:
    """Delete the two guard rules; whether there was any."""
    removed = False
    with IPRoute() as ipr:
        for rule in _guard_rules(priority, flag):
            try:
                ipr.rule("del", **rule)
            except NetlinkError:
                continue  # not there
            removed = True
    return removed


def remove_slot(route: SlotRoute) -> None:
    """Delete one slot's rule and table contents (missing pieces are not an error)."""
    with IPRoute() as ipr:
        with contextlib.suppress(NetlinkError):
            ipr.rule("del", fwmark=route.mark, fwmask=route.mask, table=route.table, priority=route.priority)
        for entry in ipr.get_routes(table=route.table, family=AF_INET):
            destination = f"{entry.get_attr('RTA_DST') or '0.0.0.0'}/{entry['dst_len']}"
            with contextlib.suppress(NetlinkError):
                ipr.route("del", table=route.table, dst=destination, type=entry["type"])


def installed_slots(priority: int, mask: int, table_base: int, slot_count: int) -> dict[int, SlotRoute]:
    """The slots the kernel has now: rules at ``priority`` with ``mask`` whose table
    is in egresscore's range, each with the endpoint its default route names."""
    found: dict[int, SlotRoute] = {}
    with IPRoute() as ipr:
        for rule in ipr.get_rules(family=AF_INET):
            table = rule.get_attr("FRA_TABLE")
            if (
                rule.get_attr("FRA_PRIORITY") != priority
                or rule.get_attr("FRA_FWMASK") != mask
                or table is None
                or not table_base <= table < table_base + slot_count
            ):
                continue
            endpoint = None
            for entry in ipr.get_routes(table=table, family=AF_INET):
                if entry["dst_len"] == 0 and entry.get_attr("RTA_GATEWAY"):
                    endpoint = ipaddress.IPv4Address(entry.get_attr("RTA_GATEWAY"))
            slot = table - table_base
            if endpoint is not None:
                found[slot] = SlotRoute(
                    slot, endpoint, table, int(rule.get_attr("FRA_FWMARK")), mask, priority
                )
            else:
                # A rule without its route (a crash between the two): the slot is free again.
                with contextlib.suppress(NetlinkError):
                    ipr.rule("del", fwmark=rule.get_attr("FRA_FWMARK"), fwmask=mask, table=table,
                             priority=priority)  # fmt: skip
    return found
