"""Benchmarks of the endpoint picker: decision latency in-process, and its cost behind Envoy.

Run (``llmpool picker-bench`` once wired into the CLI; the module also runs on its own)::

    llmpool picker-bench --part all --soak 20000 --json picker-bench.json
    python -m llmpool.picker.bench --part all --soak 20000 --json picker-bench.json

Two parts (``--part decision|envoy|all``):

``decision`` -- what one routing decision costs inside the picker, in-process, no network.
  For every pool size in ``--endpoints`` and policy in ``--policies`` a :class:`Director` is
  built over a :class:`Datastore` of that many endpoints filled with seeded, plausible
  scraped load (running 0..200, waiting 0..20, KV usage 0..0.9, 16 x 20,000 KV tokens) and
  ``--inflight`` requests per endpoint left in flight (routed through the same director,
  with some output tokens observed), so per-request policies have state. Then
  ``await director.route(headers, body, None)`` is timed for OpenAI completion and chat
  bodies (prompts of about 200-4,000 tokens, most sharing one of a few system prompts or
  few-shot prefixes, a quarter streamed); each request is finished right after with a
  plausible token count, and one endpoint is re-scraped per decision (untimed), so the pool
  stays in a steady state. The synthetic load leaves batch slots and KV room everywhere,
  so late-binding policies (impact, br0, brh) route at once; a decision that was held
  anyway is left out of the latency numbers and counted in the ``held`` column. The time
  is what the servicer waits for: body parse, prompt hashing, length prediction, the
  policy's round and the dispatcher's bookkeeping (``asyncio.wait_for`` included). The
  body parse alone is timed on the same bodies too, and, at the smallest pool size, a
  whole ext_proc stream (the six messages Envoy sends in FULL_DUPLEX_STREAMED mode for a
  plain JSON exchange) handled by :class:`ExtProcServicer` without gRPC: the picker's
  Python work per request, so the Envoy part's added latency splits into that and the
  gRPC transport.

``envoy`` -- the picker as a subprocess (``python -m llmpool.cli extender --plaintext``)
  behind Envoy's ext_proc filter in FULL_DUPLEX_STREAMED mode (:mod:`llmpool.gateway`),
  against an instant backend: a second Envoy whose listener answers ``/metrics`` with a
  vLLM exposition and every other path with a fixed OpenAI completion JSON
  (``direct_response``, so the backend costs no Python). Compared paths: straight to the
  backend, Envoy without the picker (round robin to the backend), Envoy with the picker
  (one per ``--envoy-policies``).

  (a) added latency: ``--requests`` sequential keep-alive POSTs (after a warm-up) from
      ``http.client`` with TCP_NODELAY; "added" is with-picker minus without-picker;
  (b) sustained throughput: ``--concurrency`` keep-alive connections for ``--duration``
      seconds with ``wrk`` (POST bodies from a generated Lua script) when it is installed,
      else an aiohttp client in this process; the direct-to-backend row is the ceiling of the
      client and the backend together. CPU use of every process (client, both Envoys, picker) and of the whole
      machine is sampled over each run, to say what limited it;
  (c) the picker's RSS (VmRSS) after start, warm-up, the latency run and the load, and with
      ``--soak N`` N more requests in steps of ``--soak-every``, sampling RSS after each step.

Every subprocess is stopped (SIGTERM, then SIGKILL) when the benchmark ends, however it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from llmpool.children import free_port, http_get, spawn, terminate

# Only the standard library at import time: the CLI imports this module to build its parser.
if TYPE_CHECKING:
    import http.client

    from tqdm import tqdm

    from llmpool.picker.bodies import ResponseTap
    from llmpool.picker.director import Routed
    from llmpool.serving.datastore import Datastore, Endpoint

__all__ = ["BenchError", "add_bench_parser", "main", "make_bodies", "run_bench"]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROFILE = "a100-llama3-8b"
BLOCK_SIZE = 16
NUM_GPU_BLOCKS = 20_000  # 320k KV tokens per endpoint
DEFAULT_POLICIES = "least-requests,gie-default,impact,br0,brh"
DEFAULT_ENVOY_POLICIES = "least-requests,impact"
FLOOR = "floor"  # the transport floor (llmpool.picker.floor) in place of the picker
SOAK_DEFAULT = 100_000
WRK_LIMIT_MARK = b"BENCH-LIMIT-REACHED"
STREAM_MESSAGES_IN = 6  # ext_proc messages per request from Envoy (see _stream_messages)


class BenchError(RuntimeError):
    """The benchmark cannot run or a run went wrong; the message says why."""


# ------------------------------------------------------------------------------------ workload

_WORD_TEXT = (
    "the of and to in is that for it as with was on be by this are from or have an they which one you "
    "were all we when there can more if no out so what up about into than them only other new some time "
    "could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three model server request token cache memory latency throughput "
    "batch decode prefill kernel cluster gateway endpoint routing policy queue schedule tensor matrix "
    "attention sequence context window prompt output function return value error system network data "
    "please explain summarize following document question answer detail example analysis structure"
)
_WORDS = tuple(_WORD_TEXT.split())


def _sentence(rng: random.Random) -> str:
    n = rng.randint(6, 18)
    words = [rng.choice(_WORDS) for _ in range(n)]
    if n > 9 and rng.random() < 0.4:
        words[rng.randint(3, n - 3)] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", ":"))


def _text(rng: random.Random, target_tokens: int) -> str:
    """Prose of about ``target_tokens`` tokens (:mod:`llmpool.tokens`' estimate)."""
    from llmpool import tokens

    out: list[str] = []
    count = 0
    while count < target_tokens:
        s = _sentence(rng)
        out.append(s)
        count += tokens.count_text(s) + 1
    return " ".join(out)


@dataclass(frozen=True, slots=True)
class BenchBody:
    """One request body of the benchmark workload."""

    path: str
    raw: bytes
    chat: bool
    prompt_tokens: int  # the picker's estimate
    output_tokens: int  # what the "server" reports when the request finishes
    shared_prefix: bool

    def headers(self, n: int) -> dict[str, str]:
        """The request headers as Envoy hands them to the picker."""
        return {
            ":method": "POST",
            ":path": self.path,
            ":authority": "gateway.bench",
            ":scheme": "http",
            "content-type": "application/json",
            "content-length": str(len(self.raw)),
            "x-request-id": f"bench-{n}",
        }


def make_bodies(
    seed: int, count: int, *, stream_share: float = 0.25, min_tokens: int = 200, max_tokens: int = 4000
) -> list[BenchBody]:
    """``count`` OpenAI bodies, half completions and half chats, seeded.

    Prompt sizes are log-uniform in [min_tokens, max_tokens]; about 65% start with one of
    eight shared prefixes (system prompts for chats, few-shot preambles for completions)."""
    import orjson

    from llmpool import tokens
    from llmpool.picker.bodies import parse_request

    rng = random.Random(seed)
    systems = [_text(rng, rng.randint(150, min(1500, max(150, max_tokens // 2)))) for _ in range(8)]
    system_tokens = [tokens.count_text(s) for s in systems]
    out: list[BenchBody] = []
    lo, hi = math.log(min_tokens), math.log(max(min_tokens, max_tokens))
    for i in range(count):
        target = int(math.exp(rng.uniform(lo, hi)))
        chat = i % 2 == 1
        shared = rng.random() < 0.65
        k = rng.randrange(len(systems))
        body: dict[str, Any] = {"model": MODEL}
        if chat:
            if shared:
                system, rest = systems[k], max(20, target - system_tokens[k])
            else:
                system, rest = "You are a helpful assistant.", target
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            turns = rng.choice((0, 0, 1, 2))
            for _ in range(turns):
                messages.append({"role": "user", "content": _text(rng, max(10, rest // (3 * (turns + 1))))})
                messages.append(
                    {"role": "assistant", "content": _text(rng, max(10, rest // (3 * (turns + 1))))}
                )
            used = sum(tokens.count_text(m["content"]) for m in messages[1:])
            messages.append({"role": "user", "content": _text(rng, max(10, rest - used))})
            body["messages"] = messages
            body["max_completion_tokens" if rng.random() < 0.5 else "max_tokens"] = rng.choice(
                (128, 256, 512, 1024)
            )
            path = "/v1/chat/completions"
        else:
            prefix = systems[k] + "\n\n" if shared else ""
            rest = max(20, target - (system_tokens[k] if shared else 0))
            body["prompt"] = prefix + _text(rng, rest)
            body["max_tokens"] = rng.choice((64, 128, 256, 512))
            path = "/v1/completions"
        body["temperature"] = rng.choice((0.0, 0.7, 1.0))
        if rng.random() < stream_share:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        raw = orjson.dumps(body)
        parsed = parse_request(raw, chat=chat)
        out.append(
            BenchBody(
                path=path,
                raw=raw,
                chat=chat,
                prompt_tokens=parsed.prompt_tokens,
                output_tokens=rng.randint(16, 600),
                shared_prefix=shared,
            )
        )
    return out


def _body_summary(bodies: Sequence[BenchBody]) -> dict[str, Any]:
    toks = sorted(b.prompt_tokens for b in bodies)
    sizes = [len(b.raw) for b in bodies]
    return {
        "count": len(bodies),
        "chat": sum(b.chat for b in bodies),
        "shared_prefix": sum(b.shared_prefix for b in bodies),
        "prompt_tokens_min": toks[0],
        "prompt_tokens_p50": _pct(toks, 50),
        "prompt_tokens_max": toks[-1],
        "bytes_mean": round(sum(sizes) / len(sizes)),
        "bytes_max": max(sizes),
    }


# ------------------------------------------------------------------------------------ statistics


def _pct(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[idx])


def _stats(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    s = sorted(values)
    if not s:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    return {
        "n": len(s),
        "p50": round(_pct(s, 50), digits),
        "p90": round(_pct(s, 90), digits),
        "p99": round(_pct(s, 99), digits),
        "mean": round(sum(s) / len(s), digits),
        "max": round(s[-1], digits),
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    left = [all(not isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(vals, widths, left, strict=True)
        )

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ part 1


def _scrape(ds: Datastore, idx: int, rng: random.Random, now: float) -> None:
    from llmpool.serving.scrape import EngineMetrics, ServerMetrics

    eng = EngineMetrics(
        running=rng.randint(0, 200),
        waiting=rng.randint(0, 20),
        kv_usage=rng.uniform(0.0, 0.9),
        block_size=BLOCK_SIZE,
        num_gpu_blocks=NUM_GPU_BLOCKS,
    )
    ds.scraped(idx, ServerMetrics(engines={"0": eng}), now)


def _finished_tap(body: BenchBody) -> ResponseTap:
    from llmpool.picker.bodies import ResponseTap, Usage

    tap = ResponseTap(sse=False)
    tap.usage = Usage(prompt_tokens=body.prompt_tokens, completion_tokens=body.output_tokens)
    return tap


def _pool(n: int) -> list[Endpoint]:
    from llmpool.serving.datastore import Endpoint

    # loopback names: the decision part never connects to them
    return [Endpoint.parse(f"127.1.{i // 250}.{i % 250 + 1}:8000") for i in range(n)]


async def _decision_cell(
    policy: str,
    n_endpoints: int,
    bodies: Sequence[BenchBody],
    *,
    decisions: int,
    warmup: int,
    inflight_per_endpoint: int,
    seed: int,
    bar: tqdm[Any] | None,
    stream: bool = False,
) -> dict[str, Any]:
    """Time ``Director.route`` (or, with ``stream``, a whole ext_proc stream handled by the
    servicer in-process) for one policy and pool size."""
    from llmpool.picker.config import PickerConfig
    from llmpool.picker.director import Director, Rejected, Routed
    from llmpool.picker.metrics import PickerMetrics
    from llmpool.picker.servicer import ExtProcServicer
    from llmpool.routing.policy import PolicyConfig
    from llmpool.serving.datastore import Datastore

    rng = random.Random(f"{seed}/{policy}/{n_endpoints}")
    ds = Datastore(_pool(n_endpoints))
    now = time.monotonic()
    for i in range(n_endpoints):
        _scrape(ds, i, rng, now)
    cfg = PickerConfig(policy=PolicyConfig(name=policy), profile=PROFILE)
    director = Director(cfg, ds, PickerMetrics(), rng=random.Random(seed))
    background: list[Routed] = []
    try:
        for k in range(n_endpoints * inflight_per_endpoint):
            b = bodies[rng.randrange(len(bodies))]
            res = await director.route(b.headers(-k - 1), b.raw, None)
            if not isinstance(res, Routed) or res.flight is None:
                raise BenchError(f"{policy}: a background request was not routed: {res}")
            ds.progress(res.flight, rng.randint(0, 400), time.monotonic())
            background.append(res)
        order = list(range(len(bodies)))
        rng.shuffle(order)
        samples: list[float] = []
        held = 0
        holds = director.dispatcher
        perf = time.perf_counter_ns
        servicer = ExtProcServicer(director) if stream else None
        messages = [_stream_messages(b) for b in bodies] if stream else []
        ctx = _AbortContext()
        msgs_out = 0
        for k in range(warmup + decisions):
            idx = order[k % len(order)]
            b = bodies[idx]
            h0 = holds.holds
            if servicer is not None:
                n_out = 0
                t0 = perf()
                async for _ in servicer.Process(_aiter(messages[idx]), ctx):
                    n_out += 1
                t1 = perf()
                msgs_out = max(msgs_out, n_out)
                if ds.inflight_total() != len(background):
                    raise BenchError(f"{policy}: an ext_proc stream did not finish its request")
            else:
                headers = b.headers(k)
                t0 = perf()
                res = await director.route(headers, b.raw, None)
                t1 = perf()
                if isinstance(res, Rejected):
                    raise BenchError(f"{policy} with {n_endpoints} endpoints rejected a request: {res}")
                director.finish(res, 200, _finished_tap(b), complete=True)
            was_held = holds.holds != h0
            _scrape(ds, k % n_endpoints, rng, time.monotonic())
            if k >= warmup:
                if was_held:
                    held += 1
                else:
                    samples.append((t1 - t0) / 1000.0)
            if bar is not None and k % 50 == 49:
                bar.update(50)
        if bar is not None:
            bar.update((warmup + decisions) % 50)
    finally:
        for r in background:
            director.finish(r, 200, None, complete=False)
        director.close()
    st = _stats(samples)
    return {
        "policy": policy,
        "endpoints": n_endpoints,
        "inflight": n_endpoints * inflight_per_endpoint,
        "decisions": len(samples),
        "held": held,
        "p50_us": st["p50"],
        "p90_us": st["p90"],
        "p99_us": st["p99"],
        "mean_us": st["mean"],
        "max_us": st["max"],
        **({"messages_in": STREAM_MESSAGES_IN, "messages_out": msgs_out} if stream else {}),
    }


async def _backlog_cell(
    policy: str, n_endpoints: int, backlog: int, *, submits: int, seed: int
) -> dict[str, Any]:
    """Time a dispatch round while ``backlog`` requests are held at the router: every batch of
    the pool is filled first, then each timed ``Dispatcher.submit`` queues one more request,
    runs a round and is held."""
    from llmpool.picker.config import PickerConfig
    from llmpool.picker.director import Director
    from llmpool.picker.metrics import PickerMetrics
    from llmpool.routing.policy import PolicyConfig
    from llmpool.routing.types import Request
    from llmpool.serving.datastore import Datastore, Flight

    rng = random.Random(f"{seed}/{policy}/{n_endpoints}/backlog")
    ds = Datastore(_pool(n_endpoints))
    now = time.monotonic()
    for i in range(n_endpoints):
        _scrape(ds, i, rng, now)
    director = Director(
        PickerConfig(policy=PolicyConfig(name=policy), profile=PROFILE), ds, PickerMetrics(), rng=rng
    )
    disp = director.dispatcher
    ids = itertools.count(1)

    def request() -> Request:
        return Request(
            id=next(ids), arrival=time.monotonic(), prompt_tokens=rng.randint(100, 2000), model="m"
        )

    waiting: list[Any] = []
    try:
        for _ in range(n_endpoints * 4096):  # fill every batch: until a request is held
            placed = disp.submit(request())
            if not isinstance(placed, Flight):
                waiting.append(placed)
                break
        else:
            raise BenchError(f"{policy} never held a request: it does not hold at the router")
        while disp.queued < backlog:
            waiting.append(disp.submit(request()))
        samples = []
        perf = time.perf_counter_ns
        for _ in range(submits):
            t0 = perf()
            placed = disp.submit(request())
            samples.append((perf() - t0) / 1000.0)
            if isinstance(placed, Flight):
                raise BenchError(f"{policy}: a request was routed while every batch was full")
            waiting.append(placed)
    finally:
        for f in waiting:
            f.cancel()
        director.close()
    st = _stats(samples)
    return {"policy": policy, "endpoints": n_endpoints, "held": backlog, "submits": len(samples),
            "p50_us": st["p50"], "p99_us": st["p99"], "mean_us": st["mean"]}  # fmt: skip


class _AbortContext:
    """The part of a gRPC servicer context the servicer uses: ``abort`` ends the stream."""

    async def abort(self, code: Any, details: str) -> None:
        raise BenchError(f"the servicer aborted a stream: {code}: {details}")


async def _aiter(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _stream_messages(b: BenchBody) -> list[Any]:
    """What Envoy 1.40 sends the picker for one keep-alive HTTP/1.1 JSON exchange in
    FULL_DUPLEX_STREAMED mode (seen on the wire): request headers, the request body, an empty
    end-of-stream body chunk, response headers, the response body, an empty end-of-stream chunk."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    def headers(h: dict[str, str]) -> Any:
        values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()]
        return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))

    resp = BACKEND_RESPONSE.encode()
    resp_headers = {":status": "200", "content-type": "application/json", "content-length": str(len(resp))}
    return [
        pb.ProcessingRequest(request_headers=headers(b.headers(0))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b.raw, end_of_stream=False)),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b"", end_of_stream=True)),
        pb.ProcessingRequest(response_headers=headers(resp_headers)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=resp, end_of_stream=False)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)),
    ]


def _parse_timing(bodies: Sequence[BenchBody], n: int) -> list[dict[str, Any]]:
    from llmpool.picker.bodies import parse_request

    by_kind: dict[str, list[float]] = {"completion": [], "chat": [], "all": []}
    perf = time.perf_counter_ns
    for k in range(len(bodies) + n):  # one pass of warm-up
        b = bodies[k % len(bodies)]
        t0 = perf()
        parse_request(b.raw, chat=b.chat)
        dt = (perf() - t0) / 1000.0
        if k >= len(bodies):
            by_kind["chat" if b.chat else "completion"].append(dt)
            by_kind["all"].append(dt)
    rows = []
    for kind, vals in by_kind.items():
        sel = [b for b in bodies if kind == "all" or b.chat == (kind == "chat")]
        st = _stats(vals)
        rows.append(
            {
                "bodies": kind,
                "parses": int(st["n"]),
                "prompt_tokens_mean": round(sum(b.prompt_tokens for b in sel) / max(1, len(sel))),
                "p50_us": st["p50"],
                "p99_us": st["p99"],
                "mean_us": st["mean"],
            }
        )
    return rows


_ROUTE_COLUMNS = {
    "policy": "policy", "endpoints": "endpoints", "inflight": "in flight", "decisions": "decisions",
    "held": "held", "p50_us": "p50 us", "p90_us": "p90 us", "p99_us": "p99 us", "mean_us": "mean us",
    "max_us": "max us",
}  # fmt: skip


def _route_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    return _table(list(_ROUTE_COLUMNS.values()), [[r[k] for k in _ROUTE_COLUMNS] for r in rows], title=title)


def run_decision(opts: argparse.Namespace, *, out: Any = sys.stdout) -> dict[str, Any]:
    import asyncio

    from tqdm import tqdm

    from llmpool.routing.policy import ConfigError

    endpoints = _int_list(opts.endpoints, "--endpoints")
    policies = _policy_list(opts.policies, "--policies")
    bodies = make_bodies(opts.seed, opts.bodies)
    summary = _body_summary(bodies)
    print(
        f"\n== Decision latency in-process: {len(bodies)} bodies ({summary['chat']} chat, "
        f"{summary['shared_prefix']} with a shared prefix), prompt tokens {summary['prompt_tokens_min']}.."
        f"{summary['prompt_tokens_max']} (median {summary['prompt_tokens_p50']:.0f}), "
        f"{opts.decisions} timed decisions per cell after {opts.warmup} warm-up",
        file=out,
        flush=True,
    )
    parse_rows = _parse_timing(bodies, max(opts.decisions, len(bodies)))
    # every (pool size, policy) for Director.route; the whole ext_proc stream at the smallest pool
    cells = [(n, pol, False) for n in endpoints for pol in policies]
    cells += [(min(endpoints), pol, True) for pol in policies]
    rows: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    total = len(cells) * (opts.warmup + opts.decisions)
    with tqdm(total=total, desc="decisions", unit="req", disable=not opts.progress, leave=False) as bar:
        for n, pol, stream in cells:
            bar.set_postfix_str(f"{pol} N={n}{' stream' if stream else ''}")
            try:
                row = asyncio.run(
                    _decision_cell(
                        pol,
                        n,
                        bodies,
                        decisions=opts.decisions,
                        warmup=opts.warmup,
                        inflight_per_endpoint=opts.inflight,
                        seed=opts.seed,
                        bar=bar if opts.progress else None,
                        stream=stream,
                    )
                )
            except ConfigError as err:
                raise BenchError(f"policy {pol!r}: {err}") from None
            (streams if stream else rows).append(row)
    print(
        _table(
            ["bodies", "parses", "prompt tok", "p50 us", "p99 us", "mean us"],
            [
                [r["bodies"], r["parses"], r["prompt_tokens_mean"], r["p50_us"], r["p99_us"], r["mean_us"]]
                for r in parse_rows
            ],
            title="\nBody parse only (orjson + token estimate + prefix hashes):",
        ),
        file=out,
    )
    print(
        _route_table(rows, "\nDirector.route (parse + predict + policy + dispatch), per decision:"), file=out
    )
    if streams:
        title = (
            f"\nWhole ext_proc stream in the servicer, no gRPC ({streams[0]['messages_in']} messages in, "
            f"{streams[0]['messages_out']} out, as Envoy sends them for one request):"
        )
        print(_route_table(streams, title), file=out)
    if any(r["held"] for r in rows + streams):
        print("  (held decisions waited at the router and are left out of the latency numbers)", file=out)
    backlog_rows = []
    for held in _int_list(opts.backlog, "--backlog") if opts.backlog else []:
        for pol in policies:
            try:
                backlog_rows.append(
                    asyncio.run(
                        _backlog_cell(pol, min(endpoints), held, submits=opts.decisions, seed=opts.seed)
                    )
                )
            except ConfigError as err:
                raise BenchError(f"policy {pol!r}: {err}") from None
    if backlog_rows:
        print(
            _table(
                ["policy", "endpoints", "held", "submits", "p50 us", "p99 us", "mean us"],
                [
                    [r[k] for k in ("policy", "endpoints", "held", "submits", "p50_us", "p99_us", "mean_us")]
                    for r in backlog_rows
                ],
                title="\nA dispatch round with a backlog held at the router (every batch full; one more "
                "request queued and held per timed submit):",
            ),
            file=out,
        )
    out.flush()
    return {"bodies": summary, "parse": parse_rows, "route": rows, "stream": streams, "backlog": backlog_rows}


# ------------------------------------------------------------------------------------ processes


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return math.nan


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, interrupt, total) jiffies of all CPUs since boot; interrupt = irq + softirq (on
    loopback that is mostly the kernel's TCP work, charged to no process)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    parts += [0] * (8 - len(parts))
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, parts[5] + parts[6], total


class _CpuMeter:
    """CPU use of named processes and of the whole machine over an interval, in % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.cpu0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        self.busy0, self.irq0, self.total0 = _machine_jiffies()
        self.self0 = _own_cpu()

    def stop(self, client_cpu_s: float | None = None) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.t0)
        out = {
            name: round(100.0 * (_cpu_seconds(pid) - self.cpu0[name]) / wall, 1)
            for name, pid in self.pids.items()
        }
        if client_cpu_s is None:  # the client is this process
            client_cpu_s = _own_cpu() - self.self0
        out["client"] = round(100.0 * client_cpu_s / wall, 1)
        busy1, irq1, total1 = _machine_jiffies()
        scale = 100.0 * (os.cpu_count() or 1) / max(1, total1 - self.total0)
        machine = scale * (busy1 - self.busy0)
        irq = scale * (irq1 - self.irq0)
        ours = sum(v for v in out.values() if not math.isnan(v))
        out["irq"] = round(irq, 1)
        out["machine"] = round(machine, 1)
        out["other"] = round(max(0.0, machine - ours - irq), 1)
        return out


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Child:
    """A subprocess in its own session, output to a log file, stopped by its pid."""

    def __init__(
        self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.proc: subprocess.Popen[bytes] = spawn(cmd, out, env=env, die_with_parent=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        terminate(self.proc, grace_s, kill_wait_s=5.0)


# ------------------------------------------------------------------------------------ backend

BACKEND_RESPONSE = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 1767225600,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": " The quick brown fox jumps over the lazy dog.",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 512, "total_tokens": 528, "completion_tokens": 16},
    },
    separators=(",", ":"),
)

BACKEND_METRICS = f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.05
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="{BLOCK_SIZE}",engine="0",num_gpu_blocks="{NUM_GPU_BLOCKS}"}} 1.0
"""


def backend_config(port: int, admin_port: int) -> dict[str, Any]:
    """An Envoy bootstrap whose only listener is an instant fake vLLM server (direct responses)."""

    def direct(prefix: str, body: str, ctype: str) -> dict[str, Any]:
        return {
            "match": {"prefix": prefix},
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": ctype},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "backend",
        "codec_type": "AUTO",
        "route_config": {
            "name": "backend",
            "virtual_hosts": [
                {
                    "name": "vllm",
                    "domains": ["*"],
                    "routes": [
                        direct("/metrics", BACKEND_METRICS, "text/plain; version=0.0.4; charset=utf-8"),
                        direct("/", BACKEND_RESPONSE, "application/json"),
                    ],
                }
            ],
        },
        "http_filters": [
            # Read the whole request body before the direct response: a response that completes
            # before its request makes Envoy close the HTTP/1.1 connection (no keep-alive).
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 4 * 1024 * 1024,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "backend",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ]
        },
    }


def _start_backend(workdir: Path, envoy: str, concurrency: int) -> tuple[_Child, int]:
    import yaml

    port, admin = free_port(), free_port()
    cfg = workdir / "backend.yaml"
    cfg.write_text(yaml.safe_dump(backend_config(port, admin), sort_keys=False))
    child = _Child(
        "backend",
        [
            envoy,
            "-c",
            str(cfg),
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warning",
            "--disable-hot-restart",
        ],
        workdir / "backend.log",
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"the backend Envoy exited at start-up:\n{child.tail()}")
        with contextlib.suppress(OSError, ValueError):
            if http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200:
                return child, port
        time.sleep(0.05)
    child.stop()
    raise BenchError(f"the backend Envoy did not get ready:\n{child.tail()}")


def _start_picker(
    workdir: Path, policy: str, backend_port: int, transport: str = "grpclib", event_loop: str = "auto"
) -> tuple[_Child, dict[str, int]]:
    import grpc
    import yaml
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    cfg = workdir / f"picker-{policy}.yaml"
    cfg.write_text(yaml.safe_dump({"policy": policy, "profile": PROFILE}))
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])  # the directory holding the llmpool package
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [
        sys.executable,
        "-m",
        "llmpool.picker.floor",
        "--port",
        str(ports["grpc"]),
        "--health-port",
        str(ports["health"]),
        "--destination",
        f"127.0.0.1:{backend_port}",
        "--transport",
        transport,
        "--event-loop",
        event_loop,
    ]
    if policy != FLOOR:
        cmd = [
            sys.executable,
            "-m",
            "llmpool.cli",
            "extender",
            "--config",
            str(cfg),
            "--static-endpoints",
            f"127.0.0.1:{backend_port}",
            "--grpc-port",
            str(ports["grpc"]),
            "--health-port",
            str(ports["health"]),
            "--metrics-port",
            str(ports["metrics"]),
            "--host",
            "127.0.0.1",
            "--plaintext",
            "--log-format",
            "text",
            "--log-level",
            "warning",
            "--drain-seconds",
            "1",
            "--transport",
            transport,
            "--event-loop",
            event_loop,
        ]
    child = _Child(f"picker-{policy}", cmd, workdir / f"picker-{policy}.log", env=env)
    deadline = time.monotonic() + 30
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports['health']}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if not child.alive():
                    raise BenchError(f"the picker exited at start-up:\n{child.tail()}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return child, ports
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise BenchError(f"the picker did not get ready in 30 s:\n{child.tail()}")
    except BaseException:
        child.stop()
        raise


def _picker_metrics(port: int) -> dict[str, Any]:
    """A few of the picker's own Prometheus numbers (decision time, responses, errors)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "llmpool_decision_duration_seconds_sum":
                out["decision_s_sum"] = s.value
            elif s.name == "llmpool_decision_duration_seconds_count":
                out["decisions"] = s.value
            elif s.name == "llmpool_responses_total":
                out[f"responses_{s.labels.get('code', '')}"] = s.value
            elif s.name in ("llmpool_stream_errors_total", "llmpool_rejections_total"):
                out[s.name.removeprefix("llmpool_").removesuffix("_total")] = (
                    out.get(s.name.removeprefix("llmpool_").removesuffix("_total"), 0.0) + s.value
                )
    if out.get("decisions"):
        out["decision_mean_us"] = round(1e6 * out["decision_s_sum"] / out["decisions"], 1)
    return out


# ------------------------------------------------------------------------------------ clients


def _connect(port: int) -> http.client.HTTPConnection:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _post(conn: http.client.HTTPConnection, b: BenchBody) -> tuple[int, bytes]:
    conn.request("POST", b.path, body=b.raw, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def _wait_serving(port: int, body: BenchBody, timeout_s: float = 20.0) -> None:
    """Until a POST through ``port`` answers 200 (the gateway sees the picker healthy)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            conn = _connect(port)
            try:
                status, data = _post(conn, body)
            finally:
                conn.close()
            if status == 200:
                return
            last = f"HTTP {status}: {data[:200]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.1)
    raise BenchError(f"no 200 through 127.0.0.1:{port} within {timeout_s:g} s (last: {last})")


def sequential_latency(
    port: int, bodies: Sequence[BenchBody], n: int, warmup: int, *, progress: bool, desc: str
) -> list[float]:
    """Latencies (ms) of ``n`` sequential keep-alive POSTs after ``warmup`` untimed ones."""
    from tqdm import tqdm

    conn = _connect(port)
    out: list[float] = []
    perf = time.perf_counter_ns
    try:
        with tqdm(total=warmup + n, desc=desc, unit="req", disable=not progress, leave=False) as bar:
            for k in range(warmup + n):
                b = bodies[k % len(bodies)]
                t0 = perf()
                status, data = _post(conn, b)
                t1 = perf()
                if status != 200:
                    raise BenchError(f"{desc}: HTTP {status}: {data[:200]!r}")
                if conn.sock is None:  # 'connection: close': the next request would pay a TCP connect
                    raise BenchError(f"{desc}: the server closed the keep-alive connection")
                if k >= warmup:
                    out.append((t1 - t0) / 1e6)
                if k % 100 == 99:
                    bar.update(100)
    finally:
        conn.close()
    return out


def _lua_long(text: str) -> str:
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_script(bodies: Sequence[BenchBody], limit: int = 0) -> str:
    """A wrk Lua script that cycles POST bodies, stops after ``limit`` responses (0: never)
    and prints a one-line JSON summary (``BENCH {...}``) at the end."""
    items = ",\n".join(f"  {{{_lua_long(b.path)}, {_lua_long(b.raw.decode())}}}" for b in bodies)
    parts = [
        f"local bodies = {{\n{items}\n}}",
        "local i = 0",
        'local hdrs = {["Content-Type"] = "application/json"}',
        "request = function()",
        "  i = i % #bodies + 1",
        '  return wrk.format("POST", bodies[i][1], hdrs, bodies[i][2])',
        "end",
    ]
    if limit > 0:
        parts += [
            f"local limit = {limit}",
            "local seen = 0",
            "response = function(status, headers, body)",
            "  seen = seen + 1",
            "  if seen == limit then",
            f'    io.write("{WRK_LIMIT_MARK.decode()}\\n")',
            "    io.flush()",
            "    wrk.thread:stop()",
            "  end",
            "end",
        ]
    parts += [
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        '  io.write(string.format(\'BENCH {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, \'',
        '    .. \'"write": %d, "status": %d, "timeout": %d, "p50_us": %.1f, "p90_us": %.1f, \'',
        '    .. \'"p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n\',',
        "    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,",
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99),",
        "    latency.mean, latency.max))",
        "end",
    ]
    return "\n".join(parts) + "\n"


@dataclass
class LoadResult:
    client: str
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu: dict[str, float]


def _run_wrk(
    wrk: str,
    port: int,
    script: Path,
    *,
    concurrency: int,
    duration_s: float,
    pids: dict[str, int],
    progress: bool,
    desc: str,
    limit: int = 0,
) -> LoadResult:
    """One wrk run. With ``limit`` the script prints a marker after that many responses and
    stops its thread; wrk's main thread sleeps for ``-d`` regardless, so it gets SIGINT (its
    way to end early, with the summary)."""
    from tqdm import tqdm

    cmd = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
    ]
    meter = _CpuMeter(pids)
    t0 = time.monotonic()
    out_path = script.with_suffix(".out")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True
        )
    interrupted = False
    try:
        with tqdm(total=round(duration_s), desc=desc, unit="s", disable=not progress, leave=False) as bar:
            shown = 0
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.02 if limit else 0.2)
                if limit and not interrupted and WRK_LIMIT_MARK in out_path.read_bytes():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGINT)
                    interrupted = True
                el = min(round(duration_s), int(time.monotonic() - t0))
                if el > shown:
                    bar.update(el - shown)
                    shown = el
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = meter.stop(client_cpu_s=ru.ru_utime + ru.ru_stime)
    text = out_path.read_bytes().decode("utf-8", "replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH {")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}):\n{text[-1500:]}")
    s = json.loads(line[len("BENCH ") :])
    errors = int(s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"])
    secs = s["duration_us"] / 1e6
    return LoadResult(
        client="wrk",
        requests=int(s["requests"]),
        errors=errors,
        seconds=round(secs, 2),
        rps=round(s["requests"] / max(secs, 1e-9), 1),
        p50_ms=round(s["p50_us"] / 1000, 3),
        p99_ms=round(s["p99_us"] / 1000, 3),
        cpu=cpu,
    )


async def _aio_load(
    port: int, bodies: Sequence[BenchBody], concurrency: int, duration_s: float, limit: int, bar: tqdm[Any]
) -> tuple[int, int, list[float], float]:
    import asyncio

    import aiohttp

    loop = asyncio.get_running_loop()
    lat: list[float] = []
    state = {"sent": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    url = f"http://127.0.0.1:{port}"
    hdrs = {"Content-Type": "application/json"}
    t0 = loop.time()
    stop_at = t0 + duration_s
    perf = time.perf_counter

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        i = w
        while True:
            if limit > 0:
                if state["sent"] >= limit:
                    return
                state["sent"] += 1
            elif loop.time() >= stop_at:
                return
            b = bodies[i % len(bodies)]
            i += concurrency
            ts = perf()
            try:
                async with session.post(url + b.path, data=b.raw, headers=hdrs) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            lat.append((perf() - ts) * 1000.0)
            if not ok:
                state["errors"] += 1
            if len(lat) % 200 == 0:
                bar.update(200)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(w, session) for w in range(concurrency)))
    return len(lat), state["errors"], lat, loop.time() - t0


def _run_python(
    port: int,
    bodies: Sequence[BenchBody],
    *,
    concurrency: int,
    duration_s: float,
    limit: int,
    pids: dict[str, int],
    progress: bool,
    desc: str,
) -> LoadResult:
    import asyncio

    from tqdm import tqdm

    meter = _CpuMeter(pids)
    with tqdm(total=limit or None, desc=desc, unit="req", disable=not progress, leave=False) as bar:
        n, errors, lat, secs = asyncio.run(_aio_load(port, bodies, concurrency, duration_s, limit, bar))
    cpu = meter.stop()
    st = _stats(lat, 3)
    return LoadResult(
        client="python-aiohttp",
        requests=n,
        errors=errors,
        seconds=round(secs, 2),
        rps=round(n / max(secs, 1e-9), 1),
        p50_ms=st["p50"],
        p99_ms=st["p99"],
        cpu=cpu,
    )


@dataclass
class _Load:
    """How to put load on a port: wrk (with a prepared script) or the in-process aiohttp client."""

    wrk: str | None
    workdir: Path
    bodies: Sequence[BenchBody]
    concurrency: int
    progress: bool

    @property
    def client(self) -> str:
        return "wrk" if self.wrk else "python-aiohttp"

    def script(self, limit: int) -> Path:
        p = self.workdir / f"load-{limit}.lua"
        if not p.exists():
            p.write_text(wrk_script(self.bodies[:64], limit))
        return p

    def run(self, port: int, pids: dict[str, int], *, duration_s: float, desc: str) -> LoadResult:
        if self.wrk:
            return _run_wrk(
                self.wrk,
                port,
                self.script(0),
                concurrency=self.concurrency,
                duration_s=duration_s,
                pids=pids,
                progress=self.progress,
                desc=desc,
            )
        return _run_python(
            port,
            self.bodies,
            concurrency=self.concurrency,
            duration_s=duration_s,
            limit=0,
            pids=pids,
            progress=self.progress,
            desc=desc,
        )

    def count(self, port: int, pids: dict[str, int], *, requests: int, desc: str) -> LoadResult:
        if self.wrk:
            # stops after `requests` responses; the duration is only a safety net
            return _run_wrk(
                self.wrk,
                port,
                self.script(requests),
                concurrency=self.concurrency,
                duration_s=max(60.0, requests / 50.0),
                pids=pids,
                progress=False,
                desc=desc,
                limit=requests,
            )
        return _run_python(
            port,
            self.bodies,
            concurrency=self.concurrency,
            duration_s=1e9,
            limit=requests,
            pids=pids,
            progress=False,
            desc=desc,
        )


# ------------------------------------------------------------------------------------ part 2


def _verdict(cpu: dict[str, float], ncpu: int) -> str:
    """What limited a load run, from its CPU sample (a heuristic, worded as such)."""
    cap = 100.0 * ncpu
    procs = {k: v for k, v in cpu.items() if k not in ("machine", "other", "irq") and not math.isnan(v)}
    ranked = sorted(procs.items(), key=lambda kv: -kv[1])
    share = ", ".join(f"{k} {v:.0f}%" for k, v in ranked)
    machine = cpu.get("machine", 0.0)
    parts = []
    if ranked and ranked[0][1] >= 90.0:
        parts.append(f"{ranked[0][0]} saturates one core")
    if machine >= 0.9 * cap:
        parts.append(f"the machine is CPU-bound ({machine:.0f}% of {cap:.0f}%)")
    if not parts:
        parts.append(f"no process and not the machine CPU-bound ({machine:.0f}% of {cap:.0f}%)")
    return (
        "; ".join(parts)
        + f" [{share}, kernel irq {cpu.get('irq', 0.0):.0f}%, other {cpu.get('other', 0.0):.0f}%]"
    )


# ------------------------------------------------------------------------------- the timeline
# (column, access-log field, ext_proc field or None); all microseconds, medians over the timed requests
TIMELINE_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("request in", "request_received_us", None),
    ("picker: headers", "ext_proc", "request_header_latency_us"),
    ("picker: body", "ext_proc", "request_body_total_latency_us"),
    ("upstream sent", "upstream_sent_first_us", None),
    ("upstream 1st byte", "upstream_first_byte_us", None),
    ("picker: resp headers", "ext_proc", "response_header_latency_us"),
    ("picker: resp body", "ext_proc", "response_body_total_latency_us"),
    ("response out", "response_sent_last_us", None),
)


def read_access_log(
    path: str, offset: int, settle_s: float = 1.0, timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """The JSON lines Envoy appended to ``path`` after byte ``offset``, once the file has stopped
    growing for ``settle_s`` (the bench runs Envoy with ``--file-flush-interval-msec 100``); a line
    that began before ``offset`` is not among them. A line that is not a JSON object is an error:
    the format is ours."""
    import orjson

    deadline = time.monotonic() + timeout_s
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = os.path.getsize(path) if os.path.exists(path) else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
        time.sleep(0.1)
    try:
        with open(path, "rb") as f:
            f.seek(max(0, offset - 1))
            data = f.read()
    except OSError as err:
        raise BenchError(f"the gateway's access log cannot be read: {err}") from None
    if offset > 0:
        # Envoy writes its log out in blocks, so ``offset`` (the size when the caller looked)
        # may fall inside a line: that line was logged before, and is not ours.
        start = data.find(b"\n") + 1
        data = data[start:] if start else b""
    lines = [ln for ln in data.splitlines() if ln.strip()]
    rows: list[dict[str, Any]] = []
    for i, ln in enumerate(lines, 1):
        try:
            row = orjson.loads(ln)
        except orjson.JSONDecodeError as err:
            raise BenchError(f"{path}: line {i} after byte {offset} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise BenchError(f"{path}: line {i} after byte {offset} is not a JSON object")
        rows.append(row)
    return rows


def timeline_medians(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of each :data:`TIMELINE_COLUMNS` value over ``rows`` (None where no row has it)."""
    out: dict[str, Any] = {"requests": len(rows)}
    for column, field, sub in TIMELINE_COLUMNS:
        vals = []
        for r in rows:
            v = r.get(field)
            if sub is not None:
                v = v.get(sub) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.append(float(v))
        out[column] = round(statistics.median(vals)) if vals else None
    return out


def timeline_table(timeline: Sequence[dict[str, Any]]) -> str:
    cols = [c for c, _, _ in TIMELINE_COLUMNS]
    return _table(
        ["path", "requests", *cols],
        [[t["path"], t["requests"], *(t.get(c) for c in cols)] for t in timeline],
        title="\n(d) Where the time goes (Envoy access log; medians, us): the phases counted from the "
        "request's first byte at the gateway, and how long ext_proc waited for the picker's answer to "
        "each message (request headers: until the routing answer, which needs the whole body):",
    )


class _EnvoyRun:
    """The Envoy part's phases over one backend; results accumulate in the lists."""

    def __init__(
        self, opts: argparse.Namespace, workdir: Path, bodies: Sequence[BenchBody], driver: _Load
    ) -> None:
        self.opts = opts
        self.workdir = workdir
        self.bodies = bodies
        self.driver = driver
        self.ncpu = os.cpu_count() or 1
        self.backend: _Child | None = None
        self.backend_port = 0
        self.latency: list[dict[str, Any]] = []
        self.load: list[dict[str, Any]] = []
        self.rss: list[dict[str, Any]] = []
        self.soak: list[dict[str, Any]] = []
        self.picker: dict[str, Any] = {}
        self.timeline: list[dict[str, Any]] = []
        self._logs = 0

    # -- helpers
    def _access_log(self, name: str) -> str | None:
        """Where the gateway of phase ``name`` writes its access log (``--envoy-timeline``), or None."""
        if not self.opts.envoy_timeline:
            return None
        self._logs += 1
        return str(self.workdir / f"access-{self._logs}-{name}.log")

    def _flush_args(self) -> tuple[str, ...]:
        # Envoy writes file logs out every 10 s by default; the timeline reads them at once.
        return ("--file-flush-interval-msec", "100") if self.opts.envoy_timeline else ()

    def _latency(self, path: str, port: int, desc: str, access_log: str | None = None) -> None:
        o = self.opts
        offset = Path(access_log).stat().st_size if access_log and Path(access_log).exists() else 0
        vals = sequential_latency(
            port, self.bodies, o.requests, o.latency_warmup, progress=o.progress, desc=desc
        )
        st = _stats(vals, 3)
        self.latency.append({"path": path, "n": int(st["n"]), "p50_ms": st["p50"], "p90_ms": st["p90"],
                             "p99_ms": st["p99"], "mean_ms": st["mean"], "max_ms": st["max"]})  # fmt: skip
        if access_log:
            rows = read_access_log(access_log, offset)
            self.timeline.append({"path": path, **timeline_medians(rows[-o.requests :])})

    def _load(self, path: str, port: int, pids: dict[str, int], desc: str) -> LoadResult:
        r = self.driver.run(port, pids, duration_s=self.opts.duration, desc=desc)
        self.load.append({
            "path": path, "client": r.client, "concurrency": self.opts.concurrency, "requests": r.requests,
            "errors": r.errors, "seconds": r.seconds, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "cpu_percent": r.cpu, "limit": _verdict(r.cpu, self.ncpu),
        })  # fmt: skip
        return r

    # -- phases
    def start_backend(self, envoy: str) -> _Child:
        from llmpool.serving.scrape import parse_vllm_metrics

        self.backend, self.backend_port = _start_backend(self.workdir, envoy, self.opts.envoy_concurrency)
        try:
            parse_vllm_metrics(http_get(f"http://127.0.0.1:{self.backend_port}/metrics")[1])
        except Exception as err:
            self.backend.stop()
            raise BenchError(f"the backend's /metrics does not parse: {err}") from None
        return self.backend

    def direct(self) -> None:
        """Straight to the backend: the floor, and the ceiling of client and backend together."""
        assert self.backend is not None
        self._latency("direct", self.backend_port, "direct: latency")
        self._load("direct (ceiling)", self.backend_port, {"backend": self.backend.pid}, "direct: load")

    def no_picker(self) -> None:
        from llmpool import gateway

        assert self.backend is not None
        log = self._access_log("no-picker")
        spec = gateway.EnvoySpec(
            listen_port=free_port(), admin_port=free_port(), epp_port=None,
            fallback_endpoints=(f"127.0.0.1:{self.backend_port}",), concurrency=self.opts.envoy_concurrency,
            access_log_path=log,
        )  # fmt: skip
        with gateway.EnvoyProcess(spec, extra_args=self._flush_args()) as gw:
            assert gw.pid is not None
            _wait_serving(spec.listen_port, self.bodies[0])
            self._latency("envoy, no picker", spec.listen_port, "envoy: latency", log)
            pids = {"gateway": gw.pid, "backend": self.backend.pid}
            self._load("envoy, no picker", spec.listen_port, pids, "envoy: load")

    def with_picker(self, policy: str, transport: str = "grpclib", event_loop: str = "auto") -> None:
        from llmpool import gateway

        assert self.backend is not None
        o = self.opts
        label = f"{policy}, {transport}" + ("" if event_loop == "auto" else f", {event_loop} loop")
        name = f"envoy + picker ({label})"
        picker, ports = _start_picker(self.workdir, policy, self.backend_port, transport, event_loop)
        try:
            pid = picker.pid
            samples: dict[str, Any] = {"policy": label, "pid": pid, "start": _rss_mib(pid)}
            log = self._access_log(policy)
            spec = gateway.EnvoySpec(
                listen_port=free_port(), admin_port=free_port(), epp_port=ports["grpc"],
                epp_health_port=ports["health"], body_mode="FULL_DUPLEX_STREAMED",
                concurrency=o.envoy_concurrency, access_log_path=log,
            )  # fmt: skip
            with gateway.EnvoyProcess(spec, extra_args=self._flush_args()) as gw:
                assert gw.pid is not None
                pids = {"gateway": gw.pid, "backend": self.backend.pid, "picker": pid}
                _wait_serving(spec.listen_port, self.bodies[0])
                sequential_latency(spec.listen_port, self.bodies, 0, o.latency_warmup, progress=False,
                                   desc="warm-up")  # fmt: skip
                samples["warm"] = _rss_mib(pid)
                self._latency(name, spec.listen_port, f"{label}: latency", log)
                samples["latency"] = _rss_mib(pid)
                sent = self._load(name, spec.listen_port, pids, f"{label}: load").requests
                samples["load"] = _rss_mib(pid)
                if o.soak > 0:
                    sent += self._soak(label, spec.listen_port, pids)
                    samples["soak"] = _rss_mib(pid)
                samples["requests"] = sent
                pm = {} if policy == FLOOR else _picker_metrics(ports["metrics"])
                pm["envoy_ext_proc"] = {k: v for k, v in gw.ext_proc_stats().items() if v}
                self.picker[label] = pm
            if not picker.alive():
                raise BenchError(f"the picker ({label}) died:\n{picker.tail()}")
            self.rss.append(samples)
        finally:
            picker.stop()

    def _soak(self, policy: str, port: int, pids: dict[str, int]) -> int:
        from tqdm import tqdm

        o = self.opts
        done = 0
        t0 = time.monotonic()
        with tqdm(
            total=o.soak, desc=f"{policy}: soak", unit="req", disable=not o.progress, leave=False
        ) as bar:
            while done < o.soak:
                rs = self.driver.count(port, pids, requests=min(o.soak_every, o.soak - done), desc="soak")
                if rs.requests == 0:
                    raise BenchError(f"a soak step through the picker ({policy}) sent nothing")
                done += rs.requests
                bar.update(rs.requests)
                self.soak.append({
                    "policy": policy, "requests": done, "rss_mib": _rss_mib(pids["picker"]),
                    "errors": rs.errors, "rps": rs.rps, "picker_cpu": rs.cpu.get("picker", math.nan),
                    "elapsed_s": round(time.monotonic() - t0, 1),
                })  # fmt: skip
        return done


def run_envoy(opts: argparse.Namespace, *, out: Any = sys.stdout) -> dict[str, Any]:
    from llmpool import gateway

    try:
        envoy = gateway.envoy_binary()
    except gateway.GatewayError as err:
        raise BenchError(str(err)) from None
    if not Path(envoy).is_file():
        raise BenchError(f"the Envoy binary {envoy} does not exist")
    policies = _policy_list(opts.envoy_policies, "--envoy-policies")
    transports = _transport_list(opts.transports)
    loops = _event_loop_list(opts.event_loops)
    wrk = shutil.which("wrk") if opts.client in ("auto", "wrk") else None
    if opts.client == "wrk" and wrk is None:
        raise BenchError("--client wrk: wrk is not installed")
    bodies = make_bodies(opts.seed + 1, opts.bodies, stream_share=0.0)
    summary = _body_summary(bodies)
    print(
        f"\n== Through Envoy: {len(bodies)} non-streamed bodies, prompt tokens "
        f"{summary['prompt_tokens_min']}..{summary['prompt_tokens_max']}, {summary['bytes_mean']} bytes on "
        f"average; backend = Envoy direct_response; load client: "
        f"{'wrk (1 thread)' if wrk else 'python-aiohttp (in-process)'}, {opts.concurrency} connections; "
        f"{os.cpu_count()} CPUs, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        file=out,
        flush=True,
    )
    old_term = _on_sigterm()
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmpool-picker-bench-")))
            run = _EnvoyRun(
                opts, workdir, bodies, _Load(wrk, workdir, bodies, opts.concurrency, opts.progress)
            )
            stack.callback(run.start_backend(envoy).stop)
            run.direct()
            run.no_picker()
            for pol in ([FLOOR] if opts.floor else []) + policies:
                for transport in transports:
                    for loop in loops:
                        run.with_picker(pol, transport, loop)
    except gateway.GatewayError as err:
        raise BenchError(f"gateway: {err}") from None
    finally:
        _restore_sigterm(old_term)

    _print_envoy(out, run.latency, run.load, run.rss, run.soak, run.picker)
    if run.timeline:
        print(timeline_table(run.timeline), file=out)
    return {
        "client": "wrk" if wrk else "python-aiohttp",
        "bodies": summary,
        "latency": run.latency,
        "load": run.load,
        "picker_rss_mib": run.rss,
        "soak": run.soak,
        "picker": run.picker,
        "timeline": run.timeline,
    }


def _print_envoy(
    out: Any,
    latency: list[dict[str, Any]],
    load: list[dict[str, Any]],
    rss: list[dict[str, Any]],
    soak: list[dict[str, Any]],
    picker_stats: dict[str, Any],
) -> None:
    base = next((r for r in latency if r["path"] == "envoy, no picker"), None)
    rows = []
    for r in latency:
        add50 = add99 = None
        if base is not None and r["path"].startswith("envoy + picker"):
            add50 = round(r["p50_ms"] - base["p50_ms"], 3)
            add99 = round(r["p99_ms"] - base["p99_ms"], 3)
        r["added_p50_ms"], r["added_p99_ms"] = add50, add99
        rows.append([r["path"], r["n"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["mean_ms"], add50, add99])
    print(
        _table(
            ["path", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "added p50", "added p99"],
            rows,
            title="\n(a) Sequential keep-alive POSTs (http.client, TCP_NODELAY), ms; added = with picker "
            "minus Envoy without picker:",
        ),
        file=out,
    )
    rows = []
    for r in load:
        c = r["cpu_percent"]
        rows.append(
            [
                r["path"],
                r["client"],
                r["requests"],
                r["errors"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                c.get("client"),
                c.get("gateway"),
                c.get("backend"),
                c.get("picker"),
                c.get("irq"),
                c.get("other"),
                c.get("machine"),
            ]
        )
    print(
        _table(
            [
                "path",
                "client",
                "requests",
                "errors",
                "req/s",
                "p50 ms",
                "p99 ms",
                "cpu client",
                "gateway",
                "backend",
                "picker",
                "irq",
                "other",
                "machine",
            ],
            rows,
            title=f"\n(b) Sustained load, {load[0]['concurrency'] if load else 0} keep-alive connections; "
            "CPU in % of one core over the run (irq = kernel irq/softirq time, mostly loopback TCP; "
            "other = processes not started here; machine = all):",
        ),
        file=out,
    )
    for r in load:
        print(f"  {r['path']}: {r['limit']}", file=out)
    if rss:
        print(
            _table(
                ["policy", "start", "after warm-up", "after latency", "after load", "after soak", "requests"],
                [
                    [
                        s["policy"],
                        s["start"],
                        s["warm"],
                        s["latency"],
                        s["load"],
                        s.get("soak"),
                        s["requests"],
                    ]
                    for s in rss
                ],
                title="\n(c) Picker RSS (VmRSS, MiB):",
            ),
            file=out,
        )
    if soak:
        print(
            _table(
                ["policy", "soak requests", "RSS MiB", "req/s", "picker cpu", "errors", "elapsed s"],
                [
                    [
                        s["policy"],
                        s["requests"],
                        s["rss_mib"],
                        s["rps"],
                        s["picker_cpu"],
                        s["errors"],
                        s["elapsed_s"],
                    ]
                    for s in soak
                ],
                title="\nSoak: RSS after each step:",
            ),
            file=out,
        )
    for pol, pm in picker_stats.items():
        if pol.startswith(f"{FLOOR},"):
            continue  # the floor keeps no metrics
        bad = {k: v for k, v in pm.items() if k in ("stream_errors", "rejections") and v}
        codes = {k.removeprefix("responses_"): int(v) for k, v in pm.items() if k.startswith("responses_")}
        print(
            f"  picker ({pol}): {int(pm.get('decisions', 0)):,} decisions, "
            f"mean {pm.get('decision_mean_us', '-')} us "
            f"(its own histogram); responses {codes}; {bad or 'no stream errors or rejections'}; "
            f"Envoy ext_proc: {pm.get('envoy_ext_proc', {})}",
            file=out,
        )
    out.flush()


def _on_sigterm() -> Any:
    """Turn SIGTERM into SystemExit while subprocesses run, so every finally stops them."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(old: Any) -> None:
    if old is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------ CLI


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag}: give comma-separated integers, not {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{flag}: give positive integers, not {text!r}")
    return vals


def _policy_list(text: str, flag: str) -> list[str]:
    """Policy names, each checked the way the picker checks its config."""
    from pydantic import ValidationError

    from llmpool.picker.config import PickerConfig
    from llmpool.routing.policy import PolicyConfig, validation_message

    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise BenchError(f"{flag}: give at least one policy name")
    for name in vals:
        try:
            PickerConfig(policy=PolicyConfig(name=name), profile=PROFILE)
        except ValidationError as err:
            raise BenchError(f"{flag}: {validation_message(err)}") from None
    return vals


def _choices(text: str, flag: str, known: Sequence[str]) -> list[str]:
    """A comma-separated list of names from ``known``; anything else is one error naming the flag."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in known]
    if bad or not names:
        unknown = ", ".join(bad) or "(none given)"
        raise BenchError(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return names


def _event_loop_list(text: str) -> list[str]:
    from llmpool.aio import EVENT_LOOPS, loop_factory

    loops = _choices(text, "--event-loops", EVENT_LOOPS)
    for t in loops:
        try:
            loop_factory(t)
        except ValueError as err:
            raise BenchError(f"--event-loops: {err}") from None
    return loops


def _transport_list(text: str) -> list[str]:
    from llmpool.picker import TRANSPORTS

    return _choices(text, "--transports", TRANSPORTS)


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--part", choices=("decision", "envoy", "all"), default="all", help="what to run (default all)"
    )
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON to this file")
    p.add_argument("--seed", type=int, default=1, help="workload and pool seed (default 1)")
    p.add_argument("--bodies", type=_positive, default=256, help="distinct request bodies (default 256)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    d = p.add_argument_group("decision part")
    d.add_argument("--endpoints", default="8,64,256", help="pool sizes (default 8,64,256)")
    d.add_argument("--policies", default=DEFAULT_POLICIES, help=f"policies (default {DEFAULT_POLICIES})")
    d.add_argument(
        "--decisions", type=_positive, default=2000, help="timed decisions per cell (default 2000)"
    )
    d.add_argument("--warmup", type=_non_negative, default=200, help="untimed decisions first (default 200)")
    d.add_argument(
        "--inflight", type=_non_negative, default=4, help="requests left in flight per endpoint (default 4)"
    )
    d.add_argument(
        "--backlog",
        default="",
        help="also time a dispatch round with this many requests held at the router, comma-separated "
        "(policies that hold: impact, rl, br0, brh; at the smallest pool size)",
    )
    e = p.add_argument_group("envoy part")
    e.add_argument(
        "--envoy-policies",
        default=DEFAULT_ENVOY_POLICIES,
        help=f"picker policies behind Envoy (default {DEFAULT_ENVOY_POLICIES})",
    )
    e.add_argument(
        "--transports",
        default="h2",
        help="picker gRPC transports to run each policy on, comma-separated: h2 (the picker's "
        "default), grpclib, grpcio (default h2)",
    )
    e.add_argument(
        "--event-loops",
        default="auto",
        help="event loops to run each policy on: auto (uvloop when installed, the picker's default), "
        "uvloop, asyncio, comma-separated (default auto)",
    )
    e.add_argument(
        "--floor",
        action="store_true",
        help="also run the transport floor (python -m llmpool.picker.floor: answers, no parsing, "
        "no policy) on each transport, as policy 'floor'",
    )
    e.add_argument(
        "--requests", type=_positive, default=2000, help="sequential POSTs per path (default 2000)"
    )
    e.add_argument(
        "--latency-warmup",
        type=_non_negative,
        default=200,
        help="untimed sequential POSTs first (default 200)",
    )
    e.add_argument(
        "--concurrency", type=_positive, default=16, help="connections of the load run (default 16)"
    )
    e.add_argument("--duration", type=float, default=10.0, help="seconds of each load run (default 10)")
    e.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load client: wrk if installed (auto), or the in-process aiohttp client",
    )
    e.add_argument(
        "--soak",
        type=_non_negative,
        nargs="?",
        const=SOAK_DEFAULT,
        default=0,
        metavar="N",
        help=f"after the load run, send N more requests per policy and sample the picker's RSS "
        f"(--soak alone: {SOAK_DEFAULT:,}; default off)",
    )
    e.add_argument("--soak-every", type=_positive, default=10_000, help="RSS sample interval (default 10000)")
    e.add_argument("--envoy-concurrency", type=_positive, default=1, help="Envoy worker threads (default 1)")
    e.add_argument(
        "--envoy-timeline",
        action="store_true",
        help="give each gateway a JSON access log and print, per path, the median time from the "
        "request's first byte to each phase and ext_proc's per-message latencies (the log costs "
        "Envoy a little: compare latencies of runs with the same setting)",
    )


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``picker-bench`` to an argparse sub-parsers object; it dispatches to :func:`run_bench`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "picker-bench",
        help="benchmark the endpoint picker: decision latency in-process, and overhead behind Envoy",
        description="Benchmark the endpoint picker. 'decision': Director.route latency per policy and pool "
        "size, in-process. 'envoy': added latency, throughput and RSS of the picker behind Envoy's "
        "ext_proc filter against an instant backend.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the parts ``args.part`` asks for; print tables; 0 on success, 2 on a bench error."""
    out = sys.stdout
    result: dict[str, Any] = {
        "meta": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "args": {k: v for k, v in vars(args).items() if k != "func"},
        }
    }
    try:
        if args.duration <= 0:
            raise BenchError("--duration must be positive")
        if args.part in ("decision", "all"):
            result["decision"] = run_decision(args, out=out)
        if args.part in ("envoy", "all"):
            result["envoy"] = run_envoy(args, out=out)
    except BenchError as err:
        print(f"llmpool picker-bench: error: {err}", file=sys.stderr)
        return 2
    result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        import orjson

        path = Path(args.json)
        path.write_bytes(
            orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        )
        print(f"\njson: {path}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmpool.picker.bench", description=__doc__.split("\n\n")[0]
    )
    _add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
