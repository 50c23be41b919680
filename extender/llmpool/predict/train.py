"""Training the fast tier (scikit-learn, ``train`` extra) and writing its ONNX artifact.

Two linear heads on the same sparse features (:mod:`llmpool.predict.features`):

* an expected-length head: ridge regression on ``log(max(L, 1))``;
* a bucket head: multinomial logistic regression on the length buckets.

The spread of the log length around the prediction (``sigma``, per target model, shrunk toward
the global value) is measured out of fold: the ridge head is refit on one half of the prompts
and scored on the other, so it is not the optimistic in-sample spread. Everything is
deterministic for a seed (the solvers are deterministic; the seed only picks the folds).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmpool.predict import PredictError
from llmpool.predict.artifact import linear_graph, write_meta
from llmpool.predict.data import Example, prompt_key, split_by_prompt
from llmpool.predict.features import FastFeaturizer

__all__ = ["FastTrainResult", "bucket_labels", "export_fast", "log_lengths", "sigma_table", "train_fast"]

SIGMA_PRIOR_N = 20.0  # pseudo-rows pulling a model's spread toward the global one


def log_lengths(examples: Sequence[Example]) -> npt.NDArray[np.float64]:
    return np.log(np.maximum(np.asarray([e.output_tokens for e in examples], np.float64), 1.0))


def bucket_labels(lengths: Sequence[int] | npt.NDArray[Any], edges: Sequence[int]) -> npt.NDArray[np.int64]:
    """Bucket index of each length: bucket i is ``[edges[i-1], edges[i])``."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right").astype(np.int64)


def sigma_table(models: Sequence[str], residuals: npt.NDArray[np.float64]) -> tuple[float, dict[str, float]]:
    """Global and per-model RMS of log-length residuals (per model shrunk toward global)."""
    g = float(np.sqrt(np.mean(residuals**2))) if len(residuals) else 1.0
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for m, r in zip(models, residuals.tolist(), strict=True):
        a = acc[m]
        a[0] += r * r
        a[1] += 1.0
    per = {
        m: round(math.sqrt((ss + SIGMA_PRIOR_N * g * g) / (n + SIGMA_PRIOR_N)), 6)
        for m, (ss, n) in sorted(acc.items())
    }
    return round(max(g, 1e-3), 6), per


@dataclass
class FastTrainResult:
    featurizer: FastFeaturizer
    weights: npt.NDArray[np.float32]  # (dim, 1 + buckets)
    bias: npt.NDArray[np.float32]
    edges: tuple[int, ...]
    sigma: float
    sigma_per_model: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    ridge: Any = None  # the fitted scikit-learn estimators (for the export round-trip check)
    logreg: Any = None
    shift: dict[str, float] = field(default_factory=dict)  # per-model median shift ("" = unknown)

    def reference(
        self, x: Any, models: Sequence[str]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The training framework's own outputs (scikit-learn) for rows ``x``: ``(log_len, bucket_probs)``."""
        mu = self.ridge.predict(x) + np.asarray([self.shift.get(m, self.shift[""]) for m in models])
        k = len(self.edges) + 1
        probs = np.zeros((x.shape[0], k))
        if self.logreg is None:
            probs[:, int(np.argmax(self.bias[1:]))] = 1.0
        else:
            probs[:, self.logreg.classes_] = self.logreg.predict_proba(x)
        return mu, probs

    def meta(self) -> dict[str, Any]:
        return {
            "tier": "fast",
            "bucket_edges": list(self.edges),
            "features": self.featurizer.to_json(),
            "sigma": {"global": self.sigma, "per_model": self.sigma_per_model},
            "inputs": {"features": self.featurizer.dim},
            "outputs": ["log_len", "bucket_probs"],
            "trained": self.info,
        }


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise PredictError("training needs scikit-learn: pip install 'llmpool[train]'") from None


def _fit_ridge(x: Any, y: npt.NDArray[np.float64], alpha: float) -> Any:
    from sklearn.linear_model import Ridge

    return Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6, max_iter=2000).fit(x, y)


