"""The agent's configuration file (docs/agent.md, "Configuration").

A YAML (or JSON) mapping read with ``yaml.safe_load``. Every field is checked, unknown
fields are errors, and an error names the file, the field path and what was expected,
the same way policy errors do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from egresscore.core.snat_table import DEFAULT_TIMEOUTS
from egresscore.errors import PolicyError

__all__ = ["AgentConfig", "ConfigError", "GatewayConfig", "load_config"]

# Linux interface names: at most 15 bytes, no slash, whitespace or colon (IFNAMSIZ).
_INTERFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
ROLES = ("gateway",)
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
    fail_open: bool = False
    gso: bool = True
    batch_size: int = 64
    queue_length: int = 4096
    mark: int = 0x00400000
    snapshot: bool = True
    tcp_translation: str = "kernel"


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
    for name in ("assign_egress_ips", "fail_open", "gso", "snapshot"):
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
        queues = reader.mapping(data["queues"], "gateway.queues", ("first", "count"))
        first = reader.integer(queues.get("first", 0), "gateway.queues.first", 0, 65535)
        count = reader.integer(queues.get("count", 1), "gateway.queues.count", 1, 64)
        if first + count - 1 > 65535:
            raise reader.error(
                "gateway.queues", f"queues {first}..{first + count - 1}: expected numbers up to 65535"
            )
        values["first_queue"], values["queue_count"] = first, count
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
    data = reader.mapping(raw, "", ("node", "policies", "state_dir", "gateway", "status_interval"))
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
    gateway = _gateway(reader, data.get("gateway"))
    return AgentConfig(source, node, policies, state_dir, gateway, status_interval)
