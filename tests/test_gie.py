"""``gie-default``: the GIE v1.2+ default profile (queue 2 + KV 2 + prefix 3, max-score picker)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from llmpool.routing import (
    ConfigError,
    EndpointState,
    PolicyContext,
    PoolView,
    Request,
    Route,
    builtin_registry,
)
from llmpool.routing.gie import GieDefault, PrefixIndex


def ep(i: int, **kw: Any) -> EndpointState:
    kw.setdefault("name", f"pod-{i}:8000")
    return EndpointState(index=i, **kw)


def view(endpoints: Sequence[EndpointState], now: float = 0.0) -> PoolView:
    return PoolView(now=now, endpoints=list(endpoints))


def gie(params: dict[str, Any] | None = None, seed: int = 0) -> GieDefault:
    ctx = PolicyContext(rng=random.Random(seed))
    p = builtin_registry().build({"name": "gie-default", "params": params or {}}, ctx)
    assert isinstance(p, GieDefault)
    return p


def req(hashes: Sequence[int] = (), i: int = 0) -> Request:
    return Request(id=i, arrival=0.0, prompt_tokens=512 * len(hashes) + 10, prefix_hashes=tuple(hashes))


def decide(policy: GieDefault, endpoints: Sequence[EndpointState], request: Request | None = None) -> Route:
    d = policy.decide(request or req(), view(endpoints))
    assert isinstance(d, Route)
    return d


def send(policy: GieDefault, endpoints: Sequence[EndpointState], hashes: Sequence[int], to: int) -> None:
    """Route a request (so the policy sees the view) and record it as sent to endpoint ``to``."""
    r = req(hashes)
    policy.decide(r, view(endpoints))
    policy.on_assigned(r, to, 0.0)


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------


def test_defaults_are_the_gie_chart_weights() -> None:
    _spec, params = builtin_registry().validate("gie-default")
    assert params.model_dump() == {
        "queue_weight": 2,
        "kv_cache_weight": 2,
        "prefix_cache_weight": 3,
        "lru_capacity_per_server": 31250,
    }
    assert gie().index.capacity == 31250


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"queue_weight": -1}, "queue_weight"),
        ({"kv_cache_weight": -2}, "kv_cache_weight"),
        ({"prefix_cache_weight": 1.5}, "prefix_cache_weight"),
        ({"lru_capacity_per_server": 0}, "lru_capacity_per_server"),
        ({"prefix_weight": 3}, "prefix_weight"),
    ],
)
def test_bad_params_rejected(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        gie(params)
    msg = str(err.value)
    assert field in msg
    assert "gie-default" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------
# Queue term
# ------------------------------------------------------------------------------------------


def test_queue_term_is_min_max_normalised_waiting() -> None:
    # kv_usage 0 -> KV term 1.0 (x2); no prefix hashes -> prefix term 0.
    eps = [ep(0, waiting=10), ep(1, waiting=0), ep(2, waiting=5)]
    assert gie().scores(req(), eps) == [2 * 0.0 + 2.0, 2 * 1.0 + 2.0, 2 * 0.5 + 2.0]
    assert decide(gie(), eps).endpoints == (1, 2, 0)


def test_queue_term_is_one_when_all_queues_equal() -> None:
    eps = [ep(i, waiting=7) for i in range(3)]
    assert gie().scores(req(), eps) == [4.0, 4.0, 4.0]
    only = [ep(0, waiting=12)]
    assert gie().scores(req(), only) == [4.0]


def test_queue_term_ignores_running_and_router_side_counts() -> None:
    # GIE reads the scraped waiting gauge only: no running, no pending_since_scrape correction.
    eps = [ep(0, waiting=0, running=40, pending_since_scrape=25, inflight=65), ep(1, waiting=1)]
    assert decide(gie(), eps).endpoints == (0, 1)


# ------------------------------------------------------------------------------------------
# KV term
# ------------------------------------------------------------------------------------------


def test_kv_term_is_one_minus_scraped_usage_clamped() -> None:
    policy = gie({"queue_weight": 0, "prefix_cache_weight": 0, "kv_cache_weight": 1})
    eps = [
        ep(0, kv_usage=0.25),
        ep(1, kv_usage=0.75),
        ep(2, kv_usage=1.3),  # -> 0
        ep(3, kv_usage=-0.2),  # -> 1
        # unscraped assignments are not added (GIE has no router-side correction)
        ep(4, kv_usage=0.1, kv_capacity_tokens=1000, pending_tokens_since_scrape=900),
    ]
    assert policy.scores(req(), eps) == [0.75, 0.25, 0.0, 1.0, 0.9]
    assert decide(policy, eps).endpoints == (3, 4, 0, 1, 2)


# ------------------------------------------------------------------------------------------
# Prefix term
# ------------------------------------------------------------------------------------------


def only_prefix() -> GieDefault:
    return gie({"queue_weight": 0, "kv_cache_weight": 0, "prefix_cache_weight": 1})


def test_prefix_term_counts_blocks_from_the_first() -> None:
    policy = only_prefix()
    eps = [ep(0), ep(1), ep(2)]
    send(policy, eps, (1, 2, 3, 4), to=0)
    send(policy, eps, (1, 2, 9, 10), to=1)
    # 1 -> {0,1}, 2 -> {0,1}, 3 -> {0}, 4 -> {0}
    assert policy.scores(req((1, 2, 3, 4)), eps) == [1.0, 0.5, 0.0]
    assert decide(policy, eps, req((1, 2, 3, 4))).endpoints[0] == 0
    # 8 extra blocks nobody has: endpoint 0 matches 4 of 12
    assert policy.scores(req((1, 2, 3, 4, *range(100, 108))), eps) == [4 / 12, 2 / 12, 0.0]


def test_prefix_gap_stops_matching() -> None:
    policy = only_prefix()
    eps = [ep(0), ep(1)]
    send(policy, eps, (1, 2, 3, 4), to=0)
    # block 77 is cached nowhere: the walk stops there, block 4 is not credited
    assert policy.scores(req((1, 2, 77, 4)), eps) == [0.5, 0.0]
    # a request whose first block is unknown matches nothing at all
    assert policy.scores(req((77, 1, 2, 3)), eps) == [0.0, 0.0]


def test_prefix_credit_follows_gie_global_walk() -> None:
    """GIE stops at the first block *no* server holds, not at each server's own first gap.

    Endpoint 1 lost block 1 to its LRU, but endpoint 0 still holds it, so the walk goes on and
    endpoint 1 is credited for blocks 2 and 3 (GIE ``matchLongestPrefix``).
    """
    policy = gie(
        {"queue_weight": 0, "kv_cache_weight": 0, "prefix_cache_weight": 1, "lru_capacity_per_server": 3}
    )
    eps = [ep(0), ep(1)]
    send(policy, eps, (1, 2, 3), to=0)
    send(policy, eps, (1, 2, 3), to=1)
    send(policy, eps, (5,), to=1)  # evicts block 1 from endpoint 1
    assert policy.index.holders(1) == {"pod-0:8000"}
    assert policy.scores(req((1, 2, 3)), eps) == [1.0, 2 / 3]


def test_prefix_term_zero_without_hashes() -> None:
    policy = only_prefix()
    eps = [ep(0), ep(1)]
    send(policy, eps, (1, 2), to=0)
    assert policy.scores(req(()), eps) == [0.0, 0.0]


def test_prefix_index_follows_endpoint_names_not_positions() -> None:
    policy = only_prefix()
    a, b = ep(0), ep(1)
    send(policy, [a, b], (1, 2), to=1)  # to b
    b2 = ep(0, name=b.name)
    a2 = ep(1, name=a.name)
    assert policy.scores(req((1, 2)), [b2, a2]) == [1.0, 0.0]


def test_prefix_weight_zero_keeps_no_index() -> None:
    policy = gie({"prefix_cache_weight": 0})
    eps = [ep(0), ep(1)]
    send(policy, eps, (1, 2, 3), to=0)
    assert len(policy.index) == 0


def test_departed_endpoints_are_dropped_from_the_index_every_two_minutes() -> None:
    policy = only_prefix()
    eps = [ep(0), ep(1), ep(2)]
    for i in range(3):
        send(policy, eps, (10 + i, 20 + i), to=i)  # at t=0
    assert len(policy.index) == 3
    # endpoint 1 leaves the pool; nothing is dropped before the sweep interval
    policy.decide(req(), view([eps[0], eps[2]], now=60.0))
    assert len(policy.index) == 3
    # t=121: first sweep; endpoint 1 was routed to in this interval (at t=0), so it is kept
    policy.decide(req(), view([eps[0], eps[2]], now=121.0))
    assert len(policy.index) == 3
    # t=242: neither in the view nor routed to since the last sweep -> dropped
    policy.decide(req(), view([eps[0], eps[2]], now=242.0))
    assert len(policy.index) == 2
    assert policy.index.size("pod-1:8000") == 0
    assert policy.index.holders(11) == frozenset()
    assert policy.index.holders(12) == {"pod-2:8000"}


def test_subset_views_do_not_drop_recently_used_endpoints() -> None:
    """A request restricted to a subset (gateway subset hint) must not wipe the others' state."""
    policy = only_prefix()
    eps = [ep(0), ep(1)]
    send(policy, eps, (1, 2), to=0)
    r = req((3, 4))
    policy.decide(r, view(eps, now=100.0))
    policy.on_assigned(r, 1, 100.0)
    # the sweep at t=130 sees a view with endpoint 0 only; endpoint 1 was routed to at t=100
    policy.decide(req(), view([eps[0]], now=130.0))
    assert policy.index.holders(3) == {"pod-1:8000"}
    assert policy.index.holders(1) == {"pod-0:8000"}


