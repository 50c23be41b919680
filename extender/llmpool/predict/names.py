"""Named predictor models: ``params.model: <name>`` of a ``learned`` predictor -> a model file.

The picker config's ``predictor_models`` maps names to model files (the operator mounts them
from ``spec.routing.predictorModels``). A ``learned`` predictor's ``params.model`` is one of

* a built-in model name (``fast``, packaged);
* a name of ``predictor_models``: replaced by that file's path before the policy is built;
* a path to a ``.onnx`` file: anything with a ``/`` in it or ending in ``.onnx``.

Anything else is an unknown name, an error of one line. :func:`resolve_model_names` does the
replacement on a policy's config (any predictor config nested in it, ``{name: learned,
params: {model: ...}}``), so the policies themselves only ever see paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llmpool.predict.runtime import BUILTIN_MODELS
from llmpool.routing.policy import ConfigError

__all__ = ["is_model_name", "resolve_model_names"]


def is_model_name(value: str) -> bool:
    """True for a model *name* (``encoder``), False for a path (``/m/encoder.onnx``, ``x.onnx``)."""
    return not ("/" in value or os.sep in value or value.endswith(".onnx"))


def resolve_model_names(
    policy: Any, models: Mapping[str, str], *, where: str = "policy", source: str = "predictor_models"
) -> Any:
    """``policy`` (a policy config: mapping, list or scalar) with every ``learned`` predictor's
    named ``params.model`` replaced by its path in ``models``; built-in names and paths stay.

    Returns a new structure (the input is not modified). Raises :class:`ConfigError` (one line,
    naming the field; ``where`` is the location of ``policy``, ``source`` what holds the names)
    for a name that is neither built in nor in ``models``.
    """
    if isinstance(policy, Mapping):
        out = {
            k: resolve_model_names(v, models, where=f"{where}.{k}", source=source) for k, v in policy.items()
        }
        params = out.get("params")
        if out.get("name") == "learned" and isinstance(params, dict):
            value = params.get("model")
            if isinstance(value, str) and value not in BUILTIN_MODELS and is_model_name(value):
                path = models.get(value)
                if path is None:
                    named = ", ".join(sorted(models)) or "none"
                    raise ConfigError(
                        f"{where}.params.model: unknown predictor model {value!r} (named models in "
                        f"{source}: {named}; built-in: {', '.join(BUILTIN_MODELS)}; or the path "
                        "of a .onnx file)"
                    )
                out["params"] = {**params, "model": path}
        return out
    if isinstance(policy, list | tuple):
        return [
            resolve_model_names(v, models, where=f"{where}.{i}", source=source) for i, v in enumerate(policy)
        ]
    return policy
