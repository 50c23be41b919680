"""``llmpool predictor lab``: does the learned predictor help the workload-aware policies?

For each target model, builds a workload whose requests carry AlpacaEval prompt text and that
model's answer lengths, from the prompts held out of training only (the same split by prompt as
``train``), with Poisson arrivals. Then runs ``impact`` and ``brh`` in the simulator with the
``survival`` predictor, with each learned model and with the lab's ``oracle``, on the same
workloads and seeds, and reports how much of the gap between Survival and the oracle each
learned model closes: ``(survival - learned) / (survival - oracle)`` of each latency metric,
per target and pooled over the targets.

With ``shuffled``, each learned model also runs as a control, ``shuffled:<model>``: the same
model answering every request as if it carried another prompt of the same workload (a fixed
random one per request). Its predictions have the same distribution and say nothing about the
request, so a policy that gains as much with them as with the real ones is not gaining from
what the model knows.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from llmpool.predict import PredictError
from llmpool.predict.data import Example
from llmpool.routing.predictors import LengthPredictor
from llmpool.routing.types import LengthPrediction, Request

__all__ = [
    "ShuffledPrompts",
    "alpaca_workload",
    "gap_closed",
    "learned_variant",
    "paired_difference",
    "pooled_gap",
    "pooled_gap_interval",
    "run_lab",
    "shuffled_variant",
    "target_rates",
]

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


def learned_variant(model: str) -> str:
    """The variant name of a learned model in the results: ``learned:<model as given>``."""
    return f"learned:{model}"


def shuffled_variant(model: str) -> str:
    """The variant name of a learned model's shuffled-prompt control: ``shuffled:<model>``."""
    return f"shuffled:{model}"


class ShuffledPrompts(LengthPredictor):
    """The lab's control: ``inner`` answers each request as if it carried another of
    ``prompts`` (``(text, prompt tokens)``, one fixed random choice per request id and seed).

    Everything else about the request (id, model, ``max_tokens``, its age) is its own, so the
    inner predictor's caches and online correction work as usual."""

    name = "shuffled"

    def __init__(self, inner: LengthPredictor, prompts: Sequence[tuple[str | None, int]], seed: int) -> None:
        if not prompts:
            raise PredictError("shuffled control: no prompts to draw from")
        self.inner = inner
        self.bucket_edges = inner.bucket_edges
        self._prompts = prompts
        self._seed = seed
        self._as: dict[int, Request] = {}

    def _other(self, request: Request) -> Request:
        r = self._as.get(request.id)
        if r is None:
            pick = random.Random(self._seed * 1_000_003 + request.id).randrange(len(self._prompts))
            text, tokens = self._prompts[pick]
            r = self._as[request.id] = dataclasses.replace(
                request, prompt_text=text, prompt_tokens=tokens, prediction=None
            )
        return r

    def predict(self, request: Request) -> LengthPrediction:
        return self.inner.predict(self._other(request))

    def fallback_reason(self) -> str | None:
        return self.inner.fallback_reason()

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        return self.inner.termination(self._other(request), age, horizon)

    def expected_remaining(self, request: Request, age: int) -> float:
        return self.inner.expected_remaining(self._other(request), age)

    def observe(self, request: Request, output_tokens: int) -> None:
        self.inner.observe(self._other(request), output_tokens)
        self._as.pop(request.id, None)


