"""``gie-default``: a replica of the Gateway API Inference Extension's default scheduling profile.

What ships with GIE v1.2+ (``config/charts/inferencepool/templates/epp-config.yaml``) and the
llm-d router charts is one profile without filters::

    queue-scorer                weight 2   (max - waiting) / (max - min), 1.0 when max == min
    kv-cache-utilization-scorer weight 2   1 - kv_cache_usage
    prefix-cache-scorer         weight 3   matched blocks / request blocks
    max-score-picker                       highest weighted sum, random among ties

Each score is clamped to [0, 1] and the weighted scores are summed. This module reproduces that
profile on our :class:`~llmpool.routing.types.PoolView`:

* **Scraped metrics only.** The queue and KV terms read the scraped ``waiting`` and
  ``kv_usage`` gauges with no router-side correction (GIE adds none), so a burst inside one
  scrape interval sees the same numbers for every request, as the real EPP does.
* **No staleness filter.** GIE's default profile has no filter: an endpoint with old metrics
  stays a candidate and is scored on its last scraped values (metric staleness is only used by
  the saturation detector for admission; GIE issue #1497 describes this gap). We do the same
  and ignore ``EndpointState.stale``. An endpoint never scraped has zero gauges, exactly like a
  GIE pod whose first scrape has not landed.
* **Approximate prefix index** (GIE's ``prefix-cache-scorer`` / llm-d's
  ``approx-prefix-cache-producer``): per endpoint an LRU of the block hashes of the requests
  routed there (capacity ``lru_capacity_per_server``, GIE default 31,250 entries), plus a
  reverse map hash -> endpoints. It is updated when a request is sent (``on_assigned``, GIE's
  pre-request hook) with all of the request's block hashes; lookups do not refresh recency.
  Every 2 minutes (of the driver's clock) endpoints that left the pool are dropped, as GIE's
  inactive-pod cleanup does, so memory stays bounded by capacity x endpoints.
* **Match counting as GIE does it.** The request's hashes are walked from the first; the walk
  stops at the first hash that *no* endpoint holds; every endpoint holding a walked hash gets
  one block of credit. So a hash missing everywhere ends matching for all endpoints, while an
  endpoint that lost an early block to its own LRU (but another endpoint still has it) keeps
  credit for the later blocks it holds. Score = credit / number of request hashes; 0 when the
  request has no hashes.
* **Max-score picking.** The best total wins, uniformly at random among exact ties; the other
  endpoints follow as fallbacks, best total first.

Differences that remain: GIE hashes prompts itself (64-token blocks at least, model name folded
into the first hash) while we use ``Request.prefix_hashes`` as given (the trace's or the
picker's blocks); GIE v1.2 returns only the winner (``maxNumOfEndpoints: 1``) where we return
the whole ranking; the GIE picker shuffles all tied endpoints, we randomise the tied winners and
leave lower tied groups in index order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from llmpool.routing.baselines import NO_ENDPOINTS, rank_endpoints
from llmpool.routing.policy import Policy, PolicyContext, PolicyParams, PolicyRegistry
from llmpool.routing.types import Decision, EndpointState, PoolView, Request, Route

DEFAULT_LRU_CAPACITY_PER_SERVER = 31250
"""GIE's ``lruCapacityPerServer`` default: 500K tokens of HBM cache / 16-token blocks."""

PRUNE_INTERVAL_S = 120.0
"""How often departed endpoints are dropped from the prefix index (GIE's podActiveCheckInterval)."""


class GieParams(PolicyParams):
    """Parameters of ``gie-default`` (defaults = the GIE v1.2+ chart)."""

    queue_weight: int = Field(
        default=2, ge=0, description="Weight of queue-scorer (min-max normalised waiting). Default 2."
    )
    kv_cache_weight: int = Field(
        default=2, ge=0, description="Weight of kv-cache-utilization-scorer (1 - kv_usage). Default 2."
    )
    prefix_cache_weight: int = Field(
        default=3, ge=0, description="Weight of prefix-cache-scorer (matched block fraction). Default 3."
    )
    lru_capacity_per_server: int = Field(
        default=DEFAULT_LRU_CAPACITY_PER_SERVER,
        ge=1,
        description="Block hashes remembered per endpoint by the prefix index (LRU). Default 31250.",
    )


