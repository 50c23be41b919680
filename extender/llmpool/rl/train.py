"""``llmpool rl train``: Double DQN for the ``rl`` policy on the lab's simulator.

Each episode samples a workload (the scenario's synthetic mix at a random rate and length,
with a fresh seed) and a pool size, runs the simulator with :class:`~llmpool.rl.policy.RLPolicy`
acting through a numpy copy of the online network (epsilon-greedy, or the heuristic during the
demonstration episodes), computes the rewards of every decision from the run's request log
(:mod:`llmpool.rl.reward`), appends the episode to the replay and takes gradient steps.
Every ``eval_every`` episodes the greedy policy is evaluated on held-out seeds next to
round-robin and the impact heuristic; the best evaluation is exported.

Everything random comes from the seed, torch runs on one thread, and episodes run in order:
the same seed and config give the same weights. A checkpoint (``checkpoint.pt``) is written
every ``checkpoint_every`` episodes and at the end; ``resume=True`` continues from it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmpool.lab.scenarios import SCENARIOS
from llmpool.lab.sim import SimConfig, Simulator, make_rng
from llmpool.lab.workload import load_workload
from llmpool.rl.features import Candidate
from llmpool.rl.model import NumpyQ, write_model
from llmpool.rl.policy import RLParams, RLPolicy
from llmpool.rl.reward import VARIANTS, Variant, base_rewards, guidance_weight, heuristic_terms, shaped
from llmpool.routing import PolicyContext, builtin_registry
from llmpool.routing.profile import PS_PER_S, Profile, load_profile


def _say(msg: str) -> None:
    print(msg, flush=True)


class TrainError(ValueError):
    """Bad training arguments; ``str()`` is one line."""


@dataclass(frozen=True)
class TrainConfig:
    scenario: str = "paper-a"
    variant: Variant = "guided"
    episodes: int = 60
    seed: int = 0
    instances: tuple[int, ...] = ()  # default: the scenario's
    requests: tuple[int, int] = (2000, 4000)  # per episode, uniform
    load: tuple[float, float] = (0.55, 1.05)  # rate as a fraction of the scenario's top rate
    eval_rate: float | None = None  # default: the scenario's top rate
    eval_requests: int = 4000
    eval_seeds: tuple[int, ...] = (1001, 1002)
    eval_every: int = 10
    gamma: float = 0.99  # per tick
    tick_s: float = 0.02
    lr: float = 3e-4
    batch: int = 512
    replay: int = 400_000
    updates_per_decision: float = 0.25
    max_updates_per_episode: int = 2000
    target_update: int = 250
    eps_start: float = 0.2
    eps_episodes: int = 20  # exploration stops after this episode (paper a)
    completion_reward: float = 60.0
    beta_d: float = 0.5
    alpha: float = 0.5
    hold_cost: float = 0.5
    mix_scale: float = 10.0
    demo_episodes: int = 0
    margin: float = 0.8
    demo_weight: float = 1.0
    hidden: tuple[int, ...] = (64, 64)
    max_endpoints: int = 64
    checkpoint_every: int = 5
    allow_hold: bool = True
    max_decisions: int = 60_000  # per episode: a policy that holds everything stops recording here
    heuristic: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.scenario not in SCENARIOS:
            raise TrainError(f"unknown scenario {self.scenario!r}; known: {', '.join(SCENARIOS)}")
        if self.variant not in VARIANTS:
            raise TrainError(f"unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        if self.episodes < 1:
            raise TrainError(f"episodes must be >= 1, got {self.episodes}")
        lo, hi = self.requests
        if not 1 <= lo <= hi:
            raise TrainError(f"requests range {self.requests} must be 1 <= low <= high")
        if not 0 < self.load[0] <= self.load[1]:
            raise TrainError(f"load range {self.load} must be 0 < low <= high")
        if not 0 < self.gamma < 1:
            raise TrainError(f"gamma must be in (0, 1), got {self.gamma}")
        sc = SCENARIOS[self.scenario]
        for n in self.instances:
            if n < 1 or n % sc.group_size:
                raise TrainError(
                    f"instances {n} is not a positive multiple of the group size {sc.group_size}"
                )
            if n > self.max_endpoints:
                raise TrainError(f"instances {n} exceeds max_endpoints {self.max_endpoints}")


@dataclass
class EpisodeStats:
    episode: int
    rate: float
    requests: int
    instances: int
    e2e_mean_s: float
    decisions: int
    holds: int
    ret: float
    epsilon: float
    guidance: float
    loss: float
    wall_s: float


@dataclass
class EvalStats:
    episode: int
    e2e_mean_s: float
    e2e_by_seed: list[float]


class _EpisodeLearner:
    """Chooses actions (epsilon-greedy / heuristic) and keeps the episode's decisions."""

    def __init__(self, rng: random.Random, epsilon: float, demo: bool, cfg: TrainConfig) -> None:
        self.rng = rng
        self.epsilon = epsilon
        self.demo = demo
        self.cfg = cfg
        self.times: list[float] = []
        self.states: list[npt.NDArray[np.float32]] = []
        self.actions: list[int] = []
        self.heur: list[int] = []
        self.h: list[float] = []
        self.mix: list[float] = []

    def choose(self, q: npt.NDArray[np.float32], n_cands: int, heuristic: int) -> int:
        if len(self.actions) >= self.cfg.max_decisions:  # stop exploring a runaway episode
            return heuristic
        if self.demo:
            return heuristic
        if self.epsilon > 0 and self.rng.random() < self.epsilon:
            return self.rng.randrange(min(n_cands + 1, len(q)))
        return int(np.argmax(q[: n_cands + 1]))

    def record(
        self, now: float, rows: npt.NDArray[np.float32], action: int, heuristic: int, cands: list[Candidate]
    ) -> None:
        if len(self.actions) >= self.cfg.max_decisions:
            return  # the rest of the episode is charged to the last recorded decision
        h, mix = heuristic_terms(
            cands, alpha=self.cfg.alpha, hold_cost=self.cfg.hold_cost, mix_scale=self.cfg.mix_scale
        )
        self.times.append(now)
        self.states.append(rows.copy())
        self.actions.append(action)
        self.heur.append(heuristic)
        self.h.append(float(h[action]))
        self.mix.append(float(mix[action]))


