"""``llmpool predictor``: train and evaluate the learned output-length predictor.

    llmpool predictor train --data ../shared/data/prompts --tier fast --out fast.onnx
    llmpool predictor eval  --data ../shared/data/prompts --model fast --out-dir predictor-eval

Training splits by prompt (``--seed``, ``--test-fraction``) and fits on the training side only;
the model's metadata records the split, and ``eval`` uses the same one (it refuses a different
split, which would score prompts the model was trained on).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

from llmpool.predict import PredictError

__all__ = ["add_parser", "run"]


def _edges(text: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bucket edges must be comma-separated integers, got {text!r}"
        ) from None
    if not v or any(e < 1 for e in v) or any(b <= a for a, b in pairwise(v)):
        raise argparse.ArgumentTypeError(f"bucket edges must be positive and increasing, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a prompts directory like ../shared/data/prompts "
        "(AlpacaEval instructions + output lengths, SmolLM2 outputs)",
    )
    p.add_argument(
        "--jsonl",
        metavar="FILE",
        action="append",
        default=[],
        help="a JSONL file of {prompt, model, output_tokens[, prompt_tokens, max_tokens, task]} (repeatable)",
    )
    p.add_argument("--models", metavar="A,B", help="keep only these target models (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by prompt (default 0)")
    p.add_argument("--test-fraction", type=_fraction, default=0.2, help="prompts held out (default 0.2)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``predictor`` (with ``train`` and ``eval``) to the ``llmpool`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "predictor", help="train and evaluate the learned output-length predictor (docs/predictor.md)"
    )
    sub = p.add_subparsers(dest="predictor_command", metavar="ACTION", parser_class=type(p))
    sub.required = True

    t = sub.add_parser("train", help="train a tier on a split by prompt and write model.onnx + model.json")
    _data_args(t)
    t.add_argument("--tier", choices=("fast", "encoder"), default="fast")
    t.add_argument(
        "--out", metavar="PATH", required=True, help="the .onnx file to write (metadata beside it)"
    )
    t.add_argument("--edges", type=_edges, default=(256, 2048), help="bucket edges (default 256,2048)")
    t.add_argument("--alpha", type=float, default=1000.0, help="fast: ridge penalty (default 1000)")
    t.add_argument(
        "--C", dest="c", type=float, default=0.01, help="fast: logistic inverse penalty (default 0.01)"
    )
    t.add_argument("--hash-bits", type=int, default=12, help="fast: n-gram hash slots 2^bits (default 12)")
    t.add_argument("--max-length", type=int, default=256, help="encoder: tokens per prompt (default 256)")
    t.add_argument(
        "--layers",
        type=_edges,
        default=(4, 5),
        help="encoder: layers (1-6) whose mean-pooled states feed the head; deeper ones are not run "
        "(default 4,5)",
    )
    t.add_argument(
        "--ridge", type=float, default=None, help="encoder: kernel head penalty (default: 5-fold CV)"
    )
    t.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="encoder: epochs of full fine-tuning (default 3; 0 freezes the encoder: head only, ~20 s)",
    )
    t.add_argument("--lr", type=float, default=5e-5, help="encoder: fine-tuning learning rate (default 5e-5)")
    t.add_argument(
        "--schedule",
        choices=("constant", "linear"),
        default="linear",
        help="encoder: fine-tuning learning rate: linear (10 %% warm-up, decay to 0; default) or constant",
    )
    t.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="encoder: seed of the cross-validation folds and the fine-tuning order (default: --seed, "
        "which also seeds the split)",
    )
    t.set_defaults(func=run, predictor_func=_train)

    e = sub.add_parser("eval", help="score model files and baselines on prompts unseen in training")
    _data_args(e)
    e.add_argument(
        "--model",
        metavar="PATH",
        action="append",
        default=[],
        help="a model .onnx, or 'fast' for the packaged fast tier (repeatable; default fast)",
    )
    e.add_argument(
        "--out-dir",
        metavar="DIR",
        default="predictor-eval",
        help="where eval.json and reliability.png go (default predictor-eval)",
    )
    e.add_argument("--latency-n", type=int, default=2000, help="requests timed per model (default 2000)")
    e.add_argument(
        "--horizon",
        type=int,
        default=32,
        help="termination is scored as 'ends within this many tokens' (BR-H's horizon; default 32)",
    )
    e.add_argument(
        "--cut",
        metavar="N[,N...]",
        default="",
        help="also score each encoder model with the prompt cut to N tokens (the picker's "
        "encoder_max_length), e.g. 64,128",
    )
    e.set_defaults(func=run, predictor_func=_eval)

    b = sub.add_parser("bench", help="per-request inference latency of model files on one core")
    _data_args(b)
    b.add_argument(
        "--model",
        metavar="PATH",
        action="append",
        default=[],
        help="a model .onnx, or 'fast' (repeatable; default fast)",
    )
    b.add_argument("-n", type=int, default=5000, help="requests timed per model and length (default 5000)")
    b.set_defaults(func=run, predictor_func=_bench)

    lab = sub.add_parser(
        "lab", help="impact and brh in the simulator with survival, learned and oracle predictors"
    )
    _data_args(lab)
    lab.add_argument(
        "--target",
        metavar="MODEL[,MODEL...]",
        default="gpt4_1106_preview",
        help="the generators whose answer lengths the requests have, one workload each "
        "(default gpt4_1106_preview)",
    )
    lab.add_argument(
        "--model",
        metavar="PATH",
        action="append",
        default=[],
        help="a learned model .onnx, or 'fast' (repeatable: each is one variant; default fast)",
    )
    lab.add_argument(
        "--learned-params",
        metavar="JSON",
        help="more parameters of every learned variant's predictor, e.g. '{\"encoder_max_length\": 64}' "
        "(the model is --model's)",
    )
    lab.add_argument(
        "--shuffled",
        action="store_true",
        help="also run each learned model as a control, shuffled:<model>, that answers every request "
        "for another prompt of the workload: the same predictions, no information about the request",
    )
    lab.add_argument(
        "--policies",
        default="impact,brh",
        help="comma-separated, each a name or name:{json params}, e.g. 'brh:{\"horizon\": 64}' "
        "(default impact,brh)",
    )
    lab.add_argument(
        "--baselines",
        metavar="POLICIES",
        default="",
        help="more policies run as they are on the same workloads and seeds, e.g. 'round-robin,jsq,br0' "
        "(each a name or name:{json params}); printed with their difference from each policy's survival",
    )
    offered = lab.add_mutually_exclusive_group()
    offered.add_argument("--rate", type=float, help="arrivals per second, every target (default 30)")
    offered.add_argument(
        "--load",
        type=float,
        metavar="TOKENS_PER_S",
        help="instead of --rate: output tokens per second; each target's rate is this over its mean "
        "answer length, so targets with short and long answers get the same decode work",
    )
    lab.add_argument("--requests", type=int, default=3000, help="requests per run (default 3000)")
    lab.add_argument("--runs", type=int, default=3, help="seeds (default 3)")
    lab.add_argument("--instances", type=int, default=4, help="endpoints (default 4)")
    lab.add_argument("--profile", default="a100-llama3-8b", help="step-cost profile (default a100-llama3-8b)")
    lab.add_argument("--group-size", type=int, default=1, help="data-parallel barrier group size (default 1)")
    lab.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    lab.set_defaults(func=run, predictor_func=_lab)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a ``predictor`` action; errors are one line on stderr (exit 2)."""
    try:
        rc: int = args.predictor_func(args)
        return rc
    except PredictError as err:
        print(f"llmpool: error: {err}", file=sys.stderr)
        return 2


