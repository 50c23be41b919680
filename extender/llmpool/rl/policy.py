"""The ``rl`` policy: a Q-network (paper a's heuristic-guided DQN router) served with onnxruntime.

The same object routes in the lab, the emulator runs and the live picker. Per request:

1. The **heuristic** (the ``impact`` policy of :mod:`llmpool.routing.impact`, which the RL
   reward is guided by and which is the fallback) keeps the router queue: while every batch is
   full it holds requests and proposes them for release shortest-predicted-first. A request it
   does not propose is held without running the network. This is paper a's "the agent acts on
   the head of the router queue", with the queue ordered by predicted cost instead of arrival
   (evaluating the network on every queued request every round would cost O(queue) per
   completion and break the decision budget).
2. For a proposed request the network scores every candidate endpoint and *hold*
   (:mod:`llmpool.rl.features`); the policy takes the best. *Hold* keeps the request at the
   router until the next round (a tick or a completion). A request held ``max_hold_s`` is
   routed to the heuristic's choice (a starvation bound the network cannot override), and
   so is a request the network would hold on an idle pool (nothing in flight will free a
   slot, so waiting cannot help).

If the model is missing, corrupt or was trained on another state encoding, the policy logs one
warning and runs the heuristic alone; a pool larger than the model's ``max_endpoints`` is
routed by the heuristic for as long as it stays that large. Both show in
:meth:`RLPolicy.fallback_status` (the picker exports it as ``llmpool_fallback_active``).

Training (:mod:`llmpool.rl.train`) drives this class with a :class:`Learner` that picks the
action (epsilon-greedy on a numpy copy of the network) and records each decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import Field

from llmpool.rl.features import Candidate, Encoder, Situation, bucket_of, three_buckets
from llmpool.rl.model import QModel, RLModelError, load_model
from llmpool.routing.impact import ImpactParams, ImpactPolicy
from llmpool.routing.policy import ConfigError, PolicyContext, PolicyParams, PolicyRegistry
from llmpool.routing.policy import Policy as _Policy
from llmpool.routing.types import Decision, Hold, PoolView, Request, Route

log = logging.getLogger("llmpool.rl")

HOLD_RL = Hold("rl: hold")
HOLD_QUEUE = Hold("saturated: released by predicted cost")


class Scorer(Protocol):
    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


class Learner(Protocol):
    """The trainer's hook: choose an action and see every decision."""

    def choose(self, q: npt.NDArray[np.float32], n_cands: int, heuristic: int) -> int: ...

    def record(
        self, now: float, rows: npt.NDArray[np.float32], action: int, heuristic: int, cands: list[Candidate]
    ) -> None: ...


class RLParams(PolicyParams):
    """Parameters of ``rl`` (see docs/rl.md)."""

    model: str = Field(
        default="paper-a",
        description="a packaged model name (paper-a) or the path of an .onnx file from llmpool rl train",
    )
    max_endpoints: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="largest pool the network serves; default: the model's metadata",
    )
    heuristic: dict[str, Any] = Field(
        default_factory=dict, description="parameters of the impact heuristic (queue, fallback, features)"
    )
    allow_hold: bool = Field(
        default=True, description="offer the network the hold action (false: it only chooses the endpoint)"
    )


class _Heuristic(ImpactPolicy):
    """The impact policy, also answering 'what would you do, and what does each endpoint cost?'."""

    def assess(self, request: Request, view: PoolView) -> list[Candidate] | None:
        """None when the heuristic holds ``request``; else its candidate endpoints with their costs."""
        eps = view.endpoints
        self._last_eps = eps
        if not self._released(request, view):
            return None
        fresh, credit = self._candidates(request, eps)
        out: list[Candidate] = []
        for ep in fresh:
            rem = self._remaining(ep)
            est, score = self._assess(request, ep, credit, rem)
            cap = ep.kv_capacity_tokens
            out.append(
                Candidate(
                    endpoint=ep.index,
                    score=score,
                    ttft=est.ttft,
                    decode=est.decode,
                    stall=est.prefill_stall,
                    slowdown=est.decode_slowdown,
                    kv_penalty=est.kv_penalty,
                    inflight=ep.inflight,
                    waiting=ep.waiting,
                    free_slots=self._free_slots(ep),
                    kv_frac=ep.kv_load_tokens() / cap if cap > 0 else 0.0,
                    remaining_tokens=rem,
                    dec_buckets=(0, 0, 0),
                    stale=ep.stale,
                )
            )
        return out


