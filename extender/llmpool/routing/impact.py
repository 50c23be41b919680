"""The latency-impact estimator (paper a) and the ``impact`` policy.

For a new request and each candidate endpoint, :class:`ImpactEstimator` estimates, from the
endpoint's observed state and the engines' step-cost profile:

* the request's **own** TTFT there (waiting for a batch slot, the prefill work queued ahead
  of it, its own prefill) and its decode time (its predicted output length at the batch's
  per-step time);
* the delay it adds to the requests **already there**: the *prefill stall* (every running
  decode waits for the steps that carry its prompt; paper a's Eq. 1 term, "proportional to
  the prompt tokens and the tokens already decoding") and the *decode slowdown* (one more
  sequence in every step, for as long as it overlaps the others; paper a's Eq. 2 term,
  "proportional to the number of requests"), and a **KV-pressure** term when its tokens
  would overflow the KV cache (preemption by recompute).

Paper a does not print its Eq. 1-3; the forms here are our reconstruction (see
algorithms.md A.3) in seconds of latency, so the weights are unit-free.

The ``impact`` policy routes to the endpoint minimising ``own E2E + w * impact``; when every
endpoint's batch is full it holds requests at the router (late binding) and, among the
requests in its window, releases first those with the smallest predicted cost (an aged
shortest-predicted-job-first), so the engines' FCFS queues never see a long request block
short ones. All inputs are O(1) per endpoint: scraped gauges, the router's own counters and
the policy's running sum of predicted output lengths per endpoint.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from llmpool.routing.gie import PrefixIndex
from llmpool.routing.policy import (
    ConfigError,
    Policy,
    PolicyContext,
    PolicyParams,
    PolicyRegistry,
)
from llmpool.routing.predictors import (
    LengthPredictor,
    PredictorConfig,
    build_predictor,
    predictor_fallback_status,
)
from llmpool.routing.profile import EngineConfig, Profile, StepCost, load_profile
from llmpool.routing.types import Decision, EndpointState, Hold, PoolView, Request, Route


class CostModel:
    """A profile's step cost in float seconds (the estimator's view of one engine step)."""

    __slots__ = ("a_dec", "a_pre", "c0", "c1", "c2", "f_batch", "ovh")

    def __init__(self, step: StepCost) -> None:
        self.ovh = step.overhead_ms * 1e-3
        self.c0 = step.linear.c0_ms * 1e-3
        self.c1 = step.linear.c1_ms * 1e-3
        self.c2 = step.linear.c2_us_per_token * 1e-6
        self.f_batch = 1.0 + step.attention_batching_overhead
        self.a_dec = step.decode_attention_ns_per_context_token * 1e-9
        self.a_pre = step.prefill_attention_ns_per_pair * 1e-9

    def lin(self, n_tok: float) -> float:
        return self.ovh + max(self.c0, self.c1 + self.c2 * n_tok)

    def decode_step(self, n_seq: float, ctx_tokens: float) -> float:
        """One decode-only step for ``n_seq`` sequences attending ``ctx_tokens`` in all."""
        f = self.f_batch if n_seq > 1 else 1.0
        return self.lin(n_seq) + f * self.a_dec * ctx_tokens

    def prefill_extra(self, prompt: float, n_seq: float, budget: float) -> float:
        """Extra step time the ``prompt`` adds to the steps that carry it (chunked at
        ``budget`` tokens per step alongside ``n_seq`` decodes)."""
        room = max(1.0, budget - n_seq)
        steps = math.ceil(prompt / room)
        with_prompt = steps * self.lin(n_seq + min(prompt, room)) - steps * self.lin(n_seq)
        f = self.f_batch if n_seq >= 1 else 1.0  # batched with decodes, or alone
        return max(0.0, with_prompt) + f * self.a_pre * prompt * prompt / 2.0


@dataclass(slots=True)
class Estimate:
    """The estimator's answer for one (request, endpoint) pair, in seconds."""

    ttft: float
    decode: float
    prefill_stall: float
    decode_slowdown: float
    kv_penalty: float

    @property
    def own_e2e(self) -> float:
        return self.ttft + self.decode