def _profile(name: str) -> Profile:
    sc = SCENARIOS[name]
    profile = load_profile(sc.profile)
    if sc.engine_overrides:
        profile = profile.model_copy(update={"engine": profile.engine.with_overrides(**sc.engine_overrides)})
    return profile


def _sim(cfg: TrainConfig, profile: Profile, instances: int, policy: Any, items: Any) -> Any:
    sc = SCENARIOS[cfg.scenario]
    sim_cfg = SimConfig(
        instances=instances,
        group_size=sc.group_size,
        tick_s=cfg.tick_s,
        engine_overrides=dict(sc.engine_overrides),
    )
    return Simulator(profile, policy, sim_cfg).run(items)


def evaluate_policy(
    cfg: TrainConfig, spec: dict[str, Any] | RLPolicy, *, seeds: tuple[int, ...], instances: int | None = None
) -> list[float]:
    """Mean E2E per seed of a policy (a config, or a built RL policy object per seed)."""
    sc = SCENARIOS[cfg.scenario]
    profile = _profile(cfg.scenario)
    rate = cfg.eval_rate or max(sc.rates)
    n_inst = instances or (cfg.instances[0] if cfg.instances else sc.instances)
    out = []
    for seed in seeds:
        wl = load_workload(sc.workload, n=cfg.eval_requests, rate=rate * n_inst / sc.instances, seed=seed)
        truth = {it.request.id: it.output_tokens for it in wl.items}.get
        ctx = PolicyContext(rng=make_rng(seed, "policy"), truth=truth, profile=profile)
        pol = spec if isinstance(spec, RLPolicy) else builtin_registry().build(spec, ctx)
        out.append(_sim(cfg, profile, n_inst, pol, wl.items).summary.e2e_mean_s)
    return out


