"""The agent: the only layer that touches the host (docs/agent.md).

``egresscore run --role gateway --config FILE`` runs :class:`GatewayAgent`; library
users can drive the same class, or use :mod:`egresscore.core.nfqueue` directly.
"""

from egresscore.agent.config import AgentConfig, ConfigError, GatewayConfig, load_config
from egresscore.agent.gateway import GatewayAgent, plan_gateway

__all__ = ["AgentConfig", "ConfigError", "GatewayAgent", "GatewayConfig", "load_config", "plan_gateway"]
