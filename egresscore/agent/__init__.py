"""The agent: the only layer that touches the host (docs/agent.md).

``egresscore run --role node|gateway|both --config FILE`` runs :class:`Agent`; library
users can drive the same class, or use :mod:`egresscore.core.nfqueue` directly.
"""

from egresscore.agent.config import (
    AgentConfig,
    ConfigError,
    GatewayConfig,
    RedirectConfig,
    TunnelConfig,
    check_role,
    load_config,
)
from egresscore.agent.gateway import GatewayRole, plan_gateway
from egresscore.agent.node import NodeRole, plan_node
from egresscore.agent.runner import Agent, cleanup

__all__ = [
    "Agent",
    "AgentConfig",
    "ConfigError",
    "GatewayConfig",
    "GatewayRole",
    "NodeRole",
    "RedirectConfig",
    "TunnelConfig",
    "check_role",
    "cleanup",
    "load_config",
    "plan_gateway",
    "plan_node",
]
