"""Output-length predictors: the one interface every workload-aware policy asks about lengths.

A :class:`LengthPredictor` answers three questions about a request's output length ``L``
(in tokens, always at least 1):

* :meth:`~LengthPredictor.predict` -- on arrival: a :class:`~llmpool.routing.types.LengthPrediction`
  (``E[L]`` and the probabilities of the length buckets, paper (a)'s 0-256 / 256-2048 / >=2048
  by default);
* :meth:`~LengthPredictor.termination` -- for a request that has generated ``age`` tokens and is
  still running: ``(p_fin, mu_rem)`` with ``p_fin = P(L <= age + H | L > age)`` and
  ``mu_rem = E[L - age | age < L <= age + H]`` (BalanceRoute BR-H's termination classifier and
  conditional-mean regressor); :meth:`~LengthPredictor.clipped_remaining` combines them into
  ``E[min(L - age, H) | L > age]``;
* :meth:`~LengthPredictor.expected_remaining` -- ``E[L - age | L > age]``.

:meth:`~LengthPredictor.observe` feeds back a completed response's length (online learning).

``request.max_tokens``, when set, caps the length: every method works with ``min(L, max_tokens)``.

Implementations: :class:`OraclePredictor` (lab only: the true length by request id),
:class:`SurvivalPredictor` (an age-conditioned empirical distribution that learns online with
exponential decay), :class:`ExactMatchPredictor` (empirical lengths per prompt identity, falling
back to Survival), and :class:`PerModelPredictor` (one child per model name). Build them from a
:class:`PredictorConfig` with :func:`build_predictor`.

No I/O and no randomness: the same observations give the same answers, in the lab and live.
Memory is bounded by the parameters (fixed-size arrays and LRU-bounded maps). Predictors are
not thread-safe; the picker calls them from its single decision loop. The one exception is
:meth:`LengthPredictor.prepare`, the expensive part of ``predict`` of a ``blocking`` predictor,
which touches no predictor state: the picker runs it in a worker thread.
"""

from __future__ import annotations

import abc
import math
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any, ClassVar, Final, TypeAlias

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmpool.routing.policy import ConfigError, PolicyParams, validation_message
from llmpool.routing.types import LengthPrediction, Request

__all__ = [
    "DEFAULT_BUCKET_EDGES",
    "PREDICTOR_COMPONENT",
    "ExactMatchParams",
    "ExactMatchPredictor",
    "LengthPredictor",
    "OracleParams",
    "OraclePredictor",
    "PerModelPredictor",
    "PredictorConfig",
    "PredictorParams",
    "SurvivalParams",
    "SurvivalPredictor",
    "Truth",
    "build_predictor",
    "predictor_fallback_status",
    "predictor_names",
    "prompt_identity",
]

DEFAULT_BUCKET_EDGES: Final = (256, 2048)
"""Paper (a)'s three decode buckets: [0, 256), [256, 2048), [2048, inf) tokens."""

Truth: TypeAlias = Callable[[int], int | None]
"""The lab's ground truth: request id -> true output length, or None when unknown."""

_COARSE_GROWTH: Final = 1.0 / 64.0  # coarse bins above exact_until grow by ~1.6 % each
_RESCALE_AT: Final = 1e150  # renormalise the decayed counts before the weights overflow
_TINY: Final = 1e-12  # surviving mass below total * _TINY counts as none
_MAX_LENGTH: Final = 2**31 - 1  # ExactMatch stores lengths as C ints


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class LengthPredictor(abc.ABC):
    """A distribution over a request's output length ``L >= 1``, conditioned on age.

    ``bucket_edges`` are the upper edges of all but the last bucket of the predictions
    (bucket ``i`` is ``[edges[i-1], edges[i])``). Every method treats the length as
    ``min(L, request.max_tokens)`` when ``max_tokens`` is set.
    """

    name: ClassVar[str] = ""
    bucket_edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES
    #: True when :meth:`predict` runs a model that costs milliseconds of CPU per new request
    #: (the learned predictor's encoder tier). A driver with an event loop (the live picker)
    #: then runs :meth:`prepare` in a worker thread and finishes with :meth:`predict_prepared`
    #: on its own thread; a synchronous driver (the lab) just calls :meth:`predict`.
    blocking: bool = False

    @abc.abstractmethod
    def predict(self, request: Request) -> LengthPrediction:
        """``E[L]`` and the bucket probabilities for a new request; ``source`` names the model used."""

    def prepare(self, request: Request) -> object | None:
        """The expensive part of :meth:`predict` for a new request, safe to run in a worker thread.

        It reads the request and the predictor's immutable model only (no state of the predictor
        changes), so it may run concurrently with any other call. Its result goes to
        :meth:`predict_prepared`. The default does nothing (returns ``None``).
        """
        return None

    def predict_prepared(self, request: Request, prepared: object | None) -> LengthPrediction:
        """:meth:`predict` given :meth:`prepare`'s result, on the driver's thread.

        ``prepared`` is ``None`` when the prepared part is not available (it timed out or failed):
        a blocking predictor then answers without its model (empirically) for this request, for
        its whole life (``termination`` and ``expected_remaining`` included), and never runs the
        model inline. The default ignores ``prepared`` and calls :meth:`predict`.
        """
        return self.predict(request)

    def fallback_reason(self) -> str | None:
        """Why a stand-in answers instead of the configured model (one line), or ``None``."""
        return None

    @abc.abstractmethod
    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        """``(p_fin, mu_rem)`` for a running request that has generated ``age`` tokens.

        ``p_fin = P(L <= age + horizon | L > age)`` and ``mu_rem = E[L - age | age < L <= age +
        horizon]``, with ``mu_rem`` in ``[1, horizon]``; ``(0.0, float(horizon))`` when
        ``p_fin == 0``. A request at or past its ``max_tokens`` gives ``(1.0, 1.0)``.
        ``horizon`` must be at least 1.
        """

    @abc.abstractmethod
    def expected_remaining(self, request: Request, age: int) -> float:
        """``E[L - age | L > age]`` (at least 1: a running request has a token still to come)."""

    @abc.abstractmethod
    def observe(self, request: Request, output_tokens: int) -> None:
        """Learn from a completed response that produced ``output_tokens`` tokens."""

    def clipped_remaining(self, request: Request, age: int, horizon: int) -> float:
        """``E[min(L - age, horizon) | L > age]``: BR-H's ``(1 - p_fin) * H + p_fin * mu_rem``."""
        p_fin, mu_rem = self.termination(request, age, horizon)
        return (1.0 - p_fin) * horizon + p_fin * mu_rem


