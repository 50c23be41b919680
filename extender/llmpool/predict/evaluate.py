"""``llmpool predictor eval``: the learned tiers against baselines on prompts unseen in training.

Metrics per method: 3-bucket (or configured) accuracy, per-bucket accuracy (recall of each true
bucket), macro-F1 over the buckets present, MAE of ``log L`` (the point prediction is the
predicted median), and calibration: expected calibration error of the top bucket and a
reliability plot (PNG). Baselines, all fitted on the training side only:

* ``global`` -- the global median length and bucket frequencies;
* ``per-model-median`` -- each target model's median length and bucket frequencies;
* ``prompt-length`` -- least squares of ``log L`` on ``log(1 + prompt tokens)``, buckets from a
  lognormal with the residual spread.

**Termination** (what BR-H asks): for every held-out request and every age ``a`` on a grid
(0, 16, 32, ... below its length), the lognormal's probability that it ends within the next
``horizon`` tokens, ``P(L <= a + H | L > a)`` (``learned``'s own ``termination`` arithmetic,
with the trained per-model spread, before any online correction), against whether it did.
Scored by the Brier skill (1 - Brier / the base rate's) and the ROC AUC, both weighted by the
request's KV load at that age (prompt + age tokens: BR-H projects load), overall and per age
band. Baselines use their own spread: per model for ``per-model-median``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmpool.predict.data import Example
from llmpool.predict.learned import lognormal_termination
from llmpool.predict.runtime import EncoderModel, LoadedModel

__all__ = ["baseline_spreads", "baselines", "latency", "metrics", "reliability_plot", "termination_metrics"]

AGE_BANDS: tuple[tuple[int, int | None], ...] = ((0, 128), (128, 512), (512, None))

Floats = npt.NDArray[np.float64]


def _labels(lengths: Sequence[int], edges: Sequence[int]) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = np.searchsorted(
        np.asarray(edges), np.maximum(np.asarray(lengths), 1), side="right"
    ).astype(np.int64)
    return out


def _lognormal_probs(mu: Floats, sigma: float, edges: Sequence[int]) -> Floats:
    cdf = [np.zeros_like(mu)]
    for e in edges:
        z = (math.log(e - 0.5) - mu) / (sigma * math.sqrt(2.0))
        cdf.append(0.5 * (1.0 + np.vectorize(math.erf)(z)))
    cdf.append(np.ones_like(mu))
    c = np.stack(cdf, axis=1)
    return np.clip(np.diff(c, axis=1), 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class _Fits:
    """The baselines' fits on the training side: log lengths, rows per target model, the
    prompt-length regression and its residual spread."""

    y: Floats
    by_model: dict[str, list[int]]
    coef: Floats
    sigma: float

    @classmethod
    def of(cls, train: Sequence[Example]) -> _Fits:
        y = np.log(np.maximum([e.output_tokens for e in train], 1).astype(np.float64))
        by: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(train):
            by[e.model].append(i)
        a = _design([e.prompt_tokens for e in train])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        return cls(y, dict(by), coef, float(np.sqrt(np.mean((y - a @ coef) ** 2))))


def _design(prompt_tokens: Sequence[int]) -> Floats:
    xp = np.log1p(np.asarray(prompt_tokens, dtype=np.float64))
    return np.vstack([np.ones_like(xp), xp]).T


def baselines(
    train: Sequence[Example], test: Sequence[Example], edges: Sequence[int]
) -> dict[str, tuple[Floats, Floats]]:
    """``{name: (mu, probs)}`` on ``test`` for the three baselines, fitted on ``train``."""
    k = len(edges) + 1
    f = _Fits.of(train)
    y = f.y
    lab = _labels([e.output_tokens for e in train], edges)
    n = len(test)
    g_mu = float(np.median(y))
    g_p = np.bincount(lab, minlength=k).astype(np.float64) + 1.0
    g_p /= g_p.sum()
    out: dict[str, tuple[Floats, Floats]] = {"global": (np.full(n, g_mu), np.tile(g_p, (n, 1)))}
    med = {m: float(np.median(y[ix])) for m, ix in f.by_model.items()}
    freq = {m: (np.bincount(lab[ix], minlength=k) + 1.0) / (len(ix) + k) for m, ix in f.by_model.items()}
    out["per-model-median"] = (
        np.asarray([med.get(e.model, g_mu) for e in test]),
        np.stack([freq.get(e.model, g_p) for e in test]) if n else np.empty((0, k)),
    )
    mu = _design([e.prompt_tokens for e in test]) @ f.coef
    out["prompt-length"] = (mu, _lognormal_probs(mu, f.sigma, edges))
    return out


def baseline_spreads(train: Sequence[Example], test: Sequence[Example]) -> dict[str, Floats]:
    """The log-length spread of each baseline per ``test`` row, fitted on ``train`` (the
    residual standard deviation: global, per target model, and of the prompt-length fit)."""
    f = _Fits.of(train)
    y = f.y
    g_sd = float(np.sqrt(np.mean((y - np.median(y)) ** 2)))
    sd = {m: float(np.sqrt(np.mean((y[ix] - np.median(y[ix])) ** 2))) for m, ix in f.by_model.items()}
    return {
        "global": np.full(len(test), g_sd),
        "per-model-median": np.asarray([max(sd.get(e.model, g_sd), 0.05) for e in test]),
        "prompt-length": np.full(len(test), f.sigma),
    }


def weighted_auc(score: Floats, label: Floats, weight: Floats) -> float | None:
    """ROC AUC with sample weights (ties count half); None without both classes."""
    _, idx = np.unique(score, return_inverse=True)
    pos = np.bincount(idx, weights=weight * label)
    neg = np.bincount(idx, weights=weight * (1.0 - label))
    tp, tn = float(pos.sum()), float(neg.sum())
    if tp <= 0.0 or tn <= 0.0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (tp * tn))


def _skill(p: Floats, f: Floats, w: Floats) -> dict[str, float | None]:
    if not w.size or w.sum() <= 0.0:
        return {"points": 0, "base_rate": None, "brier_skill": None, "auc": None}
    base = float(np.average(f, weights=w))
    brier = float(np.average((p - f) ** 2, weights=w))
    ref = base * (1.0 - base)
    return {
        "points": int(w.size),
        "base_rate": base,
        "brier_skill": 1.0 - brier / ref if ref > 0.0 else None,
        "auc": weighted_auc(p, f, w),
    }


def termination_metrics(
    mu: Floats, sigma: Floats, test: Sequence[Example], *, horizon: int = 32, step: int = 16
) -> dict[str, Any]:
    """Brier skill and AUC of "ends within ``horizon`` tokens" at every ``step``-th age (see the
    module docstring), overall and per :data:`AGE_BANDS` band."""
    if horizon < 1 or step < 1:
        raise ValueError(f"horizon and step must be at least 1, got {horizon} and {step}")
    ps: list[float] = []
    fs: list[float] = []
    ws: list[float] = []
    ages: list[int] = []
    for m, s, e in zip(mu.tolist(), sigma.tolist(), test, strict=True):
        length = max(1, e.output_tokens)
        cap = max(e.max_tokens, 1) if e.max_tokens is not None else None
        for a in range(0, length, step):
            ps.append(
                1.0 if cap is not None and a >= cap else lognormal_termination(m, s, a, horizon, cap)[0]
            )
            fs.append(1.0 if length <= a + horizon else 0.0)
            ws.append(float(e.prompt_tokens + a))
            ages.append(a)
    p_, f_, w_, a_ = np.asarray(ps), np.asarray(fs), np.asarray(ws), np.asarray(ages)
    out: dict[str, Any] = {"horizon": horizon, "step": step, **_skill(p_, f_, w_), "bands": {}}
    for lo, hi in AGE_BANDS:
        k = (a_ >= lo) & (a_ < hi) if hi is not None else a_ >= lo
        out["bands"][f"{lo}-{hi}" if hi is not None else f"{lo}+"] = _skill(p_[k], f_[k], w_[k])
    return out


def metrics(mu: Floats, probs: Floats, test: Sequence[Example], edges: Sequence[int]) -> dict[str, Any]:
    """Accuracy, per-bucket accuracy, macro-F1, MAE of log length and top-bucket ECE."""
    k = len(edges) + 1
    y = np.log(np.maximum([e.output_tokens for e in test], 1).astype(np.float64))
    lab = _labels([e.output_tokens for e in test], edges)
    pred = probs.argmax(axis=1)
    per: list[float | None] = []
    f1s: list[float] = []
    for b in range(k):
        t = lab == b
        pp = pred == b
        per.append(float(np.mean(pred[t] == b)) if t.any() else None)
        if t.any():
            tp = float(np.sum(t & pp))
            prec = tp / pp.sum() if pp.any() else 0.0
            rec = tp / t.sum()
            f1s.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    conf = probs.max(axis=1)
    hit = (pred == lab).astype(np.float64)
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = 0.0
    for b in range(10):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - hit[m].mean())
    return {
        "n": len(test),
        "accuracy": float(hit.mean()) if len(test) else float("nan"),
        "per_bucket_accuracy": per,
        "bucket_share": [float(np.mean(lab == b)) for b in range(k)],
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "mae_log": float(np.mean(np.abs(mu - y))) if len(test) else float("nan"),
        "ece": float(ece),
    }


def reliability_plot(
    results: dict[str, tuple[Floats, Floats]], test: Sequence[Example], edges: Sequence[int], path: Path
) -> Path:
    """A reliability diagram (one-vs-rest over all buckets, 10 bins) of every method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(edges) + 1
    lab = _labels([e.output_tokens for e in test], edges)
    onehot = np.eye(k)[lab]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    for name, (_, probs) in results.items():
        p = probs.ravel()
        o = onehot.ravel()
        bins = np.minimum((p * 10).astype(int), 9)
        xs, ys = [], []
        for b in range(10):
            m = bins == b
            if m.sum() >= 20:
                xs.append(p[m].mean())
                ys.append(o[m].mean())
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set_xlabel("predicted bucket probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Bucket calibration on unseen prompts (edges {list(edges)})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def latency(
    model: LoadedModel, test: Sequence[Example], *, n: int = 2000, max_length: int | None = None
) -> dict[str, float]:
    """Per-request inference latency (features/tokenization + onnxruntime, one thread), in ms.

    For the encoder, each prompt is repeated until it is longer than ``max_length`` tokens, so
    every timed request has exactly ``max_length`` tokens after truncation.
    """
    rows = list(test[: max(1, n)]) or [Example("", "m", 1, 1)]
    if isinstance(model, EncoderModel) and max_length is not None:
        longer = []
        for e in rows:
            have = max(1, len(model.encode(e.prompt)[0]) - 2)
            text = " ".join([e.prompt] * (1 + max_length // have))
            longer.append(Example(text, e.model, e.output_tokens, e.prompt_tokens, e.max_tokens, e.task))
        rows = longer
    samples: list[float] = []
    reps = max(1, n // len(rows))
    for _ in range(2):  # warm up
        model.infer(rows[0].prompt, rows[0].prompt_tokens, rows[0].max_tokens, rows[0].model)
    pc = time.perf_counter
    for _ in range(reps):
        for e in rows:
            t0 = pc()
            if isinstance(model, EncoderModel):
                model.infer(e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task, max_length=max_length)
            else:
                model.infer(e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task)
            samples.append(pc() - t0)
    a = np.asarray(samples) * 1e3
    return {
        "n": len(a),
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }
