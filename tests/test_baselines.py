"""The prediction-free baselines: round-robin, random, least-requests, jsq, p2c, least-kv."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from llmpool.routing import (
    ActiveRequest,
    ConfigError,
    EndpointState,
    Hold,
    LengthPrediction,
    Policy,
    PolicyContext,
    PoolView,
    Request,
    Route,
    builtin_registry,
)
from llmpool.routing.baselines import JoinShortestQueue

BASELINES = ["round-robin", "random", "least-requests", "jsq", "p2c", "least-kv"]
ALL_POLICIES = [*BASELINES, "gie-default"]


def ep(i: int, active: Sequence[ActiveRequest] = (), **kw: Any) -> EndpointState:
    e = EndpointState(index=i, name=f"10.0.0.{i}:8000", **kw)
    if active:
        e._active_source = lambda: active
    return e


def view(endpoints: Sequence[EndpointState], now: float = 0.0) -> PoolView:
    return PoolView(now=now, endpoints=list(endpoints))


def build(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Policy:
    ctx = PolicyContext(rng=random.Random(seed))
    return builtin_registry().build({"name": name, "params": params or {}}, ctx)


def req(i: int = 0, prompt: int = 100, **kw: Any) -> Request:
    return Request(id=i, arrival=0.0, prompt_tokens=prompt, **kw)


def route(
    policy: Policy, endpoints: Sequence[EndpointState], request: Request | None = None
) -> tuple[int, ...]:
    d = policy.decide(request or req(), view(endpoints))
    assert isinstance(d, Route)
    return d.endpoints


# ------------------------------------------------------------------------------------------
# Registry and common contract
# ------------------------------------------------------------------------------------------


def test_builtin_registry_lists_all_seven_baselines_first() -> None:
    names = builtin_registry().names()
    assert names[: len(ALL_POLICIES)] == ALL_POLICIES


def test_unknown_policy_name_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as err:
        build("least-loaded")
    msg = str(err.value)
    assert "least-loaded" in msg
    assert "\n" not in msg
    for name in ALL_POLICIES:
        assert name in msg


def test_jsq_rejects_negative_default_output_tokens() -> None:
    ctx = PolicyContext(rng=random.Random(0))
    with pytest.raises(ConfigError) as err:
        builtin_registry().build({"name": "jsq", "params": {"default_output_tokens": -1}}, ctx)
    msg = str(err.value)
    assert "\n" not in msg
    assert "default_output_tokens" in msg
    assert "jsq" in msg


@pytest.mark.parametrize("name", BASELINES)
def test_unknown_parameter_is_rejected(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, {"weight": 1})
    assert "weight" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_no_endpoints_holds(name: str) -> None:
    d = build(name).decide(req(), view([]))
    assert d == Hold("no endpoints")


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_single_endpoint_routes_to_it(name: str) -> None:
    assert route(build(name), [ep(0, running=3, waiting=2, kv_usage=0.7)]) == (0,)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_route_is_a_permutation_of_all_endpoints(name: str) -> None:
    rng = random.Random(7)
    policy = build(name, seed=3)
    for _ in range(200):
        n = rng.randint(1, 12)
        eps = [
            ep(
                i,
                running=rng.randint(0, 5),
                waiting=rng.randint(0, 5),
                pending_since_scrape=rng.randint(0, 2),
                kv_usage=rng.random(),
                kv_capacity_tokens=rng.choice([0, 10_000]),
                inflight=rng.randint(0, 8),
                stale=rng.random() < 0.2,
            )
            for i in range(n)
        ]
        r = route(policy, eps)
        assert sorted(r) == list(range(n))


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_ties_spread_over_endpoints(name: str) -> None:
    """Equal endpoints: over many decisions every endpoint gets a fair share (not endpoint 0)."""
    policy = build(name, seed=11)
    eps = [ep(i, running=2, waiting=1, kv_usage=0.3, kv_capacity_tokens=1000) for i in range(8)]
    picks = Counter(route(policy, eps)[0] for _ in range(1600))
    assert set(picks) == set(range(8))
    assert min(picks.values()) >= 120  # expectation 200 each
    assert max(picks.values()) <= 280


@pytest.mark.parametrize("name", BASELINES)
def test_stale_endpoints_are_last_resort(name: str) -> None:
    # The stale endpoints look idle (they would win on load); they must still never come first.
    eps = [
        ep(0, running=9, waiting=9, kv_usage=0.9, stale=False, inflight=9),
        ep(1, stale=True),
        ep(2, running=8, waiting=8, kv_usage=0.8, stale=False, inflight=8),
        ep(3, stale=True),
    ]
    policy = build(name, seed=5)
    for _ in range(100):
        r = route(policy, eps)
        assert set(r[:2]) == {0, 2}
        assert set(r[2:]) == {1, 3}


@pytest.mark.parametrize("name", BASELINES)
def test_all_stale_still_routes(name: str) -> None:
    eps = [ep(i, stale=True) for i in range(3)]
    assert sorted(route(build(name), eps)) == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# round-robin
# ------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_index_order_with_cyclic_fallbacks() -> None:
    policy = build("round-robin")
    eps = [ep(i) for i in range(4)]
    routes = [route(policy, eps) for _ in range(6)]
    assert [r[0] for r in routes] == [0, 1, 2, 3, 0, 1]
    assert routes[2] == (2, 3, 0, 1)


def test_round_robin_survives_endpoint_count_changes() -> None:
    policy = build("round-robin")
    four = [ep(i) for i in range(4)]
    assert [route(policy, four)[0] for _ in range(3)] == [0, 1, 2]
    six = [ep(i) for i in range(6)]
    assert [route(policy, six)[0] for _ in range(4)] == [3, 4, 5, 0]
    two = [ep(i) for i in range(2)]
    assert [route(policy, two)[0] for _ in range(3)] == [1, 0, 1]
    three = [ep(i) for i in range(3)]
    assert [route(policy, three)[0] for _ in range(3)] == [2, 0, 1]


def test_round_robin_skips_stale_without_double_serving_the_next() -> None:
    policy = build("round-robin")
    eps = [ep(0), ep(1, stale=True), ep(2), ep(3)]
    picks = [route(policy, eps)[0] for _ in range(6)]
    assert picks == [0, 2, 3, 0, 2, 3]
    assert route(policy, eps) == (0, 2, 3, 1)


# ------------------------------------------------------------------------------------------
# random
# ------------------------------------------------------------------------------------------


def test_random_is_reproducible_from_the_context_rng() -> None:
    eps = [ep(i) for i in range(10)]
    p1, p2, p3 = build("random", seed=42), build("random", seed=42), build("random", seed=43)
    seq1 = [route(p1, eps)[0] for _ in range(50)]
    seq2 = [route(p2, eps)[0] for _ in range(50)]
    seq3 = [route(p3, eps)[0] for _ in range(50)]
    assert seq1 == seq2
    assert seq1 != seq3
    assert len(set(seq1)) > 5


def test_random_fallbacks_follow_the_pick_cyclically() -> None:
    policy = build("random", seed=1)
    eps = [ep(i) for i in range(5)]
    for _ in range(20):
        r = route(policy, eps)
        assert r == tuple((r[0] + k) % 5 for k in range(5))


# ------------------------------------------------------------------------------------------
# least-requests
# ------------------------------------------------------------------------------------------


def test_least_requests_counts_running_waiting_and_pending() -> None:
    eps = [
        ep(0, running=4, waiting=0, pending_since_scrape=0),  # 4
        ep(1, running=1, waiting=1, pending_since_scrape=3),  # 5: idle gauges, but 3 unscraped
        ep(2, running=2, waiting=0, pending_since_scrape=1),  # 3
        ep(3, running=9, waiting=2, pending_since_scrape=0),  # 11
    ]
    assert route(build("least-requests"), eps) == (2, 0, 1, 3)


def test_least_requests_ignores_inflight_and_kv() -> None:
    eps = [ep(0, running=1, inflight=50, kv_usage=0.99), ep(1, running=2, inflight=0, kv_usage=0.0)]
    assert route(build("least-requests"), eps) == (0, 1)


# ------------------------------------------------------------------------------------------
# jsq
# ------------------------------------------------------------------------------------------


def active(
    prompt: int,
    generated: int = 0,
    *,
    first_token: bool | None = None,
    max_tokens: int | None = None,
    expected: float | None = None,
) -> ActiveRequest:
    prediction = LengthPrediction(expected_tokens=expected) if expected is not None else None
    r = Request(id=0, arrival=0.0, prompt_tokens=prompt, max_tokens=max_tokens, prediction=prediction)
    started = generated > 0 if first_token is None else first_token
    return ActiveRequest(
        request=r, assigned_at=0.0, generated_tokens=generated, first_token_at=1.0 if started else None
    )


def jsq_endpoints() -> list[EndpointState]:
    return [
        # prefill pending: 1000 prompt + 256 default decode = 1256
        ep(0, [active(1000)]),
        # decoding: prediction 400 - 50 generated = 350; second request over its max_tokens: 0
        ep(1, [active(100, 50, expected=400.0), active(80, 150, max_tokens=100)]),
        # prefill pending with max_tokens 300: 200 + 300 = 500
        ep(2, [active(200, max_tokens=300)]),
        # idle but the gauges say busy: JSQ only looks at outstanding tokens
        ep(3, running=30, waiting=30),
    ]


def test_jsq_outstanding_tokens_hand_computed() -> None:
    policy = build("jsq")
    assert isinstance(policy, JoinShortestQueue)
    got = [policy.outstanding_tokens(e) for e in jsq_endpoints()]
    assert got == [1256.0, 350.0, 500.0, 0.0]


def test_jsq_prediction_beats_max_tokens_and_first_token_ends_prefill() -> None:
    policy = build("jsq")
    assert isinstance(policy, JoinShortestQueue)
    # prediction (100) wins over max_tokens (4000): 500 prompt + 100
    assert policy.outstanding_tokens(ep(0, [active(500, max_tokens=4000, expected=100.0)])) == 600.0
    # first token seen but generated count not yet updated: prompt no longer outstanding
    assert policy.outstanding_tokens(ep(0, [active(500, 0, first_token=True, max_tokens=10)])) == 10.0


def test_jsq_picks_fewest_outstanding_tokens() -> None:
    assert route(build("jsq"), jsq_endpoints()) == (3, 1, 2, 0)
    without_idle = jsq_endpoints()[:3]
    assert route(build("jsq"), without_idle) == (1, 2, 0)


def test_jsq_default_output_tokens_parameter() -> None:
    policy = build("jsq", {"default_output_tokens": 0})
    assert isinstance(policy, JoinShortestQueue)
    assert policy.outstanding_tokens(jsq_endpoints()[0]) == 1000.0
    big = build("jsq", {"default_output_tokens": 5000})
    assert isinstance(big, JoinShortestQueue)
    assert big.outstanding_tokens(jsq_endpoints()[0]) == 6000.0


def test_jsq_reflects_progress_without_callbacks() -> None:
    """The driver updates ActiveRequest in place while streaming; JSQ sees it on the next decision."""
    a0 = active(100, max_tokens=1000)
    a1 = active(100, max_tokens=600)
    eps = [ep(0, [a0]), ep(1, [a1])]
    policy = build("jsq")
    assert route(policy, eps)[0] == 1  # 1100 vs 700
    a0.first_token_at = 1.0
    a0.generated_tokens = 500  # 500 left vs 700
    assert route(policy, eps)[0] == 0


# ------------------------------------------------------------------------------------------
# p2c
# ------------------------------------------------------------------------------------------


def test_p2c_never_picks_the_worse_of_its_two_samples() -> None:
    rng = random.Random(3)
    policy = build("p2c", seed=9)
    for _ in range(500):
        n = rng.randint(2, 10)
        eps = [
            ep(i, running=rng.randint(0, 4), waiting=rng.randint(0, 4), inflight=rng.randint(0, 4))
            for i in range(n)
        ]
        r = route(policy, eps)
        win, lose = eps[r[0]], eps[r[1]]
        lw = win.running + win.waiting + win.pending_since_scrape
        ll = lose.running + lose.waiting + lose.pending_since_scrape
        assert (lw, win.inflight) <= (ll, lose.inflight)
        # the rest follow the winner in cyclic index order
        cyclic = [(r[0] + k) % n for k in range(1, n)]
        assert list(r[2:]) == [i for i in cyclic if i != r[1]]


def test_p2c_worst_endpoint_never_wins_and_middle_wins_a_third() -> None:
    policy = build("p2c", seed=4)
    eps = [ep(0, running=0), ep(1, running=5), ep(2, running=10)]
    picks = Counter(route(policy, eps)[0] for _ in range(3000))
    assert picks[2] == 0
    # {0,1} and {0,2} -> 0; {1,2} -> 1
    assert 850 <= picks[1] <= 1150
    assert picks[0] + picks[1] == 3000


def test_p2c_tie_goes_to_fewer_inflight() -> None:
    policy = build("p2c", seed=2)
    eps = [ep(0, running=3, inflight=7), ep(1, running=3, inflight=2)]
    assert all(route(policy, eps) == (1, 0) for _ in range(50))


def test_p2c_counts_pending_since_scrape() -> None:
    policy = build("p2c", seed=2)
    eps = [ep(0, running=1, pending_since_scrape=4), ep(1, running=3)]
    assert all(route(policy, eps) == (1, 0) for _ in range(50))


# ------------------------------------------------------------------------------------------
# least-kv
# ------------------------------------------------------------------------------------------


def test_least_kv_uses_scraped_usage_plus_unscraped_tokens() -> None:
    eps = [
        ep(0, kv_usage=0.10, kv_capacity_tokens=10_000, pending_tokens_since_scrape=5_000),  # 0.6
        ep(1, kv_usage=0.40, kv_capacity_tokens=10_000),  # 0.4
        ep(2, kv_usage=0.20, kv_capacity_tokens=20_000, pending_tokens_since_scrape=2_000),  # 0.3
        ep(3, kv_usage=0.50, kv_capacity_tokens=0, pending_tokens_since_scrape=9_999),  # fallback 0.5
    ]
    assert route(build("least-kv"), eps) == (2, 1, 3, 0)


def test_least_kv_ties_go_to_fewer_requests() -> None:
    policy = build("least-kv", seed=8)
    eps = [
        ep(0, kv_usage=0.2, kv_capacity_tokens=1000, running=3),
        ep(1, kv_usage=0.2, kv_capacity_tokens=1000, running=1),
        ep(2, kv_usage=0.2, kv_capacity_tokens=1000, running=1),
        ep(3, kv_usage=0.5, kv_capacity_tokens=1000),
    ]
    picks = Counter(route(policy, eps)[0] for _ in range(400))
    assert set(picks) == {1, 2}
    assert min(picks.values()) > 120
    assert all(route(policy, eps)[3] == 3 for _ in range(20))
