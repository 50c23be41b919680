"""BalanceRoute (br0, brh, brh-oracle): the F-score model, projections, stages, holds, starvation.

Expected values are computed by hand from algorithms.md Part B (B.2, B.3, B.5), never by the
code under test.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from llmpool.lab.sim import SimConfig, Simulator
from llmpool.lab.workload import WorkloadItem
from llmpool.routing import (
    ActiveRequest,
    ConfigError,
    EndpointState,
    Hold,
    LengthPrediction,
    Policy,
    PolicyContext,
    PolicyRegistry,
    PoolView,
    Request,
    Route,
)
from llmpool.routing.balanceroute import (
    BalanceRouteH,
    BR0Params,
    BRHParams,
    envelope,
    f_score,
    f_score_horizon,
    horizon_penalty,
    project_loads,
    register_balanceroute,
    step_cost_model,
)
from llmpool.routing.predictors import LengthPredictor
from llmpool.routing.profile import PS_PER_S, load_profile

PROFILE = load_profile("h100-llama3-8b")


def registry() -> PolicyRegistry:
    reg = PolicyRegistry()
    register_balanceroute(reg)
    return reg


def build(name: str, params: dict[str, Any] | None = None, seed: int = 0, **ctx: Any) -> Policy:
    return registry().build(
        {"name": name, "params": params or {}}, PolicyContext(rng=random.Random(seed), **ctx)
    )


def req(i: int, prompt: int = 100, arrival: float = 0.0, **kw: Any) -> Request:
    return Request(id=i, arrival=arrival, prompt_tokens=prompt, **kw)


class Pool:
    """Endpoints whose in-flight requests the test controls (what the picker/simulator report)."""

    def __init__(self, n: int, *, groups: Sequence[str] | None = None, capacity: int = 400_000) -> None:
        self.active: list[list[ActiveRequest]] = [[] for _ in range(n)]
        self.endpoints: list[EndpointState] = []
        for i in range(n):
            e = EndpointState(
                index=i,
                name=f"10.0.0.{i}:8000",
                group=groups[i] if groups is not None else f"pod{i}",
                rank=i,
                kv_capacity_tokens=capacity,
            )
            e._active_source = self._source(i)
            self.endpoints.append(e)

    def _source(self, i: int) -> Any:
        return lambda: self.active[i]

    def add(self, i: int, prompt: int, generated: int = 0, rid: int = -1) -> Request:
        r = req(rid, prompt)
        self.active[i].append(ActiveRequest(request=r, assigned_at=0.0, generated_tokens=generated))
        self.endpoints[i].inflight += 1
        if generated == 0:  # as the driver counts it: prefill work until the first token shows
            self.endpoints[i].prefill_pending_tokens += prompt
        return r

    def decode(self, i: int, j: int) -> None:
        """Request ``j`` of endpoint ``i`` produces a token."""
        a = self.active[i][j]
        if a.generated_tokens == 0:
            self.endpoints[i].prefill_pending_tokens -= a.request.prompt_tokens
        a.generated_tokens += 1

    def finish(self, i: int) -> ActiveRequest:
        """Endpoint ``i``'s oldest request leaves."""
        done = self.active[i].pop(0)
        self.endpoints[i].inflight -= 1
        if done.generated_tokens == 0:
            self.endpoints[i].prefill_pending_tokens -= done.request.prompt_tokens
        return done

    def load(self, i: int) -> int:
        return sum(a.request.prompt_tokens + a.generated_tokens for a in self.active[i])


def dispatch(
    policy: Policy, pool: Pool, queue: list[Request], now: float, *, admit: bool = True
) -> dict[int, int | None]:
    """The simulator's dispatch round: offer held requests in order; a Hold skips one (up to the
    window); a routed request leaves the queue and (with ``admit``) joins its endpoint."""
    view = PoolView(now=now, endpoints=pool.endpoints, queue=queue)
    out: dict[int, int | None] = {}
    pos = 0
    while pos < len(queue) and pos < policy.queue_window:
        r = queue[pos]
        d = policy.decide(r, view)
        if isinstance(d, Hold):
            out[r.id] = None
            pos += 1
            continue
        assert isinstance(d, Route)
        g = d.endpoints[0]
        assert sorted(d.endpoints) == list(range(len(pool.endpoints)))  # every endpoint, once
        out[r.id] = g
        del queue[pos]
        if admit:
            pool.active[g].append(ActiveRequest(request=r, assigned_at=now))
            pool.endpoints[g].inflight += 1
            pool.endpoints[g].prefill_pending_tokens += r.prompt_tokens
        policy.on_assigned(r, g, now)
    return out