PREDICTOR_COMPONENT: Final = "predictor"
"""The component name a policy's length predictor reports under in ``Policy.fallback_status``."""


def predictor_fallback_status(predictor: LengthPredictor) -> dict[str, str]:
    """``{"predictor": reason}`` while a stand-in answers for ``predictor``'s model, else ``{}``
    (what a policy that owns one predictor returns from ``Policy.fallback_status``)."""
    reason = predictor.fallback_reason()
    return {} if reason is None else {PREDICTOR_COMPONENT: reason}


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


class PredictorParams(PolicyParams):
    """Parameters every predictor has (unknown fields are errors)."""

    bucket_edges: tuple[int, ...] = Field(
        default=DEFAULT_BUCKET_EDGES,
        description="Upper edges of all but the last length bucket (tokens, strictly increasing). "
        "Default (256, 2048): paper (a)'s buckets [0, 256), [256, 2048), [2048, inf).",
    )

    @field_validator("bucket_edges")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(e < 1 for e in v) or any(b <= a for a, b in pairwise(v)):
            raise ValueError("bucket_edges must be positive and strictly increasing")
        return v


class SurvivalParams(PredictorParams):
    """Parameters of ``survival``."""

    max_len: int = Field(
        default=32768, ge=1, le=1 << 30, description="Longest length tracked; longer ones count as this."
    )
    exact_until: int = Field(
        default=4096,
        ge=1,
        le=1 << 20,
        description="Lengths up to this have one bin per token; above it, bins grow by ~1.6 % each.",
    )
    half_life: float | None = Field(
        default=5000.0,
        gt=0,
        description="Observations after which an observation's weight halves; None turns decay off.",
    )
    prior_mean: float = Field(default=256.0, ge=1, description="Mean of the lognormal prior (tokens).")
    prior_sigma: float = Field(default=1.0, gt=0, le=5, description="Log-space spread of the prior.")
    prior_weight: float = Field(
        default=20.0, ge=0, description="Prior weight in pseudo-observations; 0 means no prior."
    )
    rebuild_every: int = Field(
        default=64, ge=1, description="Rebuild the cumulative arrays at most every this many observations."
    )


class ExactMatchParams(PredictorParams):
    """Parameters of ``exact-match``."""

    samples_per_prompt: int = Field(default=8, ge=1, le=1024, description="Lengths kept per prompt.")
    max_prompts: int = Field(default=100_000, ge=1, le=1 << 26, description="Prompt identities kept (LRU).")
    min_samples: int = Field(
        default=1, ge=1, description="Samples needed before the prompt's own lengths are used."
    )
    fallback: SurvivalParams = Field(
        default_factory=SurvivalParams,
        description="Parameters of the Survival fallback (its bucket_edges are replaced by these).",
    )

    @model_validator(mode="after")
    def _min_le_kept(self) -> ExactMatchParams:
        if self.min_samples > self.samples_per_prompt:
            raise ValueError("min_samples must not exceed samples_per_prompt")
        return self


