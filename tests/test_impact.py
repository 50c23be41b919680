"""The latency-impact estimator and the ``impact`` policy."""

from __future__ import annotations

import math
import random

import pytest

from llmpool.lab.sim import SimConfig, Simulator
from llmpool.lab.workload import WorkloadItem
from llmpool.routing import ConfigError, PolicyContext, builtin_registry
from llmpool.routing.impact import CostModel, ImpactEstimator
from llmpool.routing.profile import load_profile
from llmpool.routing.types import EndpointState, PoolView, Request, Route

A100 = load_profile("a100-llama3-8b")
S = A100.step


def lin(n: float) -> float:
    return S.overhead_ms * 1e-3 + max(
        S.linear.c0_ms * 1e-3, S.linear.c1_ms * 1e-3 + S.linear.c2_us_per_token * 1e-6 * n
    )


def ctx(seed: int = 0, truth: dict[int, int] | None = None) -> PolicyContext:
    return PolicyContext(rng=random.Random(seed), truth=truth.get if truth else None, profile=A100)


def ep(
    index: int, running: int = 0, waiting: int = 0, kv_tokens: int = 0, cap: int = 400_000
) -> EndpointState:
    return EndpointState(
        index=index,
        name=f"e{index}",
        running=running,
        waiting=waiting,
        kv_usage=kv_tokens / cap,
        kv_capacity_tokens=cap,
        inflight=running + waiting,
    )


def test_cost_model_matches_profile_arithmetic() -> None:
    c = CostModel(S)
    assert c.lin(1) == pytest.approx(lin(1))
    assert c.lin(500) == pytest.approx(lin(500))
    a = S.decode_attention_ns_per_context_token * 1e-9
    f = 1 + S.attention_batching_overhead
    assert c.decode_step(1, 1000) == pytest.approx(lin(1) + a * 1000)
    assert c.decode_step(8, 8000) == pytest.approx(lin(8) + f * a * 8000)
    # a 600-token prompt next to 10 decodes with a 2048 budget: one step carrying it
    extra = lin(610) - lin(10) + f * S.prefill_attention_ns_per_pair * 1e-9 * 600 * 600 / 2
    assert c.prefill_extra(600, 10, 2048) == pytest.approx(extra)


def test_estimator_on_an_idle_endpoint_is_the_lone_request_arithmetic() -> None:
    est = ImpactEstimator(CostModel(S), A100.engine).estimate(500, 100, ep(0), 0.0)
    a = S.decode_attention_ns_per_context_token * 1e-9
    prefill = lin(500) - lin(0) + S.prefill_attention_ns_per_pair * 1e-9 * 500 * 500 / 2
    assert est.ttft == pytest.approx(prefill + lin(1))
    assert est.decode == pytest.approx(99 * (lin(1) + a * (500 + 50)))
    assert est.prefill_stall == 0.0 and est.decode_slowdown == 0.0 and est.kv_penalty == 0.0


def test_estimator_impact_on_others_hand_case() -> None:
    c = CostModel(S)
    e = ep(0, running=20, kv_tokens=20_000)
    est = ImpactEstimator(c, A100.engine).estimate(300, 50, e, remaining_others=4000.0)
    # prefill stall: 20 running decodes each wait for the prefill's extra step time
    assert est.prefill_stall == pytest.approx(20 * c.prefill_extra(300, 20, 2048))
    # decode slowdown: one more sequence per step for min(remaining, 20 * 50) overlapping steps
    delta = c.decode_step(21, 20_300) - c.decode_step(20, 20_000)
    assert est.decode_slowdown == pytest.approx(delta * min(4000.0, 20 * 50))
    # a busier endpoint costs the newcomer more and hurts more requests
    busier = ImpactEstimator(c, A100.engine).estimate(300, 50, ep(1, running=60, kv_tokens=60_000), 12000.0)
    assert busier.own_e2e > est.own_e2e and busier.prefill_stall > est.prefill_stall


