"""Model files: an ONNX graph plus a JSON metadata file beside it (same stem, ``.json``).

The metadata says which tier the graph is, what its inputs mean (the fast tier's feature
layout, the encoder tier's tokenizer and model list), the bucket edges of its bucket head, the
log-length spread per target model, and the SHA-256 of the ONNX file, so a graph and metadata
that do not belong together are refused. Writing is deterministic: the same weights give the
same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from llmpool.modelfile import meta_path, read_checked_meta, sha256_file
from llmpool.predict import PredictError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "linear_graph",
    "meta_path",
    "read_meta",
    "sha256_file",
    "write_meta",
]

FORMAT: Final = "llmpool-length-predictor"
FORMAT_VERSION: Final = 1
OPSET: Final = 17
IR_VERSION: Final = 8


def write_meta(onnx_path: str | Path, meta: dict[str, Any]) -> Path:
    """Write the metadata beside ``onnx_path`` (with the ONNX file's hash) and return its path."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "onnx_sha256": sha256_file(onnx_path)}
    p = meta_path(onnx_path)
    p.write_text(json.dumps(full, sort_keys=True, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
    return p


def read_meta(onnx_path: str | Path) -> dict[str, Any]:
    """The metadata of a model file, checked against the ONNX file (one-line errors)."""
    return read_checked_meta(
        onnx_path,
        what="predictor model",
        fmt=FORMAT,
        version=FORMAT_VERSION,
        error=PredictError,
        retrain="retrain with `llmpool predictor train`",
    )


def linear_graph(
    weights: npt.NDArray[np.float32], bias: npt.NDArray[np.float32], name: str = "fast"
) -> bytes:
    """The fast tier's graph: ``y = x @ W + b``; ``log_len = y[:, 0]``, ``bucket_probs = softmax(y[:, 1:])``.

    ``weights`` is ``(dim, 1 + buckets)``. Built with the ``onnx`` helper API (training extra).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim, width = weights.shape
    k = width - 1
    if k < 1 or bias.shape != (width,):
        raise PredictError(f"linear graph: bad shapes {weights.shape} / {bias.shape}")
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(weights, np.float32), "W"),
        numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), "b"),
        numpy_helper.from_array(np.asarray([1, k], np.int64), "split"),
        numpy_helper.from_array(np.asarray([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
        helper.make_node("Split", ["y", "split"], ["len_col", "logits"], axis=1),
        helper.make_node("Squeeze", ["len_col", "axis1"], ["log_len"]),
        helper.make_node("Softmax", ["logits"], ["bucket_probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", dim])],
        [
            helper.make_tensor_value_info("log_len", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("bucket_probs", TensorProto.FLOAT, ["n", k]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llmpool", producer_version="1"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
