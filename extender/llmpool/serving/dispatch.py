"""Run a routing policy against live endpoints: the router-side queue and dispatch
rounds, shared by every live driver (the replay client and the endpoint picker).

Rounds are :func:`llmpool.routing.driver.dispatch_round`, the simulator's own: queued
requests are offered in arrival order with one frozen ``view.now``; a
:class:`~llmpool.routing.types.Hold` keeps a request queued, and a round runs again
every ``tick_s`` while something is held and whenever a request finishes.
:meth:`Dispatcher.finish` calls ``on_completed`` on every exit path.

What only a live driver needs, kept out of the policies:

* per-request eligibility (a gateway's subset hint): the policy's ordered list is
  narrowed to eligible endpoints; if it named none of them, the eligible endpoint with
  the fewest requests in flight takes the request;
* endpoints known to be down are never chosen while another eligible one exists;
* when every eligible endpoint's metrics are stale the policy is bypassed and the
  request goes to the endpoint with the fewest requests in flight (the policies'
  inputs are meaningless then).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable

from llmpool.routing.driver import DispatchError, dispatch_round
from llmpool.routing.policy import Policy
from llmpool.routing.types import EndpointState, Request, Route
from llmpool.serving.datastore import Datastore, Flight

__all__ = ["DispatchError", "Dispatcher", "Eligible", "NoEndpointError"]

Eligible = Callable[[EndpointState], bool]


class NoEndpointError(DispatchError):
    """No endpoint of the pool may take this request (empty pool or an empty subset)."""


class _Waiter:
    __slots__ = ("eligible", "fut")

    def __init__(self, fut: asyncio.Future[Flight], eligible: Eligible | None) -> None:
        self.fut = fut
        self.eligible = eligible


class Dispatcher:
    def __init__(
        self,
        policy: Policy,
        datastore: Datastore,
        *,
        tick_s: float = 0.02,
        max_endpoints: int = 3,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_endpoints < 1:
            raise ValueError(f"max_endpoints must be >= 1, got {max_endpoints}")
        self.ds = datastore
        self.tick_s = tick_s
        self.clock = clock
        self.max_endpoints = max_endpoints
        self.rng = rng or random.Random()
        self._queue: deque[Request] = deque()
        self._waiters: dict[int, _Waiter] = {}
        self._tick: asyncio.TimerHandle | None = None
        self.ds.view.queue = self._queue
        self.decisions = 0
        self.holds = 0
        self.bypassed = 0
        self.policy = policy
        self.window = max(1, int(getattr(policy, "queue_window", 1)))

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy (a config reload). Requests in flight finish on the old one."""
        self.policy = policy
        self.window = max(1, int(getattr(policy, "queue_window", 1)))
        if self._queue:
            self._dispatch()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def candidates(self, eligible: Eligible | None) -> list[int]:
        ds = self.ds
        return [
            i for i, st in enumerate(ds.states) if (eligible is None or eligible(st)) and ds.routable(i)
        ] or [i for i, st in enumerate(ds.states) if eligible is None or eligible(st)]

    async def route(self, request: Request, eligible: Eligible | None = None) -> Flight:
        """Wait until the policy routes ``request``; returns its flight (target + fallbacks).

        Raises :class:`NoEndpointError` when no endpoint is eligible, :class:`DispatchError`
        when the policy fails. If the caller is cancelled while the request is held (a
        timeout, a client that went away), the request leaves the queue."""
        placed = self.submit(request, eligible)
        if isinstance(placed, Flight):
            return placed
        return await self.wait(request, placed)

    def submit(self, request: Request, eligible: Eligible | None = None) -> Flight | asyncio.Future[Flight]:
        """Queue ``request`` and run a round: its flight when the round placed it (the usual
        case: no task, no loop iteration), else a future for :meth:`wait`. Raises as
        :meth:`route` does."""
        cands = self.candidates(eligible)
        if not cands:
            raise NoEndpointError("no ready endpoint" if eligible is None else "no eligible endpoint")
        states = self.ds.states
        if all(states[i].stale for i in cands):
            self.bypassed += 1
            return self.assign_now(request, self._least_inflight(cands))
        fut: asyncio.Future[Flight] = asyncio.get_running_loop().create_future()
        self._waiters[id(request)] = _Waiter(fut, eligible)
        self._queue.append(request)
        self._dispatch()
        if fut.done():
            return fut.result()  # placed (or failed: raises) in this round
        return fut

    async def wait(self, request: Request, fut: asyncio.Future[Flight]) -> Flight:
        """Wait for a request :meth:`submit` left queued; cancelling the wait dequeues it."""
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                self._waiters.pop(id(request), None)
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)

    def assign_now(self, request: Request, idx: int, route: tuple[str, ...] = ()) -> Flight:
        """Send ``request`` to endpoint ``idx`` without asking the policy (it is told)."""
        now = self.clock()
        fl = self.ds.assign(idx, request, now)
        if route:
            fl.route = route
        self.policy.on_assigned(request, idx, now)
        return fl

    def finish(self, fl: Flight, output_tokens: int) -> None:
        """The request of ``fl`` is over (done, failed or cancelled); idempotent."""
        if self.ds.complete(fl):
            self.policy.on_completed(fl.request, fl.endpoint, output_tokens, self.clock())
            if self._queue:
                self._dispatch()

    # ------------------------------------------------------------------ rounds
    def _least_inflight(self, cands: list[int]) -> int:
        states = self.ds.states
        best = min(states[i].inflight for i in cands)
        tied = [i for i in cands if states[i].inflight == best]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _place(self, req: Request, route: Route) -> int | None:
        w = self._waiters.pop(id(req), None)
        if w is None or w.fut.done():
            return None
        ds = self.ds
        states = ds.states
        elig = w.eligible
        chosen = [i for i in route.endpoints if ds.routable(i) and (elig is None or elig(states[i]))][
            : self.max_endpoints
        ]
        if not chosen:
            cands = self.candidates(elig)
            if not cands:
                w.fut.set_exception(NoEndpointError("no eligible endpoint"))
                return None
            chosen = [self._least_inflight(cands)]
        fl = ds.assign(chosen[0], req, ds.view.now)
        fl.route = tuple(ds.endpoints[i].name for i in chosen)
        w.fut.set_result(fl)
        return chosen[0]

    def _fail(self, req: Request, err: DispatchError) -> None:
        w = self._waiters.pop(id(req), None)
        if w is not None and not w.fut.done():
            w.fut.set_exception(err)

    def _dispatch(self) -> None:
        view = self.ds.view
        view.now = self.clock()  # one frozen time per round
        before = len(self._queue)
        held, decisions = dispatch_round(self.policy, view, self._queue, self.window, self._place, self._fail)
        self.decisions += decisions
        self.holds += decisions - (before - len(self._queue))
        if held and self._queue and self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(self.tick_s, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        if self._queue:
            self._dispatch()

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for w in self._waiters.values():
            if not w.fut.done():
                w.fut.set_exception(NoEndpointError("the router is shutting down"))
        self._waiters.clear()
        self._queue.clear()
