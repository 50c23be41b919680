"""The lab's engine model driven by a wall clock.

One :class:`~llmpool.lab.engine.StepGroup` of one engine (the simulator's code, fast
forward off) steps back to back while it has work: plan a step at the current engine
time, sleep until the step's end, apply it, wake the streams that got a token. The
engine's integer-picosecond clock maps to the event loop's clock divided by
``time_scale``: at ``time_scale=10`` a 10 ms step takes 1 ms of wall time, and every
duration the server reports (its histograms) is in engine time.

Steps run back to back on the engine model's own timeline: if the event loop wakes up
late, tokens are delivered late, but the next step still starts at the previous one's
planned end, so lateness does not accumulate into the model's latencies. Only when
delivery falls more than ``MAX_LAG_S`` behind (an overloaded host) does the engine
clock resynchronise with the wall clock, losing that time as a slow server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

from llmpool.emulator.vllm_metrics import VllmMetrics
from llmpool.lab.engine import Engine, EngineRequest, StepGroup
from llmpool.routing.profile import PS_PER_S, Profile, StepTimer

#: How far (engine seconds) token delivery may fall behind the engine model's timeline
#: before the engine clock gives up and resynchronises with the wall clock.
MAX_LAG_S = 0.25


class Stream:
    """One request's progress as its HTTP handler sees it."""

    __slots__ = (
        "aborted",
        "arrival",
        "changed",
        "done",
        "ereq",
        "finish",
        "first",
        "last_token",
        "max_tokens",
        "n",
        "reason",
        "scheduled",
    )

    def __init__(self, ereq: EngineRequest, max_tokens: int, n: int, arrival: float) -> None:
        self.ereq = ereq
        self.max_tokens = max_tokens
        self.n = n
        self.arrival = arrival  # engine seconds
        self.scheduled = -1.0
        self.first = -1.0
        self.last_token = -1.0
        self.finish = -1.0
        self.reason = ""
        self.done = False
        self.aborted = False
        self.changed = asyncio.Event()

    @property
    def generated(self) -> int:
        return self.ereq.generated

    @property
    def prompt_tokens(self) -> int:
        return self.ereq.prompt


class RealtimeEngine:
    """A single vLLM engine (``engine="0"``) stepping in scaled wall-clock time."""

    def __init__(
        self,
        profile: Profile,
        *,
        model_name: str,
        max_model_len: int,
        time_scale: float = 1.0,
        engine_overrides: dict[str, int | bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        cfg = profile.engine.with_overrides(**(engine_overrides or {}))
        self.cfg = cfg
        self.timer = StepTimer(profile.step)
        self.engine = Engine(cfg, self.timer, name="0")
        self.group = StepGroup([self.engine], self.timer, fast_forward=False)
        self.time_scale = time_scale
        self.max_model_len = max_model_len
        self._clock = clock
        self._t0 = 0.0
        self._last_end = 0
        self._busy = False
        self._max_lag_ps = int(MAX_LAG_S * PS_PER_S)
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._aborts: list[Stream] = []
        self._task: asyncio.Task[None] | None = None
        cache_info = {
            "block_size": str(cfg.block_size),
            "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "kv_cache_size_tokens": str(cfg.num_gpu_blocks * cfg.block_size),
            "cache_dtype": "auto",
            "gpu_memory_utilization": "0.9",
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
        }
        self.metrics = VllmMetrics(
            self.engine, model_name=model_name, max_model_len=max_model_len, cache_info=cache_info
        )
        self.steps = 0

    # ----------------------------------------------------------------- clock
    def _loop_time(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def now_ps(self) -> int:
        return int((self._loop_time() - self._t0) * self.time_scale * PS_PER_S)

    def engine_seconds(self, ps: int) -> float:
        return ps / PS_PER_S

    def _wall_of(self, ps: int) -> float:
        return self._t0 + ps / (self.time_scale * PS_PER_S)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._t0 = self._loop_time()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llmpool-emulated-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ----------------------------------------------------------------- intake
    def fits(self, prompt: int, output: int) -> bool:
        return self.engine.fits(prompt, output)

    def submit(
        self, prompt: int, output: int, hashes: tuple[int, ...], *, max_tokens: int, n: int = 1
    ) -> Stream:
        now = self.now_ps()
        ereq = EngineRequest(next(self._ids), prompt, output, hashes, hbt=self.cfg.block_size)
        stream = Stream(ereq, max_tokens, n, now / PS_PER_S)
        ereq.tag = stream
        self.engine.add(ereq, now)
        self._wake.set()
        return stream

    def abort(self, stream: Stream) -> None:
        """The client went away: drop the request before the next step."""
        if not stream.done and not stream.aborted:
            stream.aborted = True
            self._aborts.append(stream)
            self._wake.set()

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        group = self.group
        engine = self.engine
        while True:
            if self._aborts:
                self._apply_aborts()
            if not engine.has_work():
                self._busy = False
                self._wake.clear()
                await self._wake.wait()
                continue
            # Back-to-back steps follow the engine model's timeline exactly; the event
            # loop's wake-up lateness only delays when tokens are delivered. Only after an
            # idle spell, or when delivery has fallen more than MAX_LAG_S behind, does the
            # engine clock resynchronise with the wall clock.
            now = self.now_ps()
            start = self._last_end if self._busy and now - self._last_end < self._max_lag_ps else now
            start = max(start, self._last_end)
            self._busy = True
            group.plan(start)
            sched = engine.sched
            before = [(r, r.generated) for r, _ in sched]
            n_tok = 0
            t_start = start / PS_PER_S
            for r, need in sched:
                n_tok += need
                s: Stream = r.tag
                if s.scheduled < 0:
                    s.scheduled = t_start
            delay = self._wall_of(group.end_ps) - self._loop_time()
            await asyncio.sleep(delay if delay > 0 else 0)
            end_ps = group.end_ps
            finished = group.finish(end_ps)
            self._last_end = end_ps
            self.steps += 1
            m = self.metrics
            m.c_iter.observe(n_tok)
            t_end = end_ps / PS_PER_S
            for r, gen in before:
                if r.generated > gen:
                    s = r.tag
                    if s.first < 0:
                        s.first = t_end
                        m.c_ttft.observe(t_end - s.arrival)
                    else:
                        m.c_itl.observe(t_end - s.last_token)
                    s.last_token = t_end
                    s.changed.set()
            for r in finished:
                self._finish(r.tag, t_end, "length" if r.output >= r.tag.max_tokens else "stop")

    def _finish(self, s: Stream, t_end: float, reason: str) -> None:
        s.finish = t_end
        s.reason = reason
        s.done = True
        r = s.ereq
        self.metrics.observe_request(
            prompt=r.prompt,
            generated=r.generated,
            max_tokens=s.max_tokens,
            n=s.n,
            arrival=s.arrival,
            scheduled=s.scheduled if s.scheduled >= 0 else t_end,
            first=s.first if s.first >= 0 else t_end,
            finish=t_end,
            preemptions=r.preemptions,
            computed_prefill=r.prompt - r.cached,
            reason=reason,
        )
        s.changed.set()

    def _apply_aborts(self) -> None:
        now = self.now_ps() / PS_PER_S
        for s in self._aborts:
            if not s.done and self.engine.abort(s.ereq):
                self._finish(s, now, "abort")
        self._aborts.clear()
