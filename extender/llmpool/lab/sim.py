"""The discrete-event simulator: a router with a queue, a policy, and a pool of engines.

Event order at equal times: engine step ends, then router re-dispatches triggered by
completions, then arrivals, then router ticks, then metric samples. Held requests are
offered to the policy again on ticks and after completions (which are the same events
whether or not decode stretches are fast-forwarded), never on plain step ends.

The router sees exactly what the live picker will see: scraped gauges refreshed every
``scrape_interval_s`` (lazily, when a decision needs them) plus its own exact in-flight
accounting; never a request's true output length.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmpool.lab.engine import Engine, EngineRequest, StepGroup
from llmpool.lab.metrics import RequestLog, RunSummary, summarize
from llmpool.routing.driver import (
    DispatchError,
    dispatch_round,
    note_assigned,
    note_finished,
    note_first_token,
    note_scraped,
)
from llmpool.routing.policy import Policy
from llmpool.routing.profile import PS_PER_S, EngineConfig, Profile, StepTimer
from llmpool.routing.types import ActiveRequest, EndpointState, PoolView, Request, Route

_GROUP, _DISPATCH, _ARRIVAL, _TICK, _SAMPLE = 0, 1, 2, 3, 4


class SimItem(Protocol):
    """One workload request: what the router sees plus the hidden true output length."""

    @property
    def request(self) -> Request: ...

    @property
    def output_tokens(self) -> int: ...


class SimulationError(RuntimeError):
    """The simulation cannot continue (e.g. a policy returned an invalid endpoint)."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the pool is built and observed."""

    instances: int = 4
    group_size: int = 1  # > 1: data-parallel barrier groups of this many ranks
    scrape_interval_s: float = 0.05
    tick_s: float = 0.02
    sample_interval_s: float = 0.2
    fast_forward: bool = True
    engine_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.group_size < 1 or self.instances % self.group_size:
            raise ValueError(
                f"instances ({self.instances}) must be a multiple of group_size ({self.group_size})"
            )
        if self.tick_s <= 0 or self.sample_interval_s <= 0 or self.scrape_interval_s < 0:
            raise ValueError("tick_s and sample_interval_s must be > 0, scrape_interval_s >= 0")


class _Flight:
    __slots__ = ("dispatch_ps", "endpoint", "item", "scrape_epoch")

    def __init__(self, item: SimItem, endpoint: int, dispatch_ps: int, scrape_epoch: int) -> None:
        self.item = item
        self.endpoint = endpoint
        self.dispatch_ps = dispatch_ps
        self.scrape_epoch = scrape_epoch  # scrapes done before this request was sent


@dataclass(slots=True)
class RunResult:
    summary: RunSummary
    log: RequestLog
    engine_counters: list[dict[str, int]]


