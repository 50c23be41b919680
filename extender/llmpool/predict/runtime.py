"""Serving a model file with onnxruntime (one thread, no training framework).

:func:`load_model` reads an ONNX file and its metadata, checks that they belong together and
that the graph has the inputs and outputs the metadata promises, and returns a
:class:`FastModel` or an :class:`EncoderModel`. Every failure is a :class:`PredictError` with one
line naming the file and what is wrong. Loaded models are cached by (path, size, mtime), so
every predictor built on the same file shares one session.

``infer(...)`` returns ``(mu, bucket_probs)``: the predicted mean of ``log L`` and the bucket
head's probabilities for :attr:`LoadedModel.edges`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from functools import partial
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from llmpool.predict import PredictError
from llmpool.predict.artifact import read_meta, sha256_file
from llmpool.predict.features import FastFeaturizer

__all__ = [
    "BUILTIN_MODELS",
    "EncoderModel",
    "FastModel",
    "LoadedModel",
    "builtin_path",
    "encode_prompt",
    "load_model",
]

BUILTIN_MODELS: Final = ("fast",)


def builtin_path(name: str) -> Path:
    """The packaged model ``name`` (``fast``): ``llmpool/predict/models/<name>.onnx``."""
    return Path(str(resources.files("llmpool.predict").joinpath("models", f"{name}.onnx")))


def _session(path: Path, threads: int = 1) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PredictError("serving a learned predictor needs onnxruntime: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PredictError(f"predictor model {path}: onnxruntime cannot load it: {first[:200]}") from None


def _sigma(meta: dict[str, Any], path: Path) -> tuple[float, dict[str, float]]:
    s = meta.get("sigma")
    if (
        not isinstance(s, dict)
        or not isinstance(s.get("global"), int | float)
        or not isinstance(s.get("per_model"), dict)
    ):
        raise PredictError(f"predictor model {path}: metadata 'sigma' is missing or malformed")
    per = {str(k): float(v) for k, v in s["per_model"].items() if isinstance(v, int | float) and v > 0}
    return max(float(s["global"]), 1e-3), per


def _edges(meta: dict[str, Any], path: Path) -> tuple[int, ...]:
    e = meta.get("bucket_edges")
    if not isinstance(e, list) or not e or not all(isinstance(v, int) and v >= 1 for v in e):
        raise PredictError(f"predictor model {path}: metadata 'bucket_edges' is missing or malformed")
    if any(b <= a for a, b in pairwise(e)):
        raise PredictError(f"predictor model {path}: metadata 'bucket_edges' must be increasing")
    return tuple(e)


def encode_prompt(tokenizer: Any, text: str | None, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and attention mask of a prompt for the encoder, at most ``max_length`` ids.

    Safe for any ``str``: empty, very long (cut to ``16 * max_length`` characters before
    tokenizing, so the cost is bounded) and lone surrogates (replaced). Truncation keeps the
    first ids and the final special token.
    """
    t = text or ""
    if len(t) > 16 * max_length:
        t = t[: 16 * max_length]
    t = t.encode("utf-8", "replace").decode("utf-8")
    ids = list(tokenizer.encode(t).ids)
    if len(ids) > max_length:
        ids = ids[: max_length - 1] + ids[-1:]
    if not ids:
        ids = [0]
    return ids, [1] * len(ids)