def target_rates(
    examples: Sequence[Example], targets: Sequence[str], *, rate: float | None, load: float | None
) -> list[tuple[str, float]]:
    """``(target, arrivals per second)``: ``rate`` for every target, or, with ``load`` (output
    tokens per second), ``load`` over the mean answer length of each target's rows, so that
    targets with short and long answers are offered the same decode work."""
    if (rate is None) == (load is None):
        raise PredictError("give exactly one of rate and load")
    for name, value in (("--rate", rate), ("--load", load)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PredictError(f"{name} must be a positive number, got {value}")
    out = []
    for t in targets:
        if load is None:
            assert rate is not None
            out.append((t, rate))
            continue
        lengths = [max(1, e.output_tokens) for e in examples if e.model == t]
        if not lengths:
            known = sorted({e.model for e in examples})
            raise PredictError(f"no rows for target model {t!r} (some known: {', '.join(known[:5])}, ...)")
        out.append((t, load / float(np.mean(lengths))))
    return out


def run_lab(
    examples: Sequence[Example],
    targets: Sequence[tuple[str, float]],
    *,
    predictor_models: Sequence[str],
    policies: Sequence[str],
    requests: int,
    seeds: int,
    instances: int,
    profile_name: str,
    group_size: int = 1,
    learned_params: Mapping[str, Any] | None = None,
    shuffled: bool = False,
    baselines: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run every (target, policy, predictor, seed); per target and policy, the means, the
    paired differences against Survival and the gap each learned model closes; across targets,
    the pooled gap (see :func:`pooled_gap`).

    ``targets`` are ``(target model, arrivals per second)``. Each of ``policies`` is a name or
    ``name:{json params}`` (as ``llmpool bench`` takes them); the variants differ only in the
    predictor, set over those parameters: ``survival``, one ``learned:<model>`` per entry of
    ``predictor_models`` (``learned_params``, e.g. ``encoder_max_length``, are more parameters
    of its predictor), with ``shuffled`` one ``shuffled:<model>`` control per model (see
    :class:`ShuffledPrompts`), and ``oracle`` (the policy's ``-oracle`` twin, same parameters).

    ``baselines`` are more policies (name or ``name:{json params}``) run once per target and
    seed as they are, with no predictor variants, on the same workloads: per target their means
    and their paired difference against each policy's ``survival`` variant."""
    from tqdm import tqdm

    from llmpool.lab.bench import policy_config
    from llmpool.lab.sim import SimConfig, Simulator
    from llmpool.routing import builtin_registry
    from llmpool.routing.policy import PolicyContext
    from llmpool.routing.profile import load_profile

    if not predictor_models:
        raise PredictError("no learned model to run")
    if len(set(predictor_models)) != len(predictor_models):
        raise PredictError(f"a learned model is given twice: {', '.join(predictor_models)}")
    extra = dict(learned_params or {})
    for key in ("model", "on_error"):
        if key in extra:
            raise PredictError(f"learned parameters: {key!r} is set by the lab, not here")
    profile = load_profile(profile_name)
    reg = builtin_registry()
    variants: dict[str, dict[str, Any] | None] = {"survival": {"predictor": {"name": "survival"}}}
    for m in predictor_models:
        variants[learned_variant(m)] = {
            "predictor": {"name": "learned", "params": {**extra, "model": m, "on_error": "raise"}}
        }
    variants["oracle"] = None
    learned = [learned_variant(m) for m in predictor_models]
    if shuffled:
        del variants["oracle"]  # re-added last, after the controls
        for m in predictor_models:
            variants[shuffled_variant(m)] = variants[learned_variant(m)]
        variants["oracle"] = None
        learned += [shuffled_variant(m) for m in predictor_models]
    specs: dict[str, dict[str, Any]] = {}
    for pol in policies:  # every spec checked (with each variant's predictor) before the first run
        try:
            specs[pol] = policy_config(pol)
            for v in ("survival", "oracle"):
                reg.validate(_variant_config(specs[pol], variants[v]))
        except ValueError as err:  # a bad spec (BenchError) or bad parameters (ConfigError)
            raise PredictError(f"--policies: {err}") from None
        try:
            for v in learned:
                reg.validate(_variant_config(specs[pol], variants[v]))
        except ValueError as err:
            raise PredictError(f"learned parameters: {err}") from None
    base_specs: dict[str, dict[str, Any]] = {}
    for b in baselines:
        try:
            base_specs[b] = policy_config(b)
            reg.validate(base_specs[b])
        except ValueError as err:
            raise PredictError(f"--baselines: {err}") from None
    if len(base_specs) != len(baselines):
        raise PredictError(f"--baselines: a policy is given twice: {', '.join(baselines)}")
    workloads = {  # built (and checked) before the first run, one per target and seed
        (t, seed): alpaca_workload(examples, t, n=requests, rate=r, seed=seed)
        for t, r in targets
        for seed in range(seeds)
    }
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    todo: list[tuple[str, str, str | None, int]] = [
        (t, p, v, s) for t, _ in targets for s in range(seeds) for p in policies for v in variants
    ]
    todo += [(t, b, None, s) for t, _ in targets for s in range(seeds) for b in baselines]
    base_runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    bar = tqdm(todo, desc="lab runs", unit="run", disable=not progress)
    for target, pol, var, seed in bar:
        wl = workloads[(target, seed)]
        truth = {it.request.id: it.output_tokens for it in wl.items}.get
        ctx = PolicyContext(rng=random.Random(seed), truth=truth, profile=profile)
        if var is None:  # a baseline, as it is
            policy = reg.build(base_specs[pol], ctx)
        else:
            policy = reg.build(_variant_config(specs[pol], variants[var]), ctx)
        if var is not None and var.startswith("shuffled:"):
            inner = getattr(policy, "predictor", None)
            if not isinstance(inner, LengthPredictor):
                raise PredictError(f"policy {pol!r} has no length predictor to run the shuffled control on")
            prompts = [(it.request.prompt_text, it.request.prompt_tokens) for it in wl.items]
            policy.predictor = ShuffledPrompts(inner, prompts, seed)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        res = Simulator(profile, policy, SimConfig(instances=instances, group_size=group_size)).run(wl.items)
        row = {**res.summary.to_dict(), "sim_wall_s": time.perf_counter() - t0}
        if var is None:
            base_runs.setdefault((target, pol), []).append(row)
        else:
            runs.setdefault((target, pol, var), []).append(row)
    bar.close()
    out: dict[str, Any] = {
        "requests": requests,
        "seeds": seeds,
        "instances": instances,
        "group_size": group_size,
        "profile": profile_name,
        "predictor_models": list(predictor_models),
        "learned_params": extra,
        "targets": {},
    }
    for target, rate in targets:
        per: dict[str, Any] = {"rate": rate, "policies": {}}
        for pol in policies:
            rows = {v: runs[(target, pol, v)] for v in variants}
            means = {v: {m: float(np.mean([r[m] for r in rows[v]])) for m in METRICS} for v in variants}
            base = rows["survival"]
            per["policies"][pol] = {
                "means": means,
                "per_seed": {v: {m: [float(r[m]) for r in rows[v]] for m in METRICS} for v in variants},
                # every other variant minus survival, paired by seed: (mean, std over seeds)
                "vs_survival": {
                    v: {m: paired_difference([r[m] for r in base], [r[m] for r in rows[v]]) for m in METRICS}
                    for v in variants
                    if v != "survival"
                },
                "gap_closed": {
                    v: {
                        m: gap_closed(
                            means["survival"][m],
                            means[v][m],
                            means["oracle"][m],
                            higher_is_better=m in HIGHER_IS_BETTER,
                        )
                        for m in METRICS
                    }
                    for v in learned
                },
            }
        if baselines:
            per["baselines"] = {}
            for b in baselines:
                brows = base_runs[(target, b)]
                per["baselines"][b] = {
                    "means": {m: float(np.mean([r[m] for r in brows])) for m in METRICS},
                    "per_seed": {m: [float(r[m]) for r in brows] for m in METRICS},
                    # minus each policy's survival variant, paired by seed: (mean, std over seeds)
                    "vs_survival": {
                        pol: {
                            m: paired_difference(
                                [r[m] for r in runs[(target, pol, "survival")]], [r[m] for r in brows]
                            )
                            for m in METRICS
                        }
                        for pol in policies
                    },
                }
        out["targets"][target] = per
    out["pooled"] = {
        pol: {v: {m: pooled_gap(out["targets"], pol, v, m) for m in METRICS} for v in learned}
        for pol in policies
    }
    out["pooled_interval"] = {
        pol: {v: {m: pooled_gap_interval(out["targets"], pol, v, m) for m in METRICS} for v in learned}
        for pol in policies
    }
    return out


def pooled_gap_interval(
    per_target: dict[str, Any], policy: str, variant: str, metric: str, *, resamples: int = 2000
) -> tuple[float, float] | None:
    """A 90 % bootstrap interval of :func:`pooled_gap` over the seeds: the seeds are resampled
    with replacement (the same draw for every target and variant, so the pairing by seed is
    kept). None with fewer than two seeds, or when most resamples have no gap."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    saved: list[npt.NDArray[np.float64]] = []
    gap: list[npt.NDArray[np.float64]] = []
    for res in per_target.values():
        seeds = res["policies"][policy]["per_seed"]
        base = np.asarray(seeds["survival"][metric], dtype=np.float64)
        saved.append(sign * (base - np.asarray(seeds[variant][metric], dtype=np.float64)))
        gap.append(sign * (base - np.asarray(seeds["oracle"][metric], dtype=np.float64)))
    n = saved[0].shape[0]
    if n < 2:
        return None
    s_tot, g_tot = np.sum(saved, axis=0), np.sum(gap, axis=0)  # per seed, summed over targets
    draw = np.random.default_rng(0).integers(0, n, size=(resamples, n))
    s_b, g_b = s_tot[draw].sum(axis=1), g_tot[draw].sum(axis=1)
    ok = g_b > 0.0
    if ok.sum() < resamples // 2:
        return None
    ratio = s_b[ok] / g_b[ok]
    return float(np.quantile(ratio, 0.05)), float(np.quantile(ratio, 0.95))


def pooled_gap(per_target: dict[str, Any], policy: str, variant: str, metric: str) -> float | None:
    """The gap closed over all targets together: the sum over targets of what ``variant`` saves
    against Survival over the sum of what the oracle saves (targets weigh by their gap, so a
    target with almost no gap cannot swing the answer). None when the oracle saves nothing."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    saved = gap = 0.0
    for res in per_target.values():
        means = res["policies"][policy]["means"]
        saved += sign * (means["survival"][metric] - means[variant][metric])
        gap += sign * (means["survival"][metric] - means["oracle"][metric])
    if not math.isfinite(gap) or gap <= 0.0:
        return None
    return saved / gap