class Trainer:
    """One training run in ``out`` (see the module doc)."""

    def __init__(
        self, cfg: TrainConfig, out: Path, *, resume: bool = False, log: Callable[[str], None] = _say
    ) -> None:
        import torch

        from llmpool.rl.dqn import QNet, Replay

        cfg.check()
        self.cfg = cfg
        self.out = out
        self.log = log
        out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        self.torch = torch
        sc = SCENARIOS[cfg.scenario]
        self.instances = cfg.instances or (sc.instances,)
        self.profile = _profile(cfg.scenario)
        self.online = QNet(cfg.hidden)
        self.target = QNet(cfg.hidden)
        self.target.load_state_dict(self.online.state_dict())
        self.opt = torch.optim.Adam(self.online.parameters(), lr=cfg.lr)
        self.replay = Replay(cfg.replay, max(self.instances) + 1)
        self.rng = np.random.default_rng(cfg.seed)
        self.episode = 0
        self.updates = 0
        self.history: list[EpisodeStats] = []
        self.evals: list[EvalStats] = []
        self.reference: dict[str, list[float]] = {}
        self.best: tuple[float, int] | None = None
        self.elapsed = 0.0  # wall seconds spent training, over every resumed run
        if resume:
            self._load()

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save(self) -> None:
        torch = self.torch
        state = {
            "config": asdict(self.cfg),
            "episode": self.episode,
            "updates": self.updates,
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "opt": self.opt.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "history": [asdict(h) for h in self.history],
            "evals": [asdict(e) for e in self.evals],
            "reference": self.reference,
            "best": self.best,
            "elapsed": self.elapsed,
            "replay": self.replay.state_dict(),
        }
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt)

    def _load(self) -> None:
        torch = self.torch
        if not self.ckpt.is_file():
            raise TrainError(f"--resume: no checkpoint at {self.ckpt}")
        try:
            state = torch.load(self.ckpt, weights_only=False)
        except Exception as err:  # torch raises several types for a bad file
            raise TrainError(f"--resume: cannot read {self.ckpt}: {type(err).__name__}: {err}") from None
        saved = dict(state["config"])
        mine = asdict(self.cfg)
        # settings a checkpoint predates take their defaults
        differ = [k for k in mine if k != "episodes" and k in saved and _norm(saved[k]) != _norm(mine[k])]
        if differ:
            raise TrainError(
                f"--resume: the checkpoint was trained with different settings: {', '.join(sorted(differ))}"
            )
        self.episode = int(state["episode"])
        self.updates = int(state["updates"])
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.history = [EpisodeStats(**h) for h in state["history"]]
        self.evals = [EvalStats(**e) for e in state["evals"]]
        self.reference = state["reference"]
        self.best = tuple(state["best"]) if state["best"] else None
        self.elapsed = float(state["elapsed"])
        self.replay.load_state_dict(state["replay"])
        self.log(f"resumed from {self.ckpt} at episode {self.episode}")

    # ------------------------------------------------------------------ episodes
    def epsilon(self, k: int) -> float:
        c = self.cfg
        if k < c.demo_episodes:
            return 0.0
        j = k - c.demo_episodes
        return c.eps_start * max(0.0, 1.0 - j / c.eps_episodes) if c.eps_episodes > 0 else 0.0

    def _policy(self, ctx: PolicyContext, learner: Any | None) -> RLPolicy:
        params = RLParams(
            max_endpoints=self.cfg.max_endpoints,
            heuristic=dict(self.cfg.heuristic),
            allow_hold=self.cfg.allow_hold,
        )
        return RLPolicy(params, ctx, scorer=NumpyQ(self.online.layers()), learner=learner)

    def run_episode(self) -> EpisodeStats:
        cfg = self.cfg
        k = self.episode
        sc = SCENARIOS[cfg.scenario]
        t0 = time.perf_counter()
        rng = self.rng
        n_inst = int(self.instances[int(rng.integers(len(self.instances)))])
        top = max(sc.rates) * n_inst / sc.instances
        rate = float(rng.uniform(cfg.load[0], cfg.load[1]) * top)
        n_req = int(rng.integers(cfg.requests[0], cfg.requests[1] + 1))
        wl_seed = int(rng.integers(1 << 30))
        wl = load_workload(sc.workload, n=n_req, rate=rate, seed=wl_seed)
        truth = {it.request.id: it.output_tokens for it in wl.items}.get
        ctx = PolicyContext(rng=make_rng(wl_seed, "policy"), truth=truth, profile=self.profile)
        demo = k < cfg.demo_episodes
        eps = self.epsilon(k)
        learner = _EpisodeLearner(random.Random(wl_seed), eps, demo, cfg)
        result = _sim(cfg, self.profile, n_inst, self._policy(ctx, learner), wl.items)
        lg = result.log
        arrivals = np.frombuffer(lg.arrival, np.int64) / PS_PER_S
        finishes = np.frombuffer(lg.finish, np.int64) / PS_PER_S
        norm = float(n_inst * self.profile.engine.max_num_seqs)
        base, dt = base_rewards(
            learner.times,
            arrivals,
            finishes,
            tick_s=cfg.tick_s,
            completion_reward=cfg.completion_reward,
            norm=norm,
        )
        from llmpool.rl.dqn import Batch

        n = len(learner.actions)
        if n:
            rows = max(s.shape[0] for s in learner.states)
            states = np.zeros((n, rows, learner.states[0].shape[1]), np.float32)
            nrows = np.zeros(n, np.int32)
            for i, s in enumerate(learner.states):
                states[i, : s.shape[0]] = s
                nrows[i] = s.shape[0]
            self.replay.add(
                Batch(
                    states=states,
                    nrows=nrows,
                    actions=np.asarray(learner.actions, np.int32),
                    base=base.astype(np.float32),
                    h=np.asarray(learner.h, np.float32),
                    mix=np.asarray(learner.mix, np.float32),
                    dt=dt.astype(np.float32),
                    heur=np.asarray(learner.heur, np.int32),
                )
            )
            if demo and k == cfg.demo_episodes - 1:
                self.replay.freeze()
        loss = self._learn(n)
        r, _ = shaped(
            cfg.variant,
            base,
            np.asarray(learner.h),
            np.asarray(learner.mix),
            dt,
            episode=k,
            gamma=cfg.gamma,
            beta_d=cfg.beta_d,
            tick_s=cfg.tick_s,
        )
        holds = sum(1 for a, s in zip(learner.actions, learner.states, strict=True) if a == s.shape[0] - 1)
        stats = EpisodeStats(
            episode=k,
            rate=round(rate, 2),
            requests=n_req,
            instances=n_inst,
            e2e_mean_s=round(result.summary.e2e_mean_s, 4),
            decisions=n,
            holds=holds,
            ret=round(float(r.sum()), 3),
            epsilon=round(eps, 4),
            guidance=round(guidance_weight(cfg.variant, k, cfg.beta_d), 4),
            loss=round(loss, 5),
            wall_s=round(time.perf_counter() - t0, 2),
        )
        self.history.append(stats)
        self.episode += 1
        return stats

    def _learn(self, decisions: int) -> float:
        cfg = self.cfg
        if self.replay.size < min(cfg.batch, 256):
            return math.nan
        from llmpool.rl.dqn import td_update

        n_up = min(cfg.max_updates_per_episode, max(1, round(cfg.updates_per_decision * decisions)))
        k = self.episode
        buf = self.replay
        losses = []
        for _ in range(n_up):
            idx = buf.sample(self.rng, cfg.batch)
            r, disc = shaped(
                cfg.variant,
                buf.base[idx].astype(np.float64),
                buf.h[idx].astype(np.float64),
                buf.mix[idx].astype(np.float64),
                buf.dt[idx].astype(np.float64),
                episode=k,
                gamma=cfg.gamma,
                beta_d=cfg.beta_d,
                tick_s=cfg.tick_s,
            )
            demo = buf.is_demo(idx) if buf.frozen else None
            losses.append(
                td_update(
                    self.online,
                    self.target,
                    self.opt,
                    buf,
                    idx,
                    r.astype(np.float32),
                    disc.astype(np.float32),
                    demo=demo,
                    margin=cfg.margin,
                    demo_weight=cfg.demo_weight,
                )
            )
            self.updates += 1
            if self.updates % cfg.target_update == 0:
                self.target.load_state_dict(self.online.state_dict())
        return float(np.mean(losses))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> EvalStats:
        cfg = self.cfg
        sc = SCENARIOS[cfg.scenario]
        if not self.reference:
            for name in ("round-robin", "impact"):
                self.reference[name] = evaluate_policy(cfg, {"name": name}, seeds=cfg.eval_seeds)
        per_seed = []
        for seed in cfg.eval_seeds:
            ctx = PolicyContext(rng=make_rng(seed, "policy"), truth=None, profile=self.profile)
            pol = self._policy(ctx, None)
            per_seed.extend(evaluate_policy(cfg, pol, seeds=(seed,), instances=self.instances[0]))
        del sc
        ev = EvalStats(self.episode, round(float(np.mean(per_seed)), 4), [round(x, 4) for x in per_seed])
        self.evals.append(ev)
        return ev

    def export(self, path: Path, extra: dict[str, Any]) -> Path:
        cfg = self.cfg
        meta = {
            "max_endpoints": cfg.max_endpoints,
            "variant": cfg.variant,
            "scenario": cfg.scenario,
            "trained_instances": list(self.instances),
            "episodes": self.episode,
            "seed": cfg.seed,
            "allow_hold": cfg.allow_hold,
            "train_config": {
                k: _norm(getattr(cfg, k))
                for k in ("gamma", "tick_s", "demo_episodes", "beta_d", "completion_reward", "lr", "hidden")
            },
            **extra,
        }
        return write_model(path, self.online.layers(), meta)