def test_prompts_without_a_first_token_are_prefilled_first() -> None:
    c = CostModel(S)
    e = ep(0, running=20, kv_tokens=20_000)
    base = ImpactEstimator(c, A100.engine).estimate(300, 50, e, remaining_others=4000.0)
    e.prefill_pending_tokens = 5000  # queued or mid-prefill ahead of the newcomer
    est = ImpactEstimator(c, A100.engine).estimate(300, 50, e, remaining_others=4000.0)
    step_now = c.decode_step(20, 20_000)
    ahead = c.prefill_extra(5000, 20, 2048) + math.ceil(5000 / (2048 - 20)) * step_now
    assert est.ttft == pytest.approx(base.ttft + ahead)
    # what it does to the others is unchanged: the queue ahead is not its doing
    assert (est.prefill_stall, est.decode_slowdown, est.decode) == (
        base.prefill_stall,
        base.decode_slowdown,
        base.decode,
    )
    off = ImpactEstimator(c, A100.engine, queued_prefill=False).estimate(300, 50, e, 4000.0)
    assert off.ttft == pytest.approx(base.ttft)


def _reference_terms(
    est: ImpactEstimator, prompt: float, out: float, e: EndpointState, rem: float, cached: float
) -> tuple[float, float, float, float, float]:
    """The estimate composed from the readable CostModel methods (what ``terms`` writes out)."""
    c, budget = est.cost, est.budget
    n = float(e.running + e.pending_since_scrape)
    kv = e.kv_load_tokens()
    step_now = c.decode_step(max(n, 1.0), kv)
    over = n + float(e.waiting) + 1.0 - est.max_seqs
    wait = over * step_now * max(rem / n, 1.0) / n if over > 0 and n > 0 else 0.0
    running_now = min(n, float(est.max_seqs))
    prefill = c.prefill_extra(max(prompt - cached, 1.0), running_now, budget)
    backlog = float(e.prefill_pending_tokens) if est.queued_prefill else 0.0
    ahead = 0.0
    if backlog > 0.0:
        room = max(1.0, budget - running_now)
        ahead = c.prefill_extra(backlog, running_now, budget) + math.ceil(backlog / room) * step_now
    n_after = min(n + 1.0, float(est.max_seqs))
    decode = max(out - 1.0, 0.0) * c.decode_step(n_after, kv + prompt + out / 2.0)
    delta = max(0.0, c.decode_step(n_after, kv + prompt) - step_now)
    kv_pen = 0.0
    cap = float(e.kv_capacity_tokens)
    need = kv + prompt + out + rem
    if cap > 0 and need > cap:
        frac = min(1.0, (need - cap) / max(prompt + out, 1.0))
        kv_pen = frac * (c.c2 * (prompt + out) + step_now) * max(running_now, 1.0)
    return (
        wait + ahead + prefill + step_now,
        decode,
        running_now * prefill,
        delta * min(rem, running_now * out),
        kv_pen,
    )