class Simulator:
    """Replays ``items`` (sorted by arrival) through ``policy`` onto simulated engines."""

    def __init__(self, profile: Profile, policy: Policy, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self.profile = profile
        self.policy = policy
        ecfg: EngineConfig = profile.engine.with_overrides(**self.cfg.engine_overrides)
        self.timer = StepTimer(profile.step)
        n, g = self.cfg.instances, self.cfg.group_size
        self.groups: list[StepGroup] = []
        self.ep_group: list[StepGroup] = []
        self.ep_engine: list[Engine] = []
        self.endpoints: list[EndpointState] = []
        for gi in range(n // g):
            engines = [Engine(ecfg, self.timer, name=f"pod{gi}-rank{r}") for r in range(g)]
            group = StepGroup(engines, self.timer, fast_forward=self.cfg.fast_forward)
            self.groups.append(group)
            for r, e in enumerate(engines):
                idx = len(self.endpoints)
                st = EndpointState(
                    index=idx,
                    name=f"10.0.{gi}.1:{8000 + r}",
                    group=f"pod{gi}",
                    rank=r,
                    kv_capacity_tokens=e.capacity_tokens,
                )
                st._active_source = self._active_source(idx)
                self.endpoints.append(st)
                self.ep_group.append(group)
                self.ep_engine.append(e)
        host = profile.host
        if host.active:
            k = host.servers_per_host
            slow = (0.0, host.slowdown_per_busy_neighbour, host.slowdown_per_prefilling_neighbour)
            for i, group in enumerate(self.groups):
                first = i - i % k
                group.neighbours = [h for h in self.groups[first : first + k] if h is not group]
                group.slowdowns = slow
        self.view = PoolView(now=0.0, endpoints=self.endpoints, queue=())
        self._place_ps = 0
        self.scrape_ps = round(self.cfg.scrape_interval_s * PS_PER_S)
        self.tick_ps = round(self.cfg.tick_s * PS_PER_S)
        self.sample_ps = round(self.cfg.sample_interval_s * PS_PER_S)
        self.last_scrape_ps = -(1 << 62)

    # ------------------------------------------------------------------ view
    def _active_source(self, idx: int) -> Callable[[], Sequence[ActiveRequest]]:
        def build() -> Sequence[ActiveRequest]:
            e = self.ep_engine[idx]
            off = self.ep_group[idx].generated_offset(self._now_ps)
            out: list[ActiveRequest] = []
            for r in e.running:
                fl: _Flight = r.tag
                gen = r.generated + (off if e.seg_n else 0)
                out.append(
                    ActiveRequest(
                        request=fl.item.request,
                        assigned_at=fl.dispatch_ps / PS_PER_S,
                        generated_tokens=gen,
                        first_token_at=r.first_ps / PS_PER_S if r.first_ps >= 0 else None,
                    )
                )
            for r in e.waiting:
                fl = r.tag
                out.append(
                    ActiveRequest(
                        request=fl.item.request,
                        assigned_at=fl.dispatch_ps / PS_PER_S,
                        generated_tokens=r.generated,
                        first_token_at=r.first_ps / PS_PER_S if r.first_ps >= 0 else None,
                    )
                )
            return out

        return build

    def _scrape(self, now_ps: int) -> None:
        now_s = now_ps / PS_PER_S
        endpoints = self.endpoints
        idx = 0
        for group in self.groups:
            for s in group.all_stats(now_ps):
                st = endpoints[idx]
                st.running = s.running
                st.waiting = s.waiting
                st.kv_usage = s.kv_usage
                st.inflight_output_tokens = s.output_tokens
                note_scraped(st, now_s)
                idx += 1
        self.last_scrape_ps = now_ps

    # ------------------------------------------------------------------ run
    def run(
        self,
        items: Iterable[SimItem],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> RunResult:
        heap: list[tuple[int, int, int, int, Any]] = []
        seq = 0
        push = heapq.heappush
        pop = heapq.heappop
        it = iter(items)
        queue_reqs: deque[Request] = deque()
        started: list[EngineRequest] = []  # first tokens of the step just applied
        self.view.queue = queue_reqs
        log = RequestLog()
        rejected = 0
        tick_pending = False
        dispatch_pending = False
        sample_pending = False
        imb_gmax = 0.0
        imb_maxmin = 0.0
        imb_samples = 0
        win_gmax = 0.0  # the same while arrivals last (independent instances)
        win_maxmin = 0.0
        win_samples = 0
        independent = self.cfg.group_size == 1 and len(self.endpoints) > 1
        policy = self.policy
        endpoints = self.endpoints
        ep_group = self.ep_group
        ep_engine = self.ep_engine
        n_ep = len(endpoints)
        self._now_ps = 0
        # The API server's own latency (HTTP, tokenising) overlaps engine steps: it
        # delays what the client sees, not the engine.
        frontend_ps = round(self.profile.frontend_latency_ms * 1e9)
        done_count = 0
        progress_every = 1000

        arrivals_done = False

        def next_arrival() -> None:
            nonlocal seq, arrivals_done
            item = next(it, None)
            if item is None:
                arrivals_done = True  # at the last arrival's time: the drain starts
                for g in self.groups:
                    g.arrivals_end_ps = self._now_ps
            else:
                t = round(item.request.arrival * PS_PER_S)
                push(heap, (t, _ARRIVAL, seq, 0, item))
                seq += 1

        def schedule_group(g: StepGroup) -> None:
            nonlocal seq
            push(heap, (g.end_ps, _GROUP, seq, g.version, g))
            seq += 1

        def host_changed(g: StepGroup, now_ps: int) -> None:
            """``g`` started or stopped stepping, or switched between decoding and
            prefilling: its busy neighbours re-plan after their step in progress, at their
            new speed."""
            for h in g.neighbours:
                if h.busy and h.interrupt(now_ps):
                    schedule_group(h)

        window = max(1, int(getattr(policy, "queue_window", 1)))

        items_by_req: dict[int, SimItem] = {}

        def fail(req: Request, err: DispatchError) -> None:
            raise SimulationError(str(err)) from err.__cause__

        def dispatch(now_ps: int) -> None:
            nonlocal seq, tick_pending
            if now_ps - self.last_scrape_ps >= self.scrape_ps:
                self._scrape(now_ps)
            self._place_ps = now_ps
            self.view.now = now_ps / PS_PER_S
            held, _ = dispatch_round(policy, self.view, queue_reqs, window, place, fail)
            if held and queue_reqs and not tick_pending:
                push(heap, (now_ps + self.tick_ps, _TICK, seq, 0, None))
                seq += 1
                tick_pending = True

        def place(req: Request, route: Route) -> int | None:
            nonlocal seq, rejected
            now_ps = self._place_ps
            idx = route.endpoints[0]
            item = items_by_req.pop(id(req))
            engine = ep_engine[idx]
            if not engine.fits(req.prompt_tokens, item.output_tokens):
                rejected += 1
                return None
            epoch = note_assigned(endpoints[idx], req.prompt_tokens)
            engine.add(
                EngineRequest(
                    req.id,
                    req.prompt_tokens,
                    item.output_tokens,
                    req.prefix_hashes,
                    req.hash_block_tokens,
                    _Flight(item, idx, now_ps, epoch),
                ),
                now_ps,
            )
            group = ep_group[idx]
            if not group.busy:
                if group.plan(now_ps):
                    schedule_group(group)
                    if group.neighbours:
                        host_changed(group, now_ps)
            elif group.interrupt(now_ps):
                schedule_group(group)
            return idx

        next_arrival()
        while heap:
            t, kind, _, version, obj = pop(heap)
            self._now_ps = t
            if kind == _GROUP:
                group: StepGroup = obj
                if version != group.version or not group.busy:
                    continue
                started.clear()
                was = group.activity
                finished = group.finish(t, started)
                for r in started:  # the router sees first tokens as they stream
                    note_first_token(endpoints[r.tag.endpoint], r.prompt)
                now_s = t / PS_PER_S
                for r in finished:
                    fl: _Flight = r.tag
                    req = fl.item.request
                    log.add(
                        req.id,
                        round(req.arrival * PS_PER_S),
                        fl.dispatch_ps,
                        r.first_ps + frontend_ps,
                        r.finish_ps + frontend_ps,
                        r.prompt,
                        r.generated,
                        r.preemptions,
                    )
                    note_finished(endpoints[fl.endpoint], r.prompt, fl.scrape_epoch)
                    policy.on_completed(req, fl.endpoint, r.generated, now_s)
                done_count += len(finished)
                if progress is not None and done_count >= progress_every:
                    progress(done_count)
                    done_count = 0
                if group.plan(t):
                    schedule_group(group)
                if group.neighbours and group.activity != was:
                    host_changed(group, t)
                if finished and queue_reqs and not dispatch_pending:
                    # after every step end at this instant (an inline dispatch would see
                    # other groups mid-way through the same instant)
                    push(heap, (t, _DISPATCH, seq, 0, None))
                    seq += 1
                    dispatch_pending = True
            elif kind == _DISPATCH:
                dispatch_pending = False
                if queue_reqs:
                    dispatch(t)
            elif kind == _ARRIVAL:
                obj.request.prediction = None  # a new arrival carries no prediction yet
                items_by_req[id(obj.request)] = obj
                queue_reqs.append(obj.request)
                next_arrival()
                dispatch(t)
                if independent and not sample_pending:
                    push(heap, (t + self.sample_ps, _SAMPLE, seq, 0, None))
                    seq += 1
                    sample_pending = True
            elif kind == _TICK:
                tick_pending = False
                if queue_reqs:
                    dispatch(t)
                    if queue_reqs and arrivals_done and not any(g.busy for g in self.groups):
                        raise SimulationError(
                            f"policy {policy.name!r} holds {len(queue_reqs)} request(s) on an idle "
                            "pool with no arrivals left: it would wait forever"
                        )
            else:  # _SAMPLE: KV-load imbalance across independent instances
                sample_pending = False
                busy = bool(queue_reqs)
                mx = 0
                mn = 1 << 62
                tot = 0
                for idx in range(n_ep):
                    g = ep_group[idx]
                    kv = g.kv_tokens(0, t)
                    busy = busy or g.busy
                    tot += kv
                    mx = max(mx, kv)
                    mn = min(mn, kv)
                if busy:
                    imb_gmax += n_ep * mx - tot
                    imb_maxmin += mx - mn
                    imb_samples += 1
                    if not arrivals_done:
                        win_gmax += n_ep * mx - tot
                        win_maxmin += mx - mn
                        win_samples += 1
                    push(heap, (t + self.sample_ps, _SAMPLE, seq, 0, None))
                    seq += 1
                    sample_pending = True
        if progress is not None and done_count:
            progress(done_count)
        if queue_reqs:  # pragma: no cover - a policy that holds forever with no work left
            raise SimulationError(f"policy {policy.name!r} held {len(queue_reqs)} requests forever")
        if not independent:
            steps = sum(g.steps for g in self.groups)
            imb_gmax = float(sum(g.imb_gmax for g in self.groups))
            imb_maxmin = float(sum(g.imb_maxmin for g in self.groups))
            imb_samples = steps
            win_gmax = float(sum(g.win_imb_gmax for g in self.groups))
            win_maxmin = float(sum(g.win_imb_maxmin for g in self.groups))
            win_samples = sum(g.win_steps for g in self.groups)
        counters = [
            {
                "preemptions": e.num_preemptions,
                "prompt_tokens": e.prompt_tokens_total,
                "generation_tokens": e.generation_tokens_total,
                "prefix_queries": e.prefix_queries,
                "prefix_hits": e.prefix_hits,
                "finished": e.finished_total,
            }
            for e in ep_engine
        ]
        summary = summarize(
            log,
            rejected=rejected,
            preemptions=sum(c["preemptions"] for c in counters),
            imbalance_gmax_sum=imb_gmax,
            imbalance_maxmin_sum=imb_maxmin,
            imbalance_samples=imb_samples,
            arrivals_imbalance_gmax_sum=win_gmax,
            arrivals_imbalance_maxmin_sum=win_maxmin,
            arrivals_imbalance_samples=win_samples,
        )
        return RunResult(summary=summary, log=log, engine_counters=counters)


def make_rng(seed: int, salt: str) -> random.Random:
    """A seeded RNG per (seed, purpose), so adding a consumer does not shift others."""
    return random.Random(f"{seed}:{salt}")