class RLPolicy(_Policy):
    """Route with a Q-network over (endpoints + hold); the impact heuristic keeps the queue."""

    name = "rl"

    def __init__(
        self,
        params: RLParams,
        ctx: PolicyContext,
        *,
        scorer: Scorer | None = None,
        learner: Learner | None = None,
    ) -> None:
        self.p = params
        try:
            hp = ImpactParams.model_validate(params.heuristic)
        except Exception as err:  # pydantic's ValidationError, as one line
            raise ConfigError(f"policy 'rl': heuristic: {err}".splitlines()[0]) from None
        self.h = _Heuristic(hp, ctx)
        self.queue_window = self.h.queue_window
        self.max_hold_s = hp.max_hold_s
        self.learner = learner
        self.model: QModel | None = None
        self._broken: str | None = None
        self.scorer: Scorer | None = scorer
        max_eps = params.max_endpoints
        if scorer is None:
            try:
                self.model = load_model(params.model)
            except RLModelError as err:
                self._broken = str(err)
                log.warning("rl policy: %s; routing with the impact heuristic instead", err)
            else:
                self.scorer = self.model
                max_eps = max_eps or self.model.max_endpoints
        # a model trained without the hold action never scored it: do not offer it
        self.allow_hold = params.allow_hold and (
            self.model is None or self.model.meta.get("allow_hold", True)
        )
        self.max_endpoints = max_eps or 64
        self.encoder = Encoder(self.max_endpoints)
        self._too_big: str | None = None
        self.fallback_decisions = 0
        self.decisions = 0
        # endpoint name -> in-flight requests per predicted decode bucket (paper a's D row)
        self._buckets: dict[str, list[int]] = {}
        self._bucket_of: dict[int, tuple[str, int]] = {}

    # ------------------------------------------------------------------ status
    def fallback_status(self) -> Mapping[str, str]:
        """Components running degraded: ``{"rl-model": reason}`` while the heuristic routes
        (plus the heuristic's own, e.g. its length predictor)."""
        reason = self._broken or self._too_big
        inner = self.h.fallback_status()  # the heuristic's length predictor, if degraded
        if not reason:
            return inner
        return {**inner, "rl-model": reason}

    # ------------------------------------------------------------------ Policy
    def releasable(self, view: PoolView) -> set[int] | None:
        """The heuristic's round plan: the requests it holds, the network is not asked about."""
        return self.h.releasable(view)

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        if not eps:
            return Hold("no endpoints")
        if self.scorer is None:
            self.fallback_decisions += 1
            return self.h.decide(request, view)
        if len(eps) > self.max_endpoints:
            if self._too_big is None:
                self._too_big = (
                    f"pool of {len(eps)} endpoints exceeds the model's max_endpoints {self.max_endpoints}"
                )
                log.warning("rl policy: %s; routing with the impact heuristic", self._too_big)
            self.fallback_decisions += 1
            return self.h.decide(request, view)
        self._too_big = None
        cands = self.h.assess(request, view)
        if cands is None:
            return HOLD_QUEUE
        if not cands:
            return Hold("no endpoints")
        self.decisions += 1
        order = sorted(range(len(cands)), key=lambda i: cands[i].score)
        waited = view.now - request.arrival
        if waited >= self.max_hold_s:  # the starvation bound: the heuristic's choice
            return Route(tuple(cands[i].endpoint for i in order))
        for c in cands:
            b = self._buckets.get(eps[c.endpoint].name)
            if b is not None:
                c.dec_buckets = (b[0], b[1], b[2])
        total_free = 0
        total_inflight = 0
        with_slot = 0
        for ep in eps:
            free = self.h._free_slots(ep)
            total_free += max(free, 0)
            total_inflight += ep.inflight
            with_slot += free > 0
        pred = request.prediction
        expected = pred.expected_tokens if pred is not None else 1.0
        probs = three_buckets(pred.bucket_edges, pred.bucket_probs, expected) if pred else (1.0, 0.0, 0.0)
        sit = Situation(
            prompt_tokens=request.prompt_tokens,
            expected_tokens=expected,
            bucket_probs=probs,
            queue_len=len(view.queue),
            waited_s=waited,
            max_hold_s=self.max_hold_s,
            max_seqs=self.h.estimator.max_seqs,
            n_endpoints=len(eps),
            total_free=total_free,
            total_inflight=total_inflight,
            with_slot=with_slot,
        )
        rows = self.encoder.encode(sit, cands)
        k = len(cands)
        heur = order[0]
        try:
            q = self.scorer.scores(rows)
        except Exception as err:  # onnxruntime's own types: never fail the request for it
            self._broken = f"RL model failed at inference: {type(err).__name__}: {str(err)[:160]}"
            log.warning("rl policy: %s; routing with the impact heuristic from now on", self._broken)
            self.scorer = None
            return Route(tuple(cands[i].endpoint for i in order))
        if not self.allow_hold:
            q = q[:k]  # the hold row is never chosen
        if self.learner is not None:
            act = self.learner.choose(q, k, heur)
        else:
            act = int(np.argmax(q[: k + 1]))
            if not math.isfinite(float(q[act])):
                act = heur
        if act >= k and total_inflight == 0:  # nothing will finish: holding an idle pool waits for nothing
            act = heur
        if self.learner is not None:
            self.learner.record(view.now, rows, act, heur, cands)
        if act >= k:
            return HOLD_RL
        rest = tuple(cands[i].endpoint for i in order if i != act)
        return Route((cands[act].endpoint, *rest))

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:
        self.h.on_assigned(request, endpoint, now)
        eps = self.h._last_eps
        name = eps[endpoint].name if endpoint < len(eps) else str(endpoint)
        b = bucket_of(request.prediction.expected_tokens if request.prediction else 1.0)
        self._buckets.setdefault(name, [0, 0, 0])[b] += 1
        self._bucket_of[request.id] = (name, b)

    def on_completed(self, request: Request, endpoint: int, output_tokens: int, now: float) -> None:
        self.h.on_completed(request, endpoint, output_tokens, now)
        where = self._bucket_of.pop(request.id, None)
        if where is not None:
            counts = self._buckets.get(where[0])
            if counts is not None:
                counts[where[1]] -= 1
                if not any(counts):
                    del self._buckets[where[0]]


def register_rl(reg: PolicyRegistry) -> None:
    reg.register(
        "rl",
        RLParams,
        lambda p, ctx: RLPolicy(p, ctx),
        "heuristic-guided DQN router (paper a) served with onnxruntime; falls back to impact",
    )