def train_fast(
    examples: Sequence[Example],
    *,
    edges: Sequence[int] = (256, 2048),
    seed: int = 0,
    hash_bits: int = 12,
    alpha: float = 1000.0,
    c: float = 0.01,
    min_df: int = 2,
    progress: bool = False,
) -> FastTrainResult:
    """Fit the fast tier on ``examples`` (already the training side of a split by prompt)."""
    _require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from tqdm import tqdm

    if len(examples) < 4:
        raise PredictError(f"training needs at least 4 examples, got {len(examples)}")
    edges_t = tuple(int(e) for e in edges)
    steps = tqdm(total=5, desc="fast tier", unit="step", disable=not progress)
    models = sorted({e.model for e in examples})
    vocab = FastFeaturizer.fit_vocab(((e.prompt, e.task) for e in examples), min_df=min_df)
    feat = FastFeaturizer(models, vocab, hash_bits)
    x = feat.matrix(examples).astype(np.float64)
    y = log_lengths(examples)
    labels = bucket_labels([e.output_tokens for e in examples], edges_t)
    steps.update()

    ridge = _fit_ridge(x, y, alpha)
    model_arr = np.asarray([e.model for e in examples])
    shift = _median_shift(model_arr, y - ridge.predict(x), models)
    steps.update()

    # Out-of-fold residuals for the spread: two folds by prompt.
    resid = np.empty_like(y)
    fold = np.asarray([split_by_prompt_side(prompt_key(e.prompt), seed) for e in examples])
    for side in (False, True):
        tr, te = np.flatnonzero(fold != side), np.flatnonzero(fold == side)
        if len(tr) == 0 or len(te) == 0:
            resid[te] = y[te] - ridge.predict(x[te])
            continue
        r = _fit_ridge(x[tr], y[tr], alpha)
        sh = _median_shift(model_arr[tr], y[tr] - r.predict(x[tr]), models)
        resid[te] = y[te] - r.predict(x[te]) - np.asarray([sh.get(m, sh[""]) for m in model_arr[te]])
    sigma, per_model = sigma_table([e.model for e in examples], resid)
    steps.update()

    k = len(edges_t) + 1
    present = np.unique(labels)
    w = np.zeros((feat.dim, 1 + k), np.float64)
    b = np.zeros(1 + k, np.float64)
    w[:, 0] = ridge.coef_
    b[0] = ridge.intercept_
    # The per-model median shift rides on the model one-hot (value 1.0); unknown models get the global one.
    for i, m in enumerate(models):
        w[feat.model_base + i, 0] += shift[m]
    w[feat.unknown_model, 0] += shift[""]
    logreg = None
    if len(present) == 1:
        b[1:] = -30.0
        b[1 + int(present[0])] = 0.0
    else:
        logreg = LogisticRegression(C=c, max_iter=500, tol=1e-6).fit(x, labels)
        coef = logreg.coef_
        icpt = logreg.intercept_
        if len(present) == 2:  # binary: sklearn keeps one row for the second class
            coef = np.vstack([-coef[0] / 2.0, coef[0] / 2.0])
            icpt = np.asarray([-icpt[0] / 2.0, icpt[0] / 2.0])
        b[1:] = -30.0
        for j, cls in enumerate(logreg.classes_.tolist()):
            w[:, 1 + cls] = coef[j]
            b[1 + cls] = icpt[j]
    steps.update()
    info = {
        "rows": len(examples),
        "prompts": len({prompt_key(e.prompt) for e in examples}),
        "models": len(models),
        "seed": seed,
        "alpha": alpha,
        "C": c,
        "hash_bits": hash_bits,
        "min_df": min_df,
        "vocab": len(vocab),
    }
    steps.update()
    steps.close()
    return FastTrainResult(
        feat,
        w.astype(np.float32),
        b.astype(np.float32),
        edges_t,
        sigma,
        per_model,
        info,
        ridge,
        logreg,
        shift,
    )


def _median_shift(
    model_of_row: npt.NDArray[Any], resid: npt.NDArray[np.float64], models: Sequence[str]
) -> dict[str, float]:
    """Per-model median residual (the ridge head predicts a mean; MAE wants the median); ``""`` is global."""
    out = {"": float(np.median(resid))}
    order = np.argsort(model_of_row, kind="stable")
    sorted_models = model_of_row[order]
    for m in models:
        lo, hi = np.searchsorted(sorted_models, m, "left"), np.searchsorted(sorted_models, m, "right")
        out[m] = float(np.median(resid[order[lo:hi]])) if hi > lo else out[""]
    return out


def split_by_prompt_side(key: str, seed: int) -> bool:
    """The fold of a prompt for the out-of-fold spread (a seeded hash; half the prompts each)."""
    from llmpool.predict.data import _unit

    return _unit(seed + 7919, key) < 0.5


def export_fast(result: FastTrainResult, out: str | Path) -> Path:
    """Write ``out`` (ONNX) and its ``.json`` metadata; returns the ONNX path."""
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(linear_graph(result.weights, result.bias))
    write_meta(p, result.meta())
    return p


def train_test(
    examples: Sequence[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    return split_by_prompt(examples, test_fraction, seed)
