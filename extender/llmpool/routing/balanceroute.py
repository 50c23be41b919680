"""BalanceRoute: barrier-aware admission for data-parallel decode workers (``br0``, ``brh``, ``brh-oracle``).

Every decode step of a data-parallel (DP) engine ends in a barrier, so the step lasts as long
as its most loaded rank's. BalanceRoute (arXiv 2605.06113; ``docs/algorithms.md`` Part B)
admits requests so that they fill the idle gap under that envelope instead of raising it.

Model (loads in KV tokens; with ``load_model="step"`` in decode-step time)
--------------------------------------------------------------------------

* A *worker* is an endpoint. Its load ``L_g`` is the router's exact sum over its in-flight
  requests of ``prompt + generated`` tokens (B.2's ``w_i = s_i + j - 1``), walked from
  ``EndpointState.active()`` once per dispatch round. Why not the scraped gauge: it is up to one
  scrape interval old, shares prefix-cached blocks (so it under-counts what the requests will
  hold) and ignores requests still waiting inside the engine. When the driver reports no
  per-request progress (some endpoint has router in-flight requests but an empty ``active()``),
  ``load_source="auto"`` falls back to the scraped estimate ``kv_load_tokens()`` for every
  endpoint (one consistent source per round).
* ``load_model='step'`` measures the loads in units of a decode step's time instead, from the
  step-cost profile (``ctx.profile``, see :func:`step_cost_model`). A step's linear layers cost
  ``max(c0, c1 + c2 n)`` for ``n`` scheduled tokens: flat up to the knee ``(c0 - c1) / c2``,
  then ``c2`` per token. A worker's load is its KV tokens plus ``kappa * max(0, n - knee)``, with
  ``kappa = c2 / (a_dec (1 + batching overhead))`` (424 KV tokens per token for
  ``h100-llama3-8b``) and ``n`` its requests (one token each) plus the router's
  ``EndpointState.prefill_pending_tokens``, the prompts of the requests that have shown no
  output token yet (on a colocated vLLM worker their prefill shares the next step with the
  decodes; a non-streamed request is not counted, its first token is only seen at its end).
  What a request costs a worker then depends on the worker: the overflow term uses that cost,
  the fill term the request's nominal size ``s + kappa (1 + s)`` on every worker (else the
  worker where it costs most would score best while it fits). BR-H projects ``n`` like the
  loads (requests leave at their predicted end; the prompts weigh at ``h = 0``). Capacity
  checks stay in KV tokens (``_Round.kv``). With short prompts and answers hundreds of
  requests run per worker, past the knee, and balancing KV alone leaves the request counts,
  and so the steps, uneven; the paper's KV model fits decode-only workers with long contexts.
* A *balancing set* is a barrier group: the endpoints sharing ``EndpointState.group``. When every
  group has one endpoint (independent replicas), all endpoints form one set. ``G`` is the size
  of the set, ``M = max L_g`` its envelope and ``m_g = M - L_g`` the safe margins.
* F-score (B.3): ``F_g(Q) = D - G * max(D - m_g, 0)`` with ``D`` the sum of the prompt tokens
  of the candidate set ``Q``: slope +1 while ``Q`` fills the margin, ``-(G - 1)`` once it
  overflows the envelope.

Capacity and late binding
-------------------------

A worker *admits* a request of ``s`` prompt tokens when it is fresh (not ``stale``, unless every
endpoint is), not reserved (see starvation below), has fewer than ``max_seqs`` requests in
flight, and ``L_g + s <= kv_admit_threshold * kv_capacity_tokens`` (an idle worker always admits
one request, however large). When no worker admits a request it is held at the router
(:class:`~llmpool.routing.types.Hold`): like BalanceRoute's prompt pool, it waits there, and
completions free capacity and make the driver offer it again.

Free slots of a worker are ``min(max_seqs - inflight, (kv_limit - L_g) / s_ref)`` where
``s_ref`` is the mean prompt of the candidate window: the number of typical requests it could
still take, KV included (with ``max_num_seqs`` in the hundreds the KV cache is what runs out).

BR-0 (``br0``), per dispatch round
-----------------------------------

* Stage 1, capacity abundant (free slots summed over the pool ``>= abundant_slots``, default
  the window size: the pool could take every request the router offers this round): each
  offered request goes at once to ``argmax_g F_g({i})`` among the workers that admit it; ties
  (every worker whose margin holds the request scores ``F = s``) go to the lowest load, then at
  random -- never to endpoint 0 by default. With several sets, the set with the lowest mean
  load (fraction of KV capacity) that has an admitting worker is chosen first.
* Stage 2, capacity scarce: on the round's first decision the policy plans the whole candidate
  window (the first ``window`` held requests, the driver's ``queue_window``). Workers that can
  admit are popped once each in the order (set mean load, most free slots, largest margin,
  random); each takes the subset ``Q*`` of the remaining window (at most
  ``min(r_max, max_seqs - inflight)`` requests, within its KV limit) maximising ``F_g(Q)``, an
  exact search over every subset (F depends on ``Q`` only through ``D``, so this is a small
  subset-sum that fills the margin without overshooting). If the best score is not positive the
  worker force-admits its best single request (no capacity is left idle). Loads and margins
  are updated after each worker. A request is routed iff the plan gives it a worker; the others
  are held and compete again in the next round (a completion, an arrival or the 20 ms tick).

The round's plan and tentative loads are keyed by ``view.now``: every ``decide`` of one round
sees the loads after the round's earlier admissions. ``on_assigned`` confirms a tentative
admission (anything unexpected drops the round, so the next decision rebuilds it from the
pool) and ``on_completed`` drops it.

Starvation: a request waiting at the router for ``max_hold_s`` (since ``Request.arrival``) is
*overdue*. Overdue requests are placed before any other one, on the lowest-load worker that
admits them. An overdue request that no worker admits *reserves* the lowest-load fresh worker:
nothing else is admitted there until it fits, so it waits at most about ``max_hold_s`` plus the
time that worker needs to drain enough KV (or a slot).

BR-H (``brh``, ``brh-oracle``)
------------------------------

Looks ``horizon`` decode steps ahead. For each in-flight request the predictor's termination
classifier gives ``(p_fin, mu_rem) = termination(request, age=generated_tokens, horizon=H)`` and
its clipped contribution ``c_i = (1 - p_fin) H + p_fin mu_rem``: the request counts (growing by
one token per step) for the steps ``h < c_i`` and then drops out (it stays for the whole horizon
when ``c_i >= H``). The projected loads ``L_g(k + h)``, ``h = 0..H``, are built with difference
arrays in ``O(N_active + endpoints * H)``; ``M_h = max_g L_g(k + h)``, ``m_{g,h} = M_h - L_g(k + h)``
and

    F_g(Q) = alpha * (sum_h gamma^h) * D - beta * sum_h gamma^h * max(D - m_{g,h}, 0)

(the admission load ``D`` is kept constant across ``h``, as in the paper). With ``horizon=0`` and
``(alpha, beta) = (1, G)`` this is exactly BR-0. Everything else (capacity, stages, subset
search, starvation guard) is shared with BR-0, except that stage-1 ties go to the lowest
discounted projected load ``sum_h gamma^h L_g(k + h) / sum_h gamma^h`` (the load itself when
``H = 0``).

A request's predicted finishing age ``age + c_i`` is cached and reused for ``reproject_tokens``
tokens of progress (or until the request outlives it), so a round calls the predictor for about
``1 / reproject_tokens`` of the in-flight requests. New requests are predicted once on first
offer (``request.prediction``, kept across re-offers). Completions train the predictor
(``observe``).

``brh`` defaults to the ``exact-match`` predictor: per prompt identity it replays the lengths
seen for that prompt and falls back to the Survival predictor on a miss (and for requests with
no prompt identity), so it is never worse informed than ``survival`` and wins on repeated and
templated prompts (paper: stage-1 AUC 0.974 vs 0.700 on the proprietary trace, equal on Azure);
its memory is bounded (``max_prompts``). ``brh-oracle`` (lab only) uses the true lengths.

Decision cost: one round walks every in-flight request once (O(N_active)); a stage-1 decision is
O(G * (H + 1)); a stage-2 plan evaluates ``sum_{k<=r_max} C(window, k)`` subsets (2,516 for the
defaults) per popped worker, vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import combinations, islice
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from llmpool.routing.policy import ConfigError, Policy, PolicyContext, PolicyParams, PolicyRegistry
from llmpool.routing.predictors import (
    LengthPredictor,
    PredictorConfig,
    build_predictor,
    predictor_fallback_status,
)
from llmpool.routing.types import ActiveRequest, Decision, EndpointState, Hold, PoolView, Request, Route

__all__ = [
    "BR0Params",
    "BRHOracleParams",
    "BRHParams",
    "BalanceRoute",
    "BalanceRouteH",
    "BalanceRouteHOracle",
    "envelope",
    "f_score",
    "f_score_horizon",
    "horizon_penalty",
    "project_loads",
    "register_balanceroute",
]

F64 = npt.NDArray[np.float64]

DEFAULT_MAX_SEQS: Final = 256
"""In-flight requests per worker when neither ``max_seqs`` nor the profile says (vLLM's default)."""

MAX_SUBSETS: Final = 100_000
"""Upper bound on ``sum_{k <= r_max} C(window, k)``, the subsets a stage-2 worker evaluates."""

NO_ENDPOINTS: Final = Hold("no endpoints")
NO_CAPACITY: Final = Hold("no capacity: every worker is at max_seqs or its KV admission threshold")
NOT_CHOSEN: Final = Hold("capacity scarce: other requests of the window fill the margins better")

_INF: Final = math.inf


# --------------------------------------------------------------------------------------------
# The model (B.2, B.3, B.5) as plain functions
# --------------------------------------------------------------------------------------------


def envelope(loads: Sequence[float]) -> tuple[float, float, list[float]]:
    """``(M, I, margins)`` of a balancing set: ``M = max L``, ``I = G M - sum L``, ``m_g = M - L_g``.

    Loads ``[100, 90, 70, 60]`` give ``(100, 80, [0, 10, 30, 40])``.
    """
    if not loads:
        return 0.0, 0.0, []
    top = max(loads)
    return float(top), float(len(loads) * top - sum(loads)), [float(top - x) for x in loads]


def f_score(delta: float, margin: float, group_size: int) -> float:
    """BR-0's ``F_g(Q) = D - G * max(D - m_g, 0)`` for an admission load ``D`` (B.3)."""
    over = delta - margin
    return delta - group_size * (over if over > 0.0 else 0.0)


def f_score_horizon(delta: float, margins: Sequence[float], gamma: float, alpha: float, beta: float) -> float:
    """BR-H's ``alpha (sum_h gamma^h) D - beta sum_h gamma^h max(D - m_h, 0)`` over ``h = 0..H``."""
    total = 0.0
    penalty = 0.0
    for h, m in enumerate(margins):
        w = gamma**h
        total += w
        over = delta - m
        if over > 0.0:
            penalty += w * over
    return alpha * total * delta - beta * penalty


def horizon_penalty(deltas: F64, margins: F64, weights: F64) -> F64:
    """``sum_h weights[h] * max(deltas[i] - margins[h], 0)`` for every ``i``, in O((N + H) log H).

    The penalty is piecewise linear in ``D`` with kinks at the margins: with the margins sorted,
    ``D`` above the first ``k`` of them pays ``D * sum(w[:k]) - sum(w[:k] * m[:k])``.
    """
    order = np.argsort(margins, kind="stable")
    ms = margins[order]
    ws = weights[order]
    cw = np.concatenate((np.zeros(1), np.cumsum(ws)))
    cwm = np.concatenate((np.zeros(1), np.cumsum(ws * ms)))
    k = np.searchsorted(ms, deltas, side="left")  # margins strictly below D
    out: F64 = cw[k] * deltas - cwm[k]
    return out


def project_loads(
    base: F64,
    growing: F64,
    drop_endpoint: Sequence[int] | npt.NDArray[np.int64],
    drop_step: Sequence[int] | npt.NDArray[np.int64],
    drop_load: Sequence[float] | Sequence[int] | F64,
    horizon: int,
    drop_weight: F64 | None = None,
) -> F64:
    """Projected loads ``P[g, h]`` for ``h = 0..horizon`` with difference arrays (B.5).

    ``base[g]`` is the load now and ``growing[g]`` the number of requests on ``g`` (each grows by
    one token per step). Request ``j`` on endpoint ``drop_endpoint[j]`` with load
    ``drop_load[j]`` now leaves after ``drop_step[j]`` steps (``1..horizon``): it is not counted
    from ``h = drop_step[j]`` on. Requests not listed stay for the whole horizon. So
    ``P[g, h] = sum over requests on g still present at h of (load + h)``. With ``drop_weight``
    only that fraction of request ``j`` leaves (an expected load: ``drop_load`` is then the
    request's whole load, weighted here). Cost ``O(len(drop_step) + endpoints * horizon)``.
    """
    n = base.shape[0]
    h1 = horizon + 1
    steps = np.arange(h1, dtype=np.float64)
    proj: F64 = base[:, None] + growing[:, None] * steps[None, :]
    if len(drop_step):
        flat = np.asarray(drop_endpoint, dtype=np.int64) * h1 + np.asarray(drop_step, dtype=np.int64)
        dl = np.asarray(drop_load, dtype=np.float64)
        if drop_weight is None:
            gone = np.bincount(flat, minlength=n * h1).reshape(n, h1).cumsum(axis=1)
        else:
            gone = np.bincount(flat, weights=drop_weight, minlength=n * h1).reshape(n, h1).cumsum(axis=1)
            dl = dl * drop_weight
        gone_load = np.bincount(flat, weights=dl, minlength=n * h1).reshape(n, h1).cumsum(axis=1)
        proj -= gone_load + gone * steps[None, :]
    return proj


def _termination_entry(
    answer: tuple[float, float], horizon: int, age: int, until: int, expected: bool
) -> tuple[int, float, float]:
    """``(reuse while age < this, finishing age, share leaving then)`` of a termination answer
    ``(p_fin, mu_rem)`` (see ``BalanceRouteH._predict``); the finishing age is inf beyond the horizon."""
    p_fin, mu_rem = answer
    if expected:
        if p_fin <= 0.0 or mu_rem >= horizon:
            return until, _INF, 1.0
        f, share = age + mu_rem, p_fin
    else:
        c = (1.0 - p_fin) * horizon + p_fin * mu_rem
        if c >= horizon:
            return until, _INF, 1.0
        f, share = age + c, 1.0
    fl = math.floor(f)  # age < floor(f) <=> f - age >= 1 for integer ages
    return (until if until < fl else fl), f, share


@lru_cache(maxsize=128)
def _subsets(width: int, r_max: int) -> tuple[npt.NDArray[np.intp], tuple[int, ...]]:
    """Every non-empty subset of ``range(width)`` with at most ``r_max`` items.

    Rows are padded with ``width`` (an index that reads a zero-size sentinel), ordered by size,
    then lexicographically (so ``argmax`` prefers fewer and older requests on ties).
    ``ends[k]`` is the number of rows of size ``<= k``.
    """
    rows: list[tuple[int, ...]] = []
    ends = [0]
    for k in range(1, min(r_max, width) + 1):
        pad = (width,) * (r_max - k)
        rows.extend(c + pad for c in combinations(range(width), k))
        ends.append(len(rows))
    arr = np.array(rows, dtype=np.intp).reshape(-1, r_max)
    arr.flags.writeable = False
    return arr, tuple(ends)


def _subset_count(window: int, r_max: int) -> int:
    return sum(math.comb(window, k) for k in range(1, min(window, r_max) + 1))


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def step_cost_model(ctx: PolicyContext) -> tuple[float, float]:
    """``(kappa, knee)`` of ``load_model='step'`` from ``ctx.profile``.

    A decode step's linear part costs ``max(c0, c1 + c2 n)`` for ``n`` scheduled tokens: flat up
    to ``knee = (c0 - c1) / c2`` tokens, then ``c2`` per token. ``kappa`` is ``c2`` over the
    attention cost of one cached context token (batched), so ``kappa * max(0, n - knee)`` is the
    linear part above its floor in KV-token units."""
    prof = ctx.profile
    if prof is None:
        raise ConfigError("load_model 'step' needs a step-cost profile (the picker's or the lab's)")
    step = prof.step
    per_ctx = step.decode_attention_ns_per_context_token * (1.0 + step.attention_batching_overhead)
    lin = step.linear
    if per_ctx <= 0.0 or lin.c2_us_per_token <= 0.0:
        raise ConfigError(f"load_model 'step': profile {prof.name!r} has no decode attention or token cost")
    knee = max(0.0, (lin.c0_ms - lin.c1_ms) * 1e3 / lin.c2_us_per_token)
    return lin.c2_us_per_token * 1e3 / per_ctx, knee


class BR0Params(PolicyParams):
    """Parameters of ``br0`` (and the shared part of ``brh``)."""

    window: int = Field(
        default=16,
        ge=1,
        le=64,
        description="Candidate window: held requests offered per dispatch round and considered by "
        "stage 2's subset search. Default 16.",
    )
    r_max: int = Field(
        default=4,
        ge=1,
        le=8,
        description="Most requests one worker admits per stage-2 round (paper: 4). Default 4.",
    )
    abundant_slots: int | None = Field(
        default=None,
        ge=0,
        description="Stage 1 (greedy) while the pool's free slots add up to at least this; below it, "
        "stage 2 (subset selection). Default None: the window size. 0 means always stage 1.",
    )
    max_seqs: int | None = Field(
        default=None,
        ge=1,
        description="In-flight requests per worker before it stops admitting. Default None: the "
        "profile's engine max_num_seqs, else 256.",
    )
    kv_admit_threshold: float = Field(
        default=0.9,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="A worker admits a request while its KV load plus the prompt stays at or under "
        "this fraction of its KV capacity. Default 0.9.",
    )
    max_hold_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="A request held this long (seconds since arrival) is force-admitted to the "
        "lowest-load worker that can take it, or reserves one. Default 2.",
    )
    load_model: Literal["kv", "step"] = Field(
        default="kv",
        description="What a worker's load counts. 'kv': KV tokens (prompt + generated) of its requests, "
        "the paper's model (right when attention dominates a decode step: long contexts on decode-only "
        "workers). 'step': a decode step's time from the step-cost profile, in KV-token units: the KV "
        "tokens plus the linear layers' cost of the step's tokens past the profile's knee (one per "
        "request, and the prompts not yet prefilled, which share the next step on a colocated vLLM "
        "worker). Needs a profile. Default kv.",
    )
    load_source: Literal["auto", "active", "scraped"] = Field(
        default="auto",
        description="Worker load: 'active' = router's sum of prompt + generated tokens of in-flight "
        "requests; 'scraped' = kv_load_tokens(); 'auto' = active unless the driver reports no "
        "per-request progress. Default auto.",
    )

    @model_validator(mode="after")
    def _bounded_search(self) -> BR0Params:
        n = _subset_count(self.window, self.r_max)
        if n > MAX_SUBSETS:
            raise ValueError(
                f"window={self.window} with r_max={self.r_max} gives {n} subsets per worker; "
                f"keep sum over k<=r_max of C(window, k) <= {MAX_SUBSETS} (e.g. window 32, r_max 4)"
            )
        return self