class ImpactEstimator:
    """Own latency and impact on others of placing a request on an endpoint."""

    def __init__(
        self,
        cost: CostModel,
        engine: EngineConfig,
        *,
        max_seqs: int | None = None,
        queued_prefill: bool = True,
    ) -> None:
        self.cost = cost
        self.budget = float(engine.max_num_batched_tokens)
        self.max_seqs = max_seqs or engine.max_num_seqs
        self.queued_prefill = queued_prefill

    def estimate(
        self,
        prompt: float,
        expected_out: float,
        ep: EndpointState,
        remaining_others: float,
        cached: float = 0.0,
    ) -> Estimate:
        """``remaining_others``: predicted output tokens still to come for the requests
        already on ``ep`` (their sum); ``cached``: prompt tokens likely served from ``ep``'s
        prefix cache (they cost no prefill compute, but still occupy KV).

        With ``queued_prefill``, the prompts on ``ep`` that have not produced a first token
        (``ep.prefill_pending_tokens``) are prefilled before this one (vLLM schedules
        first come, first served): the request's TTFT includes the steps that carry them."""
        return Estimate(*self.terms(prompt, expected_out, ep, remaining_others, cached))

    def terms(
        self,
        prompt: float,
        expected_out: float,
        ep: EndpointState,
        remaining_others: float,
        cached: float = 0.0,
    ) -> tuple[float, float, float, float, float]:
        """:meth:`estimate`'s numbers as a tuple (ttft, decode, prefill stall, decode slowdown,
        KV penalty), without the object: the policy's hot path, once per candidate endpoint.

        The :class:`CostModel` formulas written out in line (its methods are the readable form;
        a test holds the two to the same floats): a function call costs about as much as the
        arithmetic it wraps, and this runs for every endpoint of every decision."""
        c = self.cost
        ovh, c0, c1, c2 = c.ovh, c.c0, c.c1, c.c2
        f_batch, a_dec = c.f_batch, c.a_dec
        max_seqs = self.max_seqs
        budget = self.budget
        n = float(ep.running + ep.pending_since_scrape)  # sequences in the batch soon
        kv = ep.kv_load_tokens()
        # step_now = decode_step(max(n, 1), kv)
        n1 = n if n > 1.0 else 1.0
        v = c1 + c2 * n1
        step_now = ovh + (v if v > c0 else c0) + (f_batch if n1 > 1 else 1.0) * a_dec * kv
        # Waiting for a batch slot: completions come every step_now * per_req_rem / n.
        over = n + float(ep.waiting) + 1.0 - max_seqs
        wait = 0.0
        if over > 0 and n > 0:
            per_req_rem = remaining_others / n
            wait = over * step_now * (per_req_rem if per_req_rem > 1.0 else 1.0) / n
        cap_seqs = float(max_seqs)
        running_now = n if n < cap_seqs else cap_seqs
        own = prompt - cached
        prefill = self._prefill_extra(own if own > 1.0 else 1.0, running_now)
        ahead = 0.0
        backlog = float(ep.prefill_pending_tokens) if self.queued_prefill else 0.0
        if backlog > 0.0:
            # the steps that carry the prompts queued ahead, each a decode step plus its chunk
            room = budget - running_now
            room = room if room > 1.0 else 1.0
            ahead = self._prefill_extra(backlog, running_now) + math.ceil(backlog / room) * step_now
        ttft = wait + ahead + prefill + step_now
        n_after = n + 1.0
        if n_after > cap_seqs:
            n_after = cap_seqs
        f_after = (f_batch if n_after > 1 else 1.0) * a_dec
        v = c1 + c2 * n_after
        lin_after = ovh + (v if v > c0 else c0)
        # decode = (expected_out - 1) steps of decode_step(n_after, kv + prompt + expected_out / 2)
        step_after = lin_after + f_after * (kv + prompt + expected_out / 2.0)
        d = expected_out - 1.0
        decode = (d if d > 0.0 else 0.0) * step_after
        # Impact on the others: every running decode is stalled by the prefill; each step of
        # the overlap (min(their remaining, ours)) is longer by one more sequence's cost.
        stall = running_now * prefill
        delta = (lin_after + f_after * (kv + prompt)) - step_now
        ours = running_now * expected_out
        slowdown = (delta if delta > 0.0 else 0.0) * (remaining_others if remaining_others < ours else ours)
        cap = float(ep.kv_capacity_tokens)
        kv_pen = 0.0
        if cap > 0:
            need = kv + prompt + expected_out + remaining_others
            if need > cap:
                # preemption by recompute: someone re-prefills; charge it to everyone stalled
                size = prompt + expected_out
                frac = min(1.0, (need - cap) / max(size, 1.0))
                kv_pen = frac * (c2 * size + step_now) * max(running_now, 1.0)
        return ttft, decode, stall, slowdown, kv_pen

    def _prefill_extra(self, prompt: float, n_seq: float) -> float:
        """:meth:`CostModel.prefill_extra` at this engine's token budget, written out."""
        c = self.cost
        room = self.budget - n_seq
        if room < 1.0:
            room = 1.0
        steps = math.ceil(prompt / room)
        v = c.c1 + c.c2 * (n_seq + (prompt if prompt < room else room))
        w = c.c1 + c.c2 * n_seq
        c0 = c.c0
        with_prompt = steps * (c.ovh + (v if v > c0 else c0)) - steps * (c.ovh + (w if w > c0 else c0))
        f = c.f_batch if n_seq >= 1 else 1.0  # batched with decodes, or alone
        return (with_prompt if with_prompt > 0.0 else 0.0) + f * c.a_pre * prompt * prompt / 2.0


