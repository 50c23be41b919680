"""The RL router's state encoding: one feature row per action.

The Q-network scores actions, not states: a decision over ``n`` endpoints is ``n + 1`` rows
(one per candidate endpoint, plus the *hold* row), each the concatenation of

* the **request and pool** features, equal in every row: the request's prompt length and
  predicted output-length distribution (paper a's 3 decode buckets 0-256, 256-2048, >=2048),
  the router queue length (capped at 512 as in the paper), how long it has waited, and the
  pool's free batch slots and in-flight load;
* the **endpoint** features of that row's endpoint: in-flight and queued requests, free batch
  slots (paper a's capacity C), KV load, the predicted decode work left, the counts of
  in-flight requests per predicted decode bucket (paper a's D matrix row), the
  latency-impact estimator's terms for placing this request there (own TTFT and decode time,
  the prefill stall and decode slowdown it imposes on the others, the KV-overflow risk), and
  the heuristic's opinion (how much worse than the least-impact endpoint this one scores, and
  whether it is the heuristic's choice);
* ``is_hold``: 1 on the hold row, whose endpoint features are the mean over the endpoints.

One network shared by every endpoint row (a per-endpoint scoring network) means a model
trained on 4 endpoints runs on any pool size, and permuting endpoints permutes the scores.

Every value is normalised to roughly [0, 1] (times through ``log1p``), so one encoder serves
every profile. :data:`FEATURES` is written into every exported model; a model whose list
differs from this module's is refused at load time (and the policy falls back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

FEATURE_VERSION: Final = 1

REQUEST_FEATURES: Final = (
    "req_log_prompt",
    "req_log_expected",
    "req_p_short",
    "req_p_medium",
    "req_p_long",
    "queue_len",
    "req_waited",
    "pool_free_slots",
    "pool_inflight",
    "pool_frac_with_slot",
)
ENDPOINT_FEATURES: Final = (
    "ep_inflight",
    "ep_waiting",
    "ep_free_slots",
    "ep_kv",
    "ep_remaining_work",
    "ep_dec_short",
    "ep_dec_medium",
    "ep_dec_long",
    "est_ttft",
    "est_decode",
    "est_stall",
    "est_slowdown",
    "est_kv_penalty",
    "heur_delta",
    "heur_choice",
    "ep_stale",
)
FEATURES: Final = (*REQUEST_FEATURES, *ENDPOINT_FEATURES, "is_hold")
N_FEATURES: Final = len(FEATURES)
N_REQ: Final = len(REQUEST_FEATURES)
EP0: Final = N_REQ
I_HEUR_DELTA: Final = FEATURES.index("heur_delta")
I_HEUR_CHOICE: Final = FEATURES.index("heur_choice")
I_HOLD: Final = FEATURES.index("is_hold")

QUEUE_CAP: Final = 512  # paper a: 4 x max batch size
BUCKETS: Final = (256, 2048)  # paper a's decode buckets (A.9)


@dataclass(slots=True)
class Candidate:
    """What the heuristic knows about placing the request on one endpoint (seconds)."""

    endpoint: int  # index into view.endpoints
    score: float  # the heuristic's objective (lower is better)
    ttft: float
    decode: float
    stall: float
    slowdown: float
    kv_penalty: float
    inflight: int
    waiting: int
    free_slots: int
    kv_frac: float
    remaining_tokens: float
    dec_buckets: tuple[int, int, int]
    stale: bool


@dataclass(slots=True)
class Situation:
    """The request and pool part of a decision."""

    prompt_tokens: int
    expected_tokens: float
    bucket_probs: tuple[float, float, float]
    queue_len: int
    waited_s: float
    max_hold_s: float
    max_seqs: int
    n_endpoints: int
    total_free: int
    total_inflight: int
    with_slot: int


def bucket_of(tokens: float) -> int:
    """Paper a's decode bucket of a length: 0 (< 256), 1 (< 2048) or 2."""
    return 0 if tokens < BUCKETS[0] else (1 if tokens < BUCKETS[1] else 2)


def three_buckets(
    edges: tuple[int, ...], probs: tuple[float, ...], expected: float
) -> tuple[float, float, float]:
    """A prediction's bucket probabilities on paper a's 3 buckets (a point mass on the
    expected length's bucket when the predictor uses other edges)."""
    if tuple(edges) == BUCKETS and len(probs) == 3:
        return (float(probs[0]), float(probs[1]), float(probs[2]))
    b = bucket_of(expected)
    return (float(b == 0), float(b == 1), float(b == 2))


def _t(seconds: float) -> float:
    return math.log1p(max(seconds, 0.0)) / 4.0


class Encoder:
    """Fills a preallocated ``(max_endpoints + 1, N_FEATURES)`` float32 buffer per decision."""

    def __init__(self, max_endpoints: int) -> None:
        self.max_endpoints = max_endpoints
        self.buf: npt.NDArray[np.float32] = np.zeros((max_endpoints + 1, N_FEATURES), dtype=np.float32)

    def encode(self, sit: Situation, cands: list[Candidate]) -> npt.NDArray[np.float32]:
        """Rows for ``cands`` (in order) then the hold row; returns a view of the buffer."""
        k = len(cands)
        if k > self.max_endpoints:
            raise ValueError(f"{k} candidate endpoints exceed the encoder's {self.max_endpoints}")
        rows = self.buf[: k + 1]
        rows.fill(0.0)
        s = float(max(sit.max_seqs, 1))
        n = float(max(sit.n_endpoints, 1))
        req = (
            math.log1p(sit.prompt_tokens) / 10.0,
            math.log1p(max(sit.expected_tokens, 0.0)) / 10.0,
            sit.bucket_probs[0],
            sit.bucket_probs[1],
            sit.bucket_probs[2],
            min(sit.queue_len, QUEUE_CAP) / QUEUE_CAP,
            min(max(sit.waited_s, 0.0), sit.max_hold_s) / sit.max_hold_s,
            sit.total_free / (n * s),
            min(sit.total_inflight / (n * s), 4.0),
            sit.with_slot / n,
        )
        rows[:, :N_REQ] = req
        best = min((c.score for c in cands), default=0.0)
        denom = max(best, 0.1)
        for i, c in enumerate(cands):
            r = rows[i]
            r[EP0 + 0] = c.inflight / s
            r[EP0 + 1] = min(c.waiting / s, 4.0)
            r[EP0 + 2] = max(c.free_slots, 0) / s
            r[EP0 + 3] = min(c.kv_frac, 2.0)
            r[EP0 + 4] = min(c.remaining_tokens / (s * 256.0), 4.0)
            r[EP0 + 5] = c.dec_buckets[0] / s
            r[EP0 + 6] = c.dec_buckets[1] / s
            r[EP0 + 7] = c.dec_buckets[2] / s
            r[EP0 + 8] = _t(c.ttft)
            r[EP0 + 9] = _t(c.decode)
            r[EP0 + 10] = _t(c.stall)
            r[EP0 + 11] = _t(c.slowdown)
            r[EP0 + 12] = _t(c.kv_penalty)
            r[I_HEUR_DELTA] = min((c.score - best) / denom, 5.0) / 5.0
            r[I_HEUR_CHOICE] = 0.0
            r[EP0 + 15] = float(c.stale)
        if k:
            rows[k, EP0:] = rows[:k, EP0:].mean(axis=0)
            rows[int(np.argmin([c.score for c in cands])), I_HEUR_CHOICE] = 1.0
        rows[k, I_HEUR_CHOICE] = 0.0
        rows[k, I_HOLD] = 1.0
        return rows
