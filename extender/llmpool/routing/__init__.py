"""The routing brain: data model, the policy interface, and the registry of policies."""

from llmpool.routing.policy import (
    ConfigError,
    NoParams,
    Policy,
    PolicyConfig,
    PolicyContext,
    PolicyParams,
    PolicyRegistry,
)
from llmpool.routing.types import (
    HOLD,
    ActiveRequest,
    Decision,
    EndpointState,
    Hold,
    LengthPrediction,
    PoolView,
    Request,
    Route,
)


def builtin_registry() -> PolicyRegistry:
    """A fresh registry holding every policy that ships with LLMPool."""
    from llmpool.rl.policy import register_rl
    from llmpool.routing.balanceroute import register_balanceroute
    from llmpool.routing.baselines import register_baselines
    from llmpool.routing.gie import register_gie
    from llmpool.routing.impact import register_impact

    reg = PolicyRegistry()
    register_baselines(reg)
    register_gie(reg)
    register_impact(reg)
    register_balanceroute(reg)
    register_rl(reg)
    return reg


__all__ = [
    "HOLD",
    "ActiveRequest",
    "ConfigError",
    "Decision",
    "EndpointState",
    "Hold",
    "LengthPrediction",
    "NoParams",
    "Policy",
    "PolicyConfig",
    "PolicyContext",
    "PolicyParams",
    "PolicyRegistry",
    "PoolView",
    "Request",
    "Route",
    "builtin_registry",
]