class ImpactParams(PolicyParams):
    """Parameters of ``impact`` (see docs/policies.md)."""

    predictor: dict[str, Any] | str = Field(
        default_factory=lambda: {"name": "survival", "per_model": True, "per_task": True},
        description="length predictor config: {name: survival|exact-match|oracle, per_model, params}",
    )
    profile: str | None = Field(
        default=None,
        description="step-cost profile name or file; default: the pool's profile from the driver",
    )
    impact_weight: float = Field(default=1.0, ge=0.0, description="weight of the delay imposed on others")
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="paper a's alpha: prefill-stall share vs decode-slowdown"
    )
    kv_weight: float = Field(default=1.0, ge=0.0, description="weight of the KV-overflow (preemption) risk")
    max_seqs: int | None = Field(
        default=None, ge=1, description="batch slots per endpoint; default: the profile's max_num_seqs"
    )
    hold: bool = Field(
        default=True, description="hold requests at the router while every endpoint's batch is full"
    )
    window: int = Field(
        default=8192, ge=1, le=65536, description="held requests considered per round (oldest first)"
    )
    aging_s: float = Field(
        default=5.0,
        gt=0.0,
        description="a held request's priority improves by its predicted cost every aging_s seconds waited",
    )
    max_hold_s: float = Field(
        default=30.0, gt=0.0, description="a request held this long is released first, whatever its cost"
    )
    queued_prefill: bool = Field(
        default=True,
        description=(
            "count the prompts already on an endpoint that have not produced a first token as "
            "prefill work ahead of the request (its TTFT); seen for streamed responses"
        ),
    )
    prefix_aware: bool = Field(
        default=True,
        description="discount prefill on endpoints likely to hold the prompt's prefix (router-side index)",
    )
    prefix_lru_capacity: int = Field(
        default=31250, ge=1, description="prefix blocks remembered per endpoint (as GIE's index)"
    )