@pytest.mark.parametrize("queued_prefill", [True, False])
def test_estimator_terms_equal_the_cost_model_composition_exactly(queued_prefill: bool) -> None:
    """The hot path writes the CostModel formulas out in line; it must give the same floats
    (the lab's results are reproducible bit for bit), over states from idle to overflowing."""
    rng = random.Random(7)
    for profile in (A100, load_profile("h100-llama3-8b")):
        est = ImpactEstimator(
            CostModel(profile.step),
            profile.engine,
            max_seqs=rng.choice([None, 64]),
            queued_prefill=queued_prefill,
        )
        for _ in range(2000):
            cap = rng.choice([0, 10_000, 400_000])
            e = ep(
                0,
                running=rng.choice([0, 1, 2, rng.randint(0, 300)]),
                waiting=rng.choice([0, rng.randint(0, 50)]),
                kv_tokens=rng.randint(0, 420_000) if cap else 0,
                cap=cap or 1,
            )
            e.kv_capacity_tokens = cap
            e.pending_since_scrape = rng.choice([0, rng.randint(0, 8)])
            e.pending_tokens_since_scrape = rng.choice([0, rng.randint(0, 20_000)])
            e.prefill_pending_tokens = rng.choice([0, rng.randint(1, 30_000)])
            prompt = float(rng.choice([1, 2, rng.randint(1, 40_000)]))
            out = float(rng.choice([1, rng.randint(1, 8_000)]))
            rem = rng.choice([0.0, rng.uniform(0, 200_000)])
            cached = float(rng.choice([0, rng.randint(0, int(prompt) - 1 if prompt > 1 else 0)]))
            got = est.terms(prompt, out, e, rem, cached)
            assert got == _reference_terms(est, prompt, out, e, rem, cached)
            assert tuple(vars_of(est.estimate(prompt, out, e, rem, cached))) == got


def vars_of(e: object) -> list[float]:
    return [getattr(e, f) for f in ("ttft", "decode", "prefill_stall", "decode_slowdown", "kv_penalty")]


def test_kv_pressure_penalty_only_when_overflowing() -> None:
    c = CostModel(S)
    est = ImpactEstimator(c, A100.engine)
    assert est.estimate(1000, 500, ep(0, running=4, kv_tokens=1000, cap=10_000), 500.0).kv_penalty == 0.0
    tight = est.estimate(1000, 500, ep(0, running=4, kv_tokens=9_000, cap=10_000), 500.0)
    assert tight.kv_penalty > 0.0


def test_impact_prefers_the_endpoint_where_it_hurts_least() -> None:
    pol = builtin_registry().build({"name": "impact", "params": {"hold": False}}, ctx())
    eps = [
        ep(0, running=100, kv_tokens=150_000),
        ep(1, running=5, kv_tokens=5_000),
        ep(2, running=50, kv_tokens=60_000),
    ]
    r = Request(id=1, arrival=0.0, prompt_tokens=800)
    d = pol.decide(r, PoolView(now=0.0, endpoints=eps, queue=(r,)))
    assert isinstance(d, Route)
    assert d.endpoints == (1, 2, 0)


def test_hold_when_saturated_and_release_shortest_predicted_first() -> None:
    truth = {1: 2000, 2: 10, 3: 500}
    pol = builtin_registry().build(
        {"name": "impact-oracle", "params": {"max_seqs": 4, "aging_s": 1000.0}}, ctx(truth=truth)
    )
    full = [ep(0, running=4), ep(1, running=4)]
    reqs = tuple(Request(id=i, arrival=0.0, prompt_tokens=100) for i in (1, 2, 3))
    view = PoolView(now=0.1, endpoints=full, queue=reqs)
    assert all(not isinstance(pol.decide(r, view), Route) for r in reqs)
    # one slot frees up: the shortest predicted request (id 2) goes first
    full[1].inflight = 3
    view = PoolView(now=0.2, endpoints=full, queue=reqs)
    decisions = {r.id: pol.decide(r, view) for r in reqs}
    assert isinstance(decisions[2], Route) and decisions[2].endpoints[0] == 1
    assert not isinstance(decisions[1], Route) and not isinstance(decisions[3], Route)


def test_starvation_bound_releases_old_requests_first() -> None:
    truth = {1: 4000, 2: 10}
    pol = builtin_registry().build(
        {"name": "impact-oracle", "params": {"max_seqs": 4, "max_hold_s": 5.0}}, ctx(truth=truth)
    )
    eps = [ep(0, running=3)]
    old = Request(id=1, arrival=0.0, prompt_tokens=100)
    new = Request(id=2, arrival=9.0, prompt_tokens=100)
    view = PoolView(now=10.0, endpoints=eps, queue=(old, new))
    assert isinstance(pol.decide(old, view), Route)  # held 10 s > max_hold_s: it goes first


