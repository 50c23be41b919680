"""``llmpool bench``: run policies on the same workloads and seeds, print, save, plot.

Every (rate, seed) pair defines one workload; every policy replays exactly that
workload with a policy RNG derived from the same seed. Results are reported as the
mean and standard deviation over seeds, and as % change against round-robin.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmpool.lab.scenarios import SCENARIOS, Scenario
from llmpool.lab.sim import SimConfig, Simulator, make_rng
from llmpool.lab.workload import Workload, load_workload
from llmpool.routing import PolicyContext, builtin_registry
from llmpool.routing.policy import ConfigError
from llmpool.routing.profile import load_profile

REFERENCE = "round-robin"


class BenchError(ValueError):
    """Bad bench arguments; ``str()`` is one line."""


def split_policies(text: str) -> list[str]:
    """Split ``--policies`` on commas outside braces: ``a,b:{"x": 1, "y": 2}`` -> 2 specs."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        depth += (ch == "{") - (ch == "}")
        cur.append(ch)
    out.append("".join(cur).strip())
    return [s for s in out if s]


def policy_config(spec: str) -> dict[str, Any]:
    """``name`` or ``name:{json params}`` -> a policy config mapping."""
    name, sep, params = spec.partition(":")
    if not sep:
        return {"name": name.strip()}
    try:
        parsed = json.loads(params)
    except json.JSONDecodeError as err:
        raise BenchError(f"policy {spec!r}: parameters are not valid JSON ({err.msg})") from None
    if not isinstance(parsed, dict):
        raise BenchError(f"policy {spec!r}: parameters must be a JSON object")
    return {"name": name.strip(), "params": parsed}


@dataclass(frozen=True, slots=True)
class BenchPlan:
    scenario: Scenario
    policies: tuple[str, ...]
    rates: tuple[float | None, ...]  # None: replay a trace at its own pace
    seeds: int
    requests: int | None
    instances: int
    workload: str
    quick: bool

    def config(self) -> dict[str, Any]:
        return {
            **self.scenario.describe(),
            "instances": self.instances,
            "workload": self.workload,
            "requests": self.requests,
            "rates": list(self.rates),
            "seeds": self.seeds,
            "policies": list(self.policies),
            "quick": self.quick,
            "sim": {"scrape_interval_s": SimConfig().scrape_interval_s, "tick_s": SimConfig().tick_s},
        }


def make_plan(
    scenario: str,
    *,
    policies: Sequence[str] | None = None,
    rate: float | None = None,
    seeds: int | None = None,
    instances: int | None = None,
    workload: str | None = None,
    requests: int | None = None,
    quick: bool = False,
) -> BenchPlan:
    """Validate the bench arguments (cheaply, before any run starts)."""
    if scenario not in SCENARIOS:
        raise BenchError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    sc = SCENARIOS[scenario]
    reg = builtin_registry()
    pols = tuple(policies) if policies is not None else sc.policies
    if not pols:
        raise BenchError("--policies is empty")
    # Build each policy once with the scenario's profile, so nested settings (a predictor's
    # parameters, a profile name) fail here, before any run starts.
    probe = PolicyContext(rng=make_rng(0, "probe"), truth=lambda rid: None, profile=load_profile(sc.profile))
    for p in pols:
        try:
            reg.build(policy_config(p), probe)
        except ConfigError as err:
            raise BenchError(str(err)) from None
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise BenchError(f"--rate must be a positive number of requests/s, got {rate}")
    if seeds is not None and seeds < 1:
        raise BenchError(f"--seeds must be >= 1, got {seeds}")
    if instances is not None and instances < 1:
        raise BenchError(f"--instances must be >= 1, got {instances}")
    if requests is not None and requests < 1:
        raise BenchError(f"--requests must be >= 1, got {requests}")
    n_inst = instances or sc.instances
    if n_inst % sc.group_size:
        raise BenchError(
            f"--instances {n_inst} is not a multiple of the scenario's barrier group size {sc.group_size}"
        )
    wl = workload or sc.workload
    is_trace = workload is not None and not _is_synthetic(workload)
    if is_trace and not Path(wl).expanduser().is_file():
        raise BenchError(f"--workload {workload}: no such file")
    rates: tuple[float | None, ...]
    if rate is not None:
        rates = (rate,)
    elif is_trace:
        rates = (None,)
    else:
        rates = sc.quick_rates if quick else sc.rates
    n = requests or ((sc.quick_requests if quick else sc.requests) if not is_trace else None)
    if is_trace and quick and n is None:
        n = sc.quick_requests
    k = seeds or (sc.quick_seeds if quick else sc.seeds)
    return BenchPlan(sc, pols, rates, k, n, n_inst, wl, quick)


def _is_synthetic(spec: str) -> bool:
    from llmpool.lab.workload import SYNTHETIC_SPECS

    return spec.removeprefix("synthetic:") in SYNTHETIC_SPECS


@dataclass(frozen=True, slots=True)
class _Job:
    policy: str
    seed: int
    rate: float | None
    plan: BenchPlan
    keep_e2e: bool


