"""Rewards of the three RL variants of paper a, and HuRL's guidance schedule.

Paper a's Eq. 3 is not printed (algorithms.md A.6); this is our reconstruction, in the paper's
terms, for an agent that acts at decision points ``t_0 < t_1 < ...`` (a semi-MDP: decisions
happen on arrivals, completions and router ticks, not on a fixed clock):

* **base** (Baseline RL): ``r_k = (-∫_{t_k}^{t_{k+1}} N(t) dt / tick + r_w * C_k) / norm``, where
  ``N(t)`` is the number of requests in the system (router queue plus engines: paper a's set J
  of scheduled and unscheduled requests), ``C_k`` the completions in ``(t_k, t_{k+1}]``,
  ``r_w = 60`` (A.9) and ``norm`` the pool's batch capacity in sequences. We charge each
  request in the system 1 per tick rather than paper a's ``1 - f_j`` (its fraction complete):
  by Little's law the undiscounted sum of ``-∫N dt`` is exactly minus the total E2E latency,
  the quantity the router is judged on, while ``1 - f_j`` needs a length estimate inside the
  reward. The form is unconfirmed either way (A.6).
* **mixing** (Workload-Aware RL adds it at full weight): ``-(alpha * stall + (1 - alpha) *
  slowdown) / mix_scale`` of the chosen endpoint, from the latency-impact estimator; 0 for hold.
* **heuristic** ``h`` (Workload-Guided RL): how much worse than the least-impact endpoint the
  chosen one scores, ``-min((S_a - S_min) / max(S_min, 0.1), 5)``; 0 for the least-impact
  endpoint; ``-hold_cost`` for hold (the heuristic proposed releasing the request).

HuRL (Cheng et al. 2021) for the guided variant: in training episode ``k`` the reward is
``r + w_k * h`` and the discount ``(1 - w_k) * gamma``, with ``w_k = exp(-beta_d * k)``
(paper a: beta_d = 0.5): early episodes see a short-horizon problem the heuristic solves
well, later ones the original problem. A transition spanning ``dt`` seconds is discounted by
``discount ** (dt / tick)``. The components are stored separately so replayed transitions
are re-shaped with the current episode's weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from llmpool.rl.features import Candidate

Variant = Literal["baseline", "aware", "guided"]
VARIANTS: Final[tuple[Variant, ...]] = ("baseline", "aware", "guided")
VARIANT_TITLES: Final = {
    "baseline": "Baseline RL",
    "aware": "Workload-Aware RL",
    "guided": "Workload-Guided RL",
}

F64 = npt.NDArray[np.float64]


def _integral(sorted_times: F64, prefix: F64, x: F64) -> F64:
    """``∫_0^x #{t_i <= s} ds`` for each x (``prefix[i]`` = sum of the first i times)."""
    idx = np.searchsorted(sorted_times, x, side="right")
    out: F64 = idx * x - prefix[idx]
    return out


def base_rewards(
    decision_times: Sequence[float] | F64,
    arrivals: Sequence[float] | F64,
    finishes: Sequence[float] | F64,
    *,
    tick_s: float,
    completion_reward: float,
    norm: float,
) -> tuple[F64, F64]:
    """Base reward of each decision interval and its length ``dt`` (seconds).

    Interval ``k`` runs from decision ``k`` to decision ``k + 1``; the last runs to the last
    completion (the episode's end). Decision times must be non-decreasing.
    """
    t = np.asarray(decision_times, dtype=np.float64)
    if t.size == 0:
        return np.zeros(0), np.zeros(0)
    if np.any(np.diff(t) < 0):
        raise ValueError("decision times must be non-decreasing")
    arr = np.sort(np.asarray(arrivals, dtype=np.float64))
    fin = np.sort(np.asarray(finishes, dtype=np.float64))
    end = max(float(t[-1]), float(fin[-1]) if fin.size else float(t[-1]))
    edges = np.append(t, end)
    pa = np.concatenate(([0.0], np.cumsum(arr)))
    pf = np.concatenate(([0.0], np.cumsum(fin)))
    in_system = _integral(arr, pa, edges) - _integral(fin, pf, edges)  # ∫_0^edge N(s) ds
    area = np.diff(in_system)
    done = np.diff(np.searchsorted(fin, edges, side="right")).astype(np.float64)
    r = (-area / tick_s + completion_reward * done) / norm
    return r, np.diff(edges)


def heuristic_terms(
    cands: list[Candidate], *, alpha: float, hold_cost: float, mix_scale: float
) -> tuple[F64, F64]:
    """Per action (candidates, then hold): the heuristic term ``h`` and the mixing penalty."""
    k = len(cands)
    h = np.zeros(k + 1)
    mix = np.zeros(k + 1)
    if k == 0:
        return h, mix
    best = min(c.score for c in cands)
    denom = max(best, 0.1)
    for i, c in enumerate(cands):
        h[i] = -min((c.score - best) / denom, 5.0)
        mix[i] = -min((alpha * c.stall + (1.0 - alpha) * c.slowdown) / mix_scale, 5.0)
    h[k] = -hold_cost
    return h, mix


def guidance_weight(variant: Variant, episode: int, beta_d: float) -> float:
    """``w_k``: the heuristic's weight in episode ``k`` (guided only)."""
    return math.exp(-beta_d * episode) if variant == "guided" else 0.0


def shaped(
    variant: Variant,
    base: F64,
    h: F64,
    mix: F64,
    dt: F64,
    *,
    episode: int,
    gamma: float,
    beta_d: float,
    tick_s: float,
) -> tuple[F64, F64]:
    """(reward, discount) of transitions under variant ``variant`` in training episode ``episode``."""
    w = guidance_weight(variant, episode, beta_d)
    if variant == "baseline":
        r = base
    elif variant == "aware":
        r = base + mix
    else:
        r = base + w * h
    g = (1.0 - w) * gamma
    disc: F64 = np.power(g, dt / tick_s) if g > 0 else np.zeros_like(dt)
    return r, disc