# --------------------------------------------------------------------------------------------
# The model: envelope, F-score, horizon F-score, projections
# --------------------------------------------------------------------------------------------


def test_envelope_and_f_score_on_the_paper_example() -> None:
    # B.2: loads [100, 90, 70, 60] => M = 100, I = 4 * 100 - 320 = 80, margins M - L.
    assert envelope([100, 90, 70, 60]) == (100.0, 80.0, [0.0, 10.0, 30.0, 40.0])
    G = 4
    # Worker with load 70 (margin 30): inside the margin F = D (slope +1) ...
    assert f_score(20, 30, G) == 20
    assert f_score(30, 30, G) == 30
    # ... past it F = G m - (G - 1) D (slope -(G - 1) = -3).
    assert f_score(31, 30, G) == 27
    assert f_score(50, 30, G) == 4 * 30 - 3 * 50 == -30
    # The most loaded worker (margin 0) loses (G - 1) per token admitted.
    assert f_score(10, 0, G) == -30
    # The least loaded worker (margin 40) takes 40 tokens at full gain.
    assert f_score(40, 40, G) == 40
    for m in (0.0, 10.0, 30.0, 40.0):
        for d in range(0, int(m)):
            assert f_score(d + 1, m, G) - f_score(d, m, G) == 1
        for d in range(int(m), int(m) + 20):
            assert f_score(d + 1, m, G) - f_score(d, m, G) == -(G - 1)


def test_f_score_horizon_hand_computed() -> None:
    # margins (10, 0), gamma 0.5: weights (1, 0.5), sum 1.5. D = 5 fills step 0 but overflows
    # step 1 by 5: F = 1 * 1.5 * 5 - 2 * (0 + 0.5 * 5) = 7.5 - 5 = 2.5.
    assert f_score_horizon(5, [10, 0], gamma=0.5, alpha=1.0, beta=2.0) == pytest.approx(2.5)
    # H = 0 with (alpha, beta) = (1, G) is BR-0's F-score.
    rng = random.Random(3)
    for _ in range(200):
        d, m, g = rng.uniform(0, 500), rng.uniform(0, 500), rng.randint(1, 16)
        assert f_score_horizon(d, [m], gamma=0.9, alpha=1.0, beta=g) == f_score(d, m, g)


def test_vectorised_penalty_matches_the_definition() -> None:
    rng = np.random.default_rng(1)
    for h in (0, 1, 5, 32):
        margins = rng.uniform(-100, 1000, h + 1)
        weights = 0.9 ** np.arange(h + 1, dtype=np.float64)
        deltas = np.concatenate((rng.uniform(0, 1200, 200), margins))  # kinks included
        got = horizon_penalty(deltas, margins, weights)
        want = [sum(w * max(d - m, 0.0) for m, w in zip(margins, weights, strict=True)) for d in deltas]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_project_loads_difference_arrays() -> None:
    # Endpoint 0: A (load 110) leaves after 2 steps, B (load 50) stays; endpoint 1: C (load 10)
    # leaves after 1 step. P[g, h] = sum over present requests of (load + h).
    proj = project_loads(
        np.array([160.0, 10.0]), np.array([2.0, 1.0]), [0, 1], [2, 1], [110.0, 10.0], horizon=3
    )
    assert proj.tolist() == [[160, 162, 52, 53], [10, 0, 0, 0]]
    # No drops: everything grows by one token per request and step.
    assert project_loads(np.array([5.0]), np.array([3.0]), [], [], [], 2).tolist() == [[5, 8, 11]]


def test_brh_oracle_projection_hand_computed() -> None:
    pool = Pool(2, groups=["pod0", "pod0"])
    a = pool.add(0, 100, generated=10, rid=1)  # true length 12: 2 more tokens (h = 0, 1)
    b = pool.add(0, 50, generated=0, rid=2)  # true length 100: stays past the horizon
    truth = {a.id: 12, b.id: 100}
    pol = build("brh-oracle", {"horizon": 4}, truth=truth.get)
    assert isinstance(pol, BalanceRouteH)
    proj = pol.projected_loads(PoolView(now=0.0, endpoints=pool.endpoints))
    # h=0: 110 + 50; h=1: 111 + 51; then A is gone: 52, 53, 54.
    assert proj.tolist() == [[160, 162, 52, 53, 54], [0, 0, 0, 0, 0]]


# --------------------------------------------------------------------------------------------
# Registry and parameters
# --------------------------------------------------------------------------------------------