def _load(args: argparse.Namespace) -> list[Any]:
    from llmpool.predict.data import load_data_dir, load_jsonl

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if not args.data and not args.jsonl:
        raise PredictError("no data: give --data DIR and/or --jsonl FILE")
    out: list[Any] = []
    if args.data:
        out += load_data_dir(args.data, models=models)
    for f in args.jsonl:
        rows = load_jsonl(f)
        out += [r for r in rows if models is None or r.model in models]
    if not out:
        raise PredictError("no examples left after --models")
    return out


def _train(args: argparse.Namespace) -> int:
    from llmpool.predict.data import split_by_prompt

    examples = _load(args)
    train, test = split_by_prompt(examples, args.test_fraction, args.seed)
    split = {"seed": args.seed, "test_fraction": args.test_fraction}
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise PredictError(f"--out must end in .onnx, got {out}")
    if not args.alpha > 0 or not args.c > 0 or (args.ridge is not None and not args.ridge > 0):
        raise PredictError("--alpha, --C and --ridge must be positive")
    if args.epochs < 0 or not args.lr > 0:
        raise PredictError(f"--epochs must be >= 0 and --lr positive, got {args.epochs} and {args.lr}")
    if not 8 <= args.max_length <= 512:
        raise PredictError(f"--max-length must be in [8, 512], got {args.max_length}")
    if args.tier == "fast":
        from llmpool.predict.train import export_fast, train_fast

        res = train_fast(
            train,
            edges=args.edges,
            seed=args.seed,
            hash_bits=args.hash_bits,
            alpha=args.alpha,
            c=args.c,
            progress=True,
        )
        res.info["split"] = split
        path = export_fast(res, out)
    else:
        from llmpool.predict.encoder import train_encoder

        path = train_encoder(
            train,
            out,
            edges=args.edges,
            seed=args.seed if args.train_seed is None else args.train_seed,
            max_length=args.max_length,
            alpha=args.ridge,
            layers=args.layers,
            epochs=args.epochs,
            lr=args.lr,
            schedule=args.schedule,
            split=split,
        )
    print(
        f"wrote {path} and {path.with_suffix('.json').name} "
        f"({len(train)} training rows; {len(test)} held-out rows on unseen prompts)"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os

    from llmpool.predict.data import split_by_prompt
    from llmpool.predict.evaluate import latency
    from llmpool.predict.runtime import EncoderModel, load_model

    _, test = split_by_prompt(_load(args), args.test_fraction, args.seed)
    rng = random.Random(0)
    sample = rng.sample(test, min(len(test), max(args.n, 1)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(sample)} held-out requests; onnxruntime intra_op_num_threads=1; load average {load:.2f}")
    for path in args.model or ["fast"]:
        m = load_model(path)
        lengths: list[int | None] = [64, 128, 256] if isinstance(m, EncoderModel) else [None]
        for n in lengths:
            lat = latency(m, sample, n=args.n, max_length=n)
            at = f" @{n} tokens" if n else ""
            print(f"{m.tier}:{m.path.name}{at}: p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, "
                  f"mean {lat['mean_ms']:.3f} ms ({lat['n']} requests)")  # fmt: skip
    return 0


def _plus_minus(mean: float, sd: float) -> str:
    big = max(abs(mean), sd)
    digits = 0 if big >= 100 else 2 if big >= 1 else 4
    return f"{mean:+.{digits}f}±{sd:.{digits}f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PredictError(f"{flag}: not JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(value, dict):
        raise PredictError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def _lab(args: argparse.Namespace) -> int:
    from llmpool.predict.data import split_by_prompt
    from llmpool.predict.lab import METRICS, run_lab, target_rates
    from llmpool.predict.runtime import load_model

    paths = args.model or ["fast"]
    want = {"seed": args.seed, "test_fraction": args.test_fraction}
    for path in paths:
        m = load_model(path)
        split = m.meta.get("trained", {}).get("split")
        if split is not None and split != want:
            raise PredictError(
                f"{m.path} was trained on split {split}, not {want}: pass the same --seed/--test-fraction"
            )
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if not targets:
        raise PredictError("--target: no target model given")
    if len(set(targets)) != len(targets):
        raise PredictError(f"--target: a target model is given twice: {args.target}")
    _, test = split_by_prompt(_load(args), args.test_fraction, args.seed)
    from llmpool.lab.bench import split_policies

    policies = split_policies(args.policies)
    baselines = split_policies(args.baselines) if args.baselines.strip() else []
    learned_params = _json_object(args.learned_params, "--learned-params") if args.learned_params else {}
    rate = None if args.load is not None else (args.rate if args.rate is not None else 30.0)
    res = run_lab(
        test, target_rates(test, targets, rate=rate, load=args.load),
        predictor_models=paths, learned_params=learned_params, shuffled=args.shuffled, policies=policies,
        baselines=baselines, requests=args.requests, seeds=args.runs,
        instances=args.instances, profile_name=args.profile, group_size=args.group_size,
    )  # fmt: skip
    width = max(10, *(len(v) for v in res["targets"][targets[0]]["policies"][policies[0]]["means"]))
    for target, per in res["targets"].items():
        print(f"target {target}, {args.requests} requests at {per['rate']:.1f}/s on {args.instances} "
              f"endpoints ({args.profile}), {args.runs} seeds; prompts unseen in training")  # fmt: skip
        for pol, r in per["policies"].items():
            print(f"{pol}:")
            print(
                f"  {'':{width}s}"
                + "".join(f"{k.replace('throughput_window', 'tput'):>17s}" for k in METRICS)
            )
            for var, means in r["means"].items():
                print(f"  {var:{width}s}" + "".join(f"{means[k]:17.3f}" for k in METRICS))
            for var, gaps in r["gap_closed"].items():
                cells = ["no gap" if gaps[k] is None else f"{gaps[k] * 100:.0f}%" for k in METRICS]
                print(f"  {'gap closed, ' + var:{width}s}" + "".join(f"{c:>17s}" for c in cells))
            print("  minus survival on the same seed, mean ± std over seeds:")
            for var, diffs in r["vs_survival"].items():
                cells = [_plus_minus(*diffs[k]) for k in METRICS]
                print(f"  {var:{width}s}" + "".join(f"{c:>17s}" for c in cells))
        for b, r in per.get("baselines", {}).items():
            print(f"baseline {b}:")
            print(f"  {'mean':{width}s}" + "".join(f"{r['means'][k]:17.3f}" for k in METRICS))
            for pol, diffs in r["vs_survival"].items():
                cells = [_plus_minus(*diffs[k]) for k in METRICS]
                print(f"  {'minus ' + pol + ' survival':{width}s}" + "".join(f"{c:>17s}" for c in cells))
    if len(targets) > 1:
        print(f"pooled over {len(targets)} targets (the sum of each saving over the sum of the oracle's):")
        for pol, per_var in res["pooled"].items():
            for var, gaps in per_var.items():
                cells = ["no gap" if gaps[k] is None else f"{gaps[k] * 100:.0f}%" for k in METRICS]
                print(f"  {pol + ', ' + var:{width + 8}s}" + "".join(f"{c:>17s}" for c in cells))
                iv = res["pooled_interval"][pol][var]
                cells = [
                    "-" if iv[k] is None else f"{iv[k][0] * 100:.0f}..{iv[k][1] * 100:.0f}%" for k in METRICS
                ]
                print(f"  {'  90% over seeds':{width + 8}s}" + "".join(f"{c:>17s}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from llmpool.predict.data import split_by_prompt
    from llmpool.predict.evaluate import (
        baseline_spreads,
        baselines,
        latency,
        metrics,
        reliability_plot,
        termination_metrics,
    )
    from llmpool.predict.runtime import EncoderModel, load_model

    paths = args.model or ["fast"]
    loaded = [load_model(p) for p in paths]
    for m in loaded:
        split = m.meta.get("trained", {}).get("split")
        want = {"seed": args.seed, "test_fraction": args.test_fraction}
        if split is not None and split != want:
            raise PredictError(
                f"{m.path} was trained on split {split}, not {want}: pass the same --seed/--test-fraction"
            )
    edges = loaded[0].edges
    if any(m.edges != edges for m in loaded):
        raise PredictError("the models have different bucket edges; evaluate them separately")
    examples = _load(args)
    train, test = split_by_prompt(examples, args.test_fraction, args.seed)
    results = baselines(train, test, edges)
    rows = [(e.prompt, e.prompt_tokens, e.max_tokens, e.model, e.task) for e in test]
    try:
        cuts = sorted({int(c) for c in args.cut.split(",") if c.strip()})
    except ValueError:
        raise PredictError(f"--cut: expected token counts like 64,128, got {args.cut!r}") from None
    if any(not 8 <= c <= 512 for c in cuts):
        raise PredictError(f"--cut: each token count must be in [8, 512], got {args.cut!r}")
    if args.horizon < 1:
        raise PredictError(f"--horizon must be at least 1, got {args.horizon}")
    spreads = baseline_spreads(train, test)
    names: list[str] = []
    for m in loaded:
        name = f"{m.tier}:{m.path.name}"
        names.append(name)
        results[name] = m.infer_many(rows)
        spreads[name] = np.asarray([m.sigma_of(e.model) for e in test])
        if isinstance(m, EncoderModel):
            for c in cuts:
                if c < m.max_length:
                    results[f"{name}@{c}"] = m.infer_many(rows, max_length=c)
                    spreads[f"{name}@{c}"] = spreads[name]
    report: dict[str, Any] = {
        "split": {"seed": args.seed, "test_fraction": args.test_fraction},
        "train_rows": len(train),
        "test_rows": len(test),
        "test_prompts": len({e.prompt.strip() for e in test}),
        "bucket_edges": list(edges),
        "methods": {k: metrics(mu, p, test, edges) for k, (mu, p) in results.items()},
        "latency": {},
    }
    for k, (mu, _) in results.items():
        report["methods"][k]["termination"] = termination_metrics(mu, spreads[k], test, horizon=args.horizon)
    base = report["methods"]["per-model-median"]["mae_log"]
    for v in report["methods"].values():
        v["mae_log_vs_per_model_median"] = v["mae_log"] / base - 1.0 if base else None
    for name, m in zip(names, loaded, strict=True):
        if isinstance(m, EncoderModel):
            report["latency"][name] = {
                str(n): latency(m, test, n=args.latency_n, max_length=n) for n in (64, 128, 256)
            }
        else:
            report["latency"][name] = latency(m, test, n=args.latency_n)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = reliability_plot(results, test, edges, out / "reliability.png")
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(
        f"{report['test_rows']} held-out rows, {report['test_prompts']} prompts unseen in training; "
        f"buckets {list(edges)}"
    )
    print(
        f"{'method':32s} {'acc':>6s} {'macroF1':>8s} {'MAE log':>8s} {'vs median':>9s} {'ECE':>6s}"
        "  per-bucket acc"
    )
    for k, v in report["methods"].items():
        per = " ".join("-" if a is None else f"{a:.2f}" for a in v["per_bucket_accuracy"])
        rel = v["mae_log_vs_per_model_median"]
        print(
            f"{k:32s} {v['accuracy']:6.3f} {v['macro_f1']:8.3f} {v['mae_log']:8.3f} "
            f"{rel * 100:+8.1f}% {v['ece']:6.3f}  {per}"
        )
    print(
        f"termination: ends within {args.horizon} tokens, at every 16th token of age, weighted by load; "
        "Brier skill / ROC AUC"
    )
    bands = ["all ages", *(f"age {b}" for b in report["methods"]["global"]["termination"]["bands"])]
    print(f"{'method':32s}" + "".join(f"  {b:>14s}" for b in bands))
    for k, v in report["methods"].items():
        cells = [v["termination"], *v["termination"]["bands"].values()]
        print(
            f"{k:32s}"
            + "".join(f"  {_num(c['brier_skill'], '+.3f')} / {_num(c['auc'], '.3f')}" for c in cells)
        )
    for name, lat in report["latency"].items():
        if "p99_ms" in lat:
            print(f"latency {name}: p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms (1 thread)")
        else:
            for n, v in lat.items():
                print(
                    f"latency {name} @{n} tokens: p50 {v['p50_ms']:.2f} ms, "
                    f"p99 {v['p99_ms']:.2f} ms (1 thread)"
                )
    print(f"wrote {out / 'eval.json'} and {png}")
    return 0
