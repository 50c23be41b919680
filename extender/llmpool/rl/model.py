"""The RL router's Q-network as files: an ONNX graph plus JSON metadata beside it.

The network is a small MLP applied to each action row (see :mod:`llmpool.rl.features`):
``rows [n, F] -> Linear -> ReLU -> Linear -> ReLU -> Linear -> q [n]``. It is written with
``onnx.helper`` straight from the weights (no exporter, so the bytes are deterministic and the
training framework is not needed to write it) and served with onnxruntime on one thread.

The metadata records the feature list the network was trained on, the largest pool it may
serve (``max_endpoints``), how it was trained, and the ONNX file's SHA-256. :func:`load_model`
checks all of it; every failure is an :class:`RLModelError` with one line naming the file and
what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from llmpool.modelfile import meta_path, read_checked_meta, sha256_file
from llmpool.rl.features import FEATURE_VERSION, FEATURES, N_FEATURES

FORMAT: Final = "llmpool-rl-router"
FORMAT_VERSION: Final = 1
OPSET: Final = 17
IR_VERSION: Final = 8
BUILTIN_MODELS: Final = ("paper-a",)

Layers = list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]


class RLModelError(ValueError):
    """A model file is missing, corrupt or does not fit; ``str()`` is one line."""


def builtin_path(name: str) -> Path:
    """The packaged model ``name``: ``llmpool/rl/models/<name>.onnx``."""
    return Path(str(resources.files("llmpool.rl").joinpath("models", f"{name}.onnx")))


def resolve(spec: str) -> Path:
    """A model name (``paper-a``) or a path to an ``.onnx`` file."""
    if spec in BUILTIN_MODELS:
        return builtin_path(spec)
    return Path(spec).expanduser()


def write_model(path: str | Path, layers: Layers, meta: dict[str, Any]) -> Path:
    """Write the ONNX graph of ``layers`` (``[(W [in, out], b [out]), ...]``) and its metadata."""
    from onnx import TensorProto, helper, numpy_helper

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not layers or layers[0][0].shape[0] != N_FEATURES:
        raise RLModelError(
            f"first layer takes {layers[0][0].shape[0] if layers else 0} inputs, not {N_FEATURES}"
        )
    nodes = []
    inits = []
    x = "rows"
    for i, (w, b) in enumerate(layers):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(b, dtype=np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]))
        x = f"a{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    nodes.append(helper.make_node("Squeeze", [x, "axis1"], ["q"]))
    graph = helper.make_graph(
        nodes,
        "llmpool_rl_q",
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", N_FEATURES])],
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["n"])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="llmpool-rl",
        ir_version=IR_VERSION,
    )
    out.write_bytes(model.SerializeToString())
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "features": list(FEATURES),
        "feature_version": FEATURE_VERSION,
        "hidden": [int(w.shape[1]) for w, _ in layers[:-1]],
        **meta,
        "onnx_sha256": sha256_file(out),
    }
    meta_path(out).write_text(json.dumps(full, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return out


def read_meta(path: Path) -> dict[str, Any]:
    meta = read_checked_meta(
        path,
        what="RL model",
        fmt=FORMAT,
        version=FORMAT_VERSION,
        error=RLModelError,
        retrain="retrain it with `llmpool rl train`",
    )
    if meta.get("features") != list(FEATURES):
        raise RLModelError(
            f"RL model {path}: trained on a different state encoding (feature version "
            f"{meta.get('feature_version')!r}, this build {FEATURE_VERSION}): retrain it"
        )
    me = meta.get("max_endpoints")
    if not isinstance(me, int) or me < 1:
        raise RLModelError(f"RL model {path}: metadata 'max_endpoints' is missing or not a positive integer")
    return meta


class QModel:
    """A loaded Q-network served by onnxruntime: ``scores(rows) -> q`` per row."""

    def __init__(self, path: Path, meta: dict[str, Any], session: Any) -> None:
        self.path = path
        self.meta = meta
        self.session = session
        self.max_endpoints: int = int(meta["max_endpoints"])
        ins = session.get_inputs()
        outs = session.get_outputs()
        if [i.name for i in ins] != ["rows"] or [o.name for o in outs] != ["q"]:
            raise RLModelError(f"RL model {path}: graph inputs/outputs are not rows -> q")
        width = ins[0].shape[-1]
        if isinstance(width, int) and width != N_FEATURES:
            raise RLModelError(
                f"RL model {path}: the graph takes {width} features, the encoder makes {N_FEATURES}"
            )
        self._feed: dict[str, Any] = {}

    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self._feed["rows"] = rows
        out: npt.NDArray[np.float32] = self.session.run(None, self._feed)[0]
        return out


def load_model(spec: str | Path) -> QModel:
    """Load and check a model (a builtin name or a path); one-line :class:`RLModelError` on failure."""
    path = resolve(str(spec))
    meta = read_meta(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise RLModelError("serving the RL router needs onnxruntime: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RLModelError(f"RL model {path}: onnxruntime cannot load it: {first[:200]}") from None
    return QModel(path, meta, sess)


class NumpyQ:
    """The same MLP in numpy (the trainer's actor between gradient steps)."""

    def __init__(self, layers: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]) -> None:
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]

    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        x = rows
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < last:
                np.maximum(x, 0.0, out=x)
        return x[:, 0]
