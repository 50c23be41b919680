"""The ``learned`` length predictor: a model file served by onnxruntime behind the routing interface.

Per request the model gives ``mu`` (the predicted median of ``log L``) and its bucket head's
probabilities. The length distribution the interface needs is a discretised lognormal with
median ``exp(mu)`` and log-spread ``sigma`` (measured out of fold per target model at training
time): ``P(L <= n) = Phi((ln(n + 0.5) - mu) / sigma)`` for ``n >= 1``. From it:

* ``predict`` -- ``E[min(L, max_tokens)]``; the bucket head's probabilities (re-weighted by the
  online correction, below; derived from the lognormal when the configured edges are not the
  model's), with the buckets above ``max_tokens`` merged into the one holding it;
* ``termination`` / ``expected_remaining`` -- the lognormal conditioned on ``L > age``, in closed
  form (a few ``erfc`` calls; no model call, as the request's ``mu`` is cached by request id).
  A request that outlived the distribution (surviving mass < 1e-12) is treated as geometric
  with the distribution's mean, like ``survival`` does past its data.

**Online correction** (``observe``): per target model, an exponentially decayed mean and spread
of the residual ``ln(L) - mu`` (half-life ``correction_half_life`` observations, backed by
``correction_prior`` pseudo-observations of the trained spread). The mean shifts ``mu``; the
spread replaces ``sigma``; the bucket head's probabilities are multiplied by the ratio of the
corrected to the uncorrected lognormal bucket masses and blended toward the corrected lognormal
with weight ``w / (w + correction_prior)`` (``w`` the model's decayed observation count). A
response that stopped at its ``max_tokens`` says nothing about its natural length and is not
used. At most ``max_models`` models are tracked (LRU): memory is bounded.

**Off the event loop** (encoder tier): the predictor is ``blocking``. The live picker runs
:meth:`LearnedPredictor.prepare` (the model call: tokenizer + onnxruntime, which release the GIL;
no predictor state is touched) in a worker thread and hands the result to
:meth:`LearnedPredictor.predict_prepared` on its loop, which caches it, so ``predict``,
``termination`` and ``expected_remaining`` of that request are cache hits. When the model's
answer is not there in time (``prepared is None``), the request is answered for its whole life
by an empirical ``survival`` predictor that every completion trains (kept for blocking tiers
only). The lab calls ``predict`` synchronously, as for any predictor.

:func:`build_learned` loads the model file; if it cannot, it raises a one-line
:class:`~llmpool.routing.policy.ConfigError` (``on_error: raise``) or logs a warning and returns
a :class:`LearnedFallback` (a ``survival`` predictor whose :meth:`~LearnedFallback.fallback_reason`
says why; ``on_error: fallback``, the default: a picker never crashes on a bad model file).
Policies report it through ``Policy.fallback_status``; there is no process-wide state.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Final, TypeAlias, cast

from llmpool.predict import PredictError
from llmpool.predict.runtime import EncoderModel, LoadedModel, load_model
from llmpool.routing.policy import ConfigError
from llmpool.routing.predictors import (
    LearnedParams,
    LengthPredictor,
    SurvivalParams,
    SurvivalPredictor,
    _geom_remaining,
    _geom_termination,
)
from llmpool.routing.types import LengthPrediction, Request

__all__ = ["LearnedFallback", "LearnedPredictor", "build_learned", "lognormal_termination"]

log = logging.getLogger("llmpool.predict")

_SQRT2: Final = math.sqrt(2.0)
_TINY: Final = 1e-12

# What prepare() hands to predict_prepared(): (model, prompt_tokens, max_tokens, mu, sigma, probs),
# the key fields of the request it was computed for first.
_Raw: TypeAlias = tuple[str, int, int | None, float, float, tuple[float, ...]]


def _phi_between(z1: float, z2: float) -> float:
    """``P(z1 < Z <= z2)`` for a standard normal, accurate in both tails."""
    if z2 <= z1:
        return 0.0
    if z1 >= 0.0:
        return 0.5 * (math.erfc(z1 / _SQRT2) - math.erfc(z2 / _SQRT2))
    return 0.5 * (math.erfc(-z2 / _SQRT2) - math.erfc(-z1 / _SQRT2))


def _sf(n: float, mu: float, s: float) -> float:
    """``P(L > n)`` for integer ``n`` (``L >= 1`` always)."""
    if n < 1:
        return 1.0
    return 0.5 * math.erfc((math.log(n + 0.5) - mu) / (s * _SQRT2))


def _pe(lo: float, hi: float, mu: float, s: float) -> float:
    """``E[X; lo < X <= hi]`` for the continuous lognormal ``X`` (``hi`` may be ``inf``)."""
    m = math.exp(mu + 0.5 * s * s)
    z1 = (math.log(lo) - mu - s * s) / s if lo > 0 else -math.inf
    z2 = (math.log(hi) - mu - s * s) / s if hi != math.inf else math.inf
    return m * _phi_between(z1, z2)


def _capped_mean_above(a: int, cap: int, mu: float, s: float, sa: float) -> float:
    """``E[min(L, cap) | L > a]`` for ``a < cap``."""
    body = _pe(a + 0.5, cap - 0.5, mu, s) if cap - 1 > a else 0.0
    return (body + cap * _sf(cap - 1, mu, s)) / sa


def _lognormal_buckets(edges: tuple[int, ...], mu: float, s: float) -> list[float]:
    out: list[float] = []
    prev = 0.0
    for e in edges:
        f = 1.0 - _sf(e - 1, mu, s)
        out.append(max(f - prev, 0.0))
        prev = max(prev, f)
    out.append(max(1.0 - prev, 0.0))
    return out


def lognormal_termination(
    mu: float, s: float, age: int, horizon: int, cap: int | None
) -> tuple[float, float]:
    """``(P(L <= age + horizon | L > age), E[L - age | that])`` for the discretised lognormal
    (``age >= 0``, ``horizon >= 1``, ``age`` below ``cap`` when there is one): what
    :meth:`LearnedPredictor.termination` answers, and what ``predictor eval`` scores."""
    if cap is not None:
        cap = max(cap, 1)
    sa = _sf(age, mu, s)
    if sa < _TINY:
        return _geom_termination(math.exp(mu + 0.5 * s * s), age, horizon, cap)
    h = float(horizon)
    if cap is not None and age + horizon >= cap:
        rem = _capped_mean_above(age, cap, mu, s, sa) - age
        return 1.0, (1.0 if rem < 1.0 else (h if rem > h else rem))
    sh = _sf(age + horizon, mu, s)
    fin = sa - sh
    if fin <= 0.0:
        return 0.0, h
    p_fin = fin / sa
    rem = _pe(age + 0.5, age + horizon + 0.5, mu, s) / fin - age
    return (p_fin if p_fin < 1.0 else 1.0), (1.0 if rem < 1.0 else (h if rem > h else rem))


class LearnedPredictor(LengthPredictor):
    """A model file's predictions as a :class:`LengthPredictor` (see the module docstring)."""

    name = "learned"

    def __init__(self, model: LoadedModel, params: LearnedParams | None = None) -> None:
        p = params if params is not None else LearnedParams()
        self.params = p
        self.model = model
        self.bucket_edges = p.bucket_edges
        self._head = p.bucket_edges == model.edges  # the head's buckets are the ones asked for
        self._source = f"learned-{model.tier}"
        self._decay = 2.0 ** (-1.0 / p.correction_half_life)
        self._k0 = p.correction_prior
        self._max_models = p.max_models
        self._cache_size = p.cache_size
        # model -> [sum r, sum r^2, weight] (decayed)
        self._corr: OrderedDict[str, list[float]] = OrderedDict()
        # request id -> (model, prompt_tokens, max_tokens, mu_raw, sigma_raw, head probs)
        self._cache: OrderedDict[int, _Raw] = OrderedDict()
        # A model that costs milliseconds per request (the encoder) is run off the picker's loop;
        # requests whose answer did not come in time are answered by this empirical predictor.
        self.blocking = model.tier != "fast"
        # the model call, with the encoder's prompt cut when the params ask for less than its own
        cut = p.encoder_max_length
        if isinstance(model, EncoderModel) and cut is not None and cut < model.max_length:
            self._model_infer: Callable[..., tuple[float, tuple[float, ...]]] = partial(
                model.infer, max_length=cut
            )
        else:
            self._model_infer = model.infer
        self._empirical: SurvivalPredictor | None = None
        self._no_model: OrderedDict[int, None] = OrderedDict()  # ids answered by _empirical
        if self.blocking:
            self._empirical = SurvivalPredictor(
                p.fallback.model_copy(update={"bucket_edges": p.bucket_edges})
            )

    # ------------------------------------------------------------------ the model's answer
    def _infer(self, request: Request) -> _Raw:
        """The model's answer for a request: reads only the request and the immutable model."""
        mu, probs = self._model_infer(
            request.prompt_text, request.prompt_tokens, request.max_tokens, request.model, request.task
        )
        s = self.model.sigma_of(request.model)
        return (request.model, request.prompt_tokens, request.max_tokens, mu, s, probs)

    def _cached(self, request: Request) -> _Raw | None:
        c = self._cache.get(request.id)
        if (
            c is not None
            and c[0] == request.model
            and c[1] == request.prompt_tokens
            and c[2] == request.max_tokens
        ):
            return c
        return None

    def _store(self, request: Request, raw: _Raw) -> None:
        cache = self._cache
        if request.id not in cache and len(cache) >= self._cache_size:
            cache.popitem(last=False)
        cache[request.id] = raw

    def _raw(self, request: Request) -> tuple[float, float, tuple[float, ...]]:
        c = self._cached(request)
        if c is None:
            c = self._infer(request)
            self._store(request, c)
        return c[3], c[4], c[5]

    def _empirical_for(self, request: Request) -> SurvivalPredictor | None:
        """The empirical predictor when this request is answered without the model."""
        if self._empirical is not None and request.id in self._no_model:
            return self._empirical
        return None

    # ------------------------------------------------------------------ off the event loop
    def prepare(self, request: Request) -> object | None:
        """The model call for a new request (thread-safe: the predictor's state is untouched)."""
        return self._infer(request)

    def predict_prepared(self, request: Request, prepared: object | None) -> LengthPrediction:
        if isinstance(prepared, tuple) and len(prepared) == 6:
            raw = cast(_Raw, prepared)
            if raw[:3] == (request.model, request.prompt_tokens, request.max_tokens):
                self._store(request, raw)
                return self.predict(request)
        if self._cached(request) is not None or self._empirical is None:
            return self.predict(request)  # the answer is cached, or the model is cheap
        no = self._no_model
        if request.id not in no and len(no) >= self._cache_size:
            no.popitem(last=False)
        no[request.id] = None
        return self._empirical.predict(request)

    def _corrected(self, model: str, mu: float, s: float) -> tuple[float, float, bool]:
        st = self._corr.get(model)
        if st is None or st[2] <= 0.0:
            return mu, s, False
        sr, sr2, w = st
        k0 = self._k0
        shift = sr / (w + k0)
        mean = sr / w
        var = max(sr2 / w - mean * mean, 0.0)
        s2 = (k0 * s * s + w * var) / (k0 + w)
        return mu + shift, max(math.sqrt(s2), 0.05), True

    def distribution(self, request: Request) -> tuple[float, float]:
        """``(mu, sigma)`` of the request's (corrected) lognormal."""
        mu, s, _ = self._raw(request)
        m, sc, _ = self._corrected(request.model, mu, s)
        return m, sc

    # ------------------------------------------------------------------ the interface
    def predict(self, request: Request) -> LengthPrediction:
        emp = self._empirical_for(request)
        if emp is not None:
            return emp.predict(request)
        mu0, s0, head = self._raw(request)
        mu, s, corrected = self._corrected(request.model, mu0, s0)
        if self._corr.get(request.model) is not None:
            self._corr.move_to_end(request.model)
        edges = self.bucket_edges
        if self._head:
            probs = list(head)
            if corrected:
                # Re-weight the head by how the correction moved the lognormal's bucket masses, then
                # blend toward the corrected lognormal as the model's observations accumulate (the
                # head alone cannot put mass where it had none).
                new = _lognormal_buckets(edges, mu, s)
                old = _lognormal_buckets(edges, mu0, s0)
                probs = [p * (n + 1e-9) / (o + 1e-9) for p, n, o in zip(probs, new, old, strict=True)]
                z = sum(probs)
                w = self._corr[request.model][2]
                lam = w / (w + self._k0) if w > 0.0 else 0.0
                probs = [(1.0 - lam) * p / z + lam * n for p, n in zip(probs, new, strict=True)]
        else:
            probs = _lognormal_buckets(edges, mu, s)
        cap = request.max_tokens
        if cap is not None:
            cap = max(cap, 1)
            j = bisect_right(edges, cap)
            if j < len(probs) - 1:
                probs[j] = sum(probs[j:])
                for i in range(j + 1, len(probs)):
                    probs[i] = 0.0
            expected = _capped_mean_above(0, cap, mu, s, 1.0) if cap > 1 else 1.0
        else:
            expected = math.exp(mu + 0.5 * s * s)
        total = sum(probs)
        if not total > 0.0 or not math.isfinite(total):
            probs = _lognormal_buckets(edges, mu, s)
            total = sum(probs)
        return LengthPrediction(
            expected_tokens=max(expected, 1.0),
            bucket_edges=edges,
            bucket_probs=tuple(p / total for p in probs),
            source=self._source,
        )

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        emp = self._empirical_for(request)
        if emp is not None:
            return emp.termination(request, age, horizon)
        a = age if age > 0 else 0
        cap = request.max_tokens
        if cap is not None and a >= max(cap, 1):
            return 1.0, 1.0
        mu, s = self.distribution(request)
        return lognormal_termination(mu, s, a, horizon, cap)

    def expected_remaining(self, request: Request, age: int) -> float:
        emp = self._empirical_for(request)
        if emp is not None:
            return emp.expected_remaining(request, age)
        a = age if age > 0 else 0
        cap = request.max_tokens
        if cap is not None:
            cap = max(cap, 1)
            if a >= cap:
                return 1.0
        mu, s = self.distribution(request)
        sa = _sf(a, mu, s)
        if sa < _TINY:
            return _geom_remaining(math.exp(mu + 0.5 * s * s), a, cap)
        if cap is not None:
            rem = _capped_mean_above(a, cap, mu, s, sa) - a
        else:
            rem = _pe(a + 0.5, math.inf, mu, s) / sa - a
        return rem if rem > 1.0 else 1.0

    def observe(self, request: Request, output_tokens: int) -> None:
        if self._empirical is not None:
            self._empirical.observe(request, output_tokens)
            if request.id in self._no_model:
                del self._no_model[request.id]
                self._cache.pop(request.id, None)
                return  # answered without the model: no mu to correct
        cap = request.max_tokens
        length = output_tokens if output_tokens >= 1 else 1
        if cap is not None and length >= cap:
            self._cache.pop(request.id, None)
            return  # stopped at the cap: its natural length is unknown
        c = self._cached(request)
        if c is None:
            if self.blocking:
                return  # never run a slow model just to learn (its answer was evicted)
            c = self._infer(request)
        mu = c[3]
        self._cache.pop(request.id, None)
        r = math.log(length) - mu
        corr = self._corr
        st = corr.get(request.model)
        if st is None:
            if len(corr) >= self._max_models:
                corr.popitem(last=False)
            st = corr[request.model] = [0.0, 0.0, 0.0]
        else:
            corr.move_to_end(request.model)
        d = self._decay
        st[0] = st[0] * d + r
        st[1] = st[1] * d + r * r
        st[2] = st[2] * d + 1.0

    def correction(self, model: str) -> tuple[float, float]:
        """``(shift of mu, weight)`` of the online correction for a target model."""
        st = self._corr.get(model)
        if st is None or st[2] <= 0.0:
            return 0.0, 0.0
        return st[0] / (st[2] + self._k0), st[2]


class LearnedFallback(SurvivalPredictor):
    """The ``survival`` predictor standing in for a learned model that could not load.

    :meth:`fallback_reason` is the one-line load error; policies report it through
    ``Policy.fallback_status`` (the picker's ``llmpool_fallback_active{component="predictor"}``).
    """

    def __init__(self, params: SurvivalParams, reason: str) -> None:
        super().__init__(params)
        self.reason = reason

    def fallback_reason(self) -> str | None:
        return self.reason


def build_learned(params: LearnedParams) -> LengthPredictor:
    """A :class:`LearnedPredictor` on ``params.model``, or the survival fallback (see module doc)."""
    try:
        model = load_model(params.model)
    except PredictError as err:
        if params.on_error == "raise":
            raise ConfigError(f"predictor 'learned': {err}") from None
        log.warning("predictor 'learned': %s; falling back to the survival predictor", err)
        return LearnedFallback(
            params.fallback.model_copy(update={"bucket_edges": params.bucket_edges}),
            f"predictor 'learned': {err}",
        )
    return LearnedPredictor(model, params)
