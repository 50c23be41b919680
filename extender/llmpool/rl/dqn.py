"""Double DQN on per-action feature rows (torch, CPU; the ``train`` extra).

A state is a padded ``(R, F)`` block of action rows with a mask (``R`` = the largest pool
trained on + 1); ``Q(s, a) = net(row_a)``. Targets are Double DQN's: the online network picks
the next action, the target network values it. Transitions are stored in a ring buffer with
the index of their successor (successors are newer, so a ring overwrites a transition before
its successor). Demonstration transitions (the heuristic acting, DQfD-style warm start) live
in a separate buffer that is never overwritten and add a large-margin loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from llmpool.rl.features import N_FEATURES
from llmpool.rl.model import Layers


class QNet(nn.Module):
    def __init__(self, hidden: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        dims = (N_FEATURES, *hidden)
        mods: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*mods)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(rows).squeeze(-1)
        return out

    def layers(self) -> Layers:
        """``[(W [in, out], b), ...]`` as float32 numpy (for NumpyQ and the ONNX writer)."""
        lin = [m for m in self.net if isinstance(m, nn.Linear)]
        return [
            (
                m.weight.detach().numpy().T.astype(np.float32).copy(),
                m.bias.detach().numpy().astype(np.float32).copy(),
            )
            for m in lin
        ]


@dataclass(slots=True)
class Batch:
    states: npt.NDArray[np.float32]  # (n, R, F)
    nrows: npt.NDArray[np.int32]  # valid rows per state
    actions: npt.NDArray[np.int32]
    base: npt.NDArray[np.float32]
    h: npt.NDArray[np.float32]
    mix: npt.NDArray[np.float32]
    dt: npt.NDArray[np.float32]
    heur: npt.NDArray[np.int32]


class Replay:
    """A ring of transitions; ``next`` = the successor's slot, or -1 at an episode's end."""

    def __init__(self, capacity: int, rows: int) -> None:
        self.capacity = capacity
        self.rows = rows
        self.states = np.zeros((capacity, rows, N_FEATURES), np.float32)
        self.nrows = np.zeros(capacity, np.int32)
        self.actions = np.zeros(capacity, np.int32)
        self.base = np.zeros(capacity, np.float32)
        self.h = np.zeros(capacity, np.float32)
        self.mix = np.zeros(capacity, np.float32)
        self.dt = np.zeros(capacity, np.float32)
        self.heur = np.zeros(capacity, np.int32)
        self.next = np.full(capacity, -1, np.int64)
        self.pos = 0
        self.size = 0
        self.frozen = 0  # slots [0, frozen) hold demonstrations and are never overwritten

    def freeze(self) -> None:
        """Keep everything stored so far (the demonstrations) for good."""
        self.frozen = self.size
        if self.frozen >= self.capacity // 2:
            raise ValueError(
                f"demonstrations fill {self.frozen} of {self.capacity} replay slots: raise the replay size"
            )
        self.pos = self.frozen

    def is_demo(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = idx < self.frozen
        return out

    def add(self, ep: Batch) -> None:
        """Append one episode's transitions (in decision order)."""
        n = len(ep.actions)
        if n == 0:
            return
        ring = self.capacity - self.frozen
        if n > ring:
            raise ValueError(f"an episode of {n} decisions does not fit a replay of {ring} free slots")
        slots = self.frozen + (self.pos - self.frozen + np.arange(n)) % ring
        r = ep.states.shape[1]
        self.states[slots] = 0.0
        self.states[slots, :r] = ep.states
        self.nrows[slots] = ep.nrows
        self.actions[slots] = ep.actions
        self.base[slots] = ep.base
        self.h[slots] = ep.h
        self.mix[slots] = ep.mix
        self.dt[slots] = ep.dt
        self.heur[slots] = ep.heur
        nxt = np.append(slots[1:], -1)
        self.next[slots] = nxt
        self.pos = int(self.frozen + (self.pos - self.frozen + n) % ring)
        self.size = min(self.size + n, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        out: npt.NDArray[np.int64] = rng.integers(0, self.size, size=n)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("states", "nrows", "actions", "base", "h", "mix", "dt", "heur", "next")
        } | {
            "pos": self.pos,
            "size": self.size,
            "frozen": self.frozen,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k in ("states", "nrows", "actions", "base", "h", "mix", "dt", "heur", "next"):
            getattr(self, k)[...] = d[k]
        self.pos = int(d["pos"])
        self.size = int(d["size"])
        self.frozen = int(d["frozen"])


def masked_q(net: QNet, states: torch.Tensor, nrows: torch.Tensor) -> torch.Tensor:
    """Q for every row, ``-inf`` on padding rows."""
    q = net(states)
    idx = torch.arange(states.shape[1]).unsqueeze(0)
    out: torch.Tensor = q.masked_fill(idx >= nrows.unsqueeze(1), float("-inf"))
    return out


def td_update(
    online: QNet,
    target: QNet,
    opt: torch.optim.Optimizer,
    buf: Replay,
    idx: npt.NDArray[np.int64],
    reward: npt.NDArray[np.float32],
    disc: npt.NDArray[np.float32],
    *,
    demo: npt.NDArray[np.bool_] | None = None,
    margin: float = 0.8,
    demo_weight: float = 1.0,
    clip: float = 10.0,
) -> float:
    """One Double DQN gradient step on transitions ``idx`` with shaped rewards/discounts."""
    s = torch.from_numpy(buf.states[idx])
    n = torch.from_numpy(buf.nrows[idx]).long()
    a = torch.from_numpy(buf.actions[idx]).long()
    nxt = buf.next[idx]
    has_next = nxt >= 0
    q_all = masked_q(online, s, n)
    q = q_all.gather(1, a.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        y = torch.from_numpy(reward.astype(np.float32)).clone()
        if has_next.any():
            j = nxt[has_next]
            s2 = torch.from_numpy(buf.states[j])
            n2 = torch.from_numpy(buf.nrows[j]).long()
            a2 = masked_q(online, s2, n2).argmax(1, keepdim=True)
            v2 = masked_q(target, s2, n2).gather(1, a2).squeeze(1)
            mask = torch.from_numpy(has_next)
            y[mask] += torch.from_numpy(disc.astype(np.float32))[mask] * v2
    loss = nn.functional.smooth_l1_loss(q, y)
    if demo is not None and demo.any():
        dm = torch.from_numpy(demo)
        he = torch.from_numpy(buf.heur[idx]).long()
        marg = torch.full_like(q_all, margin)
        marg.scatter_(1, he.unsqueeze(1), 0.0)
        best = (q_all + marg).max(1).values
        q_e = q_all.gather(1, he.unsqueeze(1)).squeeze(1)
        loss = loss + demo_weight * (best - q_e)[dm].mean()
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    nn.utils.clip_grad_norm_(online.parameters(), clip)
    opt.step()
    return float(loss.item())