def test_registered_policies_and_defaults() -> None:
    reg = registry()
    assert reg.names() == ["br0", "brh", "brh-oracle"]
    assert [s.lab_only for s in reg] == [False, False, True]
    pol = build("br0", {"window": 7})
    assert pol.name == "br0" and pol.queue_window == 7
    assert build("br0").queue_window == 16
    assert build("br0").max_seqs == 256  # type: ignore[attr-defined]
    assert build("br0", profile=PROFILE).max_seqs == PROFILE.engine.max_num_seqs  # type: ignore[attr-defined]
    assert build("br0", {"max_seqs": 3}, profile=PROFILE).max_seqs == 3  # type: ignore[attr-defined]
    brh = build("brh")
    assert isinstance(brh, BalanceRouteH) and brh.name == "brh"
    assert BRHParams().predictor.name == "exact-match"
    assert build("brh-oracle", truth={}.get).name == "brh-oracle"


def test_brh_oracle_needs_truth() -> None:
    with pytest.raises(ConfigError, match=r"policy 'brh-oracle' needs the lab's ground truth"):
        build("brh-oracle")
    with pytest.raises(
        ConfigError, match=r"predictor 'oracle' needs the lab's ground truth; use the brh-oracle"
    ):
        build("brh", {"predictor": "oracle"}, truth={}.get)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("br0", {"window": 0}, r"policy 'br0': window: Input should be greater than or equal to 1"),
        ("br0", {"r_max": 9}, r"r_max: Input should be less than or equal to 8"),
        ("br0", {"kv_admit_threshold": 1.5}, r"kv_admit_threshold: Input should be less than or equal to 1"),
        ("br0", {"max_hold_s": 0}, r"max_hold_s: Input should be greater than 0"),
        ("br0", {"max_hold_s": float("nan")}, r"max_hold_s: Input should be a finite number"),
        ("br0", {"windw": 4}, r"windw: Extra inputs are not permitted \(parameters: window, r_max"),
        ("br0", {"load_source": "gpu"}, r"load_source: Input should be 'auto', 'active' or 'scraped'"),
        ("br0", {"load_model": "flops"}, r"load_model: Input should be 'kv' or 'step'"),
        ("br0", {"window": 64, "r_max": 8}, r"window=64 with r_max=8 gives \d+ subsets per worker"),
        ("brh", {"horizon": -1}, r"policy 'brh': horizon: Input should be greater than or equal to 0"),
        ("brh", {"gamma": 2}, r"gamma: Input should be less than or equal to 1"),
        ("brh", {"predictor": "bert"}, r"predictor: Value error, unknown predictor 'bert'"),
        ("brh", {"predictor": {"name": "survival", "params": {"half_life": -1}}}, r"predictor 'survival'"),
        ("brh-oracle", {"predictor": "survival"}, r"predictor: Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_one_line_config_errors(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        registry().validate({"name": name, "params": params})
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Stage 1: greedy argmax F, tie-breaking, capacity
# --------------------------------------------------------------------------------------------


def test_equal_loads_spread_instead_of_piling_on_endpoint_0() -> None:
    pool = Pool(4)
    pol = build("br0", seed=1)
    picks: Counter[int] = Counter()
    for k in range(400):  # separate rounds, nothing admitted: every choice is a pure tie
        r = req(k, arrival=float(k))
        d = pol.decide(r, PoolView(now=float(k), endpoints=pool.endpoints, queue=[r]))
        assert isinstance(d, Route)
        picks[d.endpoints[0]] += 1
    assert set(picks) == {0, 1, 2, 3}
    assert all(60 <= c <= 140 for c in picks.values()), picks
    # Within one round the tentative admissions count: four equal requests, four workers.
    queue = [req(k, 500) for k in range(4)]
    assert sorted(g for g in dispatch(build("br0"), Pool(4), queue, 0.0).values() if g is not None) == [
        0,
        1,
        2,
        3,
    ]


def test_lowest_load_wins_ties() -> None:
    pool = Pool(4)
    for i, load in enumerate((300, 100, 200, 400)):
        pool.add(i, load)
    for seed in range(20):
        # F = 50 on every worker (the request fits every margin but worker 3's, which is the max).
        d = build("br0", seed=seed).decide(req(0, 50), PoolView(now=0.0, endpoints=pool.endpoints))
        assert isinstance(d, Route) and d.endpoints[0] == 1
        assert d.endpoints[1:4] == (2, 0, 3)  # fallbacks by load


def test_barrier_groups_pick_the_group_then_the_rank() -> None:
    pool = Pool(4, groups=["a", "a", "b", "b"], capacity=10_000)
    pool.add(0, 4000)
    pool.add(1, 3000)  # group a: mean 3500
    pool.add(2, 1000)
    pool.add(3, 2000)  # group b: mean 1500 -> chosen; rank 2 has the lowest load
    d = build("br0").decide(req(9, 100), PoolView(now=0.0, endpoints=pool.endpoints))
    assert isinstance(d, Route) and d.endpoints[:2] == (2, 3)


def test_stale_endpoints_are_not_chosen_while_a_fresh_one_admits() -> None:
    pool = Pool(3)
    pool.add(2, 5000)
    pool.endpoints[0].stale = True
    pool.endpoints[1].stale = True
    d = build("br0").decide(req(0), PoolView(now=0.0, endpoints=pool.endpoints))
    assert isinstance(d, Route) and d.endpoints[0] == 2
    assert isinstance(build("br0").decide(req(0), PoolView(now=0.0, endpoints=[])), Hold)


def test_hold_without_capacity() -> None:
    pool = Pool(2, capacity=1000)
    pool.add(0, 850)  # 850 + 100 > 0.9 * 1000
    pool.add(1, 600)
    pol = build("br0", {"max_seqs": 8})
    assert isinstance(pol.decide(req(0, 400), PoolView(now=0.0, endpoints=pool.endpoints)), Hold)
    d = pol.decide(req(1, 300), PoolView(now=1.0, endpoints=pool.endpoints))  # 600 + 300 <= 900
    assert isinstance(d, Route) and d.endpoints[0] == 1
    # max_seqs counts the router's in-flight requests.
    one = build("br0", {"max_seqs": 1})
    assert isinstance(one.decide(req(2, 1), PoolView(now=2.0, endpoints=pool.endpoints)), Hold)
    # An idle worker takes any request, however large (otherwise it could never run).
    idle = Pool(1, capacity=1000)
    d = pol.decide(req(3, 5000), PoolView(now=3.0, endpoints=idle.endpoints))
    assert isinstance(d, Route)


def test_scraped_load_when_the_driver_reports_no_progress() -> None:
    pool = Pool(2, capacity=1000)
    pool.endpoints[0].inflight = 3  # requests in flight but active() reports none
    pool.endpoints[0].kv_usage = 0.1  # 100 tokens
    pool.endpoints[1].kv_usage = 0.5  # 500 tokens
    d = build("br0").decide(req(0), PoolView(now=0.0, endpoints=pool.endpoints))
    assert isinstance(d, Route) and d.endpoints[0] == 0
    d = build("br0", {"load_source": "scraped"}).decide(req(0), PoolView(now=0.0, endpoints=pool.endpoints))
    assert isinstance(d, Route) and d.endpoints[0] == 0
    # "active" trusts active() alone: both endpoints look empty, so the gauges play no part.
    picks = set()
    for seed in range(20):
        d = build("br0", {"load_source": "active"}, seed=seed).decide(
            req(0), PoolView(now=0.0, endpoints=pool.endpoints)
        )
        assert isinstance(d, Route)
        picks.add(d.endpoints[0])
    assert picks == {0, 1}


# --------------------------------------------------------------------------------------------
# Stage 2: subset selection, force-admission
# --------------------------------------------------------------------------------------------

SCARCE = {"abundant_slots": 10**6, "max_seqs": 4, "r_max": 4}


def test_subset_selection_fills_the_margin_without_overshooting() -> None:
    pool = Pool(2, groups=["pod0", "pod0"])
    for _ in range(4):
        pool.add(0, 250)  # load 1000, at max_seqs: cannot admit
    # Worker 1: load 0, margin 1000, G = 2. Subsets of the window and their F:
    #   {550, 450} = 1000 -> F 1000 (exact fill, the unique optimum)
    #   greedy largest-first: 600, then 300 and 50 -> 950 -> F 950
    #   {600, 450} = 1050 -> F 1050 - 2 * 50 = 950 (overshoot)
    queue = [req(0, 600), req(1, 550), req(2, 450), req(3, 300), req(4, 50)]
    got = dispatch(build("br0", SCARCE), pool, queue, 0.0)
    assert got == {0: None, 1: 1, 2: 1, 3: None, 4: None}
    assert [r.id for r in queue] == [0, 3, 4]


def test_force_admission_when_no_subset_scores_positive() -> None:
    pool = Pool(2, groups=["pod0", "pod0"])
    pool.add(0, 1000)
    pool.add(1, 1000)  # equal loads: both margins 0, every F negative
    queue = [req(0, 600), req(1, 450), req(2, 300), req(3, 50)]
    got = dispatch(build("br0", SCARCE, seed=0), pool, queue, 0.0)
    # The first worker force-admits its best single request: 50 (F = 50 - 2 * 50 = -50). The
    # envelope rises to 1050, so the other worker's margin is 50: its best single is 300
    # (F = 300 - 2 * 250 = -200); 450 and 600 score worse and stay held.
    assert got[0] is None and got[1] is None
    assert got[2] is not None and got[3] is not None and got[2] != got[3]


@pytest.mark.parametrize("load_model", ["kv", "step"])
def test_brh_with_zero_horizon_equals_br0_on_random_states(load_model: str) -> None:
    rng = random.Random(7)
    decisions = 0
    held = 0
    for case in range(60):
        n = rng.randint(1, 10)
        grouped = rng.random() < 0.5
        groups = ["pod0"] * n if grouped else None
        params: dict[str, Any] = {
            "max_seqs": rng.choice([2, 4, 8, 64]),
            "window": rng.choice([1, 4, 16]),
            "r_max": rng.choice([1, 2, 4]),
            "abundant_slots": rng.choice([0, 4, 16, 10**6]),
            "max_hold_s": rng.choice([0.05, 2.0]),
            "load_model": load_model,
        }
        beta: dict[str, Any] = {"beta": float(n)} if grouped and rng.random() < 0.5 else {}
        capacity = rng.choice([5000, 20000])
        pools = [Pool(n, groups=groups, capacity=capacity) for _ in range(2)]
        for i in range(n):
            for _ in range(rng.randint(0, 3)):
                prompt, gen = rng.randint(10, 2000), rng.randint(0, 300)
                for p in pools:
                    p.add(i, prompt, gen)
            stale = rng.random() < 0.1
            for p in pools:
                p.endpoints[i].stale = stale
        seed = rng.randrange(1000)
        br0 = build("br0", params, seed=seed, profile=PROFILE)
        brh = build(
            "brh",
            {**params, "horizon": 0, "alpha": 1.0, **beta, "predictor": "survival"},
            seed=seed,
            profile=PROFILE,
        )
        queues: list[list[Request]] = [[], []]
        rid = 0
        for step in range(12):
            now = step * 0.02
            for _ in range(rng.randint(0, 5)):
                prompt = rng.randint(10, 3000)
                for q in queues:
                    q.append(req(rid, prompt, arrival=now))
                rid += 1
            a = dispatch(br0, pools[0], queues[0], now)
            b = dispatch(brh, pools[1], queues[1], now)
            assert a == b, (case, step)
            decisions += len(a)
            held += sum(g is None for g in a.values())
            if rng.random() < 0.3:  # a completion somewhere
                i = rng.randrange(n)
                for p, pol in zip(pools, (br0, brh), strict=True):
                    if p.active[i]:
                        pol.on_completed(p.finish(i).request, i, 10, now)
            for p in pools:  # one decode step
                for i, acts in enumerate(p.active):
                    for j in range(len(acts)):
                        p.decode(i, j)
    assert decisions > 1000 and 0.1 < held / decisions < 0.9, (decisions, held)


# --------------------------------------------------------------------------------------------
# BR-H: predictions are cached on the request, completions train the predictor
# --------------------------------------------------------------------------------------------


class CountingPredictor(LengthPredictor):
    def __init__(self) -> None:
        self.predicted: list[int] = []
        self.observed: list[tuple[int, int]] = []
        self.terminations = 0

    def predict(self, request: Request) -> LengthPrediction:
        self.predicted.append(request.id)
        return LengthPrediction(expected_tokens=100.0, bucket_probs=(1.0, 0.0, 0.0), source="counting")

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        self.terminations += 1
        return 0.5, 2.0

    def expected_remaining(self, request: Request, age: int) -> float:
        return 100.0

    def observe(self, request: Request, output_tokens: int) -> None:
        self.observed.append((request.id, output_tokens))


def test_brh_caches_predictions_and_learns_online() -> None:
    pred = CountingPredictor()
    pol = BalanceRouteH(BRHParams(horizon=8, max_seqs=1), PolicyContext(rng=random.Random(0)), pred)
    pool = Pool(1)
    pool.add(0, 10, rid=100)
    held = req(1, 10)
    for k in range(3):  # held three times (the worker is at max_seqs): predicted once
        assert isinstance(
            pol.decide(held, PoolView(now=float(k), endpoints=pool.endpoints, queue=[held])), Hold
        )
    assert pred.predicted == [1]
    assert held.prediction is not None and held.prediction.source == "counting"
    # c = 0.5 * 8 + 0.5 * 2 = 5 -> the in-flight request counts for h = 0..4; asked once and
    # reused for the next rounds (reproject_tokens = 16).
    assert pred.terminations == 1
    pol.on_completed(pool.active[0][0].request, 0, 42, 3.0)
    assert pred.observed == [(100, 42)]


def test_expected_projection_keeps_the_share_that_does_not_finish() -> None:
    """projection 'expected': (p_fin, mu_rem) = (0.5, 2) -> half of the request leaves after 2
    steps, half stays; 'drop' takes all of it away after c = 0.5 * 8 + 0.5 * 2 = 5 steps."""
    pool = Pool(1)
    pool.add(0, 10, generated=0, rid=100)
    view = PoolView(now=0.0, endpoints=pool.endpoints)
    exp = BalanceRouteH(
        BRHParams(horizon=8, projection="expected"), PolicyContext(rng=random.Random(0)), CountingPredictor()
    ).projected_loads(view)
    drop = BalanceRouteH(BRHParams(horizon=8), PolicyContext(rng=random.Random(0)), CountingPredictor())
    assert exp[0].tolist() == [10, 11] + [0.5 * (10 + h) for h in range(2, 9)]
    assert drop.projected_loads(view)[0].tolist() == [10 + h for h in range(5)] + [0] * 4
    # a request admitted in the round enters the same way (its own prediction at age 0)
    pol = BalanceRouteH(
        BRHParams(horizon=8, projection="expected"), PolicyContext(rng=random.Random(0)), CountingPredictor()
    )
    new = req(7, 20)
    pol.decide(new, PoolView(now=0.0, endpoints=pool.endpoints, queue=[new]))
    rnd = pol._round
    assert rnd is not None and rnd.proj is not None
    assert rnd.proj[0].tolist() == [30, 32] + [0.5 * (30 + 2 * h) for h in range(2, 9)]


def test_weighted_drops_equal_unweighted_ones_at_weight_one() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n, h, k = 4, 16, 30
        ends = rng.integers(0, n, k)
        steps = rng.integers(1, h + 1, k)
        loads = rng.integers(1, 5000, k).astype(np.float64)
        base, grow = rng.uniform(0, 1e5, n), rng.integers(0, 50, n).astype(np.float64)
        plain = project_loads(base, grow, ends, steps, loads, h)
        assert np.array_equal(plain, project_loads(base, grow, ends, steps, loads, h, np.ones(k)))
        half = project_loads(base, grow, ends, steps, loads, h, np.full(k, 0.5))
        none = project_loads(base, grow, (), (), (), h)
        assert np.allclose(half, (plain + none) / 2)


@pytest.mark.parametrize("projection", ["drop", "expected"])
def test_brh_oracle_projection_does_not_depend_on_the_mode(projection: str) -> None:
    """With true lengths p_fin is 0 or 1, so both projections are the same."""
    pool = Pool(2, groups=["pod0", "pod0"])
    a = pool.add(0, 100, generated=10, rid=1)
    b = pool.add(0, 50, generated=0, rid=2)
    c = pool.add(1, 70, generated=3, rid=3)
    truth = {a.id: 12, b.id: 100, c.id: 6}
    pol = build("brh-oracle", {"horizon": 4, "projection": projection}, truth=truth.get)
    proj = pol.projected_loads(PoolView(now=0.0, endpoints=pool.endpoints))  # type: ignore[attr-defined]
    assert proj.tolist() == [[160, 162, 52, 53, 54], [73, 74, 75, 0, 0]]


# --------------------------------------------------------------------------------------------
# Through the simulator: late binding and the starvation guard
# --------------------------------------------------------------------------------------------


def item(rid: int, t: float, prompt: int, output: int) -> WorkloadItem:
    return WorkloadItem(Request(id=rid, arrival=t, prompt_tokens=prompt), output)


def column(res: Any, name: str, rid: int) -> float:
    i = list(res.log.rid).index(rid)
    return float(getattr(res.log, name)[i]) / PS_PER_S


def test_hold_when_full_and_release_on_completion() -> None:
    pol = build("br0", {"max_seqs": 1})
    items = [item(i, 0.0, 200, 30) for i in range(3)]
    res = Simulator(PROFILE, pol, SimConfig(instances=1)).run(items)
    assert res.summary.requests == 3 and res.summary.rejected == 0
    # One request at a time: each is dispatched the instant the previous one completes.
    assert column(res, "dispatch", 0) == 0.0
    assert column(res, "dispatch", 1) == column(res, "finish", 0) > 0
    assert column(res, "dispatch", 2) == column(res, "finish", 1)
    assert res.summary.router_wait_mean_s > 0


def starvation_items() -> list[WorkloadItem]:
    """One 3000-token prompt among a stream of 100-token ones that always fit the margins better."""
    items = []
    rid = 0
    for k in range(240):
        t = k / 60
        if k == 4:
            items.append(item(rid, t, 3000, 20))
            rid += 1
        items.append(item(rid, t, 100, 20))
        rid += 1
    return items


@pytest.mark.parametrize("max_hold_s", [0.5, 1.0])
def test_force_admission_prevents_starvation(max_hold_s: float) -> None:
    params = {"max_seqs": 2, "r_max": 1, "abundant_slots": 10**6}
    big = 4
    guarded = build("br0", {**params, "max_hold_s": max_hold_s})
    res = Simulator(PROFILE, guarded, SimConfig(instances=2)).run(starvation_items())
    wait = column(res, "dispatch", big) - column(res, "arrival", big)
    # Overdue at max_hold_s; it then reserves a worker and takes its next free slot (a 100-token,
    # 20-token request lasts well under 0.1 s).
    assert max_hold_s <= wait <= max_hold_s + 0.1
    # Without the guard the same request waits for the whole stream of small ones.
    unguarded = build("br0", {**params, "max_hold_s": 3600})
    res = Simulator(PROFILE, unguarded, SimConfig(instances=2)).run(starvation_items())
    assert column(res, "dispatch", big) - column(res, "arrival", big) > 3.0


@pytest.mark.parametrize("name", ["br0", "brh", "brh-oracle"])
def test_barrier_group_run_completes(name: str) -> None:
    rng = random.Random(5)
    items = [item(i, i * 0.05, rng.randint(100, 3000), rng.randint(5, 200)) for i in range(120)]
    truth = {it.request.id: it.output_tokens for it in items}
    pol = build(name, {"max_seqs": 8}, truth=truth.get)
    res = Simulator(PROFILE, pol, SimConfig(instances=4, group_size=4)).run(items)
    assert res.summary.requests == 120 and res.summary.rejected == 0
    assert math.isfinite(res.summary.imbalance_gmax_mean)


def test_params_model_is_strict() -> None:
    with pytest.raises(ValueError):
        BR0Params(window=0)


# --------------------------------------------------------------------------------------------
# load_model 'step': a request's token per step and a pending prefill weigh as the profile says
# --------------------------------------------------------------------------------------------

KAPPA = 21.0e3 / (45.0 * 1.1)  # h100-llama3-8b: c2 21 us per token over 45 ns x 1.1 per context token
KNEE = (6.08 - 3.16) * 1e3 / 21.0  # tokens below which the linear layers cost their floor c0


def test_step_cost_model_comes_from_the_profile() -> None:
    kappa, knee = step_cost_model(PolicyContext(rng=random.Random(0), profile=PROFILE))
    assert kappa == pytest.approx(KAPPA) and knee == pytest.approx(KNEE)
    with pytest.raises(ConfigError, match="load_model 'step' needs a step-cost profile") as err:
        build("br0", {"load_model": "step"})
    assert "\n" not in str(err.value)


def _params(name: str, model: str) -> dict[str, Any]:
    return {"predictor": "survival", "load_model": model} if name == "brh" else {"load_model": model}


def _pick(name: str, model: str, pool: Pool, s: int = 50, now: float = 0.0) -> int:
    d = build(name, _params(name, model), profile=PROFILE).decide(
        req(9, s), PoolView(now=now, endpoints=pool.endpoints)
    )
    assert isinstance(d, Route)
    return d.endpoints[0]


@pytest.mark.parametrize("name", ["br0", "brh"])
def test_step_load_counts_requests_above_the_knee(name: str) -> None:
    # Worker 0 holds 180 short requests (1,800 KV tokens), worker 1 140 longer ones (2,800): by
    # KV worker 0 is lighter; by step time worker 0's 180 tokens per step are 41 past the knee
    # (about 17,400 KV tokens' worth), worker 1's one, so worker 1 is.
    def pair(n0: int, half0: int, n1: int, half1: int) -> Pool:
        """Two ranks of one group with n0 / n1 requests of half* prompt and half* generated."""
        pool = Pool(2, groups=["a", "a"])
        for i, (count, half) in enumerate(((n0, half0), (n1, half1))):
            for _ in range(count):
                pool.add(i, half, half)
        return pool

    pool = pair(180, 5, 140, 10)
    assert (_pick(name, "kv", pool), _pick(name, "step", pool)) == (0, 1)
    # Below the knee a step costs the same however many requests it has: KV decides again.
    small = pair(60, 5, 20, 40)
    assert (_pick(name, "kv", small), _pick(name, "step", small)) == (0, 0)


@pytest.mark.parametrize("name", ["br0", "brh"])
def test_step_load_counts_a_pending_prefill(name: str) -> None:
    # Worker 0's request has not produced a token yet: its 500 prompt tokens go through the
    # next step, 362 tokens past the knee. Worker 1's 600 + 100 are decoding.
    pool = Pool(2, groups=["a", "a"])
    pool.add(0, 500, 0)
    pool.add(1, 600, 100)
    assert (_pick(name, "kv", pool), _pick(name, "step", pool)) == (0, 1)
    pool.decode(0, 0)  # once it decodes, worker 0 is the lighter one again
    assert _pick(name, "step", pool, now=1.0) == 0


def test_step_loads_spread_a_burst_of_prefills() -> None:
    # A burst of new requests in one round: by KV they pile onto the lightest worker (each adds
    # only its prompt); by step time each one's prefill makes that worker the envelope of the
    # next step, so the burst spreads.
    def burst(model: str) -> list[int | None]:
        pool = Pool(4, groups=["a"] * 4)
        for i, kv in enumerate((3000, 5000, 5000, 5000)):
            pool.add(i, kv - 100, 100)
        queue = [req(k, 400) for k in range(4)]
        pol = build("brh", _params("brh", model), profile=PROFILE)
        return list(dispatch(pol, pool, queue, 0.0).values())

    assert burst("kv") == [0, 0, 0, 0]
    assert sorted(g for g in burst("step") if g is not None) == [0, 1, 2, 3]


def _step_f(n: Any, margins: Any, weights: Any, alpha: float, s: float, count: float) -> float:
    """The definition, for a set of ``count`` requests with ``s`` prompt tokens in all."""
    add = np.full(len(weights), count)
    add[0] += s
    dh = s + KAPPA * (np.maximum(n + add - KNEE, 0.0) - np.maximum(n - KNEE, 0.0))
    nominal = s + KAPPA * add
    return float(weights @ (alpha * nominal - 4.0 * np.maximum(dh - margins, 0.0)))


def test_step_scores_equal_the_horizon_f_score_of_projected_step_times() -> None:
    # F = sum_h gamma^h (alpha S_h - beta max(D_h - m_h, 0)) with D_h = s + kappa (max(0, n_h + 1
    # + [h = 0] s - knee) - max(0, n_h - knee)) what the request costs the worker at step h (n_h
    # the tokens it is projected to schedule then) and S_h = s + kappa (1 + [h = 0] s) its nominal
    # size, the same on every worker: the single-request path, the vectorised subset path and the
    # definition agree, around the knee.
    rng = random.Random(3)
    for _ in range(20):
        pool = Pool(4, groups=["a"] * 4, capacity=10**7)
        for i in range(4):
            for _ in range(rng.randint(100, 180)):
                pool.add(i, rng.randint(10, 300), rng.choice([0, 5, 60, 400]) if rng.random() < 0.9 else 0)
        gamma = rng.choice([0.8, 0.95])
        alpha = rng.choice([0.5, 1.0])
        pol = build(
            "brh", {**_params("brh", "step"), "alpha": alpha, "gamma": gamma, "horizon": 8}, profile=PROFILE
        )
        assert isinstance(pol, BalanceRouteH)
        pol.decide(req(99, 10), PoolView(now=0.0, endpoints=pool.endpoints))
        rnd = pol._round
        assert rnd is not None and rnd.proj is not None and rnd.pn is not None
        weights = gamma ** np.arange(9)
        for g in range(4):
            margins = rnd.proj.max(axis=0) - rnd.proj[g]
            n = rnd.pn[g]
            for s in (rng.randint(1, 30), rng.randint(100, 600)):
                single = pol._scores(rnd, [0, 1, 2, 3], [g], float(s))[0]
                want = _step_f(n, margins, weights, alpha, s, 1.0)
                assert single == pytest.approx(want, rel=1e-9, abs=1e-6)
            # sets of 1-4 requests with their prompts' sums, as the scarce stage scores them
            counts = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 1.0])
            sums = np.array([float(rng.randint(5, 150 * int(c))) for c in counts])
            subset = pol._score_deltas(rnd, g, sums, counts)
            for q in range(len(counts)):
                want = _step_f(n, margins, weights, alpha, sums[q], counts[q])
                assert subset[q] == pytest.approx(want, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("name", ["br0", "brh"])
def test_step_fill_does_not_reward_the_worker_where_a_request_costs_most(name: str) -> None:
    # Worker 2 prefills a huge prompt: it is the envelope and the request fits under it on both
    # other workers. On worker 1 (a 300-token prompt pending, past the knee) it would cost its
    # prefill's linear time; on worker 0 (one request decoding, below the knee) nothing but its
    # KV. Scoring the fill by that cost would pick worker 1; the fill is the request's nominal
    # size on both, so the tie goes to the lower step load, worker 0. By KV worker 1 is lighter.
    pool = Pool(3, groups=["a"] * 3, capacity=10**6)
    pool.add(0, 1000, 10)
    pool.add(1, 300, 0)
    pool.add(2, 20_000, 0)
    assert (_pick(name, "kv", pool), _pick(name, "step", pool)) == (1, 0)
