"""A model of one vLLM V1 engine, and of groups of engines that step together.

The engine schedules steps as vLLM V1's scheduler does (``vllm/v1/core/sched``):
running requests first (a decode takes one token, an unfinished prefill takes a chunk
of the remaining token budget), then waiting requests FCFS while the token budget,
``max_num_seqs`` and KV blocks last; a request that cannot get a block preempts the
most recently admitted running request (recompute: it goes back to the front of the
waiting queue and later re-prefills its prompt plus the tokens it had generated).
Optional prefix caching reuses cached blocks of shared prompt prefixes.

The engine knows nothing about clocks: a :class:`StepGroup` plans a step (or a
*segment* of identical decode-only steps, fast-forwarded in closed form), says when
it ends in integer picoseconds, and applies it when the driver reaches that time. The
simulator drives it with a virtual clock; the emulator (a later milestone) will drive
the same code with a wall clock, one step at a time.

A :class:`StepGroup` of ``G > 1`` engines is a data-parallel barrier group: all ranks
step together and the step lasts as long as the slowest rank's step (plus an optional
MoE/EP term proportional to the mean load).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmpool.routing.profile import EngineConfig, StepTimer


class EngineRequest:
    """A request inside an engine. ``output`` is the true output length (hidden truth)."""

    __slots__ = (
        "arrival_ps",
        "blocks",
        "cached",
        "computed",
        "finish_ps",
        "first_ps",
        "generated",
        "hashes",
        "hbt",
        "output",
        "preemptions",
        "prompt",
        "rid",
        "shared",
        "tag",
    )

    def __init__(
        self,
        rid: int,
        prompt: int,
        output: int,
        hashes: tuple[int, ...] = (),
        hbt: int = 512,
        tag: Any = None,
    ) -> None:
        self.rid = rid
        self.prompt = prompt
        self.output = output
        self.hashes = hashes
        self.hbt = hbt
        self.tag = tag
        self.generated = 0
        self.computed = 0
        self.cached = 0  # prompt tokens served from the prefix cache at first admission
        self.blocks = 0
        self.shared: list[int] = []
        self.arrival_ps = 0
        self.first_ps = -1
        self.finish_ps = -1
        self.preemptions = 0


@dataclass(slots=True)
class EngineStats:
    """Gauges and counters as vLLM exports them (see model-server notes section 1)."""

    running: int
    waiting: int
    kv_usage: float
    kv_capacity_tokens: int
    kv_tokens: int
    output_tokens: int  # generated so far by the requests still on the engine


class Engine:
    """One vLLM V1 engine (one data-parallel rank)."""

    def __init__(self, cfg: EngineConfig, timer: StepTimer, name: str = "") -> None:
        self.cfg = cfg
        self.timer = timer
        self.name = name
        self.bs = cfg.block_size
        self.total_blocks = cfg.num_gpu_blocks
        self.capacity_tokens = cfg.num_gpu_blocks * cfg.block_size
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.used_blocks = 0  # private blocks held by requests
        # prefix cache: key -> [refcount, blocks]; refcount-0 keys are evictable, LRU order
        self.cache: dict[int, list[int]] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached_blocks = 0  # all blocks held by the cache
        self.pinned_blocks = 0  # blocks of cache entries with refcount > 0
        self.ctx_tokens = 0  # sum of computed tokens over running requests
        self.out_tokens = 0  # sum of generated tokens over requests on this engine
        # scheduled work of the current general step
        self.sched: list[tuple[EngineRequest, int]] = []
        # current fast-forward segment (decode-only): steps, seqs, S0 and block-need histogram
        self.seg_n = 0
        self.seg_s0 = 0
        self.seg_cnt: list[int] = []
        # counters
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # counted when a prefill completes, as vLLM does
        self.prompt_tokens_cached_total = 0
        self.generation_tokens_total = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.finished_total = 0

    # ------------------------------------------------------------------ intake
    def fits(self, prompt: int, output: int) -> bool:
        """Whether the engine can ever run this request (vLLM rejects such requests up
        front: longer than the model context, here capped at the KV cache; without
        chunked prefill, a (re)prefill must fit in one step's token budget)."""
        if prompt + output > self.capacity_tokens - self.bs:
            return False
        return self.cfg.enable_chunked_prefill or prompt + output <= self.cfg.max_num_batched_tokens

    def add(self, req: EngineRequest, now_ps: int) -> None:
        req.arrival_ps = now_ps
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ blocks
    def _free_for_alloc(self) -> int:
        return self.total_blocks - self.used_blocks - self.pinned_blocks

    def _alloc(self, n: int) -> None:
        """Take ``n`` private blocks, evicting refcount-0 cache entries (LRU) if needed."""
        self.used_blocks += n
        over = self.used_blocks + self.cached_blocks - self.total_blocks
        while over > 0:
            key, _ = self.evictable.popitem(last=False)
            nb = self.cache.pop(key)[1]
            self.cached_blocks -= nb
            over -= nb

    def _release(self, r: EngineRequest) -> None:
        self.used_blocks -= r.blocks
        r.blocks = 0
        for key in reversed(r.shared):  # the tail of a prefix is evicted first, as in vLLM
            ent = self.cache[key]
            ent[0] -= 1
            if ent[0] == 0:
                self.pinned_blocks -= ent[1]
                self.evictable[key] = None
        r.shared = []

    def _blocks_for(self, r: EngineRequest, tokens: int) -> int:
        """Private blocks ``r`` needs to hold ``tokens`` tokens, beyond what it has."""
        chunk = r.hbt // self.bs if r.shared else 0
        return -(-tokens // self.bs) - len(r.shared) * chunk - r.blocks

    def _match_prefix(self, r: EngineRequest) -> None:
        """On admission, reuse the longest run of cached prompt chunks (pins them)."""
        ntok = r.prompt + r.generated
        self.prefix_queries += r.prompt
        if not (self.cfg.enable_prefix_caching and r.hashes) or r.hbt % self.bs:
            return
        limit = min(len(r.hashes), (ntok - 1) // r.hbt)  # the last token is always computed
        cache = self.cache
        for i in range(limit):
            ent = cache.get(r.hashes[i])
            if ent is None:
                break
            if ent[0] == 0:
                del self.evictable[r.hashes[i]]
                self.pinned_blocks += ent[1]
            ent[0] += 1
            r.shared.append(r.hashes[i])
        if r.shared:
            r.computed = len(r.shared) * r.hbt
            self.prefix_hits += r.computed
            if r.first_ps < 0:
                r.cached = r.computed

    def _unmatch_prefix(self, r: EngineRequest) -> None:
        self.prefix_queries -= r.prompt
        self.prefix_hits -= r.computed
        self._release(r)
        r.computed = 0
        if r.first_ps < 0:
            r.cached = 0

    def abort(self, r: EngineRequest) -> bool:
        """Drop a request (its client went away). Only between steps: never while a
        planned step or segment that includes it is pending. False if it is not here."""
        if r in self.waiting:
            self.waiting.remove(r)
            self._release(r)
            return True
        if r in self.running:
            self.running.remove(r)
            self.ctx_tokens -= r.computed
            self.out_tokens -= r.generated
            self._release(r)
            return True
        return False

    def _insert_prefix(self, r: EngineRequest) -> None:
        """After a prefill completes, its full prompt chunks become cached (shared)."""
        if not (self.cfg.enable_prefix_caching and r.hashes) or r.hbt % self.bs:
            return
        chunk = r.hbt // self.bs
        start = len(r.shared)
        full = min(len(r.hashes), r.prompt // r.hbt)
        for i in range(start, full):
            key = r.hashes[i]
            if key in self.cache:
                break  # another request cached it concurrently; keep ours private
            if r.blocks < chunk:
                break
            self.cache[key] = [1, chunk]
            self.cached_blocks += chunk
            self.pinned_blocks += chunk
            self.used_blocks -= chunk
            r.blocks -= chunk
            r.shared.append(key)

    def _preempt_last(self) -> EngineRequest:
        victim = self.running.pop()
        self.ctx_tokens -= victim.computed
        self._release(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    # ------------------------------------------------------------------ general step
    def schedule(self) -> tuple[int, int, int, float]:
        """Plan one step as vLLM V1 does. Returns (tokens, seqs, decode ctx, prefill pairs)."""
        cfg = self.cfg
        budget = cfg.max_num_batched_tokens
        thr = cfg.long_prefill_token_threshold
        sched = self.sched
        sched.clear()
        n_tok = 0
        dec_ctx = 0
        pairs = 0.0
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            need = r.prompt + r.generated - r.computed
            if need > budget:
                need = budget
            if thr and need > thr:
                need = thr
            nb = self._blocks_for(r, r.computed + need)
            scheduled_self = True
            while nb > self._free_for_alloc():
                victim = self._preempt_last()
                preempted = True
                if victim is r:
                    scheduled_self = False
                    break
            if not scheduled_self:
                break
            if nb > 0:
                self._alloc(nb)
                r.blocks += nb
            sched.append((r, need))
            budget -= need
            n_tok += need
            if need == 1 and r.computed == r.prompt + r.generated - 1 and r.generated > 0:
                dec_ctx += r.computed + 1
            else:
                pairs += need * (2 * r.computed + need) / 2
            i += 1
        if not preempted:
            waiting = self.waiting
            max_seqs = cfg.max_num_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                r = waiting[0]
                if r.computed == 0 and not r.shared:
                    self._match_prefix(r)
                need = r.prompt + r.generated - r.computed
                if need > budget:
                    if not cfg.enable_chunked_prefill:
                        self._unmatch_prefix(r)
                        break
                    need = budget
                if thr and need > thr:
                    need = thr
                nb = self._blocks_for(r, r.computed + need)
                if nb > self._free_for_alloc():
                    self._unmatch_prefix(r)
                    break
                waiting.popleft()
                if nb > 0:
                    self._alloc(nb)
                    r.blocks += nb
                running.append(r)
                self.ctx_tokens += r.computed
                sched.append((r, need))
                budget -= need
                n_tok += need
                pairs += need * (2 * r.computed + need) / 2
        return n_tok, len(sched), dec_ctx, pairs

    def load_after_schedule(self) -> int:
        """KV tokens resident during the planned step (the DP-imbalance load L_g)."""
        return self.ctx_tokens + sum(n for _, n in self.sched)

    def apply_step(
        self, end_ps: int, finished: list[EngineRequest], started: list[EngineRequest] | None = None
    ) -> None:
        """Apply the planned general step that ended at ``end_ps``; requests that produced
        their first token in it are appended to ``started`` (if given)."""
        done = False
        for r, n in self.sched:
            was_prefilling = r.computed < r.prompt
            r.computed += n
            self.ctx_tokens += n
            if r.computed == r.prompt + r.generated:
                r.generated += 1
                self.generation_tokens_total += 1
                self.out_tokens += 1
                if r.first_ps < 0:
                    r.first_ps = end_ps
                    self.prompt_tokens_total += r.prompt
                    self.prompt_tokens_cached_total += r.cached
                    if started is not None:
                        started.append(r)
                if was_prefilling and r.computed >= r.prompt:
                    self._insert_prefix(r)
                if r.generated >= r.output:
                    done = True
        self.sched.clear()
        if done:
            self._finish_done(end_ps, finished)

    def _finish_done(self, end_ps: int, finished: list[EngineRequest]) -> None:
        keep = []
        for r in self.running:
            if r.generated >= r.output:
                r.finish_ps = end_ps
                self.ctx_tokens -= r.computed
                self._release(r)
                self.out_tokens -= r.generated
                self.finished_total += 1
                finished.append(r)
            else:
                keep.append(r)
        self.running = keep

    # ------------------------------------------------------------------ fast-forward
    def ff_limit(self, kmax: int) -> int:
        """How many identical decode-only steps can run from here without any scheduling
        event (an admission, a completion, a preemption). 0 means a general step is needed.
        Sets up the segment state when > 0. An engine with nothing running returns ``kmax``
        if nothing could be admitted either (it idles through the segment)."""
        running = self.running
        if not running:
            self.seg_n = 0
            self.seg_s0 = 0
            return 0 if self.waiting else kmax
        k = kmax
        s0 = 0
        bs = self.bs
        cnt = [0] * (bs + 1)
        for r in running:
            c = r.computed
            if c != r.prompt + r.generated - 1 or r.generated == 0:
                return 0  # still prefilling
            rem = r.output - r.generated
            if rem < k:
                k = rem
            s0 += c + 1
            s = (1 - c) % bs
            cnt[s if s else bs] += 1
        n = len(running)
        if self.waiting:
            # A blocked waiting head stays blocked through a decode-only stretch as long
            # as no cached block is evicted (free blocks only shrink); so the segment
            # stops before the first eviction and a general step takes over.
            if self._head_admissible(n):
                return 0
            free = self.total_blocks - self.used_blocks - self.cached_blocks
        else:
            free = self._free_for_alloc()
        if _blocks_needed(cnt, bs, k) > free:
            lo, hi = 0, k  # largest j with need(j) <= free
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _blocks_needed(cnt, bs, mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        if k <= 0:
            return 0
        self.seg_n = n
        self.seg_s0 = s0
        self.seg_cnt = cnt
        return k

    def _head_admissible(self, n_running: int) -> bool:
        """Would the next decode-only step admit the waiting head? (No side effects.)"""
        cfg = self.cfg
        if n_running >= cfg.max_num_seqs:
            return False
        budget = cfg.max_num_batched_tokens - n_running
        if budget <= 0:
            return False
        r = self.waiting[0]
        ntok = r.prompt + r.generated
        computed = r.computed
        hit = 0
        pin = 0
        if computed == 0 and not r.shared and cfg.enable_prefix_caching and r.hashes and r.hbt % self.bs == 0:
            limit = min(len(r.hashes), (ntok - 1) // r.hbt)
            for i in range(limit):
                ent = self.cache.get(r.hashes[i])
                if ent is None:
                    break
                hit += 1
                if ent[0] == 0:
                    pin += ent[1]
            computed = hit * r.hbt
        need = ntok - computed
        if need > budget:
            if not cfg.enable_chunked_prefill:
                return False
            need = budget
        thr = cfg.long_prefill_token_threshold
        if thr and need > thr:
            need = thr
        chunk = r.hbt // self.bs if hit else 0
        nb = -(-(computed + need) // self.bs) - hit * chunk - r.blocks
        return nb <= self._free_for_alloc() - pin

    def apply_segment(self, j: int, end_ps: int, finished: list[EngineRequest]) -> None:
        """Apply ``j`` decode steps of the current segment (the last ended at ``end_ps``)."""
        if j <= 0 or not self.running:
            return
        bs = self.bs
        need = _blocks_needed(self.seg_cnt, bs, j)
        if need:
            self._alloc(need)
        done = False
        for r in self.running:
            c = r.computed + j
            r.computed = c
            r.generated += j
            r.blocks = -(-c // bs) - (len(r.shared) * (r.hbt // bs) if r.shared else 0)
            if r.generated >= r.output:
                done = True
        self.ctx_tokens += self.seg_n * j
        self.generation_tokens_total += self.seg_n * j
        self.out_tokens += self.seg_n * j
        if done:
            self._finish_done(end_ps, finished)

    def segment_blocks_at(self, j: int) -> int:
        return _blocks_needed(self.seg_cnt, self.bs, j) if self.seg_n else 0

    # ------------------------------------------------------------------ observation
    def stats(self, seg_steps_done: int = 0, seg_steps_alloc: int = 0) -> EngineStats:
        """Gauges as of now; inside a segment pass the steps done and allocated so far."""
        used = self.used_blocks + self.pinned_blocks
        kv_tokens = self.ctx_tokens
        out = self.out_tokens
        if seg_steps_alloc and self.seg_n:
            used += self.segment_blocks_at(seg_steps_alloc)
            kv_tokens += self.seg_n * seg_steps_done
            out += self.seg_n * seg_steps_done
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_usage=min(1.0, used / (self.total_blocks - 1)),
            kv_capacity_tokens=self.capacity_tokens,
            kv_tokens=kv_tokens,
            output_tokens=out,
        )


def _blocks_needed(cnt: Sequence[int], bs: int, j: int) -> int:
    """New blocks a decode-only stretch of ``j`` steps allocates, from the histogram
    ``cnt[s]`` of requests whose first new block is needed at step ``s`` (1..bs)."""
    if j <= 0:
        return 0
    total = 0
    for s in range(1, min(j, bs) + 1):
        c = cnt[s]
        if c:
            total += c * ((j - s) // bs + 1)
    return total


# What a step group's planned step does (StepGroup.activity): host contention depends on it.
IDLE, DECODING, PREFILLING = 0, 1, 2


class StepGroup:
    """Engines that step together: one engine (an independent replica) or a
    data-parallel barrier group whose step lasts as long as its slowest rank's."""

    def __init__(self, engines: list[Engine], timer: StepTimer, *, fast_forward: bool = True) -> None:
        self.engines = engines
        self.timer = timer
        self.G = len(engines)
        self.fast_forward = fast_forward
        self.busy = False
        self.start_ps = 0
        self.end_ps = 0
        self.version = 0  # bumped whenever end_ps changes (lazy heap invalidation)
        self._memo_t = -1
        self._memo_v = -1
        self._memo_j = 0
        # segment
        self.seg_k = 0  # 0: a general step is planned
        self.seg_b = 0
        self.seg_a = 0
        self.seg_s0 = 0
        self.seg_n = 0
        self.seg_cum: np.ndarray | None = None  # cumulative end offsets (G > 1)
        # DP imbalance accumulators (over barrier steps, G > 1), over every step and over the
        # steps that start while arrivals last (``arrivals_end_ps``: None until the simulator
        # has seen the last arrival, then its time), without the drain tail of a finite workload
        self.steps = 0
        self.imb_gmax = 0
        self.imb_maxmin = 0
        self.arrivals_end_ps: int | None = None
        self.win_steps = 0
        self.win_imb_gmax = 0
        self.win_imb_maxmin = 0
        # Host contention (Profile.host): the other servers on this group's host, and how
        # much longer a step gets per neighbour by what that neighbour does (index: its
        # ``activity``). No neighbours: a host of its own.
        self.neighbours: list[StepGroup] = []
        self.slowdowns: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.activity = IDLE  # what the planned step does: IDLE, DECODING or PREFILLING
        self.factor = 1.0  # the slowdown of the step or segment planned last

    # --------------------------------------------------------------- planning
    def plan(self, now_ps: int) -> bool:
        """Plan the next step or segment starting at ``now_ps``; False when idle."""
        engines = self.engines
        if not any(e.has_work() for e in engines):
            self.busy = False
            self.seg_k = 0
            self.activity = IDLE
            return False
        self.busy = True
        self.start_ps = now_ps
        self.version += 1
        f = 1.0
        if self.neighbours:
            sd = self.slowdowns
            for g in self.neighbours:
                f += sd[g.activity]
        self.factor = f
        if self.fast_forward and self._plan_segment(now_ps):
            self.activity = DECODING
            return True
        self.seg_k = 0
        timer = self.timer
        prefill = False
        if self.G == 1:
            e = engines[0]
            n_tok, n_seq, dec_ctx, pairs = e.schedule()
            load = e.load_after_schedule()
            if n_seq == 0:
                raise RuntimeError(f"engine {e.name}: nothing schedulable (waiting head can never fit)")
            dur = timer.step_ps(n_tok, n_seq, dec_ctx, pairs) + timer.moe_ps * load
            prefill = pairs > 0
        else:
            worst = 0
            loads = []
            for e in engines:
                n_tok, n_seq, dec_ctx, pairs = e.schedule()
                if n_seq:
                    t = timer.step_ps(n_tok, n_seq, dec_ctx, pairs)
                    if t > worst:
                        worst = t
                    prefill = prefill or pairs > 0
                loads.append(e.load_after_schedule())
            total = sum(loads)
            dur = worst + (timer.moe_ps * total) // self.G
            self._account_imbalance(max(loads), min(loads), total, 1)
        self.activity = PREFILLING if prefill else DECODING
        if f != 1.0:
            dur = round(dur * f)
        self.end_ps = now_ps + max(dur, 1)
        return True

    def _plan_segment(self, now_ps: int) -> bool:
        kmax = 1 << 40
        for e in self.engines:
            k = e.ff_limit(kmax)
            if k == 0:
                return False
            kmax = min(kmax, k)
        busy = [e for e in self.engines if e.seg_n]
        if not busy:
            return False
        timer = self.timer
        k = kmax
        if self.G == 1:
            e = busy[0]
            n = e.seg_n
            b = timer.base_ps(n)
            a = timer.attn_per_ctx_ps(n) + timer.moe_ps
            f = self.factor
            if f != 1.0:  # still integers: the closed form stays exact
                b = round(b * f)
                a = round(a * f)
            self.seg_b, self.seg_a, self.seg_s0, self.seg_n = b, a, e.seg_s0, n
            self.seg_cum = None
            self.seg_k = k
            self.end_ps = now_ps + self._g1_offset(k)
            return True
        # Barrier group: per-step time is the max over ranks of affine functions of the step.
        cum = self._group_cum(k)
        self.seg_cum = cum
        self.seg_k = k
        self.end_ps = now_ps + int(cum[-1])
        return True

    def _g1_offset(self, j: int) -> int:
        """End offset of step ``j`` of a single-engine segment (closed form, exact)."""
        return j * self.seg_b + self.seg_a * (j * self.seg_s0 + self.seg_n * j * (j - 1) // 2)

    def _group_cum(self, k: int) -> np.ndarray:
        timer = self.timer
        steps = np.arange(k, dtype=np.int64)
        per = np.zeros(k, dtype=np.int64)
        loads = []
        for e in self.engines:
            if not e.seg_n:
                loads.append(np.zeros(k, dtype=np.int64))
                continue
            load = e.seg_s0 + e.seg_n * steps
            t = timer.base_ps(e.seg_n) + timer.attn_per_ctx_ps(e.seg_n) * load
            np.maximum(per, t, out=per)
            loads.append(load)
        lmat = np.vstack(loads)
        total = lmat.sum(axis=0)
        per += (timer.moe_ps * total) // self.G
        if self.factor != 1.0:
            per = np.rint(per * self.factor).astype(np.int64)
        self._seg_loads = lmat
        return np.cumsum(per)

    # --------------------------------------------------------------- interruption
    def steps_done(self, now_ps: int) -> int:
        """Segment steps that have ended by ``now_ps`` (steps ending at now count)."""
        if not self.busy or self.seg_k == 0:
            return 0
        if self._memo_t == now_ps and self._memo_v == self.version:
            return self._memo_j
        j = self._steps_done(now_ps - self.start_ps)
        self._memo_t, self._memo_v, self._memo_j = now_ps, self.version, j
        return j

    def _steps_done(self, off: int) -> int:
        if self.seg_cum is not None:
            return int(np.searchsorted(self.seg_cum, off, side="right"))
        # Invert the closed form: (A n / 2) j^2 + (B + A S0 - A n / 2) j <= off, then fix up
        # the float estimate with exact integer checks.
        qa = self.seg_a * self.seg_n / 2.0
        qb = self.seg_b + self.seg_a * self.seg_s0 - qa
        if qa > 0:
            j = int((-qb + math.sqrt(qb * qb + 4.0 * qa * off)) / (2.0 * qa))
        else:
            j = int(off // qb) if qb > 0 else self.seg_k
        j = max(0, min(j, self.seg_k))
        g = self._g1_offset
        while j < self.seg_k and g(j + 1) <= off:
            j += 1
        while j > 0 and g(j) > off:
            j -= 1
        return j

    def kv_tokens(self, idx: int, now_ps: int) -> int:
        """KV tokens resident on rank ``idx`` now (cheap; for load sampling)."""
        e = self.engines[idx]
        if self.busy and self.seg_k and e.seg_n:
            return e.ctx_tokens + e.seg_n * self.steps_done(now_ps)
        return e.ctx_tokens

    def interrupt(self, now_ps: int) -> bool:
        """A request arrived at a rank of this group: cut a running segment short after
        the step in progress. Returns True when ``end_ps`` changed."""
        if not self.busy or self.seg_k == 0:
            return False
        j = self.steps_done(now_ps)
        new_k = min(self.seg_k, j + 1)
        if new_k == self.seg_k:
            return False
        self.seg_k = new_k
        off = int(self.seg_cum[new_k - 1]) if self.seg_cum is not None else self._g1_offset(new_k)
        self.end_ps = self.start_ps + off
        self.version += 1
        return True

    # --------------------------------------------------------------- completion
    def finish(self, now_ps: int, started: list[EngineRequest] | None = None) -> list[EngineRequest]:
        """Apply the planned step/segment (which ends at ``now_ps``); the finished requests.
        Requests that produced their first token are appended to ``started`` (if given; a
        decode-only segment starts none)."""
        finished: list[EngineRequest] = []
        if self.seg_k:
            k = self.seg_k
            if self.G > 1:
                lm = self._seg_loads[:, :k]
                mx = lm.max(axis=0)
                tot = lm.sum(axis=0)
                self._account_imbalance_arrays(mx, lm.min(axis=0), tot)
            for e in self.engines:
                if e.seg_n:
                    e.apply_segment(k, now_ps, finished)
        else:
            for e in self.engines:
                e.apply_step(now_ps, finished, started)
        self.seg_k = 0
        self.busy = False
        return finished

    def _account_imbalance(self, mx: int, mn: int, total: int, steps: int) -> None:
        """One general step, accounted when it is planned (it starts at ``start_ps``)."""
        self.steps += steps
        self.imb_gmax += self.G * mx - total
        self.imb_maxmin += mx - mn
        if self.arrivals_end_ps is None or self.start_ps <= self.arrivals_end_ps:
            self.win_steps += steps
            self.win_imb_gmax += self.G * mx - total
            self.win_imb_maxmin += mx - mn

    def _account_imbalance_arrays(self, mx: np.ndarray, mn: np.ndarray, tot: np.ndarray) -> None:
        """A segment's steps, accounted when it ends (step ``j`` starts at ``start_ps +
        seg_cum[j - 1]``)."""
        k = int(mx.shape[0])
        gmax = self.G * mx - tot
        maxmin = mx - mn
        self.steps += k
        self.imb_gmax += int(gmax.sum())
        self.imb_maxmin += int(maxmin.sum())
        end = self.arrivals_end_ps
        if end is None:
            n_in = k
        elif self.start_ps > end:
            n_in = 0
        else:
            assert self.seg_cum is not None
            n_in = 1 + int(np.searchsorted(self.seg_cum[: k - 1], end - self.start_ps, side="right"))
        if n_in:
            self.win_steps += n_in
            self.win_imb_gmax += int(gmax[:n_in].sum())
            self.win_imb_maxmin += int(maxmin[:n_in].sum())

    # --------------------------------------------------------------- observation
    def all_stats(self, now_ps: int) -> list[EngineStats]:
        """Every rank's gauges at ``now_ps`` (one segment lookup for the whole group)."""
        if self.busy and self.seg_k:
            j = self.steps_done(now_ps)
            alloc = min(j + 1, self.seg_k)
            return [e.stats(j, alloc) if e.seg_n else e.stats() for e in self.engines]
        return [e.stats() for e in self.engines]

    def generated_offset(self, now_ps: int) -> int:
        """Decode tokens each running request has produced in the segment so far."""
        if self.busy and self.seg_k:
            return self.steps_done(now_ps)
        return 0
