"""The vLLM V1 engine model (llmpool.lab.engine) driven directly, without the simulator.

Expected values are computed by hand from the profile's published numbers (never by
calling StepTimer): step = overhead + max(c0, c1 + c2 n_tok) + f (a_dec ctx + a_pre pairs).
"""

from __future__ import annotations

import math

import pytest

from llmpool.lab.engine import Engine, EngineRequest, StepGroup
from llmpool.routing.profile import PS_PER_S, StepTimer, load_profile

PROFILE = load_profile("a100-llama3-8b")
S = PROFILE.step
BS = PROFILE.engine.block_size
REL = 1e-9  # picosecond rounding only


def step_s(n_tok: int, n_seq: int, dec_ctx: int = 0, pairs: float = 0.0) -> float:
    """One engine step in seconds, from the profile's numbers (model-server notes §4)."""
    f = 1.0 + S.attention_batching_overhead if n_seq > 1 else 1.0
    lin = max(S.linear.c0_ms * 1e-3, S.linear.c1_ms * 1e-3 + S.linear.c2_us_per_token * 1e-6 * n_tok)
    attn = (
        S.decode_attention_ns_per_context_token * 1e-9 * dec_ctx
        + S.prefill_attention_ns_per_pair * 1e-9 * pairs
    )
    return S.overhead_ms * 1e-3 + lin + f * attn


def make_engine(**overrides: object) -> Engine:
    return Engine(PROFILE.engine.with_overrides(**overrides), StepTimer(PROFILE.step), name="e")


def make_group(n: int, *, fast_forward: bool, **overrides: object) -> StepGroup:
    timer = StepTimer(PROFILE.step)
    cfg = PROFILE.engine.with_overrides(**overrides)
    return StepGroup([Engine(cfg, timer, name=f"r{i}") for i in range(n)], timer, fast_forward=fast_forward)


def check_blocks(e: Engine) -> None:
    assert e.used_blocks >= 0
    assert 0 <= e.pinned_blocks <= e.cached_blocks
    assert e.used_blocks + e.cached_blocks <= e.total_blocks


def drive(group: StepGroup) -> tuple[dict[int, EngineRequest], int]:
    """Run ``group`` (work already added) to completion; returns finished requests by rid and
    the end time in ps. Checks the block invariants after every step or segment."""
    now = 0
    done: dict[int, EngineRequest] = {}
    while group.plan(now):
        now = group.end_ps
        for r in group.finish(now):
            assert r.rid not in done
            done[r.rid] = r
        for e in group.engines:
            check_blocks(e)
    return done, now


# --------------------------------------------------------------------------------------------
# KV blocks and preemption
# --------------------------------------------------------------------------------------------

PROMPT, OUT = 32, 60  # two requests, 2 full blocks each after prefill


def first_overflow_decode(num_blocks: int) -> int | None:
    """Decode step d (1-based) at which two lockstep requests first need more blocks than
    exist: during decode d each holds PROMPT + d tokens, i.e. ceil((PROMPT + d) / BS) blocks."""
    for d in range(1, OUT):
        if 2 * math.ceil((PROMPT + d) / BS) > num_blocks:
            return d
    return None


@pytest.mark.parametrize(("num_blocks", "expected_d"), [(7, 17), (8, 33), (11, 49), (12, None)])
def test_preemption_exactly_when_blocks_run_out(num_blocks: int, expected_d: int | None) -> None:
    assert first_overflow_decode(num_blocks) == expected_d  # the hand computation itself
    e = make_engine(num_gpu_blocks=num_blocks)
    r0, r1 = EngineRequest(0, PROMPT, OUT), EngineRequest(1, PROMPT, OUT)
    e.add(r0, 0)
    e.add(r1, 0)
    finished: list[EngineRequest] = []
    preempt_step = None
    step = 0
    while e.has_work():
        step += 1
        n_tok, n_seq, _, _ = e.schedule()
        assert n_seq > 0
        check_blocks(e)
        if e.num_preemptions and preempt_step is None:
            preempt_step = step
            d = step - 1  # step 1 is the joint prefill, step d + 1 is decode d
            # the most recently admitted request is the victim; it frees everything and
            # goes back to the front of the waiting queue having produced d tokens
            assert e.running == [r0]
            assert list(e.waiting) == [r1]
            assert (r1.computed, r1.blocks, r1.generated, r1.preemptions) == (0, 0, d, 1)
            assert e.used_blocks == math.ceil((PROMPT + d) / BS) == r0.blocks
            assert n_tok == 1
        e.apply_step(step, finished)
    assert e.num_preemptions == (0 if expected_d is None else 1)
    assert preempt_step == (None if expected_d is None else expected_d + 1)
    # both finish with exactly their output length; the preempted one is recomputed
    assert sorted(r.rid for r in finished) == [0, 1]
    assert r0.generated == r1.generated == OUT
    assert r0.preemptions == 0
    assert r0.finish_ps == OUT  # one token per step, first token in step 1
    if expected_d is None:
        assert r1.finish_ps == OUT
    else:
        # r1 cannot come back while r0 runs (it needs as many blocks as r0 holds); it
        # re-prefills PROMPT + d tokens in step OUT + 1 (producing token d + 1) and then
        # decodes one token a step.
        assert r1.first_ps == 1
        assert r1.finish_ps == OUT + 1 + (OUT - (expected_d + 1))
    assert e.generation_tokens_total == 2 * OUT
    assert e.prompt_tokens_total == 2 * PROMPT
    assert e.finished_total == 2
    assert e.used_blocks == 0 and not e.running and not e.waiting


