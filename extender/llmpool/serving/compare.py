"""Live against simulated: replay one workload through live servers with each policy,
then simulate the same workload on the same policies with a profile, and put the
numbers side by side (the sim-to-real check)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmpool.lab.metrics import RunSummary
from llmpool.lab.sim import RunResult, SimConfig, Simulator, make_rng
from llmpool.lab.workload import Workload
from llmpool.routing import builtin_registry
from llmpool.routing.policy import PolicyConfig, PolicyContext
from llmpool.routing.profile import PS_PER_S, Profile
from llmpool.serving.datastore import Endpoint
from llmpool.serving.replay import LiveResult, replay


@dataclass(slots=True)
class ComparisonRow:
    policy: str
    live: RunSummary | None
    sim: RunSummary | None
    live_errors: int = 0
    per_endpoint: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "live": self.live.to_dict() if self.live else None,
            "sim": self.sim.to_dict() if self.sim else None,
            "live_errors": self.live_errors,
            "per_endpoint": self.per_endpoint,
        }


def build_policy(spec: str | PolicyConfig, profile: Profile | None, seed: int) -> Any:
    ctx = PolicyContext(rng=make_rng(seed, "policy"), truth=None, profile=profile)
    return builtin_registry().build(spec if isinstance(spec, PolicyConfig) else PolicyConfig.parse(spec), ctx)


def simulate_run(workload: Workload, policy_spec: str | PolicyConfig, profile: Profile, instances: int,
                 seed: int, *, scrape_interval_s: float = 0.05) -> RunResult:  # fmt: skip
    """The simulated run of ``workload``: its summary and per-request log."""
    policy = build_policy(policy_spec, profile, seed)
    for it in workload.items:
        it.request.prediction = None
    cfg = SimConfig(instances=instances, scrape_interval_s=scrape_interval_s)
    return Simulator(profile, policy, cfg).run(workload.items)


def request_rows(policy: str, live: LiveResult | None, sim: RunResult | None) -> list[dict[str, Any]]:
    """One row per request and side (live, sim), seconds from the run's start: what
    ``llmpool replay --records`` writes, to see which requests the simulator gets wrong."""
    rows: list[dict[str, Any]] = []
    for r in live.records if live else []:
        rows.append({"policy": policy, "side": "live", "rid": r.rid, "endpoint": r.endpoint,
                     "arrival_s": round(r.arrival, 6), "ttft_s": round(r.first - r.arrival, 6),
                     "e2e_s": round(r.finish - r.arrival, 6), "prompt": r.prompt, "output": r.output,
                     "error": r.error})  # fmt: skip
    if sim is not None:
        log = sim.log
        ttft, e2e = log.ttft_s(), log.e2e_s()
        for i in range(len(log)):
            rows.append({"policy": policy, "side": "sim", "rid": log.rid[i], "endpoint": None,
                         "arrival_s": round(log.arrival[i] / PS_PER_S, 6), "ttft_s": round(float(ttft[i]), 6),
                         "e2e_s": round(float(e2e[i]), 6), "prompt": log.prompt[i],
                         "output": log.output[i], "error": ""})  # fmt: skip
    return rows


async def live_run(
    workload: Workload,
    endpoints: Sequence[Endpoint],
    policy_spec: str | PolicyConfig,
    profile: Profile | None,
    *,
    seed: int,
    model: str | None,
    time_scale: float,
    progress: Callable[[int], None] | None = None,
    scrape_interval_s: float = 0.05,
) -> LiveResult:
    policy = build_policy(policy_spec, profile, seed)
    return await replay(workload, endpoints, policy, model=model, time_scale=time_scale, seed=seed,
                        progress=progress, scrape_interval_s=scrape_interval_s)  # fmt: skip


def relative_error(sim: float, live: float) -> float:
    return (sim - live) / live if live else float("nan")


_FIELDS = (("E2E mean", "e2e_mean_s"), ("E2E p90", "e2e_p90_s"), ("TTFT mean", "ttft_mean_s"),
           ("TTFT p90", "ttft_p90_s"))  # fmt: skip


def format_table(rows: Sequence[ComparisonRow]) -> str:
    """Live and simulated side by side, with the simulator's error relative to live."""
    out = [f"{'policy':<16} {'metric':<10} {'live s':>9} {'sim s':>9} {'sim-live':>9}"]
    for row in rows:
        for label, key in _FIELDS:
            live = getattr(row.live, key) if row.live else float("nan")
            sim = getattr(row.sim, key) if row.sim else float("nan")
            err = relative_error(sim, live) * 100
            out.append(f"{row.policy:<16} {label:<10} {live:>9.3f} {sim:>9.3f} {err:>+8.1f}%")
        if row.per_endpoint is not None:
            out.append(f"{row.policy:<16} requests per endpoint: {row.per_endpoint}")
    return "\n".join(out)
