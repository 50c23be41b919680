"""``llmpool rl``: train the heuristic-guided RL router and inspect model files.

    llmpool rl train --scenario paper-a --episodes 120 --out runs/wg
    llmpool rl train --scenario paper-a --episodes 200 --out runs/wg --resume
    llmpool rl info runs/wg/model.onnx

Training needs the ``train`` extra (torch, CPU build). The trained model runs in the lab and
the picker as the ``rl`` policy: ``llmpool bench --policies 'rl:{"model": "runs/wg/model.onnx"}'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


class RLCliError(ValueError):
    """A usage error; ``str()`` is one line."""


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _ints(text: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return v


def _range(text: str, kind: type = float) -> tuple[Any, Any]:
    parts = text.split(",")
    try:
        lo, hi = (kind(p) for p in parts) if len(parts) == 2 else (kind(text), kind(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH or one number, got {text!r}") from None
    if lo <= 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return lo, hi


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from llmpool.lab.scenarios import SCENARIOS
    from llmpool.rl.reward import VARIANTS

    p: argparse.ArgumentParser = subparsers.add_parser(
        "rl", help="train the heuristic-guided RL router (paper a's WG-RL)"
    )
    sub = p.add_subparsers(dest="rl_command", required=True, metavar="{train,info}")
    t = sub.add_parser(
        "train",
        help="Double DQN on the lab's simulator; exports model.onnx (needs the train extra)",
        description="Train the rl policy. Writes DIR/model.onnx (best held-out evaluation), last.onnx, "
        "checkpoint.pt (resumable), summary.json and learning-curve.png.",
    )
    t.add_argument(
        "--scenario", default="paper-a", choices=sorted(SCENARIOS), help="lab scenario (default paper-a)"
    )
    t.add_argument(
        "--episodes",
        type=_pos_int,
        required=True,
        help="total training episodes (with --resume: the new total)",
    )
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument(
        "--variant", default="guided", choices=VARIANTS, help="reward variant (default guided = WG-RL)"
    )
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    t.add_argument(
        "--instances", type=_ints, help="pool sizes sampled per episode, e.g. 4,8 (default: the scenario's)"
    )
    t.add_argument(
        "--requests", type=lambda s: _range(s, int), help="requests per episode, LOW,HIGH (default 2000,4000)"
    )
    t.add_argument(
        "--load", type=_range, help="episode rate as a fraction of the scenario's top rate, LOW,HIGH"
    )
    t.add_argument(
        "--demo-episodes", type=int, default=None, help="episodes where the heuristic acts (DQfD warm start)"
    )
    t.add_argument(
        "--eval-every", type=_pos_int, help="evaluate on held-out seeds every N episodes (default 10)"
    )
    t.add_argument("--eval-requests", type=_pos_int, help="requests per evaluation run (default 4000)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 3e-4)")
    t.add_argument("--gamma", type=float, help="discount per 20 ms tick (default 0.99)")
    t.add_argument(
        "--no-hold", action="store_true", help="train without the hold action (endpoint choice only)"
    )
    t.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run, rl_func=_train)
    i = sub.add_parser("info", help="check a model file and print its metadata")
    i.add_argument("model", help="a packaged model name (paper-a) or an .onnx path")
    i.add_argument(
        "--bench",
        type=_ints,
        metavar="N,...",
        help="also time the network (onnxruntime, one thread) on pools of N endpoints, e.g. 4,16,64",
    )
    i.set_defaults(func=run, rl_func=_info)
    return p


def run(args: argparse.Namespace) -> int:
    from llmpool.rl.model import RLModelError

    try:
        rc: int = args.rl_func(args)
        return rc
    except (RLModelError, RLCliError) as err:
        print(f"llmpool rl: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RLCliError(
            "training needs torch: pip install -e '.[train]' (the CPU build, torch==2.13.0)"
        ) from None
    from llmpool.rl.train import TrainConfig, TrainError, train, with_overrides

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RLCliError(f"--out {out} exists and is not a directory")
    if not args.resume and (out / "checkpoint.pt").exists():
        raise RLCliError(
            f"--out {out} already holds a training run: pass --resume, or choose another directory"
        )
    cfg = with_overrides(
        TrainConfig(scenario=args.scenario, variant=args.variant, episodes=args.episodes, seed=args.seed),
        instances=args.instances,
        requests=args.requests,
        load=args.load,
        demo_episodes=args.demo_episodes,
        eval_every=args.eval_every,
        eval_requests=args.eval_requests,
        lr=args.lr,
        gamma=args.gamma,
        allow_hold=False if args.no_hold else None,
    )
    try:
        summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except TrainError as err:
        raise RLCliError(str(err)) from None
    best = summary["best"]
    ref = summary["reference"]
    print(f"trained {summary['episodes']} episodes in {summary['elapsed_s'] / 60:.1f} min")
    if best:
        rr, imp = ref["round-robin"], ref["impact"]
        e = best["eval_e2e_mean_s"]
        print(
            f"best held-out mean E2E {e:.3f} s at episode {best['episode']}: "
            f"{100 * (e / rr - 1):+.1f}% vs round-robin ({rr:.3f} s), "
            f"{100 * (e / imp - 1):+.1f}% vs impact ({imp:.3f} s)"
        )
    print(f"model: {out / 'model.onnx'}  curves: {out / 'learning-curve.png'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from llmpool.rl.model import load_model

    m = load_model(args.model)
    meta = {k: v for k, v in m.meta.items() if k != "features"}
    meta["features"] = len(m.meta["features"])
    print(f"{m.path}: ok")
    print(json.dumps(meta, indent=1, sort_keys=True))
    if args.bench:
        import time

        import numpy as np

        from llmpool.rl.features import N_FEATURES

        rng = np.random.default_rng(0)
        print(f"{'endpoints':>9s} {'p50 us':>8s} {'p99 us':>8s} {'max us':>8s}  (network only, 5000 calls)")
        for n in args.bench:
            rows = rng.uniform(0, 1, (n + 1, N_FEATURES)).astype(np.float32)
            for _ in range(200):
                m.scores(rows)
            t = np.empty(5000)
            for k in range(len(t)):
                t0 = time.perf_counter_ns()
                m.scores(rows)
                t[k] = (time.perf_counter_ns() - t0) / 1000.0
            p50, p99 = np.percentile(t, [50, 99])
            print(f"{n:9d} {p50:8.1f} {p99:8.1f} {t.max():8.1f}")
    return 0
