"""How long the emulated model answers when the client does not say.

Priority per request: ``ignore_eos`` (exactly ``max_tokens``), then the test header
``x-llmpool-output-tokens`` (capped at ``max_tokens``), then this length model: a draw
from a dataset's output lengths, or by default a log-normal with a median of 128 tokens
and sigma 0.9 (about the spread of chat answers). A draw above ``max_tokens`` is cut
there (finish reason ``length``), as a real model would be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

OUTPUT_TOKENS_HEADER = "x-llmpool-output-tokens"


class OutputLengths:
    """Seeded source of natural answer lengths (before the ``max_tokens`` cap)."""

    def __init__(self, lengths: Sequence[int] | None = None, *, seed: int = 0,
                 median: float = 128.0, sigma: float = 0.9) -> None:  # fmt: skip
        if lengths is not None and len(lengths) == 0:
            raise ValueError("output-length dataset is empty")
        self._lengths = np.asarray(lengths, dtype=np.int64) if lengths is not None else None
        self._rng = np.random.default_rng(seed)
        self._mu = math.log(median)
        self._sigma = sigma
        self.source = f"dataset of {len(lengths)} lengths" if lengths is not None else (
            f"lognormal(median={median:g}, sigma={sigma:g})"
        )  # fmt: skip

    def draw(self) -> int:
        if self._lengths is not None:
            return max(1, int(self._lengths[self._rng.integers(len(self._lengths))]))
        return max(1, round(float(self._rng.lognormal(self._mu, self._sigma))))


def from_workload(path: str, *, seed: int = 0) -> OutputLengths:
    """Output lengths of any trace the lab reads (Azure, Mooncake, BurstGPT, ShareGPT)."""
    from llmpool.lab.workload import load_trace

    w = load_trace(path, seed=seed)
    return OutputLengths([it.output_tokens for it in w.items], seed=seed)
