"""Decision-cost micro-benchmark: time per ``decide()`` call on one core.

    python -m llmpool.lab.decision_cost [--endpoints 16,256] [--policies a,b] [--decisions 3000]

Each endpoint carries ``--active`` in-flight requests with observed progress (what policies
that look at per-request state walk), random scraped gauges, and the policy has learnt from
a few thousand completions first. Prints p50/p99/max in microseconds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from llmpool.lab.bench import policy_config, split_policies
from llmpool.routing import PolicyContext, builtin_registry
from llmpool.routing.profile import load_profile
from llmpool.routing.types import ActiveRequest, EndpointState, PoolView, Request


def _pool(n: int, active: int, rng: random.Random) -> list[EndpointState]:
    eps: list[EndpointState] = []
    rid = 1_000_000
    for i in range(n):
        reqs = []
        for _ in range(active):
            rid += 1
            r = Request(id=rid, arrival=0.0, prompt_tokens=rng.randint(20, 4000), model="m")
            reqs.append(ActiveRequest(request=r, assigned_at=0.0, generated_tokens=rng.randint(0, 800)))
        st = EndpointState(
            index=i,
            name=f"10.0.{i // 8}.1:{8000 + i % 8}",
            group=f"pod{i // 8}",
            rank=i % 8,
            running=active,
            waiting=rng.randint(0, 4),
            kv_usage=rng.random() * 0.9,
            kv_capacity_tokens=400_000,
            scraped_at=0.0,
            inflight=active,
            inflight_prompt_tokens=sum(a.request.prompt_tokens for a in reqs),
            inflight_output_tokens=sum(a.generated_tokens for a in reqs),
            prefill_pending_tokens=sum(a.request.prompt_tokens for a in reqs if a.generated_tokens == 0),
        )
        frozen = tuple(reqs)
        st._active_source = lambda frozen=frozen: frozen
        eps.append(st)
    return eps


def measure(policy_name: str, n: int, active: int, decisions: int, seed: int = 0) -> np.ndarray:
    rng = random.Random(seed)
    profile = load_profile("h100-llama3-8b")
    truth = lambda rid: 200  # noqa: E731 - lab-only oracle stand-in
    pol = builtin_registry().build(
        policy_config(policy_name), PolicyContext(rng=rng, truth=truth, profile=profile)
    )
    eps = _pool(n, active, rng)
    for k in range(2000):  # warm the predictors / learnt state
        r = Request(id=k, arrival=0.0, prompt_tokens=rng.randint(20, 2000), model="m")
        pol.on_assigned(r, k % n, 0.0)
        pol.on_completed(r, k % n, rng.randint(1, 1000), 0.0)
    times = np.empty(decisions)
    for k in range(decisions):
        r = Request(id=10_000 + k, arrival=k * 0.001, prompt_tokens=rng.randint(20, 2000), model="m")
        view = PoolView(now=k * 0.001, endpoints=eps, queue=(r,))
        t0 = time.perf_counter_ns()
        pol.decide(r, view)
        times[k] = (time.perf_counter_ns() - t0) / 1000.0
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", default="8,16,64,256")
    ap.add_argument(
        "--policies",
        default=",".join(builtin_registry().names()),
        help="comma-separated, each a name or name:{json params}",
    )
    ap.add_argument("--active", type=int, default=16, help="in-flight requests per endpoint")
    ap.add_argument("--decisions", type=int, default=3000)
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.endpoints.split(",")]
    names = split_policies(a.policies)
    width = max(16, *(len(n) for n in names))
    print(f"{'policy':{width}s} {'endpoints':>9s} {'p50 us':>9s} {'p99 us':>9s} {'max us':>9s}")
    for name in names:
        for n in sizes:
            t = measure(name, n, a.active, a.decisions)
            p50, p99 = np.percentile(t, [50, 99])
            print(f"{name:{width}s} {n:9d} {p50:9.1f} {p99:9.1f} {t.max():9.1f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