class PrefixIndex:
    """Router-side approximation of each endpoint's prefix cache.

    Per server an LRU (``OrderedDict``, oldest first) of block hashes, bounded by ``capacity``,
    and a reverse map from hash to the servers holding it. Memory is bounded by
    ``capacity`` x number of servers tracked; :meth:`retain` drops servers that left the pool.
    """

    __slots__ = ("_holders", "_lru", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}

    def __len__(self) -> int:
        """Number of servers tracked."""
        return len(self._lru)

    def size(self, server: str) -> int:
        """Number of hashes remembered for ``server``."""
        lru = self._lru.get(server)
        return 0 if lru is None else len(lru)

    def holders(self, block_hash: int) -> frozenset[str]:
        """Servers that hold ``block_hash`` (a copy, for inspection)."""
        return frozenset(self._holders.get(block_hash, ()))

    def add(self, server: str, hashes: Sequence[int]) -> None:
        """Record that ``server`` now caches ``hashes`` (touching those it already had)."""
        lru = self._lru.get(server)
        if lru is None:
            lru = self._lru[server] = OrderedDict()
        holders = self._holders
        cap = self.capacity
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            owners = holders.get(h)
            if owners is None:
                holders[h] = {server}
            else:
                owners.add(server)
            if len(lru) > cap:
                old, _ = lru.popitem(last=False)
                self._forget(old, server)

    def _forget(self, block_hash: int, server: str) -> None:
        owners = self._holders.get(block_hash)
        if owners is not None:
            owners.discard(server)
            if not owners:
                del self._holders[block_hash]

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks of credit per server, counted as GIE's ``matchLongestPrefix`` does.

        Walk ``hashes`` from the first and stop at the first hash no server holds; each server
        holding a walked hash gets one block. Servers with no credit are absent.
        """
        credit: dict[str, int] = {}
        holders = self._holders
        for h in hashes:
            owners = holders.get(h)
            if not owners:
                break
            for s in owners:
                credit[s] = credit.get(s, 0) + 1
        return credit

    def remove(self, server: str) -> None:
        """Forget everything about ``server``."""
        lru = self._lru.pop(server, None)
        if lru is None:
            return
        for h in lru:
            self._forget(h, server)

    def retain(self, servers: set[str]) -> None:
        """Drop every tracked server not in ``servers``."""
        for s in [s for s in self._lru if s not in servers]:
            self.remove(s)


def server_id(e: EndpointState, index: int) -> str:
    """Key of an endpoint in the prefix index: its name, or its position if it has none."""
    return e.name or f"endpoint-{index}"


class GieDefault(Policy):
    """GIE v1.2+ default profile: queue 2 + KV 2 + prefix 3, max-score picker (see module doc)."""

    name = "gie-default"

    def __init__(self, params: GieParams, ctx: PolicyContext) -> None:
        self._rng = ctx.rng
        self._wq = float(params.queue_weight)
        self._wkv = float(params.kv_cache_weight)
        self._wp = float(params.prefix_cache_weight)
        self.index = PrefixIndex(params.lru_capacity_per_server)
        self._endpoints: Sequence[EndpointState] = ()
        self._keys: list[float] = []
        self._next_sweep: float | None = None
        self._assigned_since_sweep: set[str] = set()

    def scores(self, request: Request, endpoints: Sequence[EndpointState]) -> list[float]:
        """Weighted total per endpoint, in index order (for inspection and tests)."""
        if not endpoints:
            return []
        self._score_into(request, endpoints)
        return [-k for k in self._keys]

    def _score_into(self, request: Request, eps: Sequence[EndpointState]) -> list[float]:
        """Fill the key buffer with minus the weighted total of each endpoint."""
        n = len(eps)
        keys = self._keys
        if len(keys) != n:
            keys = self._keys = [0.0] * n
        qmin = qmax = eps[0].waiting
        for e in eps:
            w = e.waiting
            if w < qmin:
                qmin = w
            elif w > qmax:
                qmax = w
        qspan = qmax - qmin
        hashes = request.prefix_hashes
        total = len(hashes)
        wq, wkv, wp = self._wq, self._wkv, self._wp
        credit = self.index.match(hashes) if total and wp else None
        for i, e in enumerate(eps):
            q = 1.0 if qspan == 0 else (qmax - e.waiting) / qspan
            kv = 1.0 - e.kv_usage
            if kv < 0.0:
                kv = 0.0
            elif kv > 1.0:
                kv = 1.0
            p = 0.0
            if credit:
                c = credit.get(e.name or f"endpoint-{i}")
                if c:
                    p = c / total
                    if p > 1.0:
                        p = 1.0
            keys[i] = -(wq * q + wkv * kv + wp * p)
        return keys

    def decide(self, request: Request, view: PoolView) -> Decision:
        eps = view.endpoints
        n = len(eps)
        if n == 0:
            return NO_ENDPOINTS
        self._endpoints = eps
        now = view.now
        if self._next_sweep is None:
            self._next_sweep = now + PRUNE_INTERVAL_S
        elif now >= self._next_sweep:
            self._sweep(eps)
            self._next_sweep = now + PRUNE_INTERVAL_S
        keys = self._score_into(request, eps)
        return Route(rank_endpoints(eps, keys, self._rng, skip_stale=False))

    def _sweep(self, eps: Sequence[EndpointState]) -> None:
        """Drop the prefix LRUs of endpoints that left the pool (GIE does this every 2 minutes).

        An endpoint is kept if it is in the current view or was sent a request since the last
        sweep. The second condition protects endpoints that a per-request subset (the gateway's
        subset hint) left out of this particular view.
        """
        keep = self._assigned_since_sweep
        for i, e in enumerate(eps):
            keep.add(server_id(e, i))
        self.index.retain(keep)
        self._assigned_since_sweep = set()

    def on_assigned(self, request: Request, endpoint: int, now: float) -> None:
        """Record the request's block hashes on the endpoint it was sent to (GIE PreRequest)."""
        if not request.prefix_hashes or not self._wp:
            return
        eps = self._endpoints
        key = server_id(eps[endpoint], endpoint) if 0 <= endpoint < len(eps) else f"endpoint-{endpoint}"
        self._assigned_since_sweep.add(key)
        self.index.add(key, request.prefix_hashes)


def register_gie(reg: PolicyRegistry) -> None:
    """Register ``gie-default``."""
    reg.register(
        "gie-default",
        GieParams,
        GieDefault,
        "Gateway API Inference Extension default: queue 2 + KV-utilisation 2 + prefix 3, max score.",
    )