class _HorizonParams(BR0Params):
    horizon: int = Field(
        default=32,
        ge=0,
        le=1024,
        description="Look-ahead H in decode steps (paper sensitivity study: 80). 0 turns BR-H into "
        "BR-0 (with alpha 1, beta G). Default 32.",
    )
    gamma: float = Field(
        default=0.9,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Discount of step h: gamma**h. Small values behave like BR-0. Default 0.9.",
    )
    alpha: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="Weight of the fill term. Default 1."
    )
    beta: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Weight of the overflow term. Default None: G, the size of the balancing set.",
    )
    reproject_tokens: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Reuse a request's predicted finishing age for this many tokens of progress "
        "before asking the predictor again. Default 16.",
    )
    projection: Literal["drop", "expected"] = Field(
        default="drop",
        description="How a running request enters the projected loads. 'drop': it counts until "
        "its clipped expected contribution c = (1 - p_fin) H + p_fin mu_rem runs out, then leaves "
        "(the papers' description). 'expected': it leaves with probability p_fin after mu_rem "
        "steps and otherwise stays for the whole horizon (the expected load). Default drop.",
    )


class BRHParams(_HorizonParams):
    """Parameters of ``brh``."""

    predictor: PredictorConfig = Field(
        default_factory=lambda: PredictorConfig(name="exact-match"),
        description="Length predictor: 'survival' or 'exact-match', a name or a PredictorConfig "
        "mapping. Default exact-match.",
    )

    @field_validator("predictor", mode="before")
    @classmethod
    def _parse_predictor(cls, v: Any) -> Any:
        if isinstance(v, str):
            return PredictorConfig.parse(v)
        return v

    @field_validator("predictor")
    @classmethod
    def _deployable(cls, v: PredictorConfig) -> PredictorConfig:
        if v.name == "oracle":
            raise ValueError("predictor 'oracle' needs the lab's ground truth; use the brh-oracle policy")
        build_predictor(v)  # raises ConfigError (a ValueError) with one line on bad parameters
        return v