def _run_job(job: _Job) -> dict[str, Any]:
    plan = job.plan
    sc = plan.scenario
    workload = _workload(plan, job.rate, job.seed)
    profile = load_profile(sc.profile)
    if sc.engine_overrides:
        profile = profile.model_copy(update={"engine": profile.engine.with_overrides(**sc.engine_overrides)})
    truth = {it.request.id: it.output_tokens for it in workload.items}.get
    ctx = PolicyContext(rng=make_rng(job.seed, "policy"), truth=truth, profile=profile)
    policy = builtin_registry().build(policy_config(job.policy), ctx)
    cfg = SimConfig(
        instances=plan.instances, group_size=sc.group_size, engine_overrides=dict(sc.engine_overrides)
    )
    t0 = time.perf_counter()
    result = Simulator(profile, policy, cfg).run(workload.items)
    wall = time.perf_counter() - t0
    measured = workload.mean_rate()
    row: dict[str, Any] = {
        "policy": job.policy,
        "seed": job.seed,
        "rate": job.rate,  # requested rate; None = a trace at its own pace
        "measured_rate": round(measured, 4) if math.isfinite(measured) else None,
        **result.summary.to_dict(),
        "sim_wall_s": round(wall, 3),
    }
    if job.keep_e2e:
        row["_e2e"] = result.log.e2e_s().astype(np.float32)
        row["_ttft"] = result.log.ttft_s().astype(np.float32)
    return row


_WORKLOAD_CACHE: dict[tuple[str, int | None, float | None, int], Workload] = {}


def _workload(plan: BenchPlan, rate: float | None, seed: int) -> Workload:
    key = (plan.workload, plan.requests, rate, seed)
    wl = _WORKLOAD_CACHE.get(key)
    if wl is None:
        if len(_WORKLOAD_CACHE) > 4:
            _WORKLOAD_CACHE.clear()
        wl = load_workload(plan.workload, n=plan.requests, rate=rate, seed=seed)
        _WORKLOAD_CACHE[key] = wl
    return wl


