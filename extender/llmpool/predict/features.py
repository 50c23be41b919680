"""The fast tier's features: what the picker knows about a request within microseconds.

A request becomes one float32 vector of :attr:`FastFeaturizer.dim` entries, in four blocks:

* **numbers** -- log prompt tokens (and its square), whether ``max_tokens`` is set and its log,
  chat turns (lines ``user`` in the picker's chat text), log word count, log line count, and
  whether the prompt asks a question;
* **task cues** -- one flag per cue in :data:`CUES` (translate, summarize, list, classify,
  story, code, ...): cue words and bigrams found among the prompt's words (set lookups);
* **target model** -- one-hot over the models seen in training, plus one slot for any other;
* **word n-grams** -- unigrams and bigrams of the prompt (and the ``task`` hint), hashed with
  CRC-32 into ``2 ** hash_bits`` slots, Only
  the n-grams of the training vocabulary are looked up (a dict lookup, not a hash per n-gram at
  serving time); an n-gram never seen in training would only add collision noise. An n-gram
  counts as often as it occurs; the block is scaled by ``1 / sqrt(hits)``.

Long prompts are cut to their first :data:`HEAD_CHARS` and last :data:`TAIL_CHARS` characters
before matching, so the cost is bounded. Strings that are not valid UTF-8 (lone surrogates) are
hashed with ``surrogatepass``: any ``str`` works.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from llmpool.predict import PredictError

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

    from llmpool.predict.data import Example

__all__ = ["CUES", "FEATURES_VERSION", "FastFeaturizer", "ngrams"]

FEATURES_VERSION: Final = 1
HEAD_CHARS: Final = 1000
TAIL_CHARS: Final = 300
MAX_WORDS: Final = 160

# Task cues: exact words, or bigrams (two words with one space). Matched as sets, in C.
CUES: Final[tuple[tuple[str, str], ...]] = (
    ("translate", "translate translation translated translating translator translations"),
    ("summarize", "summarize summarise summary summarization summaries tldr summarizing"),
    ("list", "list lists listing bullet bullets enumerate|name some|name a|give me"),
    ("classify", "classify classification categorize category categories sentiment label|which one|which of"),
    ("story", "story stories poem poems fiction narrative lyrics song haiku rap limerick fairy"),
    ("essay", "essay article blog speech report post paragraph paragraphs"),
    ("code", "code python javascript function program sql script java html css regex bash c++ implement"),
    ("explain", "explain explanation describe why elaborate|how does|how do"),
    ("short", "brief briefly short concise concisely|one sentence|one word|single word|yes or|in short"),
    ("count", "words sentences paragraphs lines items examples points tips reasons ways"),
    ("letter", "email letter message reply|cover letter"),
    ("rewrite", "rewrite paraphrase correct grammar edit proofread rephrase improve fix"),
    ("steps", "steps guide recipe instructions tutorial|step by|how to|how can"),
    ("math", "calculate solve equation math compute sum multiply divide integral derivative probability"),
    ("compare", "compare comparison difference differences versus vs contrast|pros and"),
    ("ideas", "idea ideas suggest suggestions recommend recommendations brainstorm"),
    ("roleplay", "conversation dialog dialogue roleplay pretend imagine|act as"),
    ("define", "define definition meaning|what is|what are|who is|who was"),
    ("extract", "extract identify find detect"),
    ("plan", "plan itinerary schedule outline strategy"),
)
_CUE_WORDS: Final[dict[str, int]] = {}
_CUE_BIGRAMS: Final[dict[str, int]] = {}
for _i, (_name, _spec) in enumerate(CUES):
    _ws, _, _bs = _spec.partition("|")
    for _w in _ws.split():
        _CUE_WORDS.setdefault(_w, _i)
    for _b in _bs.split("|"):
        if _b.strip():
            _CUE_BIGRAMS.setdefault(_b.strip(), _i)
_CUE_WORD_KEYS: Final = frozenset(_CUE_WORDS)
_CUE_BIGRAM_KEYS: Final = frozenset(_CUE_BIGRAMS)
_COUNT_CUE: Final = next(i for i, (n, _) in enumerate(CUES) if n == "count")
_COUNT_UNITS: Final = frozenset(CUES[_COUNT_CUE][1].split())
_MATH_CUE: Final = next(i for i, (n, _) in enumerate(CUES) if n == "math")
_CODE_CUE: Final = next(i for i, (n, _) in enumerate(CUES) if n == "code")
_DIGIT: Final = re.compile(r"[0-9]")
_PUNCT: Final = str.maketrans({c: " " for c in "!\"#$%&'()*,-./:;<=>?@[\\]^_`{|}~\t\r\n\u00a0"})
N_NUMERIC: Final = 8
NUMERIC_NAMES: Final = (
    "log_prompt_tokens",
    "log_prompt_tokens_sq",
    "has_max_tokens",
    "log_max_tokens",
    "log_turns",
    "log_words",
    "log_lines",
    "question",
)


def _clip(text: str) -> str:
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]
    return text


def _words(low: str) -> list[str]:
    w = low.translate(_PUNCT).split()
    if len(w) > MAX_WORDS:
        w = w[: MAX_WORDS * 3 // 4] + w[-MAX_WORDS // 4 :]
    return w


def _bigrams(w: list[str]) -> list[str]:
    return list(map(" ".join, pairwise(w)))


def ngrams(text: str, task: str = "") -> list[str]:
    """The distinct unigrams and bigrams of a prompt (plus ``task=...`` for a task hint)."""
    w = _words(_clip(text).lower())
    grams = set(w)
    grams.update(_bigrams(w))
    if task:
        grams.add(f"task={task.lower()}")
    return sorted(grams)


def _cues(low: str, words: list[str], bigrams: list[str]) -> set[int]:
    found = {_CUE_WORDS[w] for w in _CUE_WORD_KEYS.intersection(words)}
    found.update(_CUE_BIGRAMS[b] for b in _CUE_BIGRAM_KEYS.intersection(bigrams))
    found.discard(_COUNT_CUE)
    if not _COUNT_UNITS.isdisjoint(words):
        for a, b in pairwise(words):
            if b in _COUNT_UNITS and a.isdigit():
                found.add(_COUNT_CUE)
                break
    if "```" in low:
        found.add(_CODE_CUE)
    if ("+" in low or "*" in low or "=" in low or "^" in low) and _DIGIT.search(low) is not None:
        found.add(_MATH_CUE)
    return found


def _hash_slot(gram: str, mask: int) -> int:
    return zlib.crc32(gram.encode("utf-8", "surrogatepass")) & mask


class FastFeaturizer:
    """Turns (prompt text, prompt tokens, max_tokens, model, task) into the fast tier's vector."""

    def __init__(self, models: Sequence[str], vocab: Sequence[str], hash_bits: int = 12) -> None:
        if not 4 <= hash_bits <= 20:
            raise PredictError(f"hash_bits must be in [4, 20], got {hash_bits}")
        self.models = tuple(models)
        self.vocab = tuple(vocab)
        self.hash_bits = hash_bits
        self._model_index = {m: i for i, m in enumerate(self.models)}
        self.cue_base = N_NUMERIC
        self.model_base = self.cue_base + len(CUES)
        self.unknown_model = self.model_base + len(self.models)
        self.hash_base = self.unknown_model + 1
        self.dim = self.hash_base + (1 << hash_bits)
        mask = (1 << hash_bits) - 1
        self._slots = {g: self.hash_base + _hash_slot(g, mask) for g in self.vocab}

    # ---------------------------------------------------------------- building the vocabulary
    @staticmethod
    def fit_vocab(prompts: Iterable[tuple[str, str]], *, min_df: int = 2, max_size: int = 20000) -> list[str]:
        """The n-grams found in at least ``min_df`` distinct (prompt, task) pairs, most frequent first."""
        df: Counter[str] = Counter()
        for text, task in set(prompts):
            df.update(ngrams(text, task))
        kept = [(g, c) for g, c in df.items() if c >= min_df]
        kept.sort(key=lambda gc: (-gc[1], gc[0]))
        return sorted(g for g, _ in kept[:max_size])

    # ---------------------------------------------------------------- one request
    def sparse(
        self, text: str | None, prompt_tokens: int, max_tokens: int | None, model: str, task: str = ""
    ) -> tuple[list[int], list[float]]:
        """The non-zero entries: (indices, values), indices unique and increasing within blocks."""
        t = _clip(text or "")
        low = t.lower()
        pt = math.log1p(max(prompt_tokens, 0)) / 8.0
        idx = [0, 1]
        val = [pt, pt * pt]
        if max_tokens is not None:
            idx += [2, 3]
            val += [1.0, math.log1p(max(max_tokens, 0)) / 8.0]
        turns = low.count("\nuser\n") + (1 if low.startswith("user\n") else 0)
        words = _words(low)
        bigrams = _bigrams(words)
        idx += [4, 5, 6]
        val += [math.log1p(max(turns, 1)), math.log1p(len(words)) / 8.0, math.log1p(t.count("\n")) / 4.0]
        if "?" in t:
            idx.append(7)
            val.append(1.0)
        base = self.cue_base
        for c in sorted(_cues(low, words, bigrams)):
            idx.append(base + c)
            val.append(1.0)
        mi = self._model_index.get(model)
        idx.append(self.model_base + mi if mi is not None else self.unknown_model)
        val.append(1.0)
        get = self._slots.get
        hits = [s for s in map(get, words) if s is not None]
        hits += [s for s in map(get, bigrams) if s is not None]
        if task:
            s = get(f"task={task.lower()}")
            if s is not None:
                hits.append(s)
        if hits:
            w = 1.0 / math.sqrt(len(hits))
            counts: dict[int, float] = {}
            for s in hits:
                counts[s] = counts.get(s, 0.0) + w
            for s in sorted(counts):
                idx.append(s)
                val.append(counts[s])
        return idx, val

    def dense(
        self, text: str | None, prompt_tokens: int, max_tokens: int | None, model: str, task: str = ""
    ) -> npt.NDArray[np.float32]:
        """One request as a ``(1, dim)`` float32 row (the ONNX model's input)."""
        out = np.zeros((1, self.dim), dtype=np.float32)
        idx, val = self.sparse(text, prompt_tokens, max_tokens, model, task)
        out[0, idx] = val
        return out

    # ---------------------------------------------------------------- many requests (training)
    def matrix(self, examples: Sequence[Example]) -> csr_matrix:
        """The examples as a sparse float32 matrix (scipy; training only). Prompts featurize once."""
        from scipy.sparse import csr_matrix

        cache: dict[tuple[str, int, int | None, str, str], tuple[list[int], list[float]]] = {}
        indptr = [0]
        indices: list[int] = []
        data: list[float] = []
        for ex in examples:
            key = (ex.prompt, ex.prompt_tokens, ex.max_tokens, ex.model, ex.task)
            row = cache.get(key)
            if row is None:
                row = cache[key] = self.sparse(ex.prompt, ex.prompt_tokens, ex.max_tokens, ex.model, ex.task)
            indices += row[0]
            data += row[1]
            indptr.append(len(indices))
        return csr_matrix(
            (np.asarray(data, np.float32), np.asarray(indices, np.int32), np.asarray(indptr, np.int64)),
            shape=(len(examples), self.dim),
        )

    # ---------------------------------------------------------------- (de)serialisation
    def to_json(self) -> dict[str, Any]:
        return {
            "version": FEATURES_VERSION,
            "hash_bits": self.hash_bits,
            "models": list(self.models),
            "vocab": list(self.vocab),
            "cues": [name for name, _ in CUES],
        }

    @classmethod
    def from_json(cls, data: Any) -> FastFeaturizer:
        if not isinstance(data, dict):
            raise PredictError("features: expected an object")
        if data.get("version") != FEATURES_VERSION:
            raise PredictError(
                f"features: version {data.get('version')!r} is not supported "
                f"(this build reads {FEATURES_VERSION})"
            )
        if data.get("cues") != [name for name, _ in CUES]:
            raise PredictError("features: the task cues differ from this build's")
        models, vocab, bits = data.get("models"), data.get("vocab"), data.get("hash_bits")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise PredictError("features: 'models' must be a list of strings")
        if not isinstance(vocab, list) or not all(isinstance(g, str) for g in vocab):
            raise PredictError("features: 'vocab' must be a list of strings")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise PredictError("features: 'hash_bits' must be an integer")
        return cls(models, vocab, bits)
