"""Run a routing policy against live endpoints: the router-side queue and dispatch
rounds, shared by every live driver (the replay client now, the endpoint picker).

It keeps the driver contract of :class:`~llmpool.routing.policy.Policy` exactly as
the simulator does: a dispatch round offers queued requests in arrival order with
one frozen ``view.now``; a :class:`~llmpool.routing.types.Hold` keeps the request
queued (at most ``policy.queue_window`` requests may be skipped past) and a round
runs again every ``tick_s`` while something is held, and whenever a request
finishes; :meth:`Dispatcher.finish` calls ``on_completed`` on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from llmpool.routing.policy import Policy
from llmpool.routing.types import Hold, Request, Route
from llmpool.serving.datastore import Datastore, Flight


class DispatchError(RuntimeError):
    """The policy returned something unusable for a request."""


class Dispatcher:
    def __init__(
        self,
        policy: Policy,
        datastore: Datastore,
        *,
        tick_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.ds = datastore
        self.tick_s = tick_s
        self.clock = clock
        self._queue: deque[Request] = deque()
        self._waiters: dict[int, asyncio.Future[tuple[int, Flight]]] = {}
        self._tick: asyncio.TimerHandle | None = None
        self.ds.view.queue = self._queue
        self.window = max(1, int(getattr(policy, "queue_window", 1)))
        self.decisions = 0
        self.holds = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def route(self, request: Request) -> tuple[int, Flight]:
        """Wait until the policy routes ``request``; returns (endpoint index, flight).

        If the caller is cancelled while the request is held, it leaves the queue."""
        fut: asyncio.Future[tuple[int, Flight]] = asyncio.get_running_loop().create_future()
        key = id(request)
        self._waiters[key] = fut
        self._queue.append(request)
        self._dispatch()
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                self._waiters.pop(key, None)
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)

    def finish(self, fl: Flight, output_tokens: int) -> None:
        """The request of ``fl`` is over (done, failed or cancelled)."""
        self.ds.complete(fl)
        self.policy.on_completed(fl.request, fl.endpoint, output_tokens, self.clock())
        if self._queue:
            self._dispatch()

    def _dispatch(self) -> None:
        queue = self._queue
        view = self.ds.view
        view.now = self.clock()  # one frozen time per round
        n_ep = len(self.ds.states)
        pos = 0
        held = False
        while pos < len(queue) and pos < self.window:
            req = queue[pos]
            fut = self._waiters.get(id(req))
            try:
                decision = self.policy.decide(req, view)
                self.decisions += 1
                if isinstance(decision, Hold):
                    self.holds += 1
                    held = True
                    pos += 1
                    continue
                if not isinstance(decision, Route) or not decision.endpoints:
                    raise DispatchError(f"policy {self.policy.name!r} returned {decision!r}")
                idx = decision.endpoints[0]
                if not 0 <= idx < n_ep:
                    raise DispatchError(
                        f"policy {self.policy.name!r} chose endpoint {idx}; the pool has {n_ep}"
                    )
            except Exception as err:  # a policy bug fails this request, not the router
                del queue[pos]
                self._waiters.pop(id(req), None)
                if fut is not None and not fut.done():
                    fut.set_exception(err if isinstance(err, DispatchError) else DispatchError(str(err)))
                continue
            del queue[pos]
            self._waiters.pop(id(req), None)
            fl = self.ds.assign(idx, req, view.now)
            self.policy.on_assigned(req, idx, view.now)
            if fut is not None and not fut.done():
                fut.set_result((idx, fl))
            else:  # nobody waits any more: undo (no nested round)
                self.ds.complete(fl)
                self.policy.on_completed(req, idx, 0, view.now)
        if held and queue and self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(self.tick_s, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        if self._queue:
            self._dispatch()

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
