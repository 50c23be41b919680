"""Datasets for the output-length predictor: (prompt, target model, output tokens) examples.

Readers (paths are arguments; nothing here is bundled with the package):

* AlpacaEval: ``alpaca_eval_instructions.jsonl`` (prompts) joined with
  ``alpaca_eval_output_lengths.csv.gz`` (one answer length per generator and prompt; the
  generator is the target model);
* ``smollm2_alpacaeval_outputs.jsonl``: SmolLM2-135M-Instruct's own answers (``max_tokens`` 512);
* a generic JSONL file, one object per line: ``prompt`` (str), ``model`` (str), ``output_tokens``
  (int >= 0), and optionally ``prompt_tokens`` (int), ``max_tokens`` (int or null), ``task`` (str).

A bad row is an error naming the file, the line and the field (:class:`PredictError`); rows are
never skipped silently. :func:`split_by_prompt` keeps every prompt on one side of the split.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llmpool.predict import PredictError

__all__ = [
    "ALPACA_INSTRUCTIONS",
    "ALPACA_LENGTHS",
    "SMOLLM2_MODEL",
    "SMOLLM2_OUTPUTS",
    "Example",
    "estimate_prompt_tokens",
    "load_alpaca_eval",
    "load_data_dir",
    "load_jsonl",
    "load_smollm2",
    "prompt_key",
    "split_by_prompt",
]

ALPACA_INSTRUCTIONS = "alpaca_eval_instructions.jsonl"
ALPACA_LENGTHS = "alpaca_eval_output_lengths.csv.gz"
SMOLLM2_OUTPUTS = "smollm2_alpacaeval_outputs.jsonl"
SMOLLM2_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_MAX_TOKENS = 512


@dataclass(frozen=True, slots=True)
class Example:
    """One answer: the prompt, the model that answered, and how many tokens it produced."""

    prompt: str
    model: str
    output_tokens: int
    prompt_tokens: int
    max_tokens: int | None = None
    task: str = ""


def estimate_prompt_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token), at least 1."""
    return max(1, (len(text) + 3) // 4)


def prompt_key(prompt: str) -> str:
    """The identity a split keys on: the prompt with surrounding whitespace removed."""
    return prompt.strip()


def _open_text(path: Path) -> IO[str]:
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        if path.suffix == ".xz":
            return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8", newline="")
        return path.open("r", encoding="utf-8", newline="")
    except OSError as err:
        raise PredictError(f"{path}: cannot open: {err.strerror or err}") from None


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PredictError(f"{path}:{n}: not valid JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise PredictError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
        except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError) as err:
            raise PredictError(f"{path}: cannot read: {err}") from None


def _field(row: dict[str, Any], name: str, kind: type, where: str, *, optional: bool = False) -> Any:
    if name not in row or (optional and row[name] is None):
        if optional:
            return None
        raise PredictError(f"{where}: missing field {name!r}")
    v = row[name]
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise PredictError(f"{where}: field {name!r} must be an integer, got {v!r}")
        if v < 0:
            raise PredictError(f"{where}: field {name!r} must be >= 0, got {v}")
    elif not isinstance(v, kind):
        raise PredictError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(v).__name__}")
    return v


def _int_cell(text: str, name: str, where: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise PredictError(f"{where}: column {name!r} must be an integer, got {text!r}") from None
    if v < 0:
        raise PredictError(f"{where}: column {name!r} must be >= 0, got {v}")
    return v


def load_alpaca_eval(
    instructions: str | Path, lengths: str | Path, *, models: Sequence[str] | None = None
) -> list[Example]:
    """AlpacaEval prompts joined with the answer lengths of each generator (the target model).

    ``models`` keeps only those generators (default: all).
    """
    ipath, lpath = Path(instructions), Path(lengths)
    prompts: dict[int, tuple[str, int]] = {}
    for n, row in _json_rows(ipath):
        where = f"{ipath}:{n}"
        iid = _field(row, "instruction_id", int, where)
        text = _field(row, "instruction", str, where)
        toks = _field(row, "instruction_tokens_smollm2", int, where, optional=True)
        if iid in prompts:
            raise PredictError(f"{where}: duplicate instruction_id {iid}")
        prompts[iid] = (text, toks if toks else estimate_prompt_tokens(text))
    if not prompts:
        raise PredictError(f"{ipath}: no instructions")
    keep = set(models) if models is not None else None
    out: list[Example] = []
    need = ("generator", "instruction_id", "output_tokens_smollm2")
    with _open_text(lpath) as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise PredictError(f"{lpath}: empty file")
            missing = [c for c in need if c not in header]
            if missing:
                raise PredictError(f"{lpath}: missing column(s) {', '.join(missing)} (header: {header})")
            ig, ii, it = (header.index(c) for c in need)
            width = len(header)
            for n, cells in enumerate(reader, 2):
                where = f"{lpath}:{n}"
                if len(cells) != width:
                    raise PredictError(f"{where}: expected {width} columns, got {len(cells)}")
                model = cells[ig].strip()
                if not model:
                    raise PredictError(f"{where}: empty generator")
                if keep is not None and model not in keep:
                    continue
                iid = _int_cell(cells[ii], "instruction_id", where)
                if iid not in prompts:
                    raise PredictError(f"{where}: instruction_id {iid} is not in {ipath.name}")
                text, ptoks = prompts[iid]
                out.append(Example(text, model, _int_cell(cells[it], "output_tokens_smollm2", where), ptoks))
        except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError, csv.Error) as err:
            raise PredictError(f"{lpath}: cannot read: {err}") from None
    if not out:
        raise PredictError(f"{lpath}: no rows" + (" for the selected models" if keep is not None else ""))
    return out


