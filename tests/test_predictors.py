"""Output-length predictors: hand-computed distributions, capping, decay, memory bounds, config."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmpool.routing import ConfigError, Request
from llmpool.routing.predictors import (
    ExactMatchParams,
    ExactMatchPredictor,
    LengthPredictor,
    OraclePredictor,
    PerModelPredictor,
    PredictorConfig,
    SurvivalParams,
    SurvivalPredictor,
    build_predictor,
    predictor_names,
    prompt_identity,
)

ROOT = Path(__file__).resolve().parents[1]


def req(i: int = 0, **kw: Any) -> Request:
    return Request(id=i, arrival=0.0, prompt_tokens=kw.pop("prompt_tokens", 100), **kw)


def flat(**kw: Any) -> SurvivalPredictor:
    """A Survival predictor with no prior and no decay: the plain empirical distribution."""
    return SurvivalPredictor(SurvivalParams(prior_weight=0, half_life=None, **kw))


def four_lengths(times: int = 250, **kw: Any) -> SurvivalPredictor:
    """Lengths 10, 20, 30, 40, each a quarter of the mass."""
    s = flat(**kw)
    for _ in range(times):
        for length in (10, 20, 30, 40):
            s.observe(req(), length)
    return s


# --------------------------------------------------------------------------------------------
# Survival on a hand-built distribution
# --------------------------------------------------------------------------------------------


def test_termination_hand_computed() -> None:
    s = four_lengths()
    r = req()
    # P(L in (15, 25] | L > 15) = P(20) / P(20, 30, 40) = 1/3; E[L - 15 | finishes] = 20 - 15.
    assert s.termination(r, 15, 10) == pytest.approx((1 / 3, 5.0))
    # (15, 35]: 20 and 30 of {20, 30, 40}; mean of (5, 15).
    assert s.termination(r, 15, 20) == pytest.approx((2 / 3, 10.0))
    # Window boundary is inclusive above, exclusive below: (10, 20] holds 20 only.
    assert s.termination(r, 10, 10) == pytest.approx((1 / 3, 10.0))
    # Nothing ends in (21, 29]: p_fin 0 and mu_rem = horizon.
    assert s.termination(r, 21, 8) == (0.0, 8.0)
    # Age 0: P(L <= 40) = 1, mean 25.
    assert s.termination(r, 0, 40) == pytest.approx((1.0, 25.0))
    assert s.termination(r, 35, 100) == pytest.approx((1.0, 5.0))


def test_expected_remaining_and_clipped() -> None:
    s = four_lengths()
    r = req()
    assert s.expected_remaining(r, 0) == pytest.approx(25.0)
    assert s.expected_remaining(r, 15) == pytest.approx((5 + 15 + 25) / 3)
    assert s.expected_remaining(r, 35) == pytest.approx(5.0)
    # E[min(L - 15, 10) | L > 15] = (5 + 10 + 10) / 3.
    assert s.clipped_remaining(r, 15, 10) == pytest.approx(25 / 3)


def test_max_tokens_caps_every_method() -> None:
    s = four_lengths()
    r = req(max_tokens=25)  # lengths become 10, 20, 25, 25
    assert s.termination(r, 15, 10) == pytest.approx((1.0, (5 + 10 + 10) / 3))
    assert s.termination(r, 15, 5) == pytest.approx((1 / 3, 5.0))  # (15, 20]: only 20 (h < cap)
    assert s.expected_remaining(r, 15) == pytest.approx(25 / 3)
    assert s.expected_remaining(r, 22) == pytest.approx(3.0)  # both survivors stop at 25
    p = s.predict(r)
    assert p.expected_tokens == pytest.approx((10 + 20 + 25 + 25) / 4)
    assert s.predict(req(max_tokens=1000)).expected_tokens == pytest.approx(25.0)
    # At or past the cap the request must end with the next token.
    assert s.termination(r, 25, 10) == (1.0, 1.0)
    assert s.termination(r, 30, 10) == (1.0, 1.0)
    assert s.expected_remaining(r, 25) == 1.0


def test_bucket_probabilities() -> None:
    s = four_lengths(bucket_edges=(15, 35))
    p = s.predict(req())
    assert p.bucket_edges == (15, 35)
    assert p.bucket_probs == pytest.approx((0.25, 0.5, 0.25))
    assert p.expected_tokens == pytest.approx(25.0)
    assert p.source == "survival"
    # Edges are lower-inclusive: [0, 20) holds 10 only, [20, 30) holds 20, [30, inf) 30 and 40.
    s2 = four_lengths(bucket_edges=(20, 30))
    assert s2.predict(req()).bucket_probs == pytest.approx((0.25, 0.25, 0.5))
    # Capped at 25: the 30 and 40 become 25 and move to the middle bucket.
    assert s.predict(req(max_tokens=25)).bucket_probs == pytest.approx((0.25, 0.75, 0.0))
    # Default edges (256, 2048): everything is short.
    assert four_lengths().predict(req()).bucket_probs == pytest.approx((1.0, 0.0, 0.0))


def test_past_the_observed_support_uses_geometric_tail() -> None:
    s = four_lengths()
    # Nothing survives 40: remaining length is geometric with the distribution's mean (25).
    q = 1 - 1 / 25
    p_fin = 1 - q**10
    mu = ((1 - q**10) * 25 - 10 * q**10) / p_fin
    assert s.termination(req(), 40, 10) == pytest.approx((p_fin, mu))
    assert s.expected_remaining(req(), 100) == pytest.approx(25.0)
    # Capped: must end by the cap.
    got = s.termination(req(max_tokens=45), 40, 10)
    assert got == pytest.approx((1.0, (1 - q**5) * 25))


def test_no_prior_no_data_is_geometric_with_prior_mean() -> None:
    s = flat(prior_mean=100)
    p = s.predict(req())
    assert p.expected_tokens == pytest.approx(100.0)
    q = 0.99
    assert p.bucket_probs == pytest.approx((1 - q**255, q**255 - q**2047, q**2047))
    assert s.expected_remaining(req(), 500) == pytest.approx(100.0)


def test_default_prior() -> None:
    s = SurvivalPredictor()
    p = s.predict(req())
    assert p.expected_tokens == pytest.approx(256, rel=0.01)
    assert sum(p.bucket_probs) == pytest.approx(1.0)
    # Lognormal(mean 256, sigma 1): P(L < 256) = Phi((ln 256 - mu) / 1) = Phi(0.5) ~ 0.69.
    assert p.bucket_probs[0] == pytest.approx(0.6915, abs=0.005)
    p_fin, mu = s.termination(req(), 100, 80)
    assert 0.0 < p_fin < 1.0 and 1.0 <= mu <= 80.0
    # Observations quickly outweigh the 20 pseudo-observations.
    for _ in range(2000):
        s.observe(req(), 50)
    assert s.predict(req()).expected_tokens == pytest.approx(50, rel=0.05)


def test_prior_weight_counts_as_pseudo_observations() -> None:
    s = SurvivalPredictor(SurvivalParams(prior_weight=20, half_life=None, bucket_edges=(1000,)))
    for _ in range(20):
        s.observe(req(), 5000)
    # Half the mass is the prior, half is at 5000. The prior is lognormal with mean 256 and
    # sigma 1 (mu = ln 256 - 1/2), length l getting the mass of (l - 0.5, l + 0.5], truncated to
    # 1..32768: P(prior >= 1000) = (Phi(ln 32768.5 - mu) - Phi(ln 999.5 - mu)) / Phi(ln 32768.5 - mu).
    mu = math.log(256) - 0.5

    def phi(x: float) -> float:
        return 0.5 * (1 + math.erf((math.log(x) - mu) / math.sqrt(2)))

    tail = (phi(32768.5) - phi(999.5)) / phi(32768.5)
    assert tail == pytest.approx(0.031, abs=0.001)
    assert s.predict(req()).bucket_probs[1] == pytest.approx(0.5 + 0.5 * tail, rel=1e-6)


def test_coarse_bins_stay_accurate() -> None:
    s = flat()  # exact bins up to 4096, coarse (~1.6 % wide) above
    assert s.num_bins < 4096 + 200
    for _ in range(100):
        s.observe(req(), 5000)
        s.observe(req(), 10000)
    r = req()
    p_fin, mu = s.termination(r, 4500, 600)  # 5000 ends inside, 10000 does not
    assert p_fin == pytest.approx(0.5)
    assert mu == pytest.approx(500, abs=45)  # bin width near 5000 is ~80 tokens
    assert s.termination(r, 5500, 100) == (0.0, 100.0)
    p_fin, mu = s.termination(r, 6000, 5000)
    assert p_fin == pytest.approx(1.0)
    assert mu == pytest.approx(4000, rel=0.01)
    assert s.expected_remaining(r, 0) == pytest.approx(7500, rel=0.01)
    # Longer than max_len counts as max_len.
    s.observe(req(), 10**9)
    s.refresh()
    assert s.termination(r, 32767, 5) == pytest.approx((1.0, 1.0))


def test_exact_bins_for_ages_of_a_few_thousand() -> None:
    s = flat()
    s.warm([3000, 3050, 3100, 3150])
    assert s.termination(req(), 3010, 100) == pytest.approx((2 / 3, (40 + 90) / 2))


def test_warm_equals_repeated_observe_without_decay() -> None:
    lengths = [1, 7, 7, 300, 2048, 4096, 4097, 9000, 40000]
    a = flat()
    a.warm(lengths)
    b = flat()
    for x in lengths:
        b.observe(req(), x)
    for age in (0, 5, 299, 4096, 5000):
        assert a.termination(req(), age, 80) == pytest.approx(b.termination(req(), age, 80))
        assert a.expected_remaining(req(), age) == pytest.approx(b.expected_remaining(req(), age))
    assert a.observations == len(lengths)


def test_zero_length_counts_as_one() -> None:
    s = flat()
    s.observe(req(), 0)
    assert s.predict(req()).expected_tokens == pytest.approx(1.0)


def test_horizon_must_be_positive() -> None:
    with pytest.raises(ValueError, match="horizon"):
        four_lengths().termination(req(), 0, 0)


# --------------------------------------------------------------------------------------------
# Decay and lazy rebuilds
# --------------------------------------------------------------------------------------------


def test_decay_tracks_drift_within_two_half_lives() -> None:
    half = 100

    def run(half_life: float | None) -> float:
        s = SurvivalPredictor(SurvivalParams(prior_weight=0, half_life=half_life, bucket_edges=(500,)))
        for _ in range(10 * half):
            s.observe(req(), 100)
        for _ in range(2 * half):
            s.observe(req(), 1000)
        return s.predict(req()).bucket_probs[1]

    # Observation n weighs g**n, g = 2**(1/half): the new share is (g**1200 - g**1000) / (g**1200 - 1).
    g = 2 ** (1 / half)
    expected = (g**1200 - g**1000) / (g**1200 - 1)
    assert expected == pytest.approx(0.75, abs=0.001)
    assert run(half) == pytest.approx(expected, rel=1e-9)
    assert run(None) == pytest.approx(200 / 1200)


def test_decay_rescaling_keeps_ratios() -> None:
    s = SurvivalPredictor(SurvivalParams(prior_weight=0, half_life=1.0, bucket_edges=(15,)))
    for i in range(2000):  # weights double every observation: forces several rescales
        s.observe(req(), 10 if i % 2 else 20)
    # Last two observations: 10 (weight 1) then, before it, 20 (weight 1/2), 10 (1/4), ...
    assert s.predict(req()).bucket_probs[0] == pytest.approx(2 / 3)
    assert all(math.isfinite(x) for x in s.termination(req(), 12, 10))


def test_rebuild_is_lazy_but_bounded() -> None:
    s = SurvivalPredictor(SurvivalParams(prior_weight=0, half_life=None, rebuild_every=64))
    for _ in range(10_000):
        s.observe(req(), 10)
    assert s.expected_remaining(req(), 0) == pytest.approx(10.0)
    for _ in range(63):
        s.observe(req(), 1000)
    assert s.expected_remaining(req(), 0) == pytest.approx(10.0)  # snapshot not rebuilt yet
    s.observe(req(), 1000)
    assert s.expected_remaining(req(), 0) == pytest.approx((10 * 10_000 + 1000 * 64) / 10_064)
    s.observe(req(), 1000)
    s.refresh()
    assert s.expected_remaining(req(), 0) == pytest.approx((10 * 10_000 + 1000 * 65) / 10_065)


def test_few_observations_are_seen_at_once() -> None:
    s = flat()
    s.predict(req())
    s.observe(req(), 42)
    assert s.predict(req()).expected_tokens == pytest.approx(42.0)
    s.observe(req(), 58)
    assert s.predict(req()).expected_tokens == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------
# ExactMatch
# --------------------------------------------------------------------------------------------


def test_exact_match_uses_the_prompts_own_lengths() -> None:
    em = ExactMatchPredictor(ExactMatchParams(fallback=SurvivalParams(prior_weight=0, half_life=None)))
    hit = req(prompt_hash=7)
    em.observe(hit, 100)
    em.observe(hit, 200)
    for _ in range(50):
        em.observe(req(prompt_hash=8), 1000)
    p = em.predict(hit)
    assert (p.expected_tokens, p.bucket_probs, p.source) == (150.0, (1.0, 0.0, 0.0), "exact-match")
    assert em.termination(hit, 50, 60) == pytest.approx((0.5, 50.0))
    assert em.termination(hit, 150, 100) == pytest.approx((1.0, 50.0))
    assert em.termination(hit, 120, 10) == (0.0, 10.0)
    assert em.expected_remaining(hit, 50) == pytest.approx(100.0)
    # Capped at 150: lengths become 100, 150.
    capped = req(prompt_hash=7, max_tokens=150)
    assert em.predict(capped).expected_tokens == pytest.approx(125.0)
    assert em.termination(capped, 120, 50) == pytest.approx((1.0, 30.0))
    assert em.termination(capped, 50, 60) == pytest.approx((0.5, 50.0))
    assert em.expected_remaining(capped, 50) == pytest.approx(75.0)
    assert em.termination(capped, 150, 10) == (1.0, 1.0)


def test_exact_match_falls_back() -> None:
    em = ExactMatchPredictor(ExactMatchParams(min_samples=2))
    fb = em.fallback
    assert isinstance(fb, SurvivalPredictor)
    em.observe(req(prompt_hash=1), 30)  # one sample: below min_samples
    for r in (req(prompt_hash=1), req(prompt_hash=2), req()):  # too few, unknown, no identity
        assert em.predict(r) == fb.predict(r)
        assert em.predict(r).source == "survival"
        assert em.termination(r, 10, 20) == fb.termination(r, 10, 20)
        assert em.expected_remaining(r, 10) == fb.expected_remaining(r, 10)
    em.observe(req(prompt_hash=1), 50)
    assert em.predict(req(prompt_hash=1)).expected_tokens == pytest.approx(40.0)
    # Outlived every sample of its prompt: ask the fallback.
    assert em.termination(req(prompt_hash=1), 60, 20) == fb.termination(req(prompt_hash=1), 60, 20)
    assert em.expected_remaining(req(prompt_hash=1), 60) == fb.expected_remaining(req(prompt_hash=1), 60)
    # The fallback learned from every observation (no identity needed).
    assert fb.observations == 2


def test_exact_match_ring_keeps_last_samples() -> None:
    em = ExactMatchPredictor(ExactMatchParams(samples_per_prompt=2))
    r = req(prompt_hash=3)
    for x in (10, 20, 30):
        em.observe(r, x)
    assert sorted(em.samples(r)) == [20, 30]
    assert em.predict(r).expected_tokens == pytest.approx(25.0)


def test_prompt_identity() -> None:
    assert prompt_identity(req(prompt_hash=5, prefix_hashes=(1, 2))) == 5
    a = prompt_identity(req(prefix_hashes=(1, 2), prompt_tokens=1000))
    assert a is not None
    assert a == prompt_identity(req(i=9, prefix_hashes=(1, 2), prompt_tokens=1000))
    assert a != prompt_identity(req(prefix_hashes=(1, 3), prompt_tokens=1000))
    assert a != prompt_identity(req(prefix_hashes=(1, 2), prompt_tokens=1001))
    assert prompt_identity(req()) is None
    em = ExactMatchPredictor()
    em.observe(req(prefix_hashes=(4, 5), prompt_tokens=700), 77)
    assert em.predict(req(i=2, prefix_hashes=(4, 5), prompt_tokens=700)).expected_tokens == 77.0


def test_exact_match_memory_is_bounded() -> None:
    em = ExactMatchPredictor(ExactMatchParams(max_prompts=1000, samples_per_prompt=4))
    for i in range(1_000_000):
        em.observe(req(prompt_hash=i), 1 + i % 5000)
    assert em.num_prompts == 1000
    assert len(em._slots) <= 1000
    assert len(em._data) <= 1000 * 4
    assert len(em._count) <= 1000 and len(em._next) <= 1000
    # The most recent 1000 prompts are the ones kept (LRU).
    assert em.samples(req(prompt_hash=999_999)) == (1 + 999_999 % 5000,)
    assert em.samples(req(prompt_hash=998_999)) == ()
    assert em.samples(req(prompt_hash=999_000)) == (1 + 999_000 % 5000,)


def test_exact_match_lru_touch_on_predict() -> None:
    em = ExactMatchPredictor(ExactMatchParams(max_prompts=2))
    em.observe(req(prompt_hash=1), 10)
    em.observe(req(prompt_hash=2), 20)
    em.predict(req(prompt_hash=1))  # 1 is now the most recent
    em.observe(req(prompt_hash=3), 30)  # evicts 2
    assert em.samples(req(prompt_hash=1)) == (10,)
    assert em.samples(req(prompt_hash=2)) == ()
    assert em.samples(req(prompt_hash=3)) == (30,)


def test_exact_match_rejects_mismatched_fallback() -> None:
    with pytest.raises(ConfigError, match="bucket_edges"):
        ExactMatchPredictor(ExactMatchParams(), SurvivalPredictor(SurvivalParams(bucket_edges=(100,))))


# --------------------------------------------------------------------------------------------
# Oracle and PerModel
# --------------------------------------------------------------------------------------------


def test_oracle_is_exact() -> None:
    truth = {1: 300, 2: 3000, 3: 0}
    fb = four_lengths()
    o = OraclePredictor(truth.get, fb)
    p = o.predict(req(1))
    assert (p.expected_tokens, p.bucket_probs, p.source) == (300.0, (0.0, 1.0, 0.0), "oracle")
    assert o.predict(req(2)).bucket_probs == (0.0, 0.0, 1.0)
    assert o.predict(req(3)).expected_tokens == 1.0  # at least one token
    assert o.termination(req(1), 250, 80) == (1.0, 50.0)
    assert o.termination(req(1), 219, 80) == (0.0, 80.0)
    assert o.termination(req(1), 220, 80) == (1.0, 80.0)
    assert o.termination(req(1), 300, 80) == (1.0, 1.0)  # done but not seen yet
    assert o.expected_remaining(req(1), 100) == 200.0
    capped = req(1, max_tokens=256)
    assert o.predict(capped).expected_tokens == 256.0
    assert o.predict(capped).bucket_probs == (0.0, 1.0, 0.0)
    assert o.termination(capped, 250, 80) == (1.0, 6.0)
    # Unknown id: the fallback answers, and learns.
    assert o.predict(req(4)) == fb.predict(req(4))
    assert o.termination(req(4), 15, 10) == pytest.approx((1 / 3, 5.0))
    assert o.expected_remaining(req(4), 15) == pytest.approx(15.0)
    o.observe(req(4), 10)
    assert fb.observations == 1001


def test_per_model_keeps_models_apart_and_bounded() -> None:
    built: list[LengthPredictor] = []

    def factory() -> LengthPredictor:
        p = flat()
        built.append(p)
        return p

    pm = PerModelPredictor(factory, max_models=8)
    for _ in range(10):
        pm.observe(req(model="a"), 10)
        pm.observe(req(model="b"), 1000)
    assert pm.predict(req(model="a")).expected_tokens == pytest.approx(10.0)
    assert pm.predict(req(model="b")).expected_tokens == pytest.approx(1000.0)
    assert pm.termination(req(model="a"), 5, 10) == pytest.approx((1.0, 5.0))
    assert pm.expected_remaining(req(model="b"), 500) == pytest.approx(500.0)
    for m in range(2000):
        pm.observe(req(model=f"m{m}"), 5)
    assert pm.num_models == 8
    assert len(pm._children) <= 8
    assert len(built) == 2002  # one child per model seen (the probe child serves the first)
    # "a" was evicted: it starts again from scratch (no prior -> geometric with prior_mean).
    assert pm.predict(req(model="a")).expected_tokens == pytest.approx(256.0)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_build_predictor_defaults() -> None:
    assert predictor_names() == ["oracle", "survival", "exact-match", "learned"]
    p = build_predictor("survival")
    assert isinstance(p, PerModelPredictor)
    assert isinstance(p.child("default"), SurvivalPredictor)
    s = build_predictor({"name": "survival", "per_model": False})
    assert isinstance(s, SurvivalPredictor)
    assert s.params == SurvivalParams()
    assert s.params.half_life == 5000 and s.params.prior_mean == 256 and s.params.prior_weight == 20
    assert s.params.max_len == 32768 and s.params.rebuild_every == 64
    em = build_predictor(
        {"name": "exact-match", "per_model": False, "params": {"bucket_edges": [100], "max_prompts": 5}}
    )
    assert isinstance(em, ExactMatchPredictor)
    assert em.params.max_prompts == 5 and em.params.samples_per_prompt == 8 and em.params.min_samples == 1
    assert em.fallback.bucket_edges == (100,)
    assert em.predict(req()).bucket_edges == (100,)
    o = build_predictor(PredictorConfig(name="oracle", max_models=2), truth={0: 5}.get)
    assert isinstance(o, PerModelPredictor)
    assert o.predict(req(0)).expected_tokens == 5.0
    assert o.predict(req(1)).source == "survival"


def test_config_errors() -> None:
    with pytest.raises(ConfigError) as e:
        build_predictor("oracle")
    assert str(e.value) == (
        "predictor 'oracle' needs the lab's ground truth; use survival or exact-match in a live picker"
    )
    with pytest.raises(
        ConfigError, match=r"unknown predictor 'bert'; allowed: oracle, survival, exact-match"
    ):
        build_predictor("bert")
    with pytest.raises(ConfigError, match=r"predictor 'survival': half_life: .*\(parameters: bucket_edges"):
        build_predictor({"name": "survival", "params": {"half_life": -1}})
    with pytest.raises(ConfigError, match=r"halflife: Extra inputs are not permitted"):
        build_predictor({"name": "survival", "params": {"halflife": 10}})
    with pytest.raises(ConfigError, match="strictly increasing"):
        build_predictor({"name": "survival", "params": {"bucket_edges": [2048, 256]}})
    with pytest.raises(ConfigError, match="min_samples"):
        build_predictor({"name": "exact-match", "params": {"min_samples": 9}})
    with pytest.raises(ConfigError, match=r"fallback\.prior_mean"):
        build_predictor({"name": "exact-match", "params": {"fallback": {"prior_mean": 0}}})
    with pytest.raises(ConfigError, match=r"invalid predictor config: per_modle: Extra inputs"):
        build_predictor({"name": "survival", "per_modle": False})
    with pytest.raises(ConfigError, match="invalid predictor config: max_models"):
        build_predictor({"name": "survival", "max_models": 0})
    for err in (ConfigError("x"),):
        assert "\n" not in str(err)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def _trace(p: LengthPredictor) -> list[Any]:
    out: list[Any] = []
    for i in range(3000):
        r = req(i, prompt_hash=i % 37 if i % 3 else None, prefix_hashes=(i % 11,), model=f"m{i % 3}")
        out.append(p.predict(r))
        out.append(p.termination(r, i % 400, 80))
        p.observe(r, 1 + (i * 7919) % 3000)
    return out


@pytest.mark.parametrize("name", ["survival", "exact-match"])
def test_deterministic(name: str) -> None:
    assert _trace(build_predictor(name)) == _trace(build_predictor(name))


def test_identity_does_not_depend_on_hash_seed() -> None:
    code = (
        "from llmpool.routing import Request\n"
        "from llmpool.routing.predictors import prompt_identity\n"
        "print(prompt_identity(Request(id=0, arrival=0.0, prompt_tokens=9, prefix_hashes=(3, 1, 4))))\n"
    )
    outs = set()
    for seed in ("1", "2"):
        r = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT / "extender")},
        )
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1