# ------------------------------------------------------------------------------------------
# LRU bound
# ------------------------------------------------------------------------------------------


def test_lru_is_bounded_per_server() -> None:
    idx = PrefixIndex(capacity=4)
    idx.add("a", range(100))
    assert idx.size("a") == 4
    assert all(idx.holders(h) == frozenset() for h in range(96))
    assert all(idx.holders(h) == {"a"} for h in range(96, 100))
    idx.add("b", range(50))
    assert idx.size("a") == 4
    assert idx.size("b") == 4
    assert idx.holders(97) == {"a"}
    assert idx.holders(49) == {"b"}


def test_lru_add_refreshes_recency() -> None:
    idx = PrefixIndex(capacity=4)
    idx.add("a", (1, 2, 3, 4))
    idx.add("a", (1,))  # 1 becomes most recent
    idx.add("a", (5,))  # evicts 2, the oldest
    assert idx.holders(1) == {"a"}
    assert idx.holders(2) == frozenset()
    assert idx.match((1, 2, 3)) == {"a": 1}


def test_lookups_do_not_refresh_recency() -> None:
    idx = PrefixIndex(capacity=2)
    idx.add("a", (1, 2))
    assert idx.match((1,)) == {"a": 1}
    idx.add("a", (3,))  # 1 is still the oldest: matching did not touch it
    assert idx.holders(1) == frozenset()
    assert idx.holders(2) == {"a"}


