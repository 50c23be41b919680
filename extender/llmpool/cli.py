"""The ``llmpool`` command line. Subcommands grow with the project.

Bad input never produces a traceback: every known error is one line on stderr and a
non-zero exit status (2 for bad arguments, 1 for failures while running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmpool import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        self.exit(2, f"llmpool: error: {message} (see '{self.prog} --help')\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from llmpool.lab.scenarios import SCENARIOS

    p = _Parser(prog="llmpool", description="LLMPool: workload-aware LLM routing.")
    p.add_argument("--version", action="version", version=f"llmpool {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser(
        "bench",
        help="compare routing policies in the lab simulator",
        description=(
            "Run routing policies on the same simulated workload and seeds; print mean±std over "
            "seeds and %% change vs round-robin; optionally write JSON and PNG plots."
        ),
    )
    b.add_argument("--scenario", required=True, help=f"one of: {', '.join(SCENARIOS)}")
    b.add_argument(
        "--workload",
        metavar="PATH",
        help="a trace file (Azure 2023/2024 CSV, Mooncake JSONL, BurstGPT CSV, ShareGPT lengths CSV; "
        "format detected from content) or a synthetic spec name, instead of the scenario's workload",
    )
    b.add_argument(
        "--policies",
        help="comma-separated policies, each a name or name:{JSON params}, e.g. "
        "'round-robin,br0:{\"kv_admit_threshold\": 1.0}' (default: the scenario's set)",
    )
    b.add_argument("--instances", type=_positive_int, help="number of endpoints (default: the scenario's)")
    b.add_argument(
        "--rate",
        type=_positive_float,
        help="mean arrival rate in requests/s (a trace is rescaled to it, its bursts kept); "
        "default: the scenario's load sweep, or a trace's own pace",
    )
    b.add_argument("--seeds", type=_positive_int, help="seeds per configuration (default: scenario's)")
    b.add_argument("--requests", type=_positive_int, help="requests per run (default: scenario's)")
    b.add_argument("--json", metavar="OUT", help="write all per-run results as JSON here")
    b.add_argument("--plot", metavar="DIR", help="write PNG plots (latency CDFs, load sweep) here")
    b.add_argument("--quick", action="store_true", help="a small version that finishes in under a minute")
    b.add_argument("--jobs", type=_positive_int, help="parallel worker processes (default: min(4, CPUs))")
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("scenarios", help="list the lab's named scenarios")
    s.set_defaults(func=_cmd_scenarios)
    pl = sub.add_parser("policies", help="list the registered routing policies")
    pl.set_defaults(func=_cmd_policies)
    return p


def _cmd_scenarios(args: argparse.Namespace) -> int:
    from llmpool.lab.scenarios import SCENARIOS

    for sc in SCENARIOS.values():
        print(f"{sc.name:14s} {sc.question}")
    return 0


def _cmd_policies(args: argparse.Namespace) -> int:
    from llmpool.routing import builtin_registry

    for spec in builtin_registry():
        params = ", ".join(f"{k}={v!r}" for k, v in spec.params_model().model_dump().items())
        lab = " [lab only]" if spec.lab_only and "lab only" not in spec.summary else ""
        print(f"{spec.name:16s} {spec.summary}{lab}" + (f"  [{params}]" if params else ""))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llmpool.lab import bench

    plan = bench.make_plan(
        args.scenario,
        policies=bench.split_policies(args.policies) if args.policies is not None else None,
        rate=args.rate,
        seeds=args.seeds,
        instances=args.instances,
        workload=args.workload,
        requests=args.requests,
        quick=args.quick,
    )
    if args.json:
        out = Path(args.json)
        _check_writable(out.parent or Path("."), "--json")
        if out.is_dir():
            raise _UsageError(f"--json: {out} is a directory; give a file path")
    total = len(plan.rates) * plan.seeds * len(plan.policies)
    jobs = args.jobs or bench.default_jobs()
    print(
        f"llmpool bench: scenario {plan.scenario.name}, {len(plan.policies)} policies x "
        f"{plan.seeds} seed(s) x {len(plan.rates)} load(s) = {total} runs on {jobs} process(es)",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="run", file=sys.stderr, disable=None, dynamic_ncols=True)
    done = [0]

    def on_result(row: dict[str, Any]) -> None:
        done[0] += 1
        bar.update(1)
        load = bench.rate_label(bench.rate_key(row))
        bar.set_postfix_str(f"{row['policy']} seed {row['seed']} {load}")
        if bar.disable:
            print(
                f"  [{done[0]}/{total}] {row['policy']} seed {row['seed']} {load}: "
                f"E2E mean {row['e2e_mean_s']:.3f}s",
                file=sys.stderr,
            )

    try:
        rows = bench.run_plan(plan, jobs=jobs, on_result=on_result)
    finally:
        bar.close()
    print(bench.format_tables(plan, rows))
    print(f"\n{total} runs in {time.perf_counter() - t0:.1f}s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(bench.to_json(plan, rows), indent=1) + "\n")
        print(f"results: {args.json}")
    if args.plot:
        for path in bench.plot(plan, rows, Path(args.plot)):
            print(f"plot: {path}")
    return 0


def _check_writable(d: Path, flag: str) -> None:
    if not d.exists():
        raise _UsageError(f"{flag}: directory {d} does not exist")


class _UsageError(ValueError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    from llmpool.lab.bench import BenchError
    from llmpool.lab.sim import SimulationError
    from llmpool.lab.workload import WorkloadError
    from llmpool.routing.policy import ConfigError
    from llmpool.routing.profile import ProfileError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
        return rc
    except (BenchError, ConfigError, WorkloadError, ProfileError, _UsageError) as err:
        print(f"llmpool: error: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"llmpool: simulation failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmpool: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # never a traceback for users; LLMPOOL_DEBUG=1 shows it
        if os.environ.get("LLMPOOL_DEBUG"):
            raise
        print(
            f"llmpool: unexpected error: {type(err).__name__}: {err} (set LLMPOOL_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
