"""The agent's configuration file (docs/agent.md, "Configuration").

A YAML (or JSON) mapping read with ``yaml.safe_load``. Every field is checked, unknown
fields are errors, and an error names the file, the field path and what was expected,
the same way policy errors do.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from egresscore.core.snat_table import DEFAULT_TIMEOUTS
from egresscore.errors import PolicyError

__all__ = [
    "AgentConfig",
    "ConfigError",
    "GatewayConfig",
    "RedirectConfig",
    "TunnelConfig",
    "load_config",
]

# Linux interface names: at most 15 bytes, no slash, whitespace or colon (IFNAMSIZ).
_INTERFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
# iptables -i patterns: an interface name, or a prefix ending in "+" (cali+, lxc+).
_INTERFACE_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,14}\+?$|^[A-Za-z0-9_.@-]{15}$")
ROLES = ("node", "gateway", "both")
# closed: while no agent answers, selected flows are dropped (no queue bypass, no
# fail-open), and a stop leaves the rules in place; open: traffic flows untranslated
# rather than not at all, and a stop removes everything.
FAILURE_MODES = ("closed", "open")
UNKNOWN_SOURCES = ("drop", "pass")
# The gateway's tunnel link needs an address of its own (reverse-path filtering drops
# packets arriving on a link without one); a link-local one (RFC 3927) is never routed.
DEFAULT_TUNNEL_ADDRESS = ipaddress.IPv4Interface("169.254.236.1/32")
# How TCP flows are translated: "kernel" hands each flow to the kernel's conntrack with
# the source NAT the SNAT table chose; "queue" rewrites every packet in user space.
TCP_TRANSLATIONS = ("kernel", "queue")


class ConfigError(PolicyError):
    """The agent's configuration file is invalid (``path`` names the field)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """How the gateway role programs its host and runs its queues."""

    interface: str | None = None
    assign_egress_ips: bool = True
    ingress_interfaces: tuple[str, ...] = ()
    first_queue: int = 0
    queue_count: int = 1
    port_range: tuple[int, int] = (1024, 65535)
    max_entries: int = 262144
    timeouts: Mapping[str, float] = field(default_factory=dict)
    gso: bool = True
    batch_size: int = 64
    queue_length: int = 4096
    mark: int = 0x00400000
    snapshot: bool = True
    tcp_translation: str = "kernel"

    def mark_bits(self) -> int:
        """The three consecutive mark bits the gateway's rules use."""
        return self.mark * 7


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """The VXLAN link between nodes and gateways (the same on every node)."""

    device: str = "egc.vx"
    underlay_interface: str | None = None
    local_address: ipaddress.IPv4Address | None = None
    vni: int = 3692
    port: int = 4789
    mtu: int | None = None
    address: ipaddress.IPv4Interface | None = DEFAULT_TUNNEL_ADDRESS
    endpoints: Mapping[str, ipaddress.IPv4Address] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """How the node role queues, marks and routes its pods' flows."""

    pod_interfaces: tuple[str, ...] = ()
    first_queue: int = 100
    queue_count: int = 1
    batch_size: int = 64
    queue_length: int = 4096
    mark_mask: int = 0x7E000000
    route_table_base: int = 2100
    rule_priority: int = 100
    unknown_sources: str = "drop"
    mss_clamp: bool = True

    def mark_shift(self) -> int:
        return (self.mark_mask & -self.mark_mask).bit_length() - 1

    def mark_width(self) -> int:
        return self.mark_mask.bit_count()

    def slot_count(self) -> int:
        """Gateway tunnels this node can route at once: the values of the field with
        its top bit set (the top bit tells the nat rule a flow is redirected)."""
        return 1 << (self.mark_width() - 1)

    def redirect_flag(self) -> int:
        return 1 << (self.mark_shift() + self.mark_width() - 1)

    def pass_value(self) -> int:
        return 1 << self.mark_shift()

    def local_value(self) -> int:
        return 2 << self.mark_shift()

    def slot_value(self, slot: int) -> int:
        return self.redirect_flag() | (slot << self.mark_shift())


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``egresscore run`` needs: which node this is, the policy and endpoint
    files, where to keep state, and the settings of each role."""

    source: str
    node: str
    policies: tuple[Path, ...]
    state_dir: Path
    gateway: GatewayConfig
    status_interval: float = 1.0
    reload_interval: float = 1.0
    failure_mode: str = "closed"
    tunnel: TunnelConfig | None = None
    redirect: RedirectConfig = field(default_factory=RedirectConfig)

    @property
    def fail_closed(self) -> bool:
        return self.failure_mode == "closed"


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, path=path)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.error(
                    f"{path}.{key}" if path else str(key),
                    f"unknown field: expected one of {', '.join(allowed)}",
                )
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(path, f"expected a non-empty string, got {value!r}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {value!r}")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(path, f"expected an integer from {low} to {high}, got {value!r}")
        return value

    def number(self, value: Any, path: str, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise self.error(path, f"expected a number from {low} to {high}, got {value!r}")
        return float(value)

    def interface(self, value: Any, path: str) -> str:
        name = self.string(value, path)
        if not _INTERFACE.match(name):
            raise self.error(path, f"{name!r} is not an interface name: expected 1-15 of A-Z a-z 0-9 _ . @ -")
        return name

    def interface_pattern(self, value: Any, path: str) -> str:
        name = self.string(value, path)
        if not _INTERFACE_PATTERN.match(name) or name == "+":
            raise self.error(
                path,
                f"{name!r} is not an interface name or prefix: expected 1-15 of A-Z a-z 0-9 _ . @ -, "
                "optionally ending in + (cali+ matches every interface starting with cali)",
            )
        return name

    def ipv4(self, value: Any, path: str) -> ipaddress.IPv4Address:
        text = self.string(value, path)
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            raise self.error(path, f"{text!r} is not an IPv4 address") from None

    def choice(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(path, f"{value!r}: expected one of {', '.join(choices)}")
        return str(value)

    def queues(self, value: Any, path: str, default_first: int) -> tuple[int, int]:
        queues = self.mapping(value, path, ("first", "count"))
        first = self.integer(queues.get("first", default_first), f"{path}.first", 0, 65535)
        count = self.integer(queues.get("count", 1), f"{path}.count", 1, 64)
        if first + count - 1 > 65535:
            raise self.error(path, f"queues {first}..{first + count - 1}: expected numbers up to 65535")
        return first, count


def _gateway(reader: _Reader, raw: Any) -> GatewayConfig:
    fields = (
        "interface",
        "assign_egress_ips",
        "ingress_interfaces",
        "queues",
        "port_range",
        "max_entries",
        "timeouts",
        "fail_open",
        "gso",
        "batch_size",
        "queue_length",
        "mark",
        "snapshot",
        "tcp_translation",
    )
    data = reader.mapping(raw if raw is not None else {}, "gateway", fields)
    values: dict[str, Any] = {}
    if "interface" in data:
        values["interface"] = reader.interface(data["interface"], "gateway.interface")
    if "fail_open" in data:
        raise reader.error(
            "gateway.fail_open", "moved: the top-level failure_mode (closed or open) sets it for every role"
        )
    for name in ("assign_egress_ips", "gso", "snapshot"):
        if name in data:
            values[name] = reader.boolean(data[name], f"gateway.{name}")
    if "ingress_interfaces" in data:
        items = data["ingress_interfaces"]
        if not isinstance(items, list):
            raise reader.error("gateway.ingress_interfaces", "expected a list of interface names")
        values["ingress_interfaces"] = tuple(
            reader.interface(item, f"gateway.ingress_interfaces[{i}]") for i, item in enumerate(items)
        )
    if "queues" in data:
        values["first_queue"], values["queue_count"] = reader.queues(data["queues"], "gateway.queues", 0)
    if "port_range" in data:
        pair = data["port_range"]
        if not (isinstance(pair, list) and len(pair) == 2):
            raise reader.error("gateway.port_range", f"expected [low, high], got {pair!r}")
        low = reader.integer(pair[0], "gateway.port_range[0]", 1, 65535)
        high = reader.integer(pair[1], "gateway.port_range[1]", low, 65535)
        values["port_range"] = (low, high)
    if "max_entries" in data:
        values["max_entries"] = reader.integer(data["max_entries"], "gateway.max_entries", 1, 2**31)
    if "timeouts" in data:
        timeouts = reader.mapping(data["timeouts"], "gateway.timeouts", tuple(DEFAULT_TIMEOUTS))
        values["timeouts"] = {
            key: reader.number(value, f"gateway.timeouts.{key}", 0.001, 4_000_000.0)
            for key, value in timeouts.items()
        }
    if "batch_size" in data:
        values["batch_size"] = reader.integer(data["batch_size"], "gateway.batch_size", 1, 1024)
    if "queue_length" in data:
        values["queue_length"] = reader.integer(data["queue_length"], "gateway.queue_length", 1, 1_000_000)
    if "mark" in data:
        mark = reader.integer(data["mark"], "gateway.mark", 1, 0x20000000)
        if mark & (mark - 1):
            raise reader.error("gateway.mark", f"0x{mark:x}: expected a single bit (a power of two)")
        values["mark"] = mark
    if "tcp_translation" in data:
        mode = data["tcp_translation"]
        if mode not in TCP_TRANSLATIONS:
            raise reader.error(
                "gateway.tcp_translation", f"{mode!r}: expected one of {', '.join(TCP_TRANSLATIONS)}"
            )
        values["tcp_translation"] = mode
    config = GatewayConfig(**values)
    low, high = config.port_range
    if high - low + 1 < config.queue_count:
        raise reader.error(
            "gateway.port_range",
            f"{high - low + 1} ports cannot be split among {config.queue_count} queues: "
            "expected at least one port per queue",
        )
    return config


def _tunnel(reader: _Reader, raw: Any) -> TunnelConfig:
    fields = ("device", "underlay_interface", "local_address", "vni", "port", "mtu", "address", "endpoints")
    data = reader.mapping(raw if raw is not None else {}, "tunnel", fields)
    values: dict[str, Any] = {}
    for name in ("device", "underlay_interface"):
        if name in data:
            values[name] = reader.interface(data[name], f"tunnel.{name}")
    if "local_address" in data:
        values["local_address"] = reader.ipv4(data["local_address"], "tunnel.local_address")
    if "vni" in data:
        # RFC 7348: the VXLAN Network Identifier is 24 bits.
        values["vni"] = reader.integer(data["vni"], "tunnel.vni", 1, 2**24 - 1)
    if "port" in data:
        values["port"] = reader.integer(data["port"], "tunnel.port", 1, 65535)
    if "mtu" in data:
        values["mtu"] = reader.integer(data["mtu"], "tunnel.mtu", 576, 65485)
    if "address" in data:
        if data["address"] is None:
            values["address"] = None
        else:
            text = reader.string(data["address"], "tunnel.address")
            try:
                values["address"] = ipaddress.IPv4Interface(text)
            except ValueError:
                raise reader.error(
                    "tunnel.address",
                    f"{text!r}: expected an IPv4 address with its prefix, like 169.254.236.1/32",
                ) from None
    if "endpoints" in data:
        endpoints = data["endpoints"]
        if not isinstance(endpoints, dict):
            raise reader.error(
                "tunnel.endpoints", "expected a mapping of gateway node names to IPv4 addresses"
            )
        values["endpoints"] = {
            reader.string(name, "tunnel.endpoints"): reader.ipv4(address, f"tunnel.endpoints.{name}")
            for name, address in endpoints.items()
        }
    return TunnelConfig(**values)


def _redirect(reader: _Reader, raw: Any) -> RedirectConfig:
    fields = (
        "pod_interfaces",
        "queues",
        "batch_size",
        "queue_length",
        "mark_mask",
        "route_table_base",
        "rule_priority",
        "unknown_sources",
        "mss_clamp",
    )
    data = reader.mapping(raw if raw is not None else {}, "redirect", fields)
    values: dict[str, Any] = {}
    if "pod_interfaces" in data:
        items = data["pod_interfaces"]
        if not isinstance(items, list) or not items:
            raise reader.error(
                "redirect.pod_interfaces", "expected a non-empty list of interface names or prefixes (cali+)"
            )
        values["pod_interfaces"] = tuple(
            reader.interface_pattern(item, f"redirect.pod_interfaces[{i}]") for i, item in enumerate(items)
        )
    if "queues" in data:
        values["first_queue"], values["queue_count"] = reader.queues(data["queues"], "redirect.queues", 100)
    if "batch_size" in data:
        values["batch_size"] = reader.integer(data["batch_size"], "redirect.batch_size", 1, 1024)
    if "queue_length" in data:
        values["queue_length"] = reader.integer(data["queue_length"], "redirect.queue_length", 1, 1_000_000)
    if "mark_mask" in data:
        mask = reader.integer(data["mark_mask"], "redirect.mark_mask", 1, 0xFFFFFFFF)
        low = mask & -mask
        contiguous = ((mask + low) & mask) == 0
        if not contiguous or mask.bit_count() < 3:
            raise reader.error(
                "redirect.mark_mask",
                f"0x{mask:x}: expected at least 3 contiguous bits (pass, this node's gateway, and a "
                "top bit for the gateways' tunnels)",
            )
        values["mark_mask"] = mask
    if "route_table_base" in data:
        # Tables 253-255 are the kernel's default, main and local; 0 is unspecified.
        values["route_table_base"] = reader.integer(
            data["route_table_base"], "redirect.route_table_base", 256, 2**31 - 65536
        )
    if "rule_priority" in data:
        values["rule_priority"] = reader.integer(data["rule_priority"], "redirect.rule_priority", 1, 32765)
    if "unknown_sources" in data:
        values["unknown_sources"] = reader.choice(
            data["unknown_sources"], "redirect.unknown_sources", UNKNOWN_SOURCES
        )
    if "mss_clamp" in data:
        values["mss_clamp"] = reader.boolean(data["mss_clamp"], "redirect.mss_clamp")
    return RedirectConfig(**values)


def check_role(config: AgentConfig, role: str) -> None:
    """Raise :class:`ConfigError` when ``config`` lacks what ``role`` needs."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: expected one of {', '.join(ROLES)}", source=config.source)
    if role in ("node", "both"):
        if config.tunnel is None or config.tunnel.underlay_interface is None:
            raise ConfigError(
                "required for the node role: the interface the tunnel to the gateways runs over",
                source=config.source,
                path="tunnel.underlay_interface",
            )
        if not config.redirect.pod_interfaces:
            raise ConfigError(
                "required for the node role: the interfaces local pods' packets arrive on "
                "(a CNI bridge like cni0, or a prefix like cali+)",
                source=config.source,
                path="redirect.pod_interfaces",
            )
    if role in ("gateway", "both") and config.tunnel is not None and config.tunnel.address is None:
        raise ConfigError(
            "a gateway's tunnel link needs an address: reverse-path filtering drops packets that arrive on a "
            "link without one; expected an address with its prefix, like 169.254.236.1/32",
            source=config.source,
            path="tunnel.address",
        )
    if role == "both":
        overlap = config.redirect.mark_mask & config.gateway.mark_bits()
        if overlap:
            raise ConfigError(
                f"redirect.mark_mask 0x{config.redirect.mark_mask:x} and the gateway's mark bits "
                f"0x{config.gateway.mark_bits():x} share 0x{overlap:x}: expected separate bits",
                source=config.source,
                path="redirect.mark_mask",
            )
        redirect, gateway = config.redirect, config.gateway
        first, last = redirect.first_queue, redirect.first_queue + redirect.queue_count - 1
        if first <= gateway.first_queue + gateway.queue_count - 1 and gateway.first_queue <= last:
            raise ConfigError(
                f"redirect.queues {first}..{last} overlap gateway.queues: expected separate queue numbers",
                source=config.source,
                path="redirect.queues",
            )


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and check the configuration file at ``path``.

    Relative paths inside it (policy files, the state directory) are relative to the
    file's own directory. Raises :class:`ConfigError` with the field at fault.
    """
    source = os.fspath(path)
    reader = _Reader(source)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the configuration: {error.strerror}", source=source) from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text: {error.reason} at byte {error.start}", source=source) from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(
            f"{where}not valid YAML: {getattr(error, 'problem', error)}", source=source
        ) from None
    data = reader.mapping(
        raw,
        "",
        (
            "node",
            "policies",
            "state_dir",
            "status_interval",
            "reload_interval",
            "failure_mode",
            "tunnel",
            "redirect",
            "gateway",
        ),
    )
    base = Path(source).resolve().parent
    if "node" not in data:
        raise reader.error("node", "required: the name of this node in the inventory")
    node = reader.string(data["node"], "node")
    files = data.get("policies")
    if not isinstance(files, list) or not files:
        raise reader.error("policies", "required: a non-empty list of policy and inventory files")
    policies = tuple(base / reader.string(item, f"policies[{i}]") for i, item in enumerate(files))
    state_dir = base / reader.string(data.get("state_dir", "/run/egresscore"), "state_dir")
    status_interval = reader.number(data.get("status_interval", 1.0), "status_interval", 0.1, 3600.0)
    reload_interval = reader.number(data.get("reload_interval", 1.0), "reload_interval", 0.0, 3600.0)
    failure_mode = reader.choice(data.get("failure_mode", "closed"), "failure_mode", FAILURE_MODES)
    gateway = _gateway(reader, data.get("gateway"))
    tunnel = _tunnel(reader, data["tunnel"]) if "tunnel" in data else None
    redirect = _redirect(reader, data.get("redirect"))
    return AgentConfig(
        source,
        node,
        policies,
        state_dir,
        gateway,
        status_interval=status_interval,
        reload_interval=reload_interval,
        failure_mode=failure_mode,
        tunnel=tunnel,
        redirect=redirect,
    )