class LoadedModel:
    """A loaded model file (see :func:`load_model`)."""

    tier: str = ""

    def __init__(self, path: Path, meta: dict[str, Any], session: Any) -> None:
        self.path = path
        self.meta = meta
        self.session = session
        self.edges = _edges(meta, path)
        self.sigma, self.sigma_per_model = _sigma(meta, path)
        self._check_io()

    def _check_io(self) -> None:
        outs = [o.name for o in self.session.get_outputs()]
        if outs[:2] != ["log_len", "bucket_probs"]:
            raise PredictError(f"predictor model {self.path}: outputs {outs} are not [log_len, bucket_probs]")
        k = self.session.get_outputs()[1].shape[-1]
        if isinstance(k, int) and k != len(self.edges) + 1:
            raise PredictError(
                f"predictor model {self.path}: {k} bucket outputs but {len(self.edges)} bucket edges"
            )

    def sigma_of(self, model: str) -> float:
        return self.sigma_per_model.get(model, self.sigma)

    def infer(
        self, text: str | None, prompt_tokens: int, max_tokens: int | None, model: str, task: str = ""
    ) -> tuple[float, tuple[float, ...]]:
        raise NotImplementedError

    def infer_many(
        self, rows: Sequence[tuple[str | None, int, int | None, str, str]], batch: int = 256
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``(mu, probs)`` for many requests (evaluation); the default runs them one by one."""
        return self._one_by_one(rows, self.infer)

    def _one_by_one(
        self,
        rows: Sequence[tuple[str | None, int, int | None, str, str]],
        infer: Callable[..., tuple[float, tuple[float, ...]]],
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        mus = np.empty(len(rows))
        probs = np.empty((len(rows), len(self.edges) + 1))
        for i, r in enumerate(rows):
            mu, p = infer(*r)
            mus[i] = mu
            probs[i] = p
        return mus, probs


class FastModel(LoadedModel):
    """The fast tier: features in Python, one small ONNX graph."""

    tier = "fast"

    def __init__(self, path: Path, meta: dict[str, Any], session: Any) -> None:
        try:
            self.featurizer = FastFeaturizer.from_json(meta.get("features"))
        except PredictError as err:
            raise PredictError(f"predictor model {path}: {err}") from None
        super().__init__(path, meta, session)
        inp = session.get_inputs()
        if len(inp) != 1 or inp[0].name != "features" or inp[0].shape[-1] != self.featurizer.dim:
            got = [(i.name, i.shape) for i in inp]
            raise PredictError(
                f"predictor model {path}: inputs {got} do not match "
                f"the metadata's {self.featurizer.dim} features"
            )
        self._run = session.run
        self._names = ["log_len", "bucket_probs"]

    def infer(
        self, text: str | None, prompt_tokens: int, max_tokens: int | None, model: str, task: str = ""
    ) -> tuple[float, tuple[float, ...]]:
        x = self.featurizer.dense(text, prompt_tokens, max_tokens, model, task)
        mu, probs = self._run(self._names, {"features": x})
        return float(mu[0]), tuple(float(p) for p in probs[0])

    def infer_many(
        self, rows: Sequence[tuple[str | None, int, int | None, str, str]], batch: int = 1024
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        mus: list[npt.NDArray[Any]] = []
        probs: list[npt.NDArray[Any]] = []
        f = self.featurizer
        for s in range(0, len(rows), batch):
            chunk = rows[s : s + batch]
            x = np.zeros((len(chunk), f.dim), np.float32)
            for i, r in enumerate(chunk):
                idx, val = f.sparse(*r)
                x[i, idx] = val
            mu, p = self._run(self._names, {"features": x})
            mus.append(mu)
            probs.append(p)
        if not rows:
            return np.empty(0), np.empty((0, len(self.edges) + 1))
        return np.concatenate(mus).astype(np.float64), np.concatenate(probs).astype(np.float64)


class EncoderModel(LoadedModel):
    """The encoder tier: HF ``tokenizers`` (Rust) + the int8 MiniLM graph with its heads."""

    tier = "encoder"

    def __init__(self, path: Path, meta: dict[str, Any], session: Any) -> None:
        super().__init__(path, meta, session)
        enc = meta.get("encoder")
        if not isinstance(enc, dict):
            raise PredictError(f"predictor model {path}: metadata 'encoder' is missing")
        models = enc.get("models")
        tok_name = enc.get("tokenizer")
        max_len = enc.get("max_length")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise PredictError(f"predictor model {path}: metadata 'encoder.models' must be a list of strings")
        if not isinstance(tok_name, str) or not isinstance(max_len, int) or max_len < 8:
            raise PredictError(f"predictor model {path}: metadata 'encoder.tokenizer'/'max_length' malformed")
        names = [i.name for i in session.get_inputs()]
        want = ["input_ids", "attention_mask", "model_index", "numeric"]
        if names != want:
            raise PredictError(f"predictor model {path}: inputs {names} are not {want}")
        self.models = tuple(models)
        self._model_index = {m: i for i, m in enumerate(self.models)}
        self.max_length = max_len
        tok_path = path.parent / tok_name
        try:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as err:
            raise PredictError(
                f"predictor model {path}: cannot load tokenizer {tok_path.name}: {err}"
            ) from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)  # the encoder's longest (64/128/256 cut further)
        self._run = session.run
        self._names = ["log_len", "bucket_probs"]
        self._head: Any = None
        head = enc.get("head")
        if isinstance(head, str):
            hp = path.parent / head
            if not hp.is_file() or enc.get("head_sha256") != sha256_file(hp):
                raise PredictError(f"predictor model {path}: head file {head} is missing or does not match")
            self._head = _session(hp)

    def infer_many(
        self,
        rows: Sequence[tuple[str | None, int, int | None, str, str]],
        batch: int = 4096,
        max_length: int | None = None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Many requests: each distinct prompt is encoded once (cut to ``max_length`` tokens,
        default the model's), then the head runs in batches."""
        if self._head is None:  # no separate head: the whole graph per request
            return self._one_by_one(rows, partial(self.infer, max_length=max_length))
        k = len(self.edges) + 1
        emb: dict[str, npt.NDArray[np.float32]] = {}
        for r in rows:
            t = r[0] or ""
            if t not in emb:
                ids, mask = self.encode(t, max_length)
                feeds = {
                    "input_ids": np.asarray([ids], np.int64),
                    "attention_mask": np.asarray([mask], np.int64),
                    "model_index": np.zeros(1, np.int64),
                    "numeric": np.zeros((1, 3), np.float32),
                }
                emb[t] = self._run(["embedding"], feeds)[0][0]
        mus = np.empty(len(rows))
        probs = np.empty((len(rows), k))
        for s in range(0, len(rows), batch):
            chunk = rows[s : s + batch]
            feeds = {
                "embedding": np.stack([emb[r[0] or ""] for r in chunk]).astype(np.float32),
                "model_index": np.asarray([self.model_index(r[3]) for r in chunk], np.int64),
                "numeric": np.asarray([self.numeric(r[1], r[2]) for r in chunk], np.float32),
            }
            mu, p = self._head.run(["log_len", "bucket_probs"], feeds)
            mus[s : s + len(chunk)] = mu
            probs[s : s + len(chunk)] = p
        return mus, probs

    def encode(self, text: str | None, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids and mask of a prompt, truncated to ``max_length`` (default the model's)."""
        return encode_prompt(self.tokenizer, text, max_length or self.max_length)

    def model_index(self, model: str) -> int:
        """Index of the target model; the last index stands for any model not seen in training."""
        return self._model_index.get(model, len(self.models))

    @staticmethod
    def numeric(prompt_tokens: int, max_tokens: int | None) -> list[float]:
        pt = math.log1p(max(prompt_tokens, 0)) / 8.0
        mt = math.log1p(max(max_tokens, 0)) / 8.0 if max_tokens is not None else 0.0
        return [pt, 1.0 if max_tokens is not None else 0.0, mt]

    def infer(
        self,
        text: str | None,
        prompt_tokens: int,
        max_tokens: int | None,
        model: str,
        task: str = "",
        max_length: int | None = None,
    ) -> tuple[float, tuple[float, ...]]:
        ids, mask = self.encode(text, max_length)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.asarray([mask], np.int64),
            "model_index": np.asarray([self.model_index(model)], np.int64),
            "numeric": np.asarray([self.numeric(prompt_tokens, max_tokens)], np.float32),
        }
        mu, probs = self._run(self._names, feeds)
        return float(mu[0]), tuple(float(p) for p in probs[0])


_CACHE: dict[tuple[str, int, int], LoadedModel] = {}
_LOCK = threading.Lock()


def load_model(path: str | Path) -> LoadedModel:
    """Load (or reuse) a model file; ``fast`` names the packaged fast tier. One-line errors."""
    p = builtin_path(str(path)) if str(path) in BUILTIN_MODELS else Path(path)
    try:
        st = p.stat()
    except OSError:
        name = str(path)
        if not ("/" in name or os.sep in name or name.endswith(".onnx")):  # a name, not a path
            raise PredictError(
                f"predictor model {name!r}: no such file, and not a built-in model "
                f"({', '.join(BUILTIN_MODELS)}); named models are resolved only through the picker "
                "config's predictor_models"
            ) from None
        raise PredictError(f"predictor model {p}: no such file") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        meta = read_meta(p)
        tier = meta.get("tier")
        if tier not in ("fast", "encoder"):
            raise PredictError(f"predictor model {p}: unknown tier {tier!r} (expected fast or encoder)")
        sess = _session(p)
        model: LoadedModel = FastModel(p, meta, sess) if tier == "fast" else EncoderModel(p, meta, sess)
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = model
        return model