class ImpactPolicy(Policy):
    """Minimise own latency plus weighted impact on others; late-bind when saturated."""

    name = "impact"

    def __init__(self, params: ImpactParams, ctx: PolicyContext, *, oracle: bool = False) -> None:
        self.p = params
        self.rng = ctx.rng
        profile = self._profile(params, ctx)
        self.estimator = ImpactEstimator(
            CostModel(profile.step),
            profile.engine,
            max_seqs=params.max_seqs,
            queued_prefill=params.queued_prefill,
        )
        pred_cfg = PredictorConfig.parse(params.predictor)
        if oracle:
            pred_cfg = pred_cfg.model_copy(update={"name": "oracle"})
        self.predictor: LengthPredictor = build_predictor(pred_cfg, truth=ctx.truth)
        self.queue_window = params.window if params.hold else 1
        # endpoint name -> predicted output tokens in flight (names, not positions: a live
        # pool's endpoint list changes as pods come and go)
        self._pred_sum: dict[str, float] = {}
        self._where: dict[int, str] = {}  # request id -> endpoint name it was sent to
        self._last_eps: Sequence[EndpointState] = ()
        self._prefix = PrefixIndex(params.prefix_lru_capacity) if params.prefix_aware else None
        self._expected: dict[int, float] = {}  # request id -> predicted output tokens
        self._round_key: tuple[float, int] = (math.nan, -1)
        self._release: set[int] = set()
        self._heap: list[tuple[float, float, int]] = []
        self._in_heap: set[int] = set()

    @staticmethod
    def _profile(params: ImpactParams, ctx: PolicyContext) -> Profile:
        if params.profile is not None:
            return load_profile(params.profile)
        if ctx.profile is not None:
            return ctx.profile
        raise ConfigError("policy 'impact': no step-cost profile: set params.profile (e.g. a100-llama3-8b)")

    def fallback_status(self) -> Mapping[str, str]:
        return predictor_fallback_status(self.predictor)

    # ------------------------------------------------------------------ helpers
    def _expected_len(self, req: Request) -> float:
        if req.prediction is None:
            req.prediction = self.predictor.predict(req)
        return max(1.0, req.prediction.expected_tokens)

    def _remaining(self, ep: EndpointState) -> float:
        return max(0.0, self._pred_sum.get(ep.name, 0.0) - ep.inflight_output_tokens)

    def _free_slots(self, ep: EndpointState) -> int:
        # the router's own in-flight count is exact and fresh (gauges lag up to a scrape)
        return self.estimator.max_seqs - ep.inflight

    def _assess(
        self, req: Request, ep: EndpointState, credit: dict[str, int] | None, remaining: float
    ) -> tuple[Estimate, float]:
        """The estimate for ``req`` on ``ep`` and its score (lower is better)."""
        t = self.estimator.terms(
            float(req.prompt_tokens), self._expected_len(req), ep, remaining, _cached(req, ep, credit)
        )
        return Estimate(*t), self._combine(t)

    def _combine(self, t: tuple[float, float, float, float, float]) -> float:
        """The score of an :meth:`ImpactEstimator.terms` answer: own E2E + weighted impact."""
        ttft, decode, stall, slowdown, kv_pen = t
        p = self.p
        impact = p.alpha * stall + (1.0 - p.alpha) * slowdown
        return (ttft + decode) + p.impact_weight * impact + p.kv_weight * kv_pen

    def _score(self, req: Request, ep: EndpointState, credit: dict[str, int] | None = None) -> float:
        return self._assess(req, ep, credit, self._remaining(ep))[1]

    def _key(self, r: Request) -> float:
        """Static release priority: log of the predicted cost, aged by arrival time
        (``log(cost) - waited / aging_s`` orders requests the same way at any instant)."""
        return math.log(self._expected_len(r) + r.prompt_tokens / 8.0) + r.arrival / self.p.aging_s

    def _plan_round(self, view: PoolView) -> None:
        """Once per dispatch round: which held requests to release into the free slots."""
        free = sum(max(0, self._free_slots(ep)) for ep in view.endpoints if not ep.stale)
        queue = view.queue
        window = min(len(queue), self.queue_window)
        if free >= window:
            self._release = {queue[i].id for i in range(window)}
            return
        if free <= 0:
            self._release = set()
            return
        heap = self._heap
        if len(self._in_heap) > 2 * len(queue) + 64:
            # requests that left the queue without being routed (client gone, rejected)
            self._in_heap &= {r.id for r in queue}
        # Requests offered for the first time join the heap. The queue keeps arrival order and
        # requests enter the window only at its end, so those are the window's tail: walk back
        # from its end to the first request already in the heap (the cost is the new requests,
        # not the window).
        in_heap = self._in_heap
        i = window - 1
        while i >= 0:
            r = queue[i]
            if r.id in in_heap:
                break
            in_heap.add(r.id)
            heapq.heappush(heap, (self._key(r), r.arrival, r.id))
            i -= 1
        release: set[int] = set()
        overdue = view.now - self.p.max_hold_s
        for i in range(window):  # starvation bound first, oldest first
            r = queue[i]
            if r.arrival > overdue or len(release) >= free:
                break
            release.add(r.id)
        skipped = []
        while heap and len(release) < free:
            item = heapq.heappop(heap)
            if item[2] not in self._in_heap:
                continue  # routed already (lazy deletion)
            release.add(item[2])
            skipped.append(item)
        for item in skipped:  # keep them until they are actually routed
            heapq.heappush(heap, item)
        self._release = release

    def _candidates(
        self, request: Request, eps: Sequence[EndpointState]
    ) -> tuple[list[EndpointState], dict[str, int] | None]:
        """The endpoints that compete for ``request`` and its prefix credit per endpoint name."""
        fresh = [ep for ep in eps if not ep.stale] or list(eps)
        if self.p.hold:  # late binding: only endpoints with a free batch slot compete (_free_slots > 0)
            slots = self.estimator.max_seqs
            fresh = [ep for ep in fresh if ep.inflight < slots] or fresh
        credit = (
            self._prefix.match(request.prefix_hashes)
            if self._prefix is not None and request.prefix_hashes
            else None
        )
        return fresh, credit

    # ------------------------------------------------------------------ Policy
    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        if not eps:
            return Hold("no endpoints")
        self._last_eps = eps
        if not self._released(request, view):
            return Hold("saturated: released by predicted cost")
        fresh, credit = self._candidates(request, eps)
        # _score per endpoint, with what depends only on the request taken out of the loop
        prompt = float(request.prompt_tokens)
        expected = self._expected_len(request)
        terms, combine, remaining, rand = (
            self.estimator.terms,
            self._combine,
            self._remaining,
            self.rng.random,
        )
        best = [
            (
                combine(terms(prompt, expected, ep, remaining(ep), _cached(request, ep, credit))),
                rand(),
                ep.index,
            )
            for ep in fresh
        ]
        best.sort()
        return Route(tuple(i for _, _, i in best))

    def _released(self, request: Request, view: PoolView) -> bool:
        """Whether this round releases ``request`` from the router queue (always, without
        ``hold``)."""
        release = self.releasable(view)
        return release is None or request.id in release

    def releasable(self, view: PoolView) -> set[int] | None:
        """The round plan's releases (None without ``hold``, or with no endpoint, where
        ``decide`` answers alone); planned once per (time, queue length)."""
        if not self.p.hold or not view.endpoints:
            return None
        self._last_eps = view.endpoints
        key = (view.now, len(view.queue))
        if key != self._round_key:
            self._round_key = key
            self._plan_round(view)
        return self._release

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:
        e = self._expected_len(request)
        self._expected[request.id] = e
        name = self._last_eps[endpoint].name if endpoint < len(self._last_eps) else str(endpoint)
        self._where[request.id] = name
        self._pred_sum[name] = self._pred_sum.get(name, 0.0) + e
        if self._prefix is not None and request.prefix_hashes:
            self._prefix.add(name, request.prefix_hashes)
        self._release.discard(request.id)
        self._in_heap.discard(request.id)
        if len(self._heap) > 4 * (len(self._in_heap) + 64):  # drop routed entries in bulk
            self._heap = [x for x in self._heap if x[2] in self._in_heap]
            heapq.heapify(self._heap)
        self._round_key = (math.nan, -1)  # the view changed: re-plan on the next decision

    def on_completed(self, request: Request, endpoint: int, output_tokens: int, now: float) -> None:
        e = self._expected.pop(request.id, 0.0)
        name = self._where.pop(request.id, None)
        if name is not None:
            left = self._pred_sum.get(name, 0.0) - e
            if left > 1e-6:
                self._pred_sum[name] = left
            else:
                self._pred_sum.pop(name, None)
        if output_tokens >= 0:  # < 0: the response failed; nothing to learn
            self.predictor.observe(request, output_tokens)


def _cached(req: Request, ep: EndpointState, credit: dict[str, int] | None) -> float:
    """Prompt tokens ``ep`` likely holds in its prefix cache (by the router's prefix index)."""
    if not credit:
        return 0.0
    return float(min(credit.get(ep.name, 0) * req.hash_block_tokens, req.prompt_tokens - 1))


def register_impact(reg: PolicyRegistry) -> None:
    reg.register(
        "impact",
        ImpactParams,
        lambda p, ctx: ImpactPolicy(p, ctx),
        "own latency + weighted impact on requests already there (paper a); late binding when full",
    )
    reg.register(
        "impact-oracle",
        ImpactParams,
        lambda p, ctx: ImpactPolicy(p, ctx, oracle=True),
        "impact with the true output lengths (lab only: the ceiling)",
        lab_only=True,
    )
