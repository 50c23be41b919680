"""Replay a workload against live OpenAI-compatible servers, routed client-side by a
policy: the same policy objects, datastore and dispatch loop as the endpoint picker,
fed by real scrapes. It measures what a user would (TTFT and E2E at the client) and
reports them in the lab's :class:`~llmpool.lab.metrics.RunSummary`, so a live run
and a simulated run of the same workload print side by side.

Prompts are sent as token ids, so a request has exactly its trace's prompt length on
any server; its leading ``prefix_hashes`` blocks map to fixed id runs, so requests
that share a prefix in the trace share it on the server. Output length is forced with
``max_tokens`` + ``ignore_eos``.

``time_scale`` is for emulators running faster than real time: arrivals are
compressed by it, and every time the policy sees or the summary reports is in the
servers' (engine) seconds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiohttp
import numpy as np
import orjson

from llmpool.lab.metrics import RequestLog, RunSummary, summarize
from llmpool.lab.workload import Workload, WorkloadItem
from llmpool.routing.policy import Policy
from llmpool.routing.profile import PS_PER_S
from llmpool.serving.collector import MetricsCollector
from llmpool.serving.datastore import Datastore, Endpoint
from llmpool.serving.dispatch import Dispatcher

#: Token ids drawn for synthetic prompts: clear of the special tokens at the bottom of
#: common vocabularies and inside every vocabulary of at least 32 k entries.
TOKEN_ID_RANGE = (1000, 30000)


class ReplayError(RuntimeError):
    pass


@dataclass(slots=True)
class LiveRecord:
    rid: int
    endpoint: int
    arrival: float  # engine seconds since the start of the replay
    dispatched: float
    first: float
    finish: float
    prompt: int
    output: int
    error: str = ""


@dataclass(slots=True)
class LiveResult:
    summary: RunSummary
    records: list[LiveRecord]
    errors: int
    scrapes: int
    scrape_failures: int
    per_endpoint: list[int]


def prompt_ids(item: WorkloadItem, seed: int) -> list[int]:
    """Token ids for a request: shared-prefix blocks first, then request-unique ids."""
    req = item.request
    lo, hi = TOKEN_ID_RANGE
    out: list[int] = []
    hbt = req.hash_block_tokens
    for h in req.prefix_hashes:
        if len(out) + hbt > req.prompt_tokens:
            break
        rng = np.random.default_rng([seed, h & 0xFFFFFFFF, (h >> 32) & 0xFFFFFFFF])
        out.extend(rng.integers(lo, hi, hbt).tolist())
    rest = req.prompt_tokens - len(out)
    if rest > 0:
        rng = np.random.default_rng([seed, 7919, req.id])
        out.extend(rng.integers(lo, hi, rest).tolist())
    return out


async def _one(
    session: aiohttp.ClientSession,
    ds: Datastore,
    dispatcher: Dispatcher,
    item: WorkloadItem,
    *,
    model: str | None,
    seed: int,
    start: float,
    scale: float,
    clock: Callable[[], float],
    records: list[LiveRecord],
) -> None:
    req = replace(item.request, prediction=None)
    arrival = clock() - start
    fl = await dispatcher.route(req)
    idx = ds.endpoints.index(fl.target)
    dispatched = clock() - start
    body: dict[str, object] = {
        "prompt": prompt_ids(item, seed),
        "max_tokens": item.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if model:
        body["model"] = model
    first = -1.0
    generated = 0
    usage_tokens = -1
    error = ""
    try:
        async with session.post(f"{fl.target.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                raise ReplayError(f"HTTP {resp.status}: {text}")
            tail = b""
            async for buf in resp.content.iter_any():
                data = tail + buf
                # one '"finish_reason"' per content chunk; the usage chunk has none
                n = data.count(b'"finish_reason"')
                if b'"choices":[]' in data:
                    usage_tokens = _usage_tokens(data)
                cut = data.rfind(b"\n\n")
                tail = data[cut + 2 :] if cut >= 0 else data
                if cut >= 0:
                    n -= tail.count(b'"finish_reason"')
                else:
                    n = 0
                if n > 0:
                    now = clock()
                    if first < 0:
                        first = now - start
                    generated += n
                    ds.progress(fl, generated, now)
    except (aiohttp.ClientError, TimeoutError, ReplayError) as err:
        error = f"{type(err).__name__}: {err}"
    finally:
        out = usage_tokens if usage_tokens >= 0 else generated
        dispatcher.finish(fl, out)
    finish = clock() - start
    records.append(
        LiveRecord(req.id, idx, arrival, dispatched, first if first >= 0 else finish, finish,
                   req.prompt_tokens, usage_tokens if usage_tokens >= 0 else generated, error)
    )  # fmt: skip


def _usage_tokens(data: bytes) -> int:
    """completion_tokens of the usage event (``"choices":[]``) in an SSE buffer."""
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"choices":[]' in event:
            try:
                return int(orjson.loads(event[6:])["usage"]["completion_tokens"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                return -1
    return -1


async def replay(
    workload: Workload,
    endpoints: Sequence[Endpoint],
    policy: Policy,
    *,
    model: str | None = None,
    time_scale: float = 1.0,
    scrape_interval_s: float = 0.05,
    tick_s: float = 0.02,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    request_timeout_s: float = 600.0,
) -> LiveResult:
    """Replay ``workload`` (arrival times as given) and measure every request."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    scale = time_scale

    def clock() -> float:
        return time.monotonic() * scale

    ds = Datastore(endpoints)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    records: list[LiveRecord] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        collector = MetricsCollector(ds, session, interval_s=scrape_interval_s / scale, clock=clock)
        await collector.start()
        dispatcher = Dispatcher(policy, ds, tick_s=tick_s / scale, clock=clock)
        try:
            start = clock()
            tasks: list[asyncio.Task[None]] = []
            for item in workload.items:
                delay = (start + item.request.arrival - clock()) / scale
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(
                    asyncio.create_task(
                        _one(
                            session,
                            ds,
                            dispatcher,
                            item,
                            model=model,
                            seed=seed,
                            start=start,
                            scale=scale,
                            clock=clock,
                            records=records,
                        )
                    )
                )
            pending = set(tasks)
            done_count = 0
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                done_count += len(done)
                if progress is not None:
                    progress(len(done))
        finally:
            dispatcher.close()
            await collector.stop()
    ok = [r for r in records if not r.error]
    log = RequestLog()
    for r in sorted(ok, key=lambda r: r.rid):
        log.add(r.rid, _ps(r.arrival), _ps(r.dispatched), _ps(r.first), _ps(r.finish), r.prompt, r.output, 0)
    summary = summarize(log, rejected=len(records) - len(ok), preemptions=0, imbalance_gmax_sum=0.0,
                        imbalance_maxmin_sum=0.0, imbalance_samples=0)  # fmt: skip
    per_ep = [0] * len(endpoints)
    for r in records:
        per_ep[r.endpoint] += 1
    return LiveResult(summary, records, len(records) - len(ok), collector.scrapes, collector.failures, per_ep)


def _ps(s: float) -> int:
    return round(s * PS_PER_S)


def default_rng(seed: int) -> random.Random:
    return random.Random(f"{seed}:live-policy")