def test_no_admission_in_a_step_that_preempts() -> None:
    # vLLM V1 schedules no waiting request in a step that preempted. With prefill chunks capped
    # at 32 tokens the victim's recompute chunk (2 blocks) would fit in the 3 free blocks.
    e = make_engine(num_gpu_blocks=7, long_prefill_token_threshold=32)
    r0, r1 = EngineRequest(0, PROMPT, OUT), EngineRequest(1, PROMPT, OUT)
    e.add(r0, 0)
    e.add(r1, 0)
    finished: list[EngineRequest] = []
    for step in range(1, 18):  # the joint prefill and decodes 1..16: no preemption
        e.schedule()
        assert len(e.sched) == 2 and e.num_preemptions == 0
        e.apply_step(step, finished)
    e.schedule()  # decode 17: r1 is preempted
    assert e.num_preemptions == 1
    assert e.sched == [(r0, 1)]
    assert list(e.waiting) == [r1]
    assert e.total_blocks - e.used_blocks == 3
    e.apply_step(18, finished)
    e.schedule()  # the next step admits r1's first recompute chunk
    assert e.sched == [(r0, 1), (r1, 32)]


@pytest.mark.parametrize("num_blocks", [7, 8, 11, 12])
def test_preemption_same_with_fast_forward(num_blocks: int) -> None:
    results = []
    for ff in (False, True):
        g = make_group(1, fast_forward=ff, num_gpu_blocks=num_blocks)
        reqs = [EngineRequest(i, PROMPT, OUT) for i in range(2)]
        for r in reqs:
            g.engines[0].add(r, 0)
        done, end = drive(g)
        assert sorted(done) == [0, 1]
        assert all(r.generated == OUT for r in reqs)
        results.append(
            (end, g.engines[0].num_preemptions, [(r.first_ps, r.finish_ps, r.preemptions) for r in reqs])
        )
    assert results[0] == results[1]
    assert results[0][1] == (0 if num_blocks == 12 else 1)


def test_fits_rejects_what_can_never_run() -> None:
    e = make_engine(num_gpu_blocks=10)  # 160 tokens; one block kept spare
    assert e.fits(100, 44)
    assert e.fits(1, 143)
    assert not e.fits(100, 100)
    assert not e.fits(200, 1)
    no_chunk = make_engine(enable_chunked_prefill=False, max_num_batched_tokens=512)
    assert no_chunk.fits(500, 12)
    assert not no_chunk.fits(600, 1)  # a (re)prefill must fit in one step's token budget


# --------------------------------------------------------------------------------------------
# Prefix caching
# --------------------------------------------------------------------------------------------


def run_alone(e: Engine, r: EngineRequest) -> tuple[int, int]:
    """Run one request to completion; returns (hits counted, tokens of its first step)."""
    hits0 = e.prefix_hits
    e.add(r, 0)
    e.schedule()
    first_tokens = sum(n for _, n in e.sched)
    hits = e.prefix_hits - hits0
    finished: list[EngineRequest] = []
    e.apply_step(1, finished)
    while e.has_work():
        e.schedule()
        check_blocks(e)
        e.apply_step(1, finished)
    assert finished == [r]
    return hits, first_tokens