def load_smollm2(path: str | Path, *, model: str = SMOLLM2_MODEL) -> list[Example]:
    """SmolLM2-135M-Instruct's answers to the AlpacaEval prompts (served with max_tokens 512)."""
    p = Path(path)
    out: list[Example] = []
    for n, row in _json_rows(p):
        where = f"{p}:{n}"
        text = _field(row, "instruction", str, where)
        ptoks = _field(row, "prompt_tokens", int, where)
        done = _field(row, "completion_tokens", int, where)
        out.append(Example(text, model, done, max(1, ptoks), SMOLLM2_MAX_TOKENS))
    if not out:
        raise PredictError(f"{p}: no rows")
    return out


def load_jsonl(path: str | Path) -> list[Example]:
    """The generic format: ``prompt``, ``model``, ``output_tokens``; optional ``prompt_tokens``,
    ``max_tokens``, ``task``."""
    p = Path(path)
    out: list[Example] = []
    for n, row in _json_rows(p):
        where = f"{p}:{n}"
        text = _field(row, "prompt", str, where)
        model = _field(row, "model", str, where)
        if not model.strip():
            raise PredictError(f"{where}: field 'model' is empty")
        done = _field(row, "output_tokens", int, where)
        ptoks = _field(row, "prompt_tokens", int, where, optional=True)
        cap = _field(row, "max_tokens", int, where, optional=True)
        if cap is not None and cap < 1:
            raise PredictError(f"{where}: field 'max_tokens' must be >= 1 or null, got {cap}")
        task = _field(row, "task", str, where, optional=True) or ""
        ptoks = ptoks if ptoks else estimate_prompt_tokens(text)
        out.append(Example(text, model.strip(), done, ptoks, cap, task))
    if not out:
        raise PredictError(f"{p}: no rows")
    return out


def load_data_dir(path: str | Path, *, models: Sequence[str] | None = None) -> list[Example]:
    """Every known file in a directory like ``../shared/data/prompts`` (AlpacaEval, SmolLM2)."""
    d = Path(path)
    if not d.is_dir():
        raise PredictError(f"{d}: not a directory")
    out: list[Example] = []
    if (d / ALPACA_INSTRUCTIONS).is_file() and (d / ALPACA_LENGTHS).is_file():
        out += load_alpaca_eval(d / ALPACA_INSTRUCTIONS, d / ALPACA_LENGTHS, models=models)
    if (d / SMOLLM2_OUTPUTS).is_file() and (models is None or SMOLLM2_MODEL in models):
        out += load_smollm2(d / SMOLLM2_OUTPUTS)
    if not out:
        raise PredictError(f"{d}: none of {ALPACA_INSTRUCTIONS} + {ALPACA_LENGTHS}, {SMOLLM2_OUTPUTS} found")
    return out


def _unit(seed: int, key: str) -> float:
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def split_by_prompt(
    examples: Iterable[Example], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split so that no prompt is on both sides: a prompt goes to test when its seeded hash falls
    below ``test_fraction``. Deterministic for a seed and independent of the row order."""
    if not 0.0 < test_fraction < 1.0 or math.isnan(test_fraction):
        raise PredictError(f"test fraction must be in (0, 1), got {test_fraction}")
    train: list[Example] = []
    test: list[Example] = []
    side: dict[str, bool] = {}
    for ex in examples:
        k = prompt_key(ex.prompt)
        t = side.get(k)
        if t is None:
            t = side[k] = _unit(seed, k) < test_fraction
        (test if t else train).append(ex)
    if not train or not test:
        raise PredictError(
            f"split by prompt left an empty side ({len(side)} distinct prompts, "
            f"test fraction {test_fraction})"
        )
    return train, test