def test_impact_through_the_simulator_finishes_everything_and_learns() -> None:
    rng = random.Random(3)
    items = []
    t = 0.0
    for i in range(400):
        t += rng.expovariate(200.0)
        items.append(
            WorkloadItem(Request(id=i, arrival=t, prompt_tokens=rng.randint(20, 600)), rng.randint(1, 400))
        )
    pol = builtin_registry().build({"name": "impact", "params": {"max_seqs": 16}}, ctx())
    res = Simulator(A100, pol, SimConfig(instances=2)).run(items)
    assert res.summary.requests == 400 and res.summary.rejected == 0
    assert res.summary.router_wait_mean_s > 0  # it did hold at the router
    mean_out = sum(it.output_tokens for it in items) / len(items)
    pred = pol.predictor.predict(Request(id=10**6, arrival=0.0, prompt_tokens=100))  # type: ignore[attr-defined]
    assert math.isclose(pred.expected_tokens, mean_out, rel_tol=0.35)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"impact_weight": -1}, "impact_weight"),
        ({"alpha": 2}, "alpha"),
        ({"window": 0}, "window"),
        ({"bogus": 1}, "bogus"),
        ({"predictor": {"name": "nope"}}, "nope"),
        ({"profile": "no-such-profile"}, "no-such-profile"),
    ],
)
def test_bad_params_are_rejected_with_one_line(params: dict[str, object], needle: str) -> None:
    with pytest.raises((ConfigError, ValueError)) as err:
        builtin_registry().build({"name": "impact", "params": params}, ctx())
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_oracle_needs_the_labs_truth() -> None:
    with pytest.raises(ConfigError, match="oracle"):
        builtin_registry().build("impact-oracle", PolicyContext(rng=random.Random(0), profile=A100))


def test_no_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="profile"):
        builtin_registry().build("impact", PolicyContext(rng=random.Random(0)))


def test_prefix_cache_credit_lowers_the_prefill_estimate() -> None:
    c = CostModel(S)
    est = ImpactEstimator(c, A100.engine)
    e = ep(0, running=10, kv_tokens=10_000)
    cold = est.estimate(2048, 100, e, 500.0)
    warm = est.estimate(2048, 100, e, 500.0, cached=1536)
    assert warm.ttft == pytest.approx(
        cold.ttft - c.prefill_extra(2048, 10, 2048) + c.prefill_extra(512, 10, 2048)
    )
    assert warm.kv_penalty == cold.kv_penalty  # cached tokens still occupy KV


def test_impact_follows_the_prefix_it_sent_before() -> None:
    pol = builtin_registry().build({"name": "impact", "params": {"hold": False}}, ctx())
    eps = [ep(0, running=4, kv_tokens=4000), ep(1, running=4, kv_tokens=4000)]
    first = Request(id=1, arrival=0.0, prompt_tokens=4096, prefix_hashes=tuple(range(8)))
    d = pol.decide(first, PoolView(now=0.0, endpoints=eps, queue=(first,)))
    assert isinstance(d, Route)
    pol.on_assigned(first, d.endpoints[0], 0.0)
    again = Request(id=2, arrival=0.1, prompt_tokens=4096, prefix_hashes=tuple(range(8)))
    d2 = pol.decide(again, PoolView(now=0.1, endpoints=eps, queue=(again,)))
    assert isinstance(d2, Route) and d2.endpoints[0] == d.endpoints[0]


def _sim_items(n: int, rate: float, seed: int) -> list[WorkloadItem]:
    rng = random.Random(seed)
    items, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        items.append(
            WorkloadItem(Request(id=i, arrival=t, prompt_tokens=rng.randint(20, 600)), rng.randint(1, 400))
        )
    return items