class BRHOracleParams(_HorizonParams):
    """Parameters of ``brh-oracle`` (the predictor is the lab's ground truth)."""


# --------------------------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------------------------


class _Round:
    """One dispatch round's view of the pool, updated by the round's tentative admissions."""

    __slots__ = (
        "abundant",
        "applied",
        "covered",
        "eligible",
        "inflight",
        "kv",
        "kv_cap",
        "kv_limit",
        "load",
        "n",
        "now",
        "ntok",
        "pctx",
        "plan",
        "pn",
        "proj",
        "reserved",
        "s_ref",
        "set_of",
        "sets",
    )

    def __init__(self, now: float, n: int) -> None:
        self.now = now
        self.n = n
        self.load: list[float] = []  # balancing load: KV tokens (+ the linear cost with load_model step)
        self.kv: list[float] = []  # KV tokens (capacity checks)
        self.ntok: list[float] = []  # load_model 'step': tokens each worker schedules next step
        self.pn: F64 | None = None  # BR-H, load_model 'step': projected scheduled tokens
        self.pctx: F64 | None = None  # BR-H, load_model 'step': projected KV tokens
        self.inflight: list[int] = []
        self.kv_limit: list[float] = []
        self.kv_cap: list[float] = []
        self.eligible: list[bool] = []
        self.sets: list[list[int]] = []
        self.set_of: list[int] = []
        self.s_ref = 1.0
        self.abundant = True
        self.plan: dict[int, int] = {}  # request id -> endpoint (stage 2)
        self.covered: set[int] = set()  # request ids a stage-2 plan has decided on
        self.reserved: set[int] = set()  # endpoints kept for an overdue request
        self.applied: dict[int, int] = {}  # request id -> endpoint, admitted tentatively
        self.proj: F64 | None = None  # BR-H: projected loads (endpoints x (H + 1))