def test_policy_index_respects_capacity_param() -> None:
    policy = gie({"lru_capacity_per_server": 8})
    eps = [ep(0), ep(1)]
    for k in range(50):
        send(policy, eps, tuple(range(k * 10, k * 10 + 5)), to=k % 2)
    assert policy.index.size("pod-0:8000") == 8
    assert policy.index.size("pod-1:8000") == 8


# ------------------------------------------------------------------------------------------
# Weighted sum and picking
# ------------------------------------------------------------------------------------------


def weighted_example(policy: GieDefault) -> list[EndpointState]:
    eps = [
        ep(0, waiting=4, kv_usage=0.5),
        ep(1, waiting=0, kv_usage=0.8),
        ep(2, waiting=2, kv_usage=0.1),
    ]
    send(policy, eps, (10, 11), to=0)
    send(policy, eps, (10, 11, 12, 13), to=2)
    return eps


def test_weighted_sum_hand_computed_default_weights() -> None:
    policy = gie()
    eps = weighted_example(policy)
    r = req((10, 11, 12, 13))
    # queue: min 0, max 4 -> ep0 0.0, ep1 1.0, ep2 0.5
    # kv:    1 - usage    -> ep0 0.5, ep1 0.2, ep2 0.9
    # prefix: 10 -> {0,2}, 11 -> {0,2}, 12 -> {2}, 13 -> {2} -> ep0 2/4, ep1 0, ep2 4/4
    # total = 2*queue + 2*kv + 3*prefix
    expected = [
        2 * 0.0 + 2 * 0.5 + 3 * 0.5,  # 2.5
        2 * 1.0 + 2 * 0.2 + 3 * 0.0,  # 2.4
        2 * 0.5 + 2 * 0.9 + 3 * 1.0,  # 5.8
    ]
    assert policy.scores(r, eps) == pytest.approx(expected)
    assert policy.scores(r, eps) == pytest.approx([2.5, 2.4, 5.8])
    assert decide(policy, eps, r).endpoints == (2, 0, 1)