def run_plan(
    plan: BenchPlan,
    *,
    jobs: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (rate, seed, policy); rows come back in a deterministic order."""
    # Load the workload once up front so a bad trace fails before any run starts.
    _workload(plan, plan.rates[0], 0)
    todo = [
        _Job(p, s, r, plan, keep_e2e=(s == 0))
        for r in plan.rates
        for s in range(plan.seeds)
        for p in plan.policies
    ]
    rows: list[dict[str, Any]] = []
    if jobs <= 1 or len(todo) == 1:
        for j in todo:
            row = _run_job(j)
            rows.append(row)
            if on_result:
                on_result(row)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for row in pool.map(_run_job, todo, chunksize=1):
                rows.append(row)
                if on_result:
                    on_result(row)
    return rows


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ---------------------------------------------------------------------------- reporting
TABLE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("e2e_mean_s", "E2E mean s", 1.0),
    ("e2e_p99_s", "E2E p99 s", 1.0),
    ("ttft_mean_s", "TTFT mean ms", 1000.0),
    ("ttft_p99_s", "TTFT p99 ms", 1000.0),
    ("tpot_mean_s", "TPOT ms", 1000.0),
    ("throughput_tok_s", "out tok/s", 1.0),
    ("throughput_window_tok_s", "tok/s (arrivals)", 1.0),
    ("preemptions", "preempt", 1.0),
    ("imbalance_gmax_mean", "imbal G*max-sum", 1.0),
    ("imbalance_gmax_arrivals_mean", "imbal (arrivals)", 1.0),
)


def rate_key(row: dict[str, Any]) -> float:
    """The load a row belongs to: its requested rate, or 0.0 for a trace at its own pace."""
    return float(row["rate"]) if row["rate"] is not None else 0.0


def rate_label(rate: float) -> str:
    return f"rate {rate:g} req/s" if rate else "trace at its own pace"


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[float, dict[str, dict[str, tuple[float, float]]]]:
    """rate -> policy -> metric -> (mean, std over seeds)."""
    out: dict[float, dict[str, dict[str, tuple[float, float]]]] = {}
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((rate_key(r), r["policy"]), []).append(r)
    for (rate, pol), rs in groups.items():
        stats: dict[str, tuple[float, float]] = {}
        for key in rs[0]:
            if key.startswith("_"):
                continue
            vals = [x[key] for x in rs]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
                continue
            if not all(math.isfinite(v) for v in vals):
                continue
            fl = [float(v) for v in vals]
            stats[key] = (statistics.fmean(fl), statistics.stdev(fl) if len(fl) > 1 else 0.0)
        out.setdefault(rate, {})[pol] = stats
    return out


def _fmt(mean: float, std: float, scale: float) -> str:
    m, s = mean * scale, std * scale
    if math.isnan(m):
        return "-"
    if m == 0 and s == 0:
        return "0"
    digits = 0 if abs(m) >= 1000 else (1 if abs(m) >= 100 else (2 if abs(m) >= 1 else 3))
    return f"{m:.{digits}f}±{s:.{digits}f}"


def format_tables(plan: BenchPlan, rows: Sequence[dict[str, Any]]) -> str:
    agg = aggregate(rows)
    lines: list[str] = []
    for rate in sorted(agg):
        by_pol = agg[rate]
        ref = by_pol.get(REFERENCE)
        lines.append(
            f"\n{plan.scenario.name}: {plan.instances} instances"
            + (f" (barrier groups of {plan.scenario.group_size})" if plan.scenario.group_size > 1 else "")
            + f", {plan.workload}, {rate_label(rate)}, {plan.seeds} seed(s), mean±std over seeds"
        )
        header = ["policy"] + [c[1] for c in TABLE_COLUMNS] + ["ΔE2E vs RR", "Δtput(arr) vs RR"]
        table = [header]
        for pol in plan.policies:
            st = by_pol.get(pol)
            if st is None:
                continue
            cells = [pol] + [_fmt(*st[key], scale) for key, _, scale in TABLE_COLUMNS]
            if ref and pol != REFERENCE:
                cells.append(_pct(st["e2e_mean_s"][0], ref["e2e_mean_s"][0]))
                cells.append(_pct(st["throughput_window_tok_s"][0], ref["throughput_window_tok_s"][0]))
            else:
                cells += ["", ""]
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for i, row in enumerate(table):
            lines.append(
                "  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row))
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(v: float, ref: float) -> str:
    if ref == 0 or math.isnan(v) or math.isnan(ref):
        return "-"
    return f"{(v - ref) / ref * 100:+.1f}%"


def to_json(plan: BenchPlan, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "scenario": plan.scenario.name,
        "config": plan.config(),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }


_MARKERS = "osD^vP*Xhp<>"


def policy_style(plan: BenchPlan, policy: str) -> dict[str, Any]:
    """One look per policy, the same in every figure of a run and distinct for up to 20
    policies (matplotlib's default cycle repeats its colours after 10)."""
    import matplotlib

    i = list(plan.policies).index(policy) if policy in plan.policies else len(plan.policies)
    return {"color": matplotlib.colormaps["tab20"](i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def plot(plan: BenchPlan, rows: Sequence[dict[str, Any]], outdir: Path) -> list[Path]:
    """Latency CDFs per policy (seed 0, each rate) and mean/p99 E2E vs load for sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    label = plan.scenario.name
    if plan.workload != plan.scenario.workload:
        label += "-" + Path(plan.workload).name.split(".")[0]
    rates = sorted({rate_key(r) for r in rows})
    for rate in rates:
        series = [r for r in rows if rate_key(r) == rate and np.size(r.get("_e2e", ())) > 0]
        if not series:
            continue  # no per-request latencies at this rate: no CDF to draw
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in series:
            for ax, key in zip(axes, ("_e2e", "_ttft"), strict=True):
                x = np.sort(r[key])
                if x.size:
                    color = policy_style(plan, r["policy"])["color"]
                    ax.plot(x, np.arange(1, x.size + 1) / x.size, color=color, label=r["policy"])
        for ax, title in zip(axes, ("E2E latency", "TTFT"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("seconds")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{title} CDF, {label}, {rate_label(rate)} (seed 0)")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{label}-cdf-{rate:g}.png" if rate else outdir / f"{label}-cdf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if len(rates) > 1:
        agg = aggregate(rows)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for pol in plan.policies:
            xs = [rt for rt in rates if pol in agg[rt]]
            for ax, key in zip(axes, ("e2e_mean_s", "e2e_p99_s"), strict=True):
                ys = [agg[rt][pol][key][0] for rt in xs]
                es = [agg[rt][pol][key][1] for rt in xs]
                ax.errorbar(xs, ys, yerr=es, capsize=3, label=pol, **policy_style(plan, pol))
        for ax, title in zip(axes, ("mean E2E", "p99 E2E"), strict=True):
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_ylabel("seconds")
            ax.set_title(f"{title} vs load, {label}")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{label}-sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if plan.scenario.group_size > 1:
            written.append(_plot_imbalance(plan, rates, agg, label, outdir))
    return written


def _plot_imbalance(
    plan: BenchPlan,
    rates: Sequence[float],
    agg: dict[float, dict[str, dict[str, tuple[float, float]]]],
    label: str,
    outdir: Path,
) -> Path:
    """DP imbalance vs load for barrier groups: over every step, and while arrivals last."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    keys = ("imbalance_gmax_mean", "imbalance_gmax_arrivals_mean")
    for pol in plan.policies:
        for ax, key in zip(axes, keys, strict=True):
            xs = [rt for rt in rates if key in agg[rt].get(pol, {})]
            ys = [agg[rt][pol][key][0] / 1000 for rt in xs]
            es = [agg[rt][pol][key][1] / 1000 for rt in xs]
            ax.errorbar(xs, ys, yerr=es, capsize=3, label=pol, **policy_style(plan, pol))
    for ax, title in zip(axes, ("every step", "steps while arrivals last (no drain)"), strict=True):
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_title(f"imbalance G·max − Σ, {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("thousand KV tokens (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle(label)
    fig.tight_layout()
    path = outdir / f"{label}-imbalance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
