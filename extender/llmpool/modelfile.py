"""Model files shipped as ``NAME.onnx`` beside ``NAME.json`` metadata: the metadata's path, a
file's SHA-256, and reading metadata checked against its ONNX file with one-line errors.
Shared by the learned length predictors (:mod:`llmpool.predict.artifact`) and the RL
router (:mod:`llmpool.rl.model`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def meta_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checked_meta(
    onnx_path: str | Path,
    *,
    what: str,
    fmt: str,
    version: int,
    error: type[Exception],
    retrain: str,
) -> dict[str, Any]:
    """The metadata of ``onnx_path``: present, valid JSON, of format ``fmt`` and ``version``,
    and naming the ONNX file's own hash. Anything else raises ``error`` with one line that
    starts with ``what`` and the path (``retrain``: how to make a current model)."""
    op = Path(onnx_path)
    if not op.is_file():
        raise error(f"{what} {op}: no such file")
    mp = meta_path(op)
    if not mp.is_file():
        raise error(f"{what} {op}: its metadata file {mp.name} is missing")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what} {op}: metadata {mp.name} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{what} {op}: {mp.name} is not {fmt} metadata")
    if meta.get("format_version") != version:
        raise error(
            f"{what} {op}: format version {meta.get('format_version')!r} is not supported "
            f"(this build reads {version}); {retrain}"
        )
    if meta.get("onnx_sha256") != sha256_file(op):
        raise error(
            f"{what} {op}: the ONNX file does not match its metadata (hash differs: corrupt or replaced)"
        )
    return meta