def test_prefix_cache_hits_whole_512_token_chunks() -> None:
    e = make_engine()
    chunk_blocks = 512 // BS
    # A computes everything and caches its 4 full prompt chunks (not the partial 5th)
    assert run_alone(e, EngineRequest(0, 2148, 2, hashes=(1, 2, 3, 4, 5))) == (0, 2048)
    assert e.cached_blocks == 4 * chunk_blocks and e.pinned_blocks == 0
    # B shares 4 chunks: only its last 100 tokens are computed
    b = EngineRequest(1, 2148, 2, hashes=(1, 2, 3, 4, 99))
    e.add(b, 0)
    e.schedule()
    assert e.sched == [(b, 100)]
    assert e.pinned_blocks == 4 * chunk_blocks
    assert e.used_blocks == math.ceil(2148 / BS) - 4 * chunk_blocks
    assert e.prefix_hits == 2048
    finished: list[EngineRequest] = []
    while e.has_work():
        e.apply_step(1, finished)
        if e.has_work():
            e.schedule()
    assert b.generated == 2 and e.pinned_blocks == 0
    # a prompt of exactly 4 chunks: the last token is always recomputed, so 3 chunks hit
    assert run_alone(e, EngineRequest(2, 2048, 1, hashes=(1, 2, 3, 4))) == (1536, 512)
    # the chain stops at the first miss
    assert run_alone(e, EngineRequest(3, 2148, 1, hashes=(1, 77, 3, 4, 5))) == (512, 1636)
    assert run_alone(e, EngineRequest(4, 1000, 1, hashes=(1, 2))) == (512, 488)
    assert e.prefix_queries == 2148 + 2148 + 2048 + 2148 + 1000
    assert e.prefix_hits == 2048 + 1536 + 512 + 512
    assert e.prefix_hits % 512 == 0


def test_prefix_cache_disabled_gives_no_hits() -> None:
    e = make_engine(enable_prefix_caching=False)
    for rid in range(3):
        hits, first = run_alone(e, EngineRequest(rid, 2148, 2, hashes=(1, 2, 3, 4, 5)))
        assert (hits, first) == (0, 2048)
    assert e.prefix_hits == 0 and e.cached_blocks == 0
    assert e.prefix_queries == 3 * 2148


# --------------------------------------------------------------------------------------------
# Barrier groups (data parallel)
# --------------------------------------------------------------------------------------------

LONG_P, LONG_O = 3000, 5
SHORT_P, SHORT_O = 10, 20


def long_rank_steps() -> list[float]:
    """Rank 0: a 3000-token prompt in chunks of 2048 + 952, then 4 decodes."""
    steps = [step_s(2048, 1, 0, 2048 * 2048 / 2), step_s(952, 1, 0, 952 * (2 * 2048 + 952) / 2)]
    steps += [step_s(1, 1, LONG_P + k) for k in range(1, LONG_O)]
    return steps


def short_rank_steps() -> list[float]:
    """Rank 1: a 10-token prefill, then 19 decodes (context 11, 12, ... incl. the new token)."""
    return [step_s(SHORT_P, 1, 0, SHORT_P * SHORT_P / 2)] + [
        step_s(1, 1, SHORT_P + k) for k in range(1, SHORT_O)
    ]


@pytest.mark.parametrize("ff", [False, True])
def test_barrier_step_time_is_set_by_the_most_loaded_rank(ff: bool) -> None:
    g = make_group(2, fast_forward=ff)
    long_r, short_r = EngineRequest(0, LONG_P, LONG_O), EngineRequest(1, SHORT_P, SHORT_O)
    g.engines[0].add(long_r, 0)
    g.engines[1].add(short_r, 0)
    done, _ = drive(g)
    assert sorted(done) == [0, 1]
    a, b = long_rank_steps(), short_rank_steps()
    a += [0.0] * (len(b) - len(a))
    group_steps = [max(x, y) for x, y in zip(a, b, strict=True)]
    assert long_r.first_ps / PS_PER_S == pytest.approx(sum(group_steps[:2]), rel=REL)
    assert long_r.finish_ps / PS_PER_S == pytest.approx(sum(group_steps[: LONG_O + 1]), rel=REL)
    assert short_r.first_ps / PS_PER_S == pytest.approx(group_steps[0], rel=REL)
    assert short_r.finish_ps / PS_PER_S == pytest.approx(sum(group_steps), rel=REL)
    # alone (G = 1) the short request is far faster: the long rank's prefill chunks stalled it
    solo = make_group(1, fast_forward=ff)
    alone = EngineRequest(1, SHORT_P, SHORT_O)
    solo.engines[0].add(alone, 0)
    drive(solo)
    assert alone.finish_ps / PS_PER_S == pytest.approx(sum(b), rel=REL)
    assert short_r.finish_ps > alone.finish_ps + 0.15 * PS_PER_S


