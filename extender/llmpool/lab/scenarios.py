"""Named lab scenarios: a pool, a workload and a load sweep that answer one question."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BASELINES: tuple[str, ...] = (
    "round-robin",
    "random",
    "least-requests",
    "jsq",
    "p2c",
    "least-kv",
    "gie-default",
)
WORKLOAD_AWARE: tuple[str, ...] = ("impact", "br0", "brh")
ORACLES: tuple[str, ...] = ("impact-oracle", "brh-oracle")  # lab only: the ceilings
DEFAULT_POLICIES: tuple[str, ...] = BASELINES + WORKLOAD_AWARE


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    question: str
    profile: str
    instances: int
    workload: str  # a synthetic spec name (see llmpool.lab.workload.SYNTHETIC_SPECS)
    requests: int
    rates: tuple[float, ...]  # the load sweep, requests/s
    quick_requests: int
    quick_rates: tuple[float, ...]
    group_size: int = 1
    seeds: int = 5
    quick_seeds: int = 2
    policies: tuple[str, ...] = DEFAULT_POLICIES
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "question": self.question,
            "profile": self.profile,
            "instances": self.instances,
            "group_size": self.group_size,
            "workload": self.workload,
            "requests": self.requests,
            "rates": list(self.rates),
            "engine_overrides": dict(self.engine_overrides),
        }


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="paper-a",
            question=(
                "Paper (a)'s setting: 4 independent replicas (A100 / Llama-3-8B) serving the "
                "five-task mix, swept from light load to overload."
            ),
            profile="a100-llama3-8b",
            instances=4,
            workload="five-task",
            requests=4000,
            rates=(40.0, 80.0, 120.0, 160.0, 200.0, 240.0, 280.0, 320.0, 400.0),
            quick_requests=1500,
            quick_rates=(80.0, 160.0),
        ),
        Scenario(
            name="balanceroute",
            question=(
                "BalanceRoute's setting: one data-parallel barrier group of G=8 ranks "
                "(H100 / Llama-3-8B profile) with conversation-like lengths; every step waits "
                "for the most loaded rank."
            ),
            profile="h100-llama3-8b",
            instances=8,
            group_size=8,
            workload="conversation",
            requests=3000,
            rates=(4.0, 6.0, 8.0, 10.0, 12.0),
            quick_requests=800,
            quick_rates=(6.0,),
        ),
        Scenario(
            name="gie",
            question=(
                "The Gateway API Inference Extension's home ground: 8 independent replicas "
                "(H100 / Llama-3-8B) with prefix caching, a chat workload sharing system "
                "prompts and documents."
            ),
            profile="h100-llama3-8b",
            instances=8,
            workload="prefix-sharing",
            requests=6000,
            rates=(40.0, 80.0, 120.0, 160.0),
            quick_requests=2000,
            quick_rates=(120.0,),
        ),
    )
}