@pytest.mark.parametrize("window", [8, 8192])
def test_the_round_plan_spares_decide_calls_and_changes_no_decision(
    window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver holds the requests outside the policy's round plan (``releasable``) without
    asking ``decide``: the same schedule as asking about every request, far fewer calls."""
    from llmpool.routing import driver

    runs = []
    for use_plan in (True, False):
        if not use_plan:  # the driver asks decide about every offered request
            monkeypatch.setattr(driver, "_releasable", lambda policy, view: None)
        pol = builtin_registry().build({"name": "impact", "params": {"max_seqs": 8, "window": window}}, ctx())
        calls = 0
        inner = pol.decide

        def counted(request: Request, view: PoolView, inner: object = inner) -> object:
            nonlocal calls
            calls += 1
            return inner(request, view)  # type: ignore[operator]

        pol.decide = counted  # type: ignore[method-assign]
        log = Simulator(A100, pol, SimConfig(instances=2)).run(_sim_items(600, 400.0, 5)).log
        runs.append((calls, list(zip(log.rid, log.dispatch, log.first, log.finish, strict=True))))
    (calls_plan, schedule_plan), (calls_all, schedule_all) = runs
    assert schedule_plan == schedule_all
    assert calls_plan * 3 < calls_all


def test_a_round_adds_only_the_new_requests_to_its_heap() -> None:
    """The requests new to the release heap are the tail of the window: a round walks back
    from its end to the first one already in the heap."""
    pol = builtin_registry().build({"name": "impact", "params": {"max_seqs": 1}}, ctx())
    full = [ep(0, running=0)]
    full[0].inflight = 1
    queue = [Request(id=i, arrival=i * 0.01, prompt_tokens=100) for i in range(50)]
    pushed: list[int] = []
    key = pol._key  # type: ignore[attr-defined]

    def spy(r: Request) -> float:
        pushed.append(r.id)
        return float(key(r))

    pol._key = spy  # type: ignore[attr-defined]
    full[0].inflight = 0  # one free slot: the round plans with the heap
    assert pol.releasable(PoolView(now=1.0, endpoints=full, queue=tuple(queue))) is not None
    assert sorted(pushed) == list(range(50))
    pushed.clear()
    queue += [Request(id=50 + i, arrival=1.0 + i * 0.01, prompt_tokens=100) for i in range(3)]
    pol.releasable(PoolView(now=2.0, endpoints=full, queue=tuple(queue)))
    assert sorted(pushed) == [50, 51, 52]


def test_a_failing_round_plan_falls_back_to_decide_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """``releasable`` raising is not fatal: the driver asks ``decide`` about each request and
    logs the failure once per policy, naming it and the error."""
    import logging

    from llmpool.routing.driver import dispatch_round
    from llmpool.routing.policy import Policy
    from llmpool.routing.types import Decision, Hold

    class EvenOnly(Policy):
        name = "even-only"
        queue_window = 16

        def decide(self, request: Request, view: PoolView) -> Decision:
            return Route((0,)) if request.id % 2 == 0 else Hold()

        def releasable(self, view: PoolView) -> set[int] | None:
            raise ValueError("plan exploded")

    pol = EvenOnly()
    view = PoolView(now=1.0, endpoints=[ep(0)], queue=())
    placed: list[int] = []
    with caplog.at_level(logging.WARNING, logger="llmpool.routing.driver"):
        for _ in range(3):  # three rounds, one warning
            queue = [Request(id=i, arrival=0.0, prompt_tokens=10) for i in range(6)]
            held, n = dispatch_round(
                pol,
                view,
                queue,
                16,
                lambda r, d: placed.append(r.id) or 0,
                lambda r, e: pytest.fail(str(e)),
            )
            assert held and n == 6 and [r.id for r in queue] == [1, 3, 5]
    assert placed == [0, 2, 4] * 3
    warnings = [r.getMessage() for r in caplog.records if "releasable() failed" in r.getMessage()]
    assert warnings == [
        "policy 'even-only': releasable() failed (ValueError: plan exploded); "
        "asking decide() about each request instead"
    ]