@pytest.mark.parametrize("ff", [False, True])
def test_barrier_imbalance_accumulators(ff: bool) -> None:
    # unbalanced: the KV tokens resident on each rank during each step, by hand
    g = make_group(2, fast_forward=ff)
    g.engines[0].add(EngineRequest(0, LONG_P, LONG_O), 0)
    g.engines[1].add(EngineRequest(1, SHORT_P, SHORT_O), 0)
    drive(g)
    l0 = [2048, 3000] + [LONG_P + k for k in range(1, LONG_O)]
    l1 = [SHORT_P] + [SHORT_P + k for k in range(1, SHORT_O)]
    l0 += [0] * (len(l1) - len(l0))
    diff = sum(abs(x - y) for x, y in zip(l0, l1, strict=True))
    assert g.steps == SHORT_O
    assert g.imb_maxmin == diff
    assert g.imb_gmax == diff  # G * max - total == max - min for G = 2
    # perfectly balanced identical loads: zero, on a group of 4 too
    for n in (2, 4):
        g = make_group(n, fast_forward=ff)
        for i, e in enumerate(g.engines):
            e.add(EngineRequest(i, 700, 40), 0)
            e.add(EngineRequest(10 + i, 50, 90), 0)
        drive(g)
        assert g.steps == 90
        assert g.imb_gmax == 0 and g.imb_maxmin == 0


# --------------------------------------------------------------------------------------------
# Chunked prefill bounds the stall a newcomer imposes on running decodes
# --------------------------------------------------------------------------------------------


def mixing_steps(budget: int) -> tuple[list[tuple[float, int, int]], EngineRequest]:
    """Stepwise: a long request (1000/1000) and newcomers (500/500) every ~50 decode steps.
    Returns (duration s, tokens scheduled, resident KV tokens) of each step while the long
    request decodes, and the long request."""
    g = make_group(1, fast_forward=False, max_num_batched_tokens=budget)
    e = g.engines[0]
    long_r = EngineRequest(0, 1000, 1000)
    e.add(long_r, 0)
    arrivals = [(round(0.55 * k * PS_PER_S), EngineRequest(k, 500, 500)) for k in range(1, 20)]
    now = 0
    out: list[tuple[float, int, int]] = []
    while g.plan(now) or arrivals:
        if not g.busy:
            now = arrivals[0][0]
        else:
            n_tok = sum(n for _, n in e.sched)
            assert n_tok <= budget
            load = e.load_after_schedule()
            decoding = long_r.first_ps >= 0 and long_r.finish_ps < 0
            start, now = now, g.end_ps
            g.finish(now)
            if decoding:
                out.append(((now - start) / PS_PER_S, n_tok, load))
        while arrivals and arrivals[0][0] <= now:
            e.add(arrivals.pop(0)[1], now)
    assert long_r.generated == 1000
    return out, long_r


def test_chunked_prefill_bounds_the_stall_per_newcomer() -> None:
    small, long_small = mixing_steps(64)
    big, long_big = mixing_steps(2048)
    f = 1.0 + S.attention_batching_overhead
    lin64 = max(S.linear.c0_ms, S.linear.c1_ms + S.linear.c2_us_per_token * 1e-3 * 64) * 1e-3
    for dur, n_tok, load in small:
        # <= 64 tokens scheduled; attention at most every resident token as decode context
        # plus 64 prefill queries against every resident token
        attn = f * load * (S.decode_attention_ns_per_context_token + 64 * S.prefill_attention_ns_per_pair)
        assert n_tok <= 64
        assert dur <= S.overhead_ms * 1e-3 + lin64 + attn * 1e-9
    worst_small = max(d for d, _, _ in small)
    worst_big = max(d for d, _, _ in big)
    # without the small budget a newcomer's whole 500-token prefill lands in one step
    assert worst_big >= step_s(501, 2, 1001, 500 * 500 / 2)
    assert worst_small < 0.5 * worst_big
    assert any(n_tok == 64 for _, n_tok, _ in small)  # the budget was actually binding
    # and the long request finishes sooner with the small budget (stall-free batching)
    assert long_small.finish_ps < long_big.finish_ps