def _norm(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Run (or continue) a training run; returns the summary written to ``out/summary.json``."""
    import torch
    from tqdm import tqdm

    from llmpool.rl.plots import plot_curves

    tr = Trainer(cfg, out, resume=resume, log=log)
    t_last = time.perf_counter()
    bar = tqdm(
        total=cfg.episodes, initial=tr.episode, unit="ep", desc=f"rl {cfg.variant}", disable=not progress
    )
    while tr.episode < cfg.episodes:
        st = tr.run_episode()
        bar.update(1)
        bar.set_postfix(e2e=f"{st.e2e_mean_s:.2f}s", eps=st.epsilon, w=st.guidance, refresh=False)
        if not progress:
            log(
                f"episode {st.episode + 1}/{cfg.episodes}: {st.instances} endpoints, {st.rate:.0f} req/s,"
                f" {st.requests} requests: E2E {st.e2e_mean_s:.3f} s, {st.decisions} decisions"
                f" ({st.holds} holds), eps {st.epsilon:.3f}, w {st.guidance:.3f}, loss {st.loss:.4f},"
                f" {st.wall_s:.1f} s"
            )
        if tr.episode % cfg.eval_every == 0 or tr.episode == cfg.episodes:
            ev = tr.evaluate()
            rr = float(np.mean(tr.reference["round-robin"]))
            imp = float(np.mean(tr.reference["impact"]))
            tag = ""
            if tr.best is None or ev.e2e_mean_s < tr.best[0]:
                tr.best = (ev.e2e_mean_s, tr.episode)
                tr.export(out / "model.onnx", {"eval_e2e_mean_s": ev.e2e_mean_s})
                torch.save(tr.online.state_dict(), out / "best.pt")
                tag = " (best)"
            (bar.write if progress else log)(
                f"episode {tr.episode}: eval E2E {ev.e2e_mean_s:.3f} s"
                f"  vs RR {100 * (ev.e2e_mean_s / rr - 1):+.1f}%"
                f"  vs impact {100 * (ev.e2e_mean_s / imp - 1):+.1f}%{tag}"
            )
        now = time.perf_counter()
        tr.elapsed += now - t_last
        t_last = now
        if tr.episode % cfg.checkpoint_every == 0 or tr.episode == cfg.episodes:
            tr._save()
    bar.close()
    tr.export(out / "last.onnx", {})
    summary = {
        "config": _norm(asdict(cfg)),
        "episodes": tr.episode,
        "updates": tr.updates,
        "elapsed_s": round(tr.elapsed, 1),
        "best": {"eval_e2e_mean_s": tr.best[0], "episode": tr.best[1]} if tr.best else None,
        "reference": {k: float(np.mean(v)) for k, v in tr.reference.items()},
        "evals": [asdict(e) for e in tr.evals],
        "history": [asdict(h) for h in tr.history],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot_curves(summary, out / "learning-curve.png")
    return summary


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