class OracleParams(PredictorParams):
    """Parameters of ``oracle``."""

    fallback: SurvivalParams = Field(
        default_factory=SurvivalParams,
        description="Parameters of the Survival fallback for requests the truth does not know.",
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _cap_of(request: Request) -> int | None:
    m = request.max_tokens
    if m is None:
        return None
    return m if m >= 1 else 1


def _point_buckets(edges: tuple[int, ...], length: int) -> tuple[float, ...]:
    probs = [0.0] * (len(edges) + 1)
    probs[bisect_right(edges, length)] = 1.0
    return tuple(probs)


def _buckets_from_cdf(edges: tuple[int, ...], cdf: Callable[[int], float]) -> tuple[float, ...]:
    """Bucket probabilities from ``cdf(x) = P(L <= x)`` (bucket i is ``[edges[i-1], edges[i])``)."""
    probs: list[float] = []
    prev = 0.0
    for e in edges:
        f = cdf(e - 1)
        f = prev if f < prev else (1.0 if f > 1.0 else f)
        probs.append(f - prev)
        prev = f
    probs.append(1.0 - prev)
    return tuple(probs)


def _geom_termination(mean: float, age: int, horizon: int, cap: int | None) -> tuple[float, float]:
    """``termination`` for a geometric remaining length ``G >= 1`` with ``E[G] = mean``."""
    q = 1.0 - 1.0 / mean if mean > 1.0 else 0.0
    if cap is not None and age + horizon >= cap:
        mu = (1.0 - q ** (cap - age)) * mean if q > 0.0 else 1.0  # E[min(G, cap - age)]
        return 1.0, (1.0 if mu < 1.0 else (float(horizon) if mu > horizon else mu))
    qh = q**horizon
    p_fin = 1.0 - qh
    if p_fin <= 0.0:
        return 0.0, float(horizon)
    mu = ((1.0 - qh) * mean - horizon * qh) / p_fin  # E[G | G <= H] = (E[min(G,H)] - H q^H) / P
    return p_fin, (1.0 if mu < 1.0 else (float(horizon) if mu > horizon else mu))


def _geom_remaining(mean: float, age: int, cap: int | None) -> float:
    if cap is None:
        return mean if mean > 1.0 else 1.0
    q = 1.0 - 1.0 / mean if mean > 1.0 else 0.0
    mu = (1.0 - q ** (cap - age)) * mean if q > 0.0 else 1.0
    return mu if mu > 1.0 else 1.0


def _check_horizon(horizon: int) -> None:
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1, got {horizon}")


def prompt_identity(request: Request) -> int | None:
    """The identity ExactMatch keys on: ``prompt_hash``, else a hash of the prefix chain.

    With no ``prompt_hash``, a non-empty ``prefix_hashes`` chain together with ``prompt_tokens``
    identifies the prompt (two prompts sharing every full block but differing in the partial
    last block usually differ in length). Without either there is no identity (``None``).
    Hashing a tuple of ints does not depend on ``PYTHONHASHSEED``, so identities are stable
    across processes.
    """
    if request.prompt_hash is not None:
        return request.prompt_hash
    if request.prefix_hashes:
        return hash((request.prompt_tokens, request.prefix_hashes))
    return None


# --------------------------------------------------------------------------------------------
# Survival
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    """The histogram's bins: lengths 1..exact one per bin, then coarse bins (lo, upper]."""

    exact: int
    coarse_uppers: tuple[int, ...]
    coarse_np: npt.NDArray[np.int64]
    uppers: npt.NDArray[np.float64]
    mids: npt.NDArray[np.float64]  # mean length of a bin (lengths uniform inside it)


@lru_cache(maxsize=16)
def _layout(max_len: int, exact_until: int) -> _Layout:
    exact = min(exact_until, max_len)
    coarse: list[int] = []
    u = exact
    while u < max_len:
        u = min(max_len, max(u + 1, math.ceil(u * (1.0 + _COARSE_GROWTH))))
        coarse.append(u)
    uppers = np.concatenate([np.arange(1, exact + 1, dtype=np.float64), np.asarray(coarse, np.float64)])
    lowers = np.concatenate([np.zeros(1), uppers[:-1]])
    mids = (lowers + 1.0 + uppers) / 2.0
    coarse_np = np.asarray(coarse, dtype=np.int64)
    for a in (uppers, mids, coarse_np):
        a.flags.writeable = False
    return _Layout(exact, tuple(coarse), coarse_np, uppers, mids)


@lru_cache(maxsize=16)
def _prior_masses(max_len: int, exact_until: int, mean: float, sigma: float) -> npt.NDArray[np.float64]:
    """Lognormal with E = mean and log-spread sigma, discretised on the bins, truncated to 1..max_len.

    Bin (lo, hi] gets the continuous mass of (lo + 0.5, hi + 0.5]; the first bin also gets
    everything below 1.5. Read-only (cached).
    """
    uppers = _layout(max_len, exact_until).uppers
    mu = math.log(mean) - sigma * sigma / 2.0
    scale = sigma * math.sqrt(2.0)
    cdf = np.array([0.5 * (1.0 + math.erf((math.log(x + 0.5) - mu) / scale)) for x in uppers.tolist()])
    masses = np.diff(np.concatenate([np.zeros(1), cdf]))
    total = float(masses.sum())
    if total <= 0.0:  # prior mean far beyond max_len: all mass at the longest bin
        masses = np.zeros_like(masses)
        masses[-1] = 1.0
    else:
        masses = masses / total
    masses.flags.writeable = False
    return masses


class SurvivalPredictor(LengthPredictor):
    """The empirical output-length distribution, conditioned on age (BR-H's Survival predictor).

    A histogram over lengths ``1..max_len``: one bin per token up to ``exact_until``, then bins
    whose width grows by ~1.6 % each (about 134 bins from 4096 to 32768 tokens; inside a coarse
    bin lengths are taken as uniform). Lengths above ``max_len`` count as ``max_len``.

    Learning: :meth:`observe` adds a completed length with a weight that grows by
    ``2 ** (1 / half_life)`` per observation, so an observation ``half_life`` observations old
    weighs half as much as a new one (tracks drift; the prior decays the same way).
    :meth:`warm` adds a batch with equal weights (pre-training on a trace).

    Prior: a discretised lognormal with mean ~``prior_mean`` and log-spread ``prior_sigma``,
    worth ``prior_weight`` observations. With ``prior_weight=0`` and nothing observed yet, the
    length is taken as geometric with mean ``prior_mean``.

    Queries read reverse-cumulative arrays (surviving count and surviving ``length * count``),
    so every query is O(1) for ages up to ``exact_until`` and O(log bins) above. The arrays are
    rebuilt lazily on the next query once ``rebuild_every`` observations are pending, or
    sooner while little has been observed (once the pending ones exceed 1/16 of all).
    A request that has outlived all the mass the histogram has (its surviving mass is below
    ``1e-12`` of the total) gets a geometric remaining length with the distribution's mean.
    """

    name = "survival"

    def __init__(self, params: SurvivalParams | None = None) -> None:
        p = params if params is not None else SurvivalParams()
        self.params = p
        self.bucket_edges = p.bucket_edges
        self._max_len = p.max_len
        layout = _layout(p.max_len, p.exact_until)
        self._exact = layout.exact
        self._coarse_uppers = layout.coarse_uppers
        self._coarse_np = layout.coarse_np
        self._mids = layout.mids
        self._counts: npt.NDArray[np.float64] = np.zeros(layout.mids.size, dtype=np.float64)
        self._growth = 2.0 ** (1.0 / p.half_life) if p.half_life is not None else 1.0
        self._weight = 1.0
        self._n_obs = 0
        self._pending = 0
        self._rebuild_every = p.rebuild_every
        if p.prior_weight > 0:
            self._counts += (
                _prior_masses(p.max_len, p.exact_until, p.prior_mean, p.prior_sigma) * p.prior_weight
            )
        self._stale = True
        # Snapshot (filled by _rebuild): C-double arrays, memcpy-cheap to build, O(1) scalar reads.
        self._sc = array("d")
        self._sw = array("d")
        self._c: list[float] = []
        self._total = 0.0
        self._tiny = 0.0
        self._mean = p.prior_mean
        self._rebuild()

    # -- building ----------------------------------------------------------------------------

    def _bin(self, length: int) -> int:
        if length <= self._exact:
            return length - 1 if length >= 1 else 0
        return self._exact + bisect_left(self._coarse_uppers, min(length, self._max_len))

    def _rebuild(self) -> None:
        c = self._counts
        n = c.size
        both = np.zeros((2, n + 1), dtype=np.float64)
        both[0, :n] = c[::-1]
        both[1, :n] = (c * self._mids)[::-1]
        np.cumsum(both[:, :n], axis=1, out=both[:, :n])
        both[:, :n] = both[:, n - 1 :: -1]  # reverse cumulative; both[:, n] stays 0
        self._sc = array("d", both[0].tobytes())
        self._sw = array("d", both[1].tobytes())
        self._c = c[self._exact :].tolist()  # coarse bins only (exact ones are never split)
        total = self._sc[0]
        self._total = total
        self._tiny = total * _TINY
        self._mean = self._sw[0] / total if total > 0.0 else self.params.prior_mean
        if self._mean < 1.0:
            self._mean = 1.0
        self._pending = 0
        self._stale = False

    def refresh(self) -> None:
        """Rebuild the cumulative arrays now (queries do it lazily)."""
        self._rebuild()

    def observe(self, request: Request, output_tokens: int) -> None:
        self._add(self._bin(output_tokens))
        if self._pending >= self._rebuild_every or self._pending * 16 >= self._n_obs:
            self._stale = True

    def _add(self, b: int) -> None:
        self._counts[b] += self._weight
        self._n_obs += 1
        self._pending += 1
        if self._growth != 1.0:
            self._weight *= self._growth
            if self._weight > _RESCALE_AT:
                # Only ratios matter: rescale in place (the snapshot stays self-consistent).
                self._counts *= 1.0 / self._weight
                self._weight = 1.0
                self._stale = True

    def warm(self, lengths: Iterable[int]) -> None:
        """Add a batch of observed lengths with equal weight (pre-training), then rebuild."""
        arr = np.fromiter((int(x) for x in lengths), dtype=np.int64)
        if arr.size:
            arr = np.clip(arr, 1, self._max_len)
            idx = np.where(
                arr <= self._exact, arr - 1, self._exact + np.searchsorted(self._coarse_np, arr, "left")
            )
            np.add.at(self._counts, idx, self._weight)
            self._n_obs += int(arr.size)
        self._rebuild()

    @property
    def observations(self) -> int:
        """Observations seen so far (observe and warm; the prior not included)."""
        return self._n_obs

    @property
    def num_bins(self) -> int:
        return int(self._counts.size)

    # -- queries -----------------------------------------------------------------------------

    def _surv(self, x: int) -> tuple[float, float]:
        """(mass with L > x, sum of L over that mass) for x >= 0."""
        exact = self._exact
        if x <= exact:
            return self._sc[x], self._sw[x]
        cu = self._coarse_uppers
        j = bisect_left(cu, x)
        if j >= len(cu):
            return 0.0, 0.0
        lo = cu[j - 1] if j else exact
        hi = cu[j]
        k = exact + j
        c = self._c[j]
        f = (hi - x) / (hi - lo)  # uniform inside the bin: the share of lengths x+1..hi
        return self._sc[k + 1] + f * c, self._sw[k + 1] + f * c * (x + 1 + hi) / 2.0

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        if self._stale:
            self._rebuild()
        if horizon < 1:
            _check_horizon(horizon)
        a = age if age > 0 else 0
        cap = request.max_tokens
        if cap is not None:
            if cap < 1:
                cap = 1
            if a >= cap:
                return 1.0, 1.0
        exact = self._exact
        if a <= exact:
            s_a = self._sc[a]
            w_a = self._sw[a]
        else:
            s_a, w_a = self._surv(a)
        if s_a <= self._tiny:
            return _geom_termination(self._mean, a, horizon, cap)
        h = a + horizon
        if cap is not None and h >= cap:
            # Every survivor finishes by the cap: the mass at L >= cap ends exactly at cap.
            m1 = cap - 1
            if m1 <= exact:
                s_m = self._sc[m1]
                w_m = self._sw[m1]
            else:
                s_m, w_m = self._surv(m1)
            mu = (w_a - w_m + cap * s_m) / s_a - a
            return 1.0, (1.0 if mu < 1.0 else (float(horizon) if mu > horizon else mu))
        if h <= exact:
            s_h = self._sc[h]
            w_h = self._sw[h]
        else:
            s_h, w_h = self._surv(h)
        d = s_a - s_h
        if d <= s_a * _TINY:
            return 0.0, float(horizon)
        p = d / s_a
        mu = (w_a - w_h) / d - a
        return (p if p < 1.0 else 1.0), (1.0 if mu < 1.0 else (float(horizon) if mu > horizon else mu))

    def expected_remaining(self, request: Request, age: int) -> float:
        if self._stale:
            self._rebuild()
        a = age if age > 0 else 0
        cap = _cap_of(request)
        if cap is not None and a >= cap:
            return 1.0
        s_a, w_a = self._surv(a)
        if s_a <= self._tiny:
            return _geom_remaining(self._mean, a, cap)
        if cap is None:
            r = w_a / s_a - a
        else:
            s_m, w_m = self._surv(cap - 1)
            r = (w_a - w_m + cap * s_m) / s_a - a
        return r if r > 1.0 else 1.0

    def _cdf(self, x: int, cap: int | None) -> float:
        """P(min(L, cap) <= x) for x >= 0."""
        if cap is not None and x >= cap:
            return 1.0
        total = self._total
        if total <= 0.0:
            mean = self._mean
            q = 1.0 - 1.0 / mean if mean > 1.0 else 0.0
            return 1.0 - q**x
        return 1.0 - self._surv(x)[0] / total

    def predict(self, request: Request) -> LengthPrediction:
        if self._stale:
            self._rebuild()
        cap = _cap_of(request)
        if self._total <= 0.0:
            expected = _geom_remaining(self._mean, 0, cap)
        elif cap is None:
            expected = self._mean
        else:
            expected = self.expected_remaining(request, 0)
        edges = self.bucket_edges
        return LengthPrediction(
            expected_tokens=expected,
            bucket_edges=edges,
            bucket_probs=_buckets_from_cdf(edges, lambda x: self._cdf(x, cap)),
            source=self.name,
        )


# --------------------------------------------------------------------------------------------
# ExactMatch
# --------------------------------------------------------------------------------------------


class ExactMatchPredictor(LengthPredictor):
    """Empirical lengths per prompt identity (BR-H's ExactMatch predictor), else the fallback.

    Keeps the last ``samples_per_prompt`` lengths of each prompt identity
    (:func:`prompt_identity`) in a flat C-int array, for at most ``max_prompts`` identities
    (least recently predicted or observed evicted first), so memory is at most
    ``max_prompts * (4 * samples_per_prompt + ~250)`` bytes plus the fallback. A prompt with at
    least ``min_samples`` samples is predicted from them (uniform weights); a request whose
    every sample says it should have finished already (all ``<= age``), a prompt seen too
    rarely, and a request without identity go to the fallback (a Survival predictor), which also
    learns from every observation.
    """

    name = "exact-match"

    def __init__(
        self, params: ExactMatchParams | None = None, fallback: LengthPredictor | None = None
    ) -> None:
        p = params if params is not None else ExactMatchParams()
        self.params = p
        self.bucket_edges = p.bucket_edges
        if fallback is None:
            fallback = SurvivalPredictor(p.fallback.model_copy(update={"bucket_edges": p.bucket_edges}))
        elif fallback.bucket_edges != p.bucket_edges:
            raise ConfigError(
                f"exact-match: fallback bucket_edges {fallback.bucket_edges} differ from {p.bucket_edges}"
            )
        self.fallback = fallback
        self._k = p.samples_per_prompt
        self._max_prompts = p.max_prompts
        self._min = p.min_samples
        self._slots: OrderedDict[int, int] = OrderedDict()
        self._data = array("i")  # slot s holds its samples at [s*k, s*k + count[s])
        self._count = array("i")
        self._next = array("i")  # ring position of the next write

    @property
    def num_prompts(self) -> int:
        """Prompt identities currently kept (at most ``max_prompts``)."""
        return len(self._slots)

    def samples(self, request: Request) -> tuple[int, ...]:
        """The lengths kept for the request's prompt, in ring-buffer order (not by age)."""
        key = prompt_identity(request)
        slot = self._slots.get(key) if key is not None else None
        if slot is None:
            return ()
        b = slot * self._k
        return tuple(self._data[b : b + self._count[slot]])

    def _lookup(self, request: Request) -> array[int] | None:
        return self._samples_of(prompt_identity(request))

    def _samples_of(self, key: int | None) -> array[int] | None:
        if key is None:
            return None
        slot = self._slots.get(key)
        if slot is None:
            return None
        n = self._count[slot]
        if n < self._min:
            return None
        b = slot * self._k
        return self._data[b : b + n]

    def observe(self, request: Request, output_tokens: int) -> None:
        self.fallback.observe(request, output_tokens)
        key = prompt_identity(request)
        if key is None:
            return
        length = output_tokens if output_tokens >= 1 else 1
        if length > _MAX_LENGTH:
            length = _MAX_LENGTH
        slots = self._slots
        slot = slots.get(key)
        k = self._k
        if slot is None:
            if len(slots) >= self._max_prompts:
                _, slot = slots.popitem(last=False)
                self._count[slot] = 0
                self._next[slot] = 0
            else:
                slot = len(slots)
                self._data.extend([0] * k)
                self._count.append(0)
                self._next.append(0)
            slots[key] = slot
        else:
            slots.move_to_end(key)
        pos = self._next[slot]
        self._data[slot * k + pos] = length
        self._next[slot] = pos + 1 if pos + 1 < k else 0
        if self._count[slot] < k:
            self._count[slot] += 1

    def predict(self, request: Request) -> LengthPrediction:
        key = prompt_identity(request)
        if key is not None and key in self._slots:
            self._slots.move_to_end(key)
        samples = self._samples_of(key)
        if samples is None:
            return self.fallback.predict(request)
        cap = _cap_of(request)
        vals = [s if cap is None or s <= cap else cap for s in samples]
        edges = self.bucket_edges
        counts = [0] * (len(edges) + 1)
        for v in vals:
            counts[bisect_right(edges, v)] += 1
        n = len(vals)
        return LengthPrediction(
            expected_tokens=sum(vals) / n,
            bucket_edges=edges,
            bucket_probs=tuple(c / n for c in counts),
            source=self.name,
        )

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        if horizon < 1:
            _check_horizon(horizon)
        samples = self._lookup(request)
        if samples is None:
            return self.fallback.termination(request, age, horizon)
        a = age if age > 0 else 0
        cap = request.max_tokens
        if cap is not None:
            if cap < 1:
                cap = 1
            if a >= cap:
                return 1.0, 1.0
        h = a + horizon
        alive = 0
        fin = 0
        total = 0
        if cap is not None and h >= cap:
            # Every survivor ends by the cap (min(s, cap) > a exactly when s > a, as a < cap).
            for s in samples:
                if s > a:
                    alive += 1
                    total += s if s < cap else cap
            fin = alive
        else:
            # h < cap: min(s, cap) <= h exactly when s <= h, so the cap changes nothing here.
            for s in samples:
                if s > a:
                    alive += 1
                    if s <= h:
                        fin += 1
                        total += s
        if alive == 0:
            return self.fallback.termination(request, age, horizon)
        if fin == 0:
            return 0.0, float(horizon)
        return fin / alive, total / fin - a

    def expected_remaining(self, request: Request, age: int) -> float:
        samples = self._lookup(request)
        if samples is None:
            return self.fallback.expected_remaining(request, age)
        a = age if age > 0 else 0
        cap = _cap_of(request)
        if cap is not None and a >= cap:
            return 1.0
        alive = 0
        total = 0
        for s in samples:
            if cap is not None and s > cap:
                s = cap
            if s > a:
                alive += 1
                total += s
        if alive == 0:
            return self.fallback.expected_remaining(request, age)
        return total / alive - a


# --------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------


class OraclePredictor(LengthPredictor):
    """The true output length, by request id (lab only: the simulator passes the lookup).

    A point mass at ``min(truth, max_tokens)`` (at least 1). Requests the truth does not know
    (``None``) go to ``fallback``, which also learns from every observation.
    """

    name = "oracle"

    def __init__(self, truth: Truth, fallback: LengthPredictor) -> None:
        self._truth = truth
        self.fallback = fallback
        self.bucket_edges = fallback.bucket_edges

    def _length(self, request: Request) -> int | None:
        t = self._truth(request.id)
        if t is None:
            return None
        if t < 1:
            t = 1
        m = request.max_tokens
        if m is not None and t > m:
            t = m if m >= 1 else 1
        return t

    def predict(self, request: Request) -> LengthPrediction:
        t = self._length(request)
        if t is None:
            return self.fallback.predict(request)
        edges = self.bucket_edges
        return LengthPrediction(
            expected_tokens=float(t),
            bucket_edges=edges,
            bucket_probs=_point_buckets(edges, t),
            source=self.name,
        )

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        if horizon < 1:
            _check_horizon(horizon)
        t = self._length(request)
        if t is None:
            return self.fallback.termination(request, age, horizon)
        rem = t - (age if age > 0 else 0)
        if rem < 1:  # the truth says it is done; the driver has not seen the end yet
            return 1.0, 1.0
        if rem <= horizon:
            return 1.0, float(rem)
        return 0.0, float(horizon)

    def expected_remaining(self, request: Request, age: int) -> float:
        t = self._length(request)
        if t is None:
            return self.fallback.expected_remaining(request, age)
        rem = t - (age if age > 0 else 0)
        return float(rem) if rem > 1 else 1.0

    def observe(self, request: Request, output_tokens: int) -> None:
        self.fallback.observe(request, output_tokens)


# --------------------------------------------------------------------------------------------
# Per model
# --------------------------------------------------------------------------------------------


class PerModelPredictor(LengthPredictor):
    """One child predictor per ``request.model`` (or per model and task hint, with
    ``per_task``), built by ``factory`` on first sight. The task hint is ``request.task``:
    what the application says the request is (paper a's "task hint"; a header in the picker).

    At most ``max_models`` children are kept; the least recently predicted or observed model is
    dropped first (it starts again from the prior if it comes back). Memory is at most
    ``max_models`` times one child's.
    """

    name = "per-model"

    def __init__(
        self, factory: Callable[[], LengthPredictor], max_models: int = 64, *, per_task: bool = False
    ) -> None:
        if max_models < 1:
            raise ConfigError(f"max_models must be at least 1, got {max_models}")
        self._factory = factory
        self._per_task = per_task
        self._max_models = max_models
        self._children: OrderedDict[str, LengthPredictor] = OrderedDict()
        self._spare: LengthPredictor | None = factory()
        self._template = self._spare  # the first child: answers prepare() for unseen models
        self.bucket_edges = self._spare.bucket_edges
        self.blocking = self._spare.blocking

    @property
    def num_models(self) -> int:
        return len(self._children)

    def child(self, model: str) -> LengthPredictor:
        """The model's predictor, created if needed (does not count as a use for the LRU)."""
        c = self._children.get(model)
        if c is None:
            c = self._create(model)
        return c

    def _create(self, model: str) -> LengthPredictor:
        children = self._children
        if len(children) >= self._max_models:
            children.popitem(last=False)
        c = self._spare if self._spare is not None else self._factory()
        self._spare = None
        children[model] = c
        return c

    def _use(self, model: str) -> LengthPredictor:
        c = self._children.get(model)
        if c is None:
            return self._create(model)
        self._children.move_to_end(model)
        return c

    def _key(self, request: Request) -> str:
        return f"{request.model}\x00{request.task}" if self._per_task else request.model

    def predict(self, request: Request) -> LengthPrediction:
        return self._use(self._key(request)).predict(request)

    def prepare(self, request: Request) -> object | None:
        # Thread-safe: a plain lookup, no child is created or reordered here. Children come from
        # one factory, so an unseen model's prepared part is the template child's.
        c = self._children.get(self._key(request))
        return (c if c is not None else self._template).prepare(request)

    def predict_prepared(self, request: Request, prepared: object | None) -> LengthPrediction:
        return self._use(self._key(request)).predict_prepared(request, prepared)

    def fallback_reason(self) -> str | None:
        for c in (self._template, *self._children.values()):
            r = c.fallback_reason()
            if r is not None:
                return r
        return None

    def termination(self, request: Request, age: int, horizon: int) -> tuple[float, float]:
        key = self._key(request)
        c = self._children.get(key)
        if c is None:
            c = self._create(key)
        return c.termination(request, age, horizon)

    def expected_remaining(self, request: Request, age: int) -> float:
        return self.child(self._key(request)).expected_remaining(request, age)

    def observe(self, request: Request, output_tokens: int) -> None:
        self._use(self._key(request)).observe(request, output_tokens)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


class PredictorConfig(BaseModel):
    """Which predictor to run: ``{"name": ..., "per_model": true, "max_models": 64, "params": {...}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    per_model: bool = True
    per_task: bool = False
    max_models: int = Field(default=64, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | PredictorConfig) -> PredictorConfig:
        """Accept a bare name (``"survival"``), a mapping, or a config object."""
        if isinstance(spec, PredictorConfig):
            return spec
        if isinstance(spec, str):
            return cls(name=spec.strip() or "?")
        try:
            return cls.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(f"invalid predictor config: {validation_message(err)}") from None


@dataclass(frozen=True, slots=True)
class _Spec:
    params_model: type[PredictorParams]
    build: Callable[[Any, Truth | None], LengthPredictor]


def _build_survival(p: SurvivalParams, truth: Truth | None) -> LengthPredictor:
    return SurvivalPredictor(p)


def _build_exact(p: ExactMatchParams, truth: Truth | None) -> LengthPredictor:
    return ExactMatchPredictor(p)


def _build_oracle(p: OracleParams, truth: Truth | None) -> LengthPredictor:
    assert truth is not None
    fallback = SurvivalPredictor(p.fallback.model_copy(update={"bucket_edges": p.bucket_edges}))
    return OraclePredictor(truth, fallback)


class LearnedParams(PredictorParams):
    """Parameters of ``learned`` (the ONNX-served model of :mod:`llmpool.predict`; docs/predictor.md)."""

    model: str = Field(
        default="fast",
        min_length=1,
        description="'fast' (the packaged fast tier) or the path of a model .onnx "
        "(its metadata .json beside it).",
    )
    on_error: str = Field(
        default="fallback",
        pattern="^(fallback|raise)$",
        description="A model file that cannot load: 'fallback' logs a warning and uses survival; "
        "'raise' fails.",
    )
    correction_half_life: float = Field(
        default=500.0, gt=0, description="Online correction: observations after which one weighs half."
    )
    correction_prior: float = Field(
        default=20.0, ge=0, description="Online correction: pseudo-observations backing the trained model."
    )
    max_models: int = Field(default=256, ge=1, description="Target models with a correction kept (LRU).")
    cache_size: int = Field(default=65536, ge=1, description="Per-request predictions kept for termination.")
    encoder_max_length: int | None = Field(
        default=None,
        ge=8,
        le=512,
        description="Encoder tier: cut the prompt to this many tokens before the encoder (default: the "
        "model's own, 256; a larger value is the model's). Its CPU cost grows with the tokens: 64 or 128 "
        "bound it on slow cores, for a small loss of accuracy (docs/predictor.md). The fast tier ignores it.",
    )
    fallback: SurvivalParams = Field(
        default_factory=SurvivalParams, description="Parameters of the survival predictor used on failure."
    )


def _build_learned(p: LearnedParams, truth: Truth | None) -> LengthPredictor:
    from llmpool.predict.learned import build_learned  # onnxruntime is imported only when used

    return build_learned(p)


_PREDICTORS: Final[dict[str, _Spec]] = {
    "oracle": _Spec(OracleParams, _build_oracle),
    "survival": _Spec(SurvivalParams, _build_survival),
    "exact-match": _Spec(ExactMatchParams, _build_exact),
    "learned": _Spec(LearnedParams, _build_learned),
}

_NEEDS_TRUTH: Final = (
    "predictor 'oracle' needs the lab's ground truth; use survival or exact-match in a live picker"
)


def predictor_names() -> list[str]:
    """The names :func:`build_predictor` accepts."""
    return list(_PREDICTORS)


def build_predictor(
    config: PredictorConfig | str | dict[str, Any], *, truth: Truth | None = None
) -> LengthPredictor:
    """Build a predictor from its config; ``truth`` (request id -> length) is for ``oracle`` only.

    With ``per_model`` (the default) the result is a :class:`PerModelPredictor` holding one
    predictor per model name. Raises :class:`~llmpool.routing.policy.ConfigError` (one line) on
    an unknown name, bad parameters, or ``oracle`` without ``truth``.
    """
    cfg = PredictorConfig.parse(config)
    spec = _PREDICTORS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"unknown predictor {cfg.name!r}; allowed: {', '.join(_PREDICTORS)}")
    if cfg.name == "oracle" and truth is None:
        raise ConfigError(_NEEDS_TRUTH)
    try:
        params = spec.params_model.model_validate(cfg.params)
    except ValidationError as err:
        fields = ", ".join(spec.params_model.model_fields)
        raise ConfigError(
            f"predictor {cfg.name!r}: {validation_message(err)} (parameters: {fields})"
        ) from None
    build = spec.build

    def factory() -> LengthPredictor:
        return build(params, truth)

    if cfg.per_model or cfg.per_task:
        return PerModelPredictor(factory, cfg.max_models, per_task=cfg.per_task)
    return factory()
