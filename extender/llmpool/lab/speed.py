"""Simulator speed and memory benchmark (prints numbers; used for docs/benchmarks.md).

    python -m llmpool.lab.speed --trace ../shared/data/traces/azure2023_conv.csv

Each case runs in a fresh child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from typing import Any


def _case(
    kind: str, spec: str, n: int | None, rate: float | None, instances: int, policy: str
) -> dict[str, Any]:
    from llmpool.lab.sim import SimConfig, Simulator, make_rng
    from llmpool.lab.workload import load_workload
    from llmpool.routing import PolicyContext, builtin_registry
    from llmpool.routing.profile import load_profile

    t0 = time.perf_counter()
    wl = load_workload(spec, n=n, rate=rate, seed=0)
    t_load = time.perf_counter() - t0
    pol = builtin_registry().build(policy, PolicyContext(rng=make_rng(0, "policy")))
    sim = Simulator(load_profile("a100-llama3-8b"), pol, SimConfig(instances=instances))
    t1 = time.perf_counter()
    res = sim.run(wl.items)
    t_sim = time.perf_counter() - t1
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": kind,
        "requests": len(wl.items),
        "instances": instances,
        "policy": policy,
        "load_s": round(t_load, 3),
        "sim_s": round(t_sim, 3),
        "req_per_s": round(len(wl.items) / t_sim),
        "simulated_s": round(res.summary.makespan_s, 1),
        "peak_rss_mb": round(rss_mb),
        "e2e_mean_s": round(res.summary.e2e_mean_s, 3),
    }


def _child(q: Any, args: tuple[Any, ...]) -> None:
    q.put(_case(*args))


def run_isolated(*args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, args))
    p.start()
    out: dict[str, Any] = q.get()
    p.join()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", help="Azure 2023 conversation trace CSV (skipped if not given)")
    ap.add_argument("--million", type=int, default=1_000_000, help="size of the big synthetic run")
    ap.add_argument("--skip-million", action="store_true")
    ap.add_argument("--json", help="also write the rows as JSON")
    a = ap.parse_args(argv)
    cases: list[tuple[Any, ...]] = []
    if a.trace:
        cases.append(("azure2023_conv, own pace, 4 instances", a.trace, None, None, 4, "round-robin"))
        cases.append(("azure2023_conv, x16 rate, 64 instances", a.trace, None, 5.53 * 16, 64, "round-robin"))
    cases.append(
        ("five-task synthetic, 100 req/s, 4 instances", "five-task", 100_000, 100.0, 4, "round-robin")
    )
    cases.append(
        ("five-task synthetic, 1600 req/s, 64 instances", "five-task", 200_000, 1600.0, 64, "round-robin")
    )
    if not a.skip_million:
        cases.append(
            (
                f"five-task synthetic, {a.million} requests, 64 instances",
                "five-task",
                a.million,
                1600.0,
                64,
                "round-robin",
            )
        )
    rows = []
    print(f"{'case':50s} {'requests':>9s} {'sim s':>7s} {'req/s':>7s} {'peak RSS MB':>11s}")
    for c in cases:
        r = run_isolated(*c)
        rows.append(r)
        print(
            f"{r['case']:50s} {r['requests']:9d} {r['sim_s']:7.2f} {r['req_per_s']:7d} {r['peak_rss_mb']:11d}"
        )
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