class BalanceRoute(Policy):
    """BR-0: prediction-free BalanceRoute (see the module docstring)."""

    name = "br0"

    def __init__(self, params: BR0Params, ctx: PolicyContext) -> None:
        self.params = params
        self._rng = ctx.rng
        self.queue_window = params.window
        self._window = params.window
        self._r_max = params.r_max
        self._abundant = params.abundant_slots if params.abundant_slots is not None else params.window
        if params.max_seqs is not None:
            self._max_seqs = params.max_seqs
        elif ctx.profile is not None:
            self._max_seqs = ctx.profile.engine.max_num_seqs
        else:
            self._max_seqs = DEFAULT_MAX_SEQS
        self._thr = params.kv_admit_threshold
        self._max_hold = params.max_hold_s
        self._source = params.load_source
        # load_model 'step': the linear layers' cost per scheduled token above the knee, in KV
        # tokens (0 for 'kv': loads are KV tokens only)
        self._kappa, self._knee = step_cost_model(ctx) if params.load_model == "step" else (0.0, 0.0)
        self._round: _Round | None = None

    @property
    def max_seqs(self) -> int:
        """The in-flight limit per worker in effect."""
        return self._max_seqs

    # ------------------------------------------------------------------ interface
    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        if not eps:
            return NO_ENDPOINTS
        self._prepare(request)
        rnd = self._round
        if rnd is None or rnd.now != view.now or rnd.n != len(eps):
            rnd = self._new_round(view, request)
        rid = request.id
        g = rnd.applied.get(rid)
        if g is not None:  # offered again after this round admitted it
            return Route(self._fallbacks(rnd, g))
        if rnd.abundant:
            overdue = rnd.now - request.arrival >= self._max_hold
            g = self._pick(rnd, request, by_load=overdue)
            if g < 0:
                if overdue:
                    self._reserve(rnd)
                return NO_CAPACITY
            self._commit(rnd, request, g)
            return Route(self._fallbacks(rnd, g))
        if rid not in rnd.covered:
            self._plan(rnd, view, request)
        g = rnd.plan.get(rid)
        if g is None:
            return NOT_CHOSEN if self._any_admits(rnd) else NO_CAPACITY
        return Route(self._fallbacks(rnd, g))

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:
        rnd = self._round
        if rnd is not None and rnd.applied.get(request.id) == endpoint:
            rnd.plan.pop(request.id, None)
            return
        self._round = None  # not the admission this round planned: rebuild from the pool

    def on_completed(self, request: Request, endpoint: int, output_tokens: int, now: float) -> None:
        self._round = None

    # ------------------------------------------------------------------ hooks (BR-H overrides)
    def _prepare(self, request: Request) -> None:
        """Called once per decision before anything else."""

    def _measure(self, eps: Sequence[EndpointState], rnd: _Round) -> bool:
        """Fill ``rnd.kv`` and ``rnd.load``; True when they come from the router's per-request
        progress."""
        n = len(eps)
        k = self._kappa
        if self._source != "scraped":
            kv = [0.0] * n
            ntok = [0.0] * n
            missing = False
            for i, e in enumerate(eps):
                act = e.active()
                if act:
                    kv[i] = float(sum([a.request.prompt_tokens + a.generated_tokens for a in act]))
                    if k:  # next step's tokens: one per request, and the prompts still to prefill
                        ntok[i] = float(len(act) + e.prefill_pending_tokens)
                elif e.inflight > 0:
                    missing = True
            if not missing or self._source == "active":
                self._set_loads(rnd, kv, ntok)
                return True
        kv = [float(e.kv_load_tokens()) for e in eps]
        self._set_loads(rnd, kv, [float(e.running + e.prefill_pending_tokens) for e in eps])
        return False

    def _lin(self, ntok: float) -> float:
        """The linear layers' cost of ``ntok`` scheduled tokens above its floor, in KV tokens."""
        x = ntok - self._knee
        return self._kappa * x if x > 0.0 else 0.0

    def _lin_added(self, ntok: float, add: float) -> float:
        """What ``add`` more scheduled tokens add to :meth:`_lin` (computed as BR-H does)."""
        knee = self._knee
        return self._kappa * (max(ntok + add - knee, 0.0) - max(ntok - knee, 0.0))

    def _set_loads(self, rnd: _Round, kv: list[float], ntok: list[float]) -> None:
        rnd.kv = kv
        rnd.ntok = ntok
        rnd.load = [v + self._lin(t) for v, t in zip(kv, ntok, strict=True)] if self._kappa else list(kv)

    def _deltas_now(self, rnd: _Round, workers: list[int], s: float) -> list[float]:
        """What one request of ``s`` prompt tokens adds to each worker's step load of the next
        step (``load_model='step'``)."""
        added = self._lin_added
        return [s + added(rnd.ntok[g], 1.0 + s) for g in workers]

    def _scores(self, rnd: _Round, members: list[int], workers: list[int], s: float) -> list[float]:
        """``F_g({i})`` of a request of ``s`` prompt tokens for each worker of one balancing set."""
        load = rnd.load
        top = max(load[i] for i in members)
        size = len(members)
        if not self._kappa:
            return [f_score(s, top - load[g], size) for g in workers]
        # the fill term counts the request's nominal size on every worker (else the worker where
        # it costs most would score best while it fits); the overflow term its cost there
        fill = (s + self._kappa) + self._kappa * s  # as BR-H's _fill_step at H = 0
        deltas = self._deltas_now(rnd, workers, s)
        return [fill - size * max(d - (top - load[g]), 0.0) for g, d in zip(workers, deltas, strict=True)]

    def _score_deltas(self, rnd: _Round, g: int, prompts: F64, counts: F64) -> F64:
        """``F_g(Q)`` for candidate sets of ``counts`` requests with ``prompts`` prompt tokens in
        all on worker ``g``."""
        load = rnd.load
        members = rnd.sets[rnd.set_of[g]]
        margin = max(load[i] for i in members) - load[g]
        if not self._kappa:
            out: F64 = prompts - len(members) * np.maximum(prompts - margin, 0.0)
            return out
        t = rnd.ntok[g]
        knee = self._knee
        tokens = counts + prompts
        d = prompts + self._kappa * (np.maximum(t + tokens - knee, 0.0) - max(t - knee, 0.0))
        fill = (prompts + self._kappa * counts) + self._kappa * prompts  # see _scores
        out = fill - len(members) * np.maximum(d - margin, 0.0)
        return out

    def _apply(self, rnd: _Round, request: Request, g: int) -> None:
        """Add a tentatively admitted request to worker ``g``'s load (BR-H: to its projection)."""

    def _tie_loads(self, rnd: _Round, workers: list[int]) -> Sequence[float]:
        """Loads (indexed by endpoint) that break F-score ties: lower wins."""
        return rnd.load

    # ------------------------------------------------------------------ rounds
    def _new_round(self, view: PoolView, request: Request) -> _Round:
        eps = view.endpoints
        n = len(eps)
        rnd = _Round(view.now, n)
        exact = self._measure(eps, rnd)
        thr = self._thr
        stale = 0
        groups: dict[str, list[int]] = {}
        inflight = [0] * n
        kv_limit = [_INF] * n
        kv_cap = [0.0] * n
        for i, e in enumerate(eps):
            inflight[i] = e.inflight if exact else e.running + e.waiting + e.pending_since_scrape
            if e.kv_capacity_tokens > 0:
                kv_cap[i] = float(e.kv_capacity_tokens)
                kv_limit[i] = thr * e.kv_capacity_tokens
            if e.stale:
                stale += 1
            groups.setdefault(e.group, []).append(i)
        rnd.inflight = inflight
        rnd.kv_limit = kv_limit
        rnd.kv_cap = kv_cap
        rnd.eligible = [not e.stale or stale == n for e in eps]
        sets = list(groups.values())
        if all(len(s) == 1 for s in sets):
            sets = [list(range(n))]
        rnd.sets = sets
        set_of = [0] * n
        for si, members in enumerate(sets):
            for i in members:
                set_of[i] = si
        rnd.set_of = set_of
        cands = self._candidates(view, request, rnd)
        rnd.s_ref = max(1.0, sum(r.prompt_tokens for r in cands) / len(cands))
        free = 0
        for g in range(n):
            free += self._slots(rnd, g)
        rnd.abundant = free >= self._abundant
        self._round = rnd
        return rnd

    def _slots(self, rnd: _Round, g: int) -> int:
        """Free slots of worker ``g``: requests of the reference size it could still take."""
        if not rnd.eligible[g] or g in rnd.reserved:
            return 0
        k = self._max_seqs - rnd.inflight[g]
        room = rnd.kv_limit[g] - rnd.kv[g]
        if room < _INF:
            k = min(k, int(room // rnd.s_ref))
        return k if k > 0 else 0

    def _candidates(self, view: PoolView, request: Request, rnd: _Round) -> list[Request]:
        """The candidate window: the first ``window`` held requests, ``request`` always included."""
        applied = rnd.applied
        cands = [r for r in islice(view.queue, self._window) if r.id not in applied]
        rid = request.id
        for r in cands:
            if r.id == rid:
                return cands
        cands.insert(0, request)
        del cands[self._window :]
        return cands

    def _admits(self, rnd: _Round, g: int, s: float) -> bool:
        if not rnd.eligible[g] or g in rnd.reserved or rnd.inflight[g] >= self._max_seqs:
            return False
        return rnd.kv[g] + s <= rnd.kv_limit[g] or rnd.inflight[g] == 0

    def _any_admits(self, rnd: _Round) -> bool:
        return any(self._admits(rnd, g, 0.0) for g in range(rnd.n))

    def _set_keys(self, rnd: _Round) -> list[float]:
        """Mean load of each balancing set (fraction of KV capacity when every capacity is known)."""
        load = rnd.load
        kv = rnd.kv
        cap = rnd.kv_cap
        keys = []
        for members in rnd.sets:
            tot = 0.0
            tkv = 0.0
            tc = 0.0
            known = True
            for i in members:
                tot += load[i]
                tkv += kv[i]
                tc += cap[i]
                known = known and cap[i] > 0
            keys.append(tkv / tc if known and tc > 0 else tot / len(members))
        return keys

    def _set_order(self, rnd: _Round) -> list[int]:
        if len(rnd.sets) == 1:
            return [0]
        rng = self._rng
        keyed = sorted((k, rng.random(), si) for si, k in enumerate(self._set_keys(rnd)))
        return [si for _, _, si in keyed]

    def _pick(self, rnd: _Round, request: Request, *, by_load: bool) -> int:
        """Stage 1: ``argmax_g F_g({i})`` (or the lowest load) among admitting workers; -1 if none."""
        s = float(request.prompt_tokens)
        workers: list[int] = []
        members: list[int] = []
        for si in self._set_order(rnd):
            members = rnd.sets[si]
            workers = [g for g in members if self._admits(rnd, g, s)]
            if workers:
                break
        if not workers:
            return -1
        if len(workers) == 1:
            return workers[0]
        load = rnd.load
        if not by_load:
            scores = self._scores(rnd, members, workers, s)
            best = max(scores)
            workers = [g for g, f in zip(workers, scores, strict=True) if f == best]
        if len(workers) > 1:
            keys = load if by_load else self._tie_loads(rnd, workers)
            low = min(keys[g] for g in workers)
            workers = [g for g in workers if keys[g] == low]
        if len(workers) > 1:
            return workers[self._rng.randrange(len(workers))]
        return workers[0]

    def _reserve(self, rnd: _Round) -> None:
        """Keep the lowest-load free worker for an overdue request nothing admits yet."""
        best = -1
        for g in range(rnd.n):
            if rnd.eligible[g] and g not in rnd.reserved and (best < 0 or rnd.load[g] < rnd.load[best]):
                best = g
        if best >= 0:
            rnd.reserved.add(best)

    def _commit(self, rnd: _Round, request: Request, g: int) -> None:
        rnd.applied[request.id] = g
        s = request.prompt_tokens
        rnd.kv[g] += s
        if self._kappa:  # recomputed, not added to, so that BR-H's projection gives the same value
            rnd.ntok[g] += 1.0 + s
            rnd.load[g] = rnd.kv[g] + self._lin(rnd.ntok[g])
        else:
            rnd.load[g] += s
        rnd.inflight[g] += 1
        self._apply(rnd, request, g)

    def _fallbacks(self, rnd: _Round, g: int) -> tuple[int, ...]:
        """``g``, then the other fresh workers of its set by load, then every other endpoint."""
        si = rnd.set_of[g]
        eligible = rnd.eligible
        same = sorted((i for i in rnd.sets[si] if i != g and eligible[i]), key=rnd.load.__getitem__)
        rest = [i for i in range(rnd.n) if i != g and (rnd.set_of[i] != si or not eligible[i])]
        return (g, *same, *rest)

    # ------------------------------------------------------------------ stage 2
    def _plan(self, rnd: _Round, view: PoolView, request: Request) -> None:
        """Decide the whole candidate window: overdue requests first, then subset selection."""
        # Requests an earlier plan of this round held were passed over by the driver already.
        covered = rnd.covered
        cands = [r for r in self._candidates(view, request, rnd) if r.id not in covered]
        covered.update(r.id for r in cands)
        remaining: list[Request] = []
        for r in cands:
            if rnd.now - r.arrival >= self._max_hold:
                g = self._pick(rnd, r, by_load=True)
                if g >= 0:
                    self._commit(rnd, r, g)
                    rnd.plan[r.id] = g
                else:
                    self._reserve(rnd)
            else:
                remaining.append(r)
        if not remaining:
            return
        keys = self._set_keys(rnd) if len(rnd.sets) > 1 else [0.0]
        load = rnd.load
        tops = [max(load[i] for i in members) for members in rnd.sets]
        rng = self._rng
        order = sorted(
            (
                keys[rnd.set_of[g]],
                -self._slots(rnd, g),
                -(tops[rnd.set_of[g]] - load[g]),
                rng.random(),
                g,
            )
            for g in range(rnd.n)
            if rnd.eligible[g] and g not in rnd.reserved and rnd.inflight[g] < self._max_seqs
        )
        for *_, g in order:
            if not remaining:
                break
            chosen = self._best_subset(rnd, g, remaining)
            for j in sorted(chosen, reverse=True):
                r = remaining.pop(j)
                self._commit(rnd, r, g)
                rnd.plan[r.id] = g

    def _best_subset(self, rnd: _Round, g: int, cands: list[Request]) -> list[int]:
        """Indices into ``cands`` of the subset worker ``g`` admits (empty if none fits)."""
        limit = min(self._r_max, self._max_seqs - rnd.inflight[g])
        if limit <= 0:
            return []
        width = len(cands)
        rows, ends = _subsets(width, self._r_max)
        rows = rows[: ends[min(limit, len(ends) - 1)]]
        sizes = np.zeros(width + 1, dtype=np.float64)
        sizes[:width] = [r.prompt_tokens for r in cands]
        deltas = sizes[rows].sum(axis=1)
        ok = deltas <= rnd.kv_limit[g] - rnd.kv[g]
        if rnd.inflight[g] == 0:
            ok[: ends[1]] = True  # an idle worker takes any single request
        if not ok.any():
            return []
        counts = (rows < width).sum(axis=1).astype(np.float64)
        scores = np.where(ok, self._score_deltas(rnd, g, deltas, counts), -_INF)
        j = int(np.argmax(scores))
        if scores[j] <= 0.0:  # nothing fills the margin: force-admit the best single request
            j = int(np.argmax(scores[: ends[1]]))
        return [int(x) for x in rows[j] if x < width]


class BalanceRouteH(BalanceRoute):
    """BR-H: BalanceRoute with an H-step look-ahead from a termination classifier."""

    name = "brh"

    def __init__(self, params: _HorizonParams, ctx: PolicyContext, predictor: LengthPredictor) -> None:
        super().__init__(params, ctx)
        self._h = params.horizon
        self._weights: F64 = params.gamma ** np.arange(params.horizon + 1, dtype=np.float64)
        self._alpha = params.alpha
        self._fill = params.alpha * float(self._weights.sum())
        self._beta = params.beta
        self._steps: F64 = np.arange(params.horizon + 1, dtype=np.float64)
        self._reproject = params.reproject_tokens
        self._expected = params.projection == "expected"
        self.predictor = predictor
        # Cached predictions of the requests in flight at the last round, sorted by request id:
        # reuse while age < _cache_until, predicted finishing age (inf: beyond the horizon).
        self._cache_id: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._cache_until: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._cache_finish: F64 = np.zeros(0, dtype=np.float64)
        # the share of the request that leaves at its finishing age (1 with projection 'drop')
        self._cache_weight: F64 = np.zeros(0, dtype=np.float64)
        # Predictions made since (requests admitted in between), same meaning.
        self._fresh: dict[int, tuple[int, float, float]] = {}

    # ------------------------------------------------------------------ interface
    def fallback_status(self) -> Mapping[str, str]:
        return predictor_fallback_status(self.predictor)

    def on_completed(self, request: Request, endpoint: int, output_tokens: int, now: float) -> None:
        if output_tokens >= 0:  # < 0: the response failed; nothing to learn
            self.predictor.observe(request, output_tokens)
        self._fresh.pop(request.id, None)
        super().on_completed(request, endpoint, output_tokens, now)

    def _prepare(self, request: Request) -> None:
        if request.prediction is None:
            request.prediction = self.predictor.predict(request)

    # ------------------------------------------------------------------ projection
    def _predict(self, request: Request, age: int, known: bool) -> tuple[int, float, float]:
        """``(reuse while age < this, finishing age, share leaving then)`` from the termination
        classifier.

        Projection ``drop``: the clipped remaining contribution is ``c = (1 - p_fin) H + p_fin
        mu_rem``; the whole request is taken to finish at ``age + c`` (never within the horizon
        when ``c >= H``). Projection ``expected``: the share ``p_fin`` finishes at ``age + mu_rem``
        and the rest stays beyond the horizon. The answer is reused for ``reproject_tokens``
        tokens of progress (the first time for ``1 + id % reproject_tokens`` tokens, so that
        requests admitted together do not all expire in the same round) and until fewer than
        one step remains (the request outlived it).
        """
        return _termination_entry(
            self.predictor.termination(request, age, self._h),
            self._h,
            age,
            age + (self._reproject if known else 1 + request.id % self._reproject),
            self._expected,
        )

    def _remaining(self, request: Request, age: int) -> tuple[float, float]:
        """Predicted steps until ``request`` (at ``age`` tokens) stops counting (inf: beyond H),
        and the share of it that stops then."""
        rid = request.id
        ent = self._fresh.get(rid)
        if ent is None:
            ids = self._cache_id
            j = int(np.searchsorted(ids, rid))
            if j < ids.shape[0] and ids[j] == rid:
                ent = (int(self._cache_until[j]), float(self._cache_finish[j]), float(self._cache_weight[j]))
        if ent is None or age >= ent[0]:
            ent = self._predict(request, age, ent is not None)
            self._fresh[rid] = ent
        return ent[1] - age, ent[2]

    def _measure(self, eps: Sequence[EndpointState], rnd: _Round) -> bool:
        """Walk every in-flight request once; project the loads over the horizon.

        Per request the walk only reads ``id``, ``prompt_tokens`` and ``generated_tokens``
        (list comprehensions); matching against the cached predictions, the drop-out steps and
        the difference arrays are vectorised. Only the requests whose cached prediction expired
        (about ``1 / reproject_tokens`` of them) call the predictor.
        """
        n = len(eps)
        h = self._h
        counts = np.zeros(n, dtype=np.int64)
        acts: list[ActiveRequest] = []
        exact = self._source != "scraped"
        if exact:
            for i, e in enumerate(eps):
                act = e.active()
                if act:
                    counts[i] = len(act)
                    acts.extend(act)
                elif e.inflight > 0:
                    exact = False
            if not exact and self._source == "active":
                exact = True
        step = self._kappa > 0.0
        if not exact:
            kv = np.array([e.kv_load_tokens() for e in eps], dtype=np.float64)
            growing = np.array([e.running for e in eps], dtype=np.float64)
            proj = project_loads(kv, growing, (), (), (), h)
            if step:
                pn_s = np.repeat(growing[:, None], h + 1, axis=1)
                pn_s[:, 0] += [e.prefill_pending_tokens for e in eps]  # prefilled in the next step
                rnd.pn = pn_s
        else:
            age = np.array([a.generated_tokens for a in acts], dtype=np.int64)
            load = np.array([a.request.prompt_tokens for a in acts], dtype=np.float64) + age
            where = np.repeat(np.arange(n), counts)
            kv = np.asarray(np.bincount(where, weights=load, minlength=n), dtype=np.float64)
            cnt = counts.astype(np.float64)
            pn = np.repeat(cnt[:, None], h + 1, axis=1) if step else None
            if h and acts:
                rem, share = self._project_remaining(acts, age)
                drop = np.flatnonzero(rem < h)
                steps = np.maximum(np.ceil(rem[drop]), 1.0).astype(np.int64)
                weight = share[drop] if self._expected else None
                proj = project_loads(kv, cnt, where[drop], steps, load[drop], h, weight)
                if pn is not None and drop.shape[0]:  # the requests still running at each step
                    flat = where[drop] * (h + 1) + steps
                    gone = np.bincount(flat, weights=weight, minlength=n * (h + 1))
                    pn -= gone.reshape(n, h + 1).cumsum(axis=1)
            else:
                proj = project_loads(kv, cnt, (), (), (), h)
            if pn is not None:  # the prompts still to prefill are scheduled in the next step
                pn[:, 0] += [e.prefill_pending_tokens for e in eps]
            rnd.pn = pn
        if step:
            pn_all = rnd.pn
            assert pn_all is not None
            rnd.pctx = proj
            proj = proj + self._kappa * np.maximum(pn_all - self._knee, 0.0)
            rnd.ntok = pn_all[:, 0].tolist()
        rnd.proj = proj
        rnd.load = proj[:, 0].tolist()
        rnd.kv = kv.tolist()
        return exact

    def _project_remaining(self, acts: list[ActiveRequest], age: npt.NDArray[np.int64]) -> tuple[F64, F64]:
        """Predicted remaining steps of every in-flight request and the share of it that leaves
        then (see :meth:`_predict`); refreshes the prediction cache."""
        ids = np.array([a.request.id for a in acts], dtype=np.int64)
        cid = self._cache_id
        if cid.shape[0]:
            pos = np.minimum(np.searchsorted(cid, ids), cid.shape[0] - 1)
            known = cid[pos] == ids
            until = np.where(known, self._cache_until[pos], 0)
            finish = np.where(known, self._cache_finish[pos], _INF)
            weight = np.where(known, self._cache_weight[pos], 1.0)
        else:
            known = np.zeros(ids.shape[0], dtype=bool)
            until = np.zeros(ids.shape[0], dtype=np.int64)
            finish = np.full(ids.shape[0], _INF)
            weight = np.ones(ids.shape[0])
        stale = np.flatnonzero(age >= until)
        if stale.shape[0]:
            fresh = self._fresh
            termination = self.predictor.termination
            h = self._h
            every = self._reproject
            expected = self._expected
            new: list[tuple[int, float, float]] = []
            for j, a_j, k_j in zip(stale.tolist(), age[stale].tolist(), known[stale].tolist(), strict=True):
                r = acts[j].request
                ent = fresh.get(r.id) if fresh else None
                if ent is not None and a_j < ent[0]:
                    new.append(ent)
                    continue
                u = a_j + (every if k_j or ent is not None else 1 + r.id % every)
                new.append(_termination_entry(termination(r, a_j, h), h, a_j, u, expected))
            until[stale] = [e[0] for e in new]
            finish[stale] = [e[1] for e in new]
            weight[stale] = [e[2] for e in new]
        self._fresh = {}
        order = np.argsort(ids, kind="stable")
        self._cache_id = ids[order]
        self._cache_until = until[order]
        self._cache_finish = finish[order]
        self._cache_weight = weight[order]
        out: F64 = finish - age
        return out, weight

    def _apply(self, rnd: _Round, request: Request, g: int) -> None:
        step = self._kappa > 0.0
        proj = rnd.pctx if step else rnd.proj
        assert proj is not None
        s = float(request.prompt_tokens)
        h = self._h
        d = h + 1
        share = 1.0
        if h:
            rem, share = self._remaining(request, 0)
            if rem < h:
                d = max(1, math.ceil(rem))
        rest = share < 1.0 and d <= h  # projection 'expected': the rest stays
        proj[g, :d] += s + self._steps[:d]
        if rest:
            proj[g, d:] += (1.0 - share) * (s + self._steps[d:])
        if step:
            pn = rnd.pn
            assert pn is not None and rnd.proj is not None
            pn[g, :d] += 1.0
            pn[g, 0] += s  # its prefill
            if rest:
                pn[g, d:] += 1.0 - share
            rnd.proj[g] = proj[g] + self._kappa * np.maximum(pn[g] - self._knee, 0.0)

    # ------------------------------------------------------------------ scores
    def _margins(self, rnd: _Round, members: list[int], workers: list[int]) -> F64:
        proj = rnd.proj
        assert proj is not None
        top = proj[members].max(axis=0)
        out: F64 = top[None, :] - proj[workers]
        return out

    def _step_deltas(self, rnd: _Round, workers: list[int], s: float) -> F64:
        """``D[w, h]``: what one request of ``s`` prompt tokens adds to worker ``workers[w]``'s
        projected load at step ``h`` with ``load_model='step'``: its KV tokens (constant across
        ``h``, as in the paper) and the linear layers' cost of its token, and of its prompt in
        the next step."""
        pn = rnd.pn
        assert pn is not None
        t = pn[workers]  # (W, H + 1)
        add = np.ones(self._h + 1)
        add[0] += s
        knee = self._knee
        out: F64 = s + self._kappa * (np.maximum(t + add - knee, 0.0) - np.maximum(t - knee, 0.0))
        return out

    def _scores(self, rnd: _Round, members: list[int], workers: list[int], s: float) -> list[float]:
        beta = self._beta if self._beta is not None else float(len(members))
        margins = self._margins(rnd, members, workers)
        if not self._kappa:
            penalty = np.maximum(s - margins, 0.0) @ self._weights
            out: list[float] = (self._fill * s - beta * penalty).tolist()
            return out
        d = self._step_deltas(rnd, workers, s)  # (W, H + 1)
        w = self._weights
        fill = self._fill_step(np.array([s]), np.ones(1))[0]  # nominal, as br0's
        scores: list[float] = (fill - beta * (np.maximum(d - margins, 0.0) @ w)).tolist()
        return scores

    def _fill_step(self, prompts: F64, counts: F64) -> F64:
        """The fill term with ``load_model='step'``: ``alpha sum_h gamma^h D_h`` of the sets'
        nominal sizes (their KV tokens and the linear cost of their tokens past the knee, each
        prompt at ``h = 0``), the same on every worker."""
        k = self._kappa
        out: F64 = self._fill * (prompts + k * counts) + self._alpha * float(self._weights[0]) * k * prompts
        return out

    def _tie_loads(self, rnd: _Round, workers: list[int]) -> Sequence[float]:
        """The discounted mean projected load ``sum_h gamma^h P[g, h] / sum_h gamma^h``."""
        proj = rnd.proj
        assert proj is not None
        keys = [0.0] * rnd.n
        vals = (proj[workers] @ self._weights) / float(self._weights.sum())
        for g, v in zip(workers, vals.tolist(), strict=True):
            keys[g] = v
        return keys

    def _score_deltas(self, rnd: _Round, g: int, prompts: F64, counts: F64) -> F64:
        members = rnd.sets[rnd.set_of[g]]
        beta = self._beta if self._beta is not None else float(len(members))
        margins = self._margins(rnd, members, [g])[0]
        w = self._weights
        if not self._kappa:
            out: F64 = self._fill * prompts - beta * horizon_penalty(prompts, margins, w)
            return out
        # The cost at h >= 1 depends on a set only through its size (few distinct values), so the
        # overflow there is the KV model's sorted-margin penalty with the margins shifted by it;
        # h = 0 (the prompts' prefill) directly. O(Q log H), as with 'kv'.
        pn = rnd.pn
        assert pn is not None
        t = pn[g]
        k = self._kappa
        knee = self._knee
        base = np.maximum(t - knee, 0.0)
        d0 = prompts + k * (np.maximum(t[0] + (counts + prompts) - knee, 0.0) - base[0])
        pen = w[0] * np.maximum(d0 - margins[0], 0.0)
        if self._h:
            for c in np.unique(counts).tolist():
                sel = counts == c
                shift = k * (np.maximum(t[1:] + c - knee, 0.0) - base[1:])
                pen[sel] += horizon_penalty(prompts[sel], margins[1:] - shift, w[1:])
        out = self._fill_step(prompts, counts) - beta * pen
        return out

    def projected_loads(self, view: PoolView) -> F64:
        """The projected loads ``P[g, h]`` this policy would use for ``view`` (for inspection)."""
        rnd = _Round(view.now, len(view.endpoints))
        self._measure(view.endpoints, rnd)
        assert rnd.proj is not None
        return rnd.proj


class BalanceRouteHOracle(BalanceRouteH):
    """BR-H with the lab's true output lengths (the ceiling for any predictor)."""

    name = "brh-oracle"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _build_br0(params: BR0Params, ctx: PolicyContext) -> Policy:
    return BalanceRoute(params, ctx)


def _build_brh(params: BRHParams, ctx: PolicyContext) -> Policy:
    return BalanceRouteH(params, ctx, build_predictor(params.predictor))


def _build_brh_oracle(params: BRHOracleParams, ctx: PolicyContext) -> Policy:
    if ctx.truth is None:
        raise ConfigError(
            "policy 'brh-oracle' needs the lab's ground truth (PolicyContext.truth); "
            "use brh with the survival or exact-match predictor in a live picker"
        )
    predictor = build_predictor(PredictorConfig(name="oracle", per_model=False), truth=ctx.truth)
    return BalanceRouteHOracle(params, ctx, predictor)


def register_balanceroute(reg: PolicyRegistry) -> None:
    """Register ``br0``, ``brh`` and the lab-only ``brh-oracle``."""
    reg.register(
        "br0",
        BR0Params,
        _build_br0,
        "BalanceRoute BR-0: fill the barrier envelope's safe margins (F-score), hold when capacity "
        "is scarce; prediction-free.",
    )
    reg.register(
        "brh",
        BRHParams,
        _build_brh,
        "BalanceRoute BR-H: BR-0 over an H-step load projection from a termination classifier "
        "(exact-match predictor by default).",
    )
    reg.register(
        "brh-oracle",
        BRHOracleParams,
        _build_brh_oracle,
        "BalanceRoute BR-H with the true output lengths (lab only: the ceiling of brh).",
        lab_only=True,
    )
