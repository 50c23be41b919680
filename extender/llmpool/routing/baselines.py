"""Baseline routing policies: the reference points every workload-aware policy is measured against.

Six policies, all prediction-free:

* ``round-robin`` -- cycle over the endpoints in index order;
* ``random`` -- uniform choice;
* ``least-requests`` -- fewest requests (scraped running + waiting, plus the router's own
  assignments since the last scrape);
* ``jsq`` -- join the shortest queue measured in outstanding tokens (paper (a)'s JSQ baseline:
  prompt tokens not yet prefilled plus decode tokens still expected);
* ``p2c`` -- power of two choices on the same request count as ``least-requests``;
* ``least-kv`` -- lowest KV-cache load (scraped usage plus unscraped assignments).

Shared conventions:

* every decision returns :class:`~llmpool.routing.types.Route` with *all* endpoint indices,
  best first, so the picker always has fallbacks;
* endpoints flagged ``stale`` are never the first choice while a fresh endpoint exists; they
  are kept at the end of the fallback list (a stale endpoint is one whose metrics are old, not
  necessarily a dead one, and a last-resort fallback is better than none);
* ties are broken with the policy's ``ctx.rng`` (never by index), so equal endpoints share the
  load instead of piling on endpoint 0;
* a decision is O(endpoints) plus at most one sort of N keys, except ``jsq``, which also walks each
  endpoint's active requests (see :class:`JoinShortestQueue`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import Field

from llmpool.routing.policy import NoParams, Policy, PolicyContext, PolicyParams, PolicyRegistry
from llmpool.routing.types import Decision, EndpointState, Hold, PoolView, Request, Route

NO_ENDPOINTS = Hold("no endpoints")
"""What every policy returns when the pool has no routable endpoint."""


# --------------------------------------------------------------------------------------------
# Shared ranking helpers (also used by llmpool.routing.gie)
# --------------------------------------------------------------------------------------------


def count_stale(endpoints: Sequence[EndpointState]) -> int:
    """How many endpoints carry ``stale=True``."""
    stale = 0
    for e in endpoints:
        if e.stale:
            stale += 1
    return stale


def rank_endpoints(
    endpoints: Sequence[EndpointState],
    keys: Sequence[float],
    rng: random.Random,
    tiebreak: Sequence[float] | None = None,
    *,
    skip_stale: bool = True,
) -> tuple[int, ...]:
    """All endpoint indices ordered by ascending ``keys[i]`` (lower is better).

    With ``skip_stale`` and at least one fresh endpoint, stale endpoints go after every fresh
    one (each part ordered by key). Among the endpoints tied for the best key, ``tiebreak``
    (lower is better) narrows the group if given; the survivors are then rotated by a
    uniformly random offset, so the winner is uniform among them and the tied fallbacks
    follow in a random cyclic order. Other tied groups keep index order (fallbacks only).
    """
    n = len(endpoints)
    order = sorted(range(n), key=keys.__getitem__)
    head = n  # the first `head` entries of `order` are the eligible first choices
    if skip_stale:
        stale = count_stale(endpoints)
        if 0 < stale < n:
            order = [i for i in order if not endpoints[i].stale] + [i for i in order if endpoints[i].stale]
            head = n - stale
    best = keys[order[0]]
    k = 1
    while k < head and keys[order[k]] == best:
        k += 1
    if k > 1 and tiebreak is not None:
        group = sorted(order[:k], key=tiebreak.__getitem__)
        order[:k] = group
        second = tiebreak[group[0]]
        k2 = 1
        while k2 < k and tiebreak[group[k2]] == second:
            k2 += 1
        k = k2
    if k > 1:
        j = rng.randrange(k)
        if j:
            order[:k] = order[j:k] + order[:j]
    return tuple(order)


def _cyclic_from(endpoints: Sequence[EndpointState], start: int, stale: int) -> tuple[int, ...]:
    """Indices ``start, start+1, ..., n-1, 0, ..., start-1``; stale ones moved last if any is fresh."""
    n = len(endpoints)
    if stale == 0 or stale == n:
        return (*range(start, n), *range(start))
    fresh: list[int] = []
    tail: list[int] = []
    for i in (*range(start, n), *range(start)):
        (tail if endpoints[i].stale else fresh).append(i)
    return (*fresh, *tail)


def _nth_fresh(endpoints: Sequence[EndpointState], r: int) -> int:
    """Index of the ``r``-th (0-based) non-stale endpoint."""
    for i, e in enumerate(endpoints):
        if not e.stale:
            if r == 0:
                return i
            r -= 1
    raise IndexError(r)


def request_load(e: EndpointState) -> int:
    """Requests on an endpoint: scraped running + waiting, plus assignments since the scrape."""
    return e.running + e.waiting + e.pending_since_scrape


def kv_load_fraction(e: EndpointState) -> float:
    """KV occupancy as a fraction of capacity, including assignments the scrape cannot show yet.

    Falls back to the scraped ``kv_usage`` when the capacity in tokens is unknown (0).
    """
    if e.kv_capacity_tokens > 0:
        return e.kv_load_tokens() / e.kv_capacity_tokens
    return e.kv_usage


class _Keyed(Policy):
    """Base for policies that score every endpoint: keeps a reusable key buffer."""

    def __init__(self, ctx: PolicyContext) -> None:
        self._rng = ctx.rng
        self._keys: list[float] = []
        self._tiebreak: list[float] = []

    def _buffer(self, n: int) -> list[float]:
        if len(self._keys) != n:
            self._keys = [0.0] * n
        return self._keys

    def _tiebreak_buffer(self, n: int) -> list[float]:
        if len(self._tiebreak) != n:
            self._tiebreak = [0.0] * n
        return self._tiebreak


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


class RoundRobin(Policy):
    """Cycle over the endpoints in index order, skipping stale ones while a fresh one exists.

    The policy remembers the index after its last pick and resumes there modulo the current
    endpoint count, so it keeps cycling when endpoints are added or removed. Fallbacks are the
    following endpoints in cyclic order.
    """

    name = "round-robin"

    def __init__(self, params: NoParams, ctx: PolicyContext) -> None:
        self._next = 0

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        start = self._next % n
        pick = start
        stale = count_stale(eps)
        if 0 < stale < n:
            i = start
            while eps[i].stale:
                i += 1
                if i == n:
                    i = 0
            pick = i
        self._next = pick + 1
        return Route(_cyclic_from(eps, pick, stale))


class RandomChoice(Policy):
    """Pick a uniformly random (fresh) endpoint; fallbacks follow it in cyclic index order."""

    name = "random"

    def __init__(self, params: NoParams, ctx: PolicyContext) -> None:
        self._rng = ctx.rng

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        stale = count_stale(eps)
        pick = _nth_fresh(eps, self._rng.randrange(n - stale)) if 0 < stale < n else self._rng.randrange(n)
        return Route(_cyclic_from(eps, pick, stale))


class LeastRequests(_Keyed):
    """Fewest requests: scraped ``running + waiting`` plus ``pending_since_scrape``.

    The pending term is the router's own assignments the last scrape cannot show yet; without
    it every request in a 50 ms scrape window would go to the same endpoint. Ties are random.
    """

    name = "least-requests"

    def __init__(self, params: NoParams, ctx: PolicyContext) -> None:
        super().__init__(ctx)

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        keys = self._buffer(n)
        for i, e in enumerate(eps):
            keys[i] = e.running + e.waiting + e.pending_since_scrape
        return Route(rank_endpoints(eps, keys, self._rng))


class JSQParams(PolicyParams):
    """Parameters of ``jsq``."""

    default_output_tokens: int = Field(
        default=256,
        ge=0,
        description=(
            "Output length assumed for a request with neither a length prediction nor max_tokens "
            "(tokens). Default 256."
        ),
    )


class JoinShortestQueue(_Keyed):
    """Join the shortest queue, measured in tokens still to process (paper (a)'s JSQ baseline).

    Outstanding work of an endpoint = sum over its active requests of

    * the prompt tokens, while no output token has been seen (prefill not done), else 0; plus
    * the expected decode tokens still to come: ``prediction.expected_tokens`` if the request
      has a prediction, else its ``max_tokens``, else ``default_output_tokens``, minus the
      tokens generated so far (floor 0).

    Why it walks ``active()`` instead of keeping per-endpoint totals from ``on_assigned`` /
    ``on_completed``: the total depends on ``generated_tokens`` and ``first_token_at``, which
    the driver updates in place as responses stream, with no callback to the policy. A running
    total could only be exact at assignment and completion, never in between, so the policy
    recomputes it. The cost is O(endpoints + active requests) per decision (one small loop per
    request, no allocation). It also stays correct when the policy is swapped in at runtime or
    the endpoint indices change. Drivers that do not fill ``active()`` make every endpoint look
    empty, and ``jsq`` then degrades to random choice.
    """

    name = "jsq"

    def __init__(self, params: JSQParams, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._default_output = float(params.default_output_tokens)

    def outstanding_tokens(self, e: EndpointState) -> float:
        """Prompt tokens not yet prefilled plus expected decode tokens still to generate."""
        default = self._default_output
        total = 0.0
        for a in e.active():
            r = a.request
            generated = a.generated_tokens
            if generated <= 0 and a.first_token_at is None:
                total += r.prompt_tokens
            p = r.prediction
            if p is not None:
                expected = p.expected_tokens
            elif r.max_tokens is not None:
                expected = r.max_tokens
            else:
                expected = default
            remaining = expected - generated
            if remaining > 0:
                total += remaining
        return total

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        keys = self._buffer(n)
        for i, e in enumerate(eps):
            keys[i] = self.outstanding_tokens(e)
        return Route(rank_endpoints(eps, keys, self._rng))


class PowerOfTwoChoices(Policy):
    """Sample two distinct endpoints, send to the one with fewer requests.

    Requests are counted as in ``least-requests``; a tie goes to the one with fewer router-side
    ``inflight`` requests, then to a coin flip. The route starts with the winner and the other
    sampled endpoint; the remaining endpoints follow in cyclic index order after the winner
    (stale ones last), so a decision reads two endpoints and never sorts the pool.
    """

    name = "p2c"

    def __init__(self, params: NoParams, ctx: PolicyContext) -> None:
        self._rng = ctx.rng

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        if n == 1:
            return Route((0,))
        rng = self._rng
        stale = count_stale(eps)
        fresh = n - stale if stale < n else n
        if fresh == 1:
            win = _nth_fresh(eps, 0)
            return Route(_cyclic_from(eps, win, stale))
        x = rng.randrange(fresh)
        y = rng.randrange(fresh - 1)
        if y >= x:
            y += 1
        if fresh != n:
            x = _nth_fresh(eps, x)
            y = _nth_fresh(eps, y)
        ex, ey = eps[x], eps[y]
        lx, ly = request_load(ex), request_load(ey)
        if lx != ly:
            x_wins = lx < ly
        elif ex.inflight != ey.inflight:
            x_wins = ex.inflight < ey.inflight
        else:
            x_wins = rng.random() < 0.5
        win, lose = (x, y) if x_wins else (y, x)
        if n == 2:
            return Route((win, lose))
        rest = _cyclic_from(eps, win, stale)
        return Route((win, lose, *(i for i in rest[1:] if i != lose)))


class LeastKV(_Keyed):
    """Lowest KV-cache load: ``kv_load_tokens() / kv_capacity_tokens``.

    ``kv_load_tokens`` is the scraped usage plus the prompt tokens of assignments since the
    scrape. When the capacity in tokens is unknown (0), the scraped ``kv_usage`` fraction is
    used. Ties (e.g. an idle pool) go to fewer requests (``least-requests``' count), then random.
    """

    name = "least-kv"

    def __init__(self, params: NoParams, ctx: PolicyContext) -> None:
        super().__init__(ctx)

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        keys = self._buffer(n)
        second = self._tiebreak_buffer(n)
        for i, e in enumerate(eps):
            keys[i] = kv_load_fraction(e)
            second[i] = e.running + e.waiting + e.pending_since_scrape
        return Route(rank_endpoints(eps, keys, self._rng, second))


def register_baselines(reg: PolicyRegistry) -> None:
    """Register the six prediction-free baselines."""
    reg.register(
        "round-robin",
        NoParams,
        RoundRobin,
        "Cycle over endpoints in index order; the paper-(a) reference baseline.",
    )
    reg.register("random", NoParams, RandomChoice, "Uniformly random endpoint.")
    reg.register(
        "least-requests",
        NoParams,
        LeastRequests,
        "Fewest running + waiting requests, corrected for assignments since the last scrape.",
    )
    reg.register(
        "jsq",
        JSQParams,
        JoinShortestQueue,
        "Join the shortest queue by outstanding prompt + expected decode tokens.",
    )
    reg.register(
        "p2c",
        NoParams,
        PowerOfTwoChoices,
        "Power of two choices: the less loaded of two random endpoints.",
    )
    reg.register(
        "least-kv",
        NoParams,
        LeastKV,
        "Lowest KV-cache load, including prompt tokens assigned since the last scrape.",
    )
