"""``llmpool predictor lab``: does the learned predictor help the workload-aware policies?

Builds a workload whose requests carry AlpacaEval prompt text and the answer lengths of one
target model, from the prompts held out of training only (the same split by prompt as
``train``), with Poisson arrivals. Then runs ``impact`` and ``brh`` in the simulator with the
``survival`` predictor, with the ``learned`` predictor and with the lab's ``oracle``, on the
same workloads and seeds, and reports how much of the gap between Survival and the oracle the
learned predictor closes: ``(survival - learned) / (survival - oracle)`` of each latency metric.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmpool.predict import PredictError
from llmpool.predict.data import Example

__all__ = ["alpaca_workload", "gap_closed", "paired_difference", "run_lab"]

METRICS = ("e2e_mean_s", "e2e_p99_s", "ttft_p99_s", "tpot_mean_s", "throughput_window_tok_s")


def alpaca_workload(examples: Sequence[Example], model: str, *, n: int, rate: float, seed: int) -> Any:
    """``n`` requests of ``model``'s answers to the given prompts, drawn with replacement."""
    from llmpool.lab.workload import Workload, WorkloadItem
    from llmpool.routing.types import Request

    rows = [e for e in examples if e.model == model]
    if not rows:
        known = sorted({e.model for e in examples})
        raise PredictError(f"no rows for target model {model!r} (some known: {', '.join(known[:5])}, ...)")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(rows), n)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    items = []
    for i, (j, t) in enumerate(zip(pick.tolist(), arrivals.tolist(), strict=True)):
        e = rows[j]
        req = Request(
            id=i,
            arrival=t,
            prompt_tokens=e.prompt_tokens,
            model=model,
            max_tokens=e.max_tokens,
            prompt_text=e.prompt,
        )
        items.append(WorkloadItem(req, max(1, e.output_tokens)))
    return Workload(f"alpaca-eval:{model}", items, f"alpaca-eval:{model}")


HIGHER_IS_BETTER = frozenset({"throughput_window_tok_s"})


def gap_closed(
    survival: float, learned: float, oracle: float, *, higher_is_better: bool = False
) -> float | None:
    """Share of the Survival-to-oracle gap the learned predictor closes.

    None when the oracle is not better than Survival on this metric (there is no gap to close).
    """
    gap = survival - oracle
    if higher_is_better:
        gap = -gap
    if not math.isfinite(gap) or gap <= 1e-9 * max(abs(survival), 1.0):
        return None
    return (survival - learned) / (survival - oracle)


def paired_difference(base: Sequence[float], other: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds of ``other - base`` run on the same workload and
    seed: the spread that says whether a difference of means is more than seed noise."""
    if len(base) != len(other) or not base:
        raise ValueError("paired_difference needs one value per seed on both sides")
    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def _variant_config(spec: dict[str, Any], variant: dict[str, Any] | None) -> dict[str, Any]:
    """A policy spec with a variant's predictor (None: the policy's ``-oracle`` twin)."""
    base = spec.get("params", {})
    if variant is None:
        return {"name": f"{spec['name']}-oracle", "params": base}
    return {"name": spec["name"], "params": {**base, **variant}}


def run_lab(
    examples: Sequence[Example],
    model: str,
    *,
    predictor_model: str,
    policies: Sequence[str],
    rate: float,
    requests: int,
    seeds: int,
    instances: int,
    profile_name: str,
    group_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (policy, predictor, seed); return per-configuration means and the gap closed.

    Each of ``policies`` is a name or ``name:{json params}`` (as ``llmpool bench`` takes them);
    the variants differ only in the predictor, set over those parameters (the oracle variant is
    the policy's ``-oracle`` twin with the same parameters)."""
    from tqdm import tqdm

    from llmpool.lab.bench import policy_config
    from llmpool.lab.sim import SimConfig, Simulator
    from llmpool.routing import builtin_registry
    from llmpool.routing.policy import PolicyContext
    from llmpool.routing.profile import load_profile

    profile = load_profile(profile_name)
    reg = builtin_registry()
    variants: dict[str, dict[str, Any] | None] = {
        "survival": {"predictor": {"name": "survival"}},
        "learned": {
            "predictor": {"name": "learned", "params": {"model": predictor_model, "on_error": "raise"}}
        },
        "oracle": None,
    }
    specs: dict[str, dict[str, Any]] = {}
    for pol in policies:  # every spec checked (with each variant's predictor) before the first run
        try:
            specs[pol] = policy_config(pol)
            for vparams in variants.values():
                reg.validate(_variant_config(specs[pol], vparams))
        except ValueError as err:  # a bad spec (BenchError) or bad parameters (ConfigError)
            raise PredictError(f"--policies: {err}") from None
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p: {v: [] for v in variants} for p in policies}
    todo = [(p, v, s) for s in range(seeds) for p in policies for v in variants]
    bar = tqdm(todo, desc="lab runs", unit="run", disable=not progress)
    for pol, var, seed in bar:
        wl = alpaca_workload(examples, model, n=requests, rate=rate, seed=seed)
        truth = {it.request.id: it.output_tokens for it in wl.items}.get
        ctx = PolicyContext(rng=random.Random(seed), truth=truth, profile=profile)
        policy = reg.build(_variant_config(specs[pol], variants[var]), ctx)
        t0 = time.perf_counter()
        res = Simulator(profile, policy, SimConfig(instances=instances, group_size=group_size)).run(wl.items)
        row = {**res.summary.to_dict(), "sim_wall_s": time.perf_counter() - t0}
        runs[pol][var].append(row)
    bar.close()
    out: dict[str, Any] = {
        "target_model": model,
        "rate": rate,
        "requests": requests,
        "seeds": seeds,
        "instances": instances,
        "group_size": group_size,
        "profile": profile_name,
        "predictor_model": predictor_model,
        "policies": {},
    }
    for pol in policies:
        means = {v: {m: float(np.mean([r[m] for r in runs[pol][v]])) for m in METRICS} for v in variants}
        base = runs[pol]["survival"]
        out["policies"][pol] = {
            "means": means,
            "per_seed": {v: {m: [float(r[m]) for r in runs[pol][v]] for m in METRICS} for v in variants},
            # learned and oracle minus survival, paired by seed: (mean, std over seeds)
            "vs_survival": {
                v: {m: paired_difference([r[m] for r in base], [r[m] for r in runs[pol][v]]) for m in METRICS}
                for v in ("learned", "oracle")
            },
            "gap_closed": {
                m: gap_closed(
                    means["survival"][m],
                    means["learned"][m],
                    means["oracle"][m],
                    higher_is_better=m in HIGHER_IS_BETTER,
                )
                for m in METRICS
            },
        }
    return out