def test_weighted_sum_hand_computed_custom_weights() -> None:
    policy = gie({"queue_weight": 1, "kv_cache_weight": 1, "prefix_cache_weight": 1})
    eps = weighted_example(policy)
    r = req((10, 11, 12, 13))
    # ep0 0 + 0.5 + 0.5 = 1.0; ep1 1 + 0.2 + 0 = 1.2; ep2 0.5 + 0.9 + 1 = 2.4
    assert policy.scores(r, eps) == pytest.approx([1.0, 1.2, 2.4])
    assert decide(policy, eps, r).endpoints == (2, 1, 0)


def test_ties_are_broken_randomly() -> None:
    policy = gie(seed=5)
    eps = [ep(i, waiting=3, kv_usage=0.4) for i in range(6)]
    picks = Counter(decide(policy, eps).endpoints[0] for _ in range(1200))
    assert set(picks) == set(range(6))
    assert min(picks.values()) >= 140  # expectation 200 each


def test_ties_only_among_the_best() -> None:
    policy = gie(seed=6)
    eps = [ep(0, waiting=0), ep(1, waiting=5), ep(2, waiting=0), ep(3, waiting=5)]
    routes = [decide(policy, eps).endpoints for _ in range(200)]
    assert {r[0] for r in routes} == {0, 2}
    assert all(set(r[:2]) == {0, 2} and set(r[2:]) == {1, 3} for r in routes)


def test_stale_endpoints_are_not_filtered() -> None:
    """GIE's default profile has no staleness filter: old metrics are scored as they are."""
    eps = [ep(0, waiting=5, kv_usage=0.9), ep(1, waiting=0, kv_usage=0.0, stale=True)]
    assert decide(gie(), eps).endpoints == (1, 0)


def test_scores_stay_within_weight_sum() -> None:
    rng = random.Random(1)
    policy = gie()
    eps = [ep(i) for i in range(6)]
    for k in range(200):
        send(policy, eps, tuple(rng.randrange(30) for _ in range(rng.randint(0, 6))), to=rng.randrange(6))
        for e in eps:
            e.waiting = rng.randint(0, 20)
            e.kv_usage = rng.uniform(-0.1, 1.2)
        scores = policy.scores(req(tuple(rng.randrange(30) for _ in range(4)), i=k), eps)
        assert all(0.0 <= s <= 7.0 for s in scores)
