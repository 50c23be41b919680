"""The router-side view of a pool of live endpoints.

The :class:`Datastore` owns one :class:`~llmpool.routing.types.EndpointState` per
endpoint and keeps it current from three sources:

* membership (:meth:`Datastore.set_endpoints`): a static list, or the pods of a
  Kubernetes watch; endpoints come and go, and every state's ``index`` is its position
  in ``states`` (the policy's ``view.endpoints``) after each change;
* scrapes of the endpoint's ``/metrics`` (:meth:`Datastore.scraped`), which set the
  gauges and start a new scrape epoch for that endpoint;
* the router's own assignments and completions, which keep in-flight counts exact
  (the accounting is :mod:`llmpool.routing.driver`'s, the same as the simulator's).

An endpoint whose ``/metrics`` refuses connections is *down*: stale at once and never
chosen while another endpoint can take the request. Metrics that are merely old
(timeouts, a slow pod) turn stale only after ``stale_after_s``.

Everything here is synchronous and allocation-light: the dispatch loop and the
metrics collector call it from the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmpool.routing.driver import note_assigned, note_finished, note_first_token, note_scraped
from llmpool.routing.types import ActiveRequest, EndpointState, PoolView, Request
from llmpool.serving.scrape import ServerMetrics


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A routable model-server endpoint: ``name`` is ``host:port``."""

    name: str
    url: str
    group: str = ""
    rank: int = 0
    engine_label: str = "0"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """From ``http://host:port`` or ``host:port``; one-line ValueError otherwise."""
        raw = text.strip()
        url = raw if "://" in raw else f"http://{raw}"
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ValueError(f"endpoint {text!r} must look like http://HOST:PORT")
        host = parts.hostname
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(name=name, url=f"{parts.scheme}://{name}", group=name)

    @property
    def host(self) -> str:
        """The address part of ``name`` (an IP for pods), brackets removed."""
        host = self.name.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") else host


class Slot:
    """Everything the datastore keeps for one endpoint."""

    __slots__ = ("down", "endpoint", "flights", "last_error", "state")

    def __init__(self, endpoint: Endpoint, state: EndpointState) -> None:
        self.endpoint = endpoint
        self.state = state
        self.flights: dict[int, Flight] = {}
        self.last_error = ""
        self.down = False


class Flight:
    """One request assigned to an endpoint and not yet finished."""

    __slots__ = ("active", "awaiting_first", "epoch", "request", "route", "slot")

    def __init__(self, request: Request, slot: Slot, epoch: int, now: float) -> None:
        self.request = request
        self.slot = slot
        self.epoch = epoch
        # its prompt counts as the endpoint's pending prefill until a first token is seen
        self.awaiting_first = request.stream
        self.active = ActiveRequest(request=request, assigned_at=now)
        self.route: tuple[str, ...] = (slot.endpoint.name,)  # target, then fallbacks

    @property
    def endpoint(self) -> int:
        """The endpoint's current index in the pool (-1 once it has left the pool)."""
        return self.slot.state.index

    @property
    def target(self) -> Endpoint:
        return self.slot.endpoint


class Datastore:
    """Endpoint states plus router-side accounting; the policy's :class:`PoolView`."""

    def __init__(self, endpoints: Sequence[Endpoint] = (), *, stale_after_s: float = 2.0) -> None:
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.stale_after_s = stale_after_s
        self.endpoints: list[Endpoint] = []
        self.states: list[EndpointState] = []
        self.slots: list[Slot] = []
        self._by_name: dict[str, Slot] = {}
        self.view = PoolView(now=0.0, endpoints=self.states, queue=())
        self.version = 0  # bumped on every membership change
        self.synced = False  # True after the first set_endpoints
        if endpoints:
            self.set_endpoints(endpoints)

    # ------------------------------------------------------------------ membership
    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> tuple[list[str], list[str]]:
        """Make ``endpoints`` the pool (in this order); returns (added, removed) names.

        Kept endpoints keep their gauges and in-flight requests. Requests in flight on a
        removed endpoint still finish normally; they just no longer count for the pool.
        """
        names = [e.name for e in endpoints]
        if len(set(names)) != len(names):
            dups = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate endpoints: {', '.join(dups)}")
        old = self._by_name
        new: dict[str, Slot] = {}
        slots: list[Slot] = []
        for i, ep in enumerate(endpoints):
            slot = old.get(ep.name)
            if slot is None:
                st = EndpointState(index=i, name=ep.name, group=ep.group or ep.name, rank=ep.rank)
                st.stale = True  # no metrics yet
                slot = Slot(ep, st)
                st._active_source = _active_of(slot.flights)
            else:
                slot.endpoint = ep
                slot.state.group = ep.group or ep.name
                slot.state.rank = ep.rank
            slot.state.index = i
            new[ep.name] = slot
            slots.append(slot)
        added = [n for n in names if n not in old]
        removed = [n for n in old if n not in new]
        for n in removed:
            old[n].state.index = -1
        self._by_name = new
        self.slots[:] = slots
        self.endpoints[:] = [s.endpoint for s in slots]
        self.states[:] = [s.state for s in slots]  # the view's list object stays the same
        self.synced = True
        if added or removed or names != [e.name for e in self.endpoints]:
            self.version += 1
        return added, removed

    def slot(self, name: str) -> Slot | None:
        return self._by_name.get(name)

    @property
    def last_error(self) -> list[str]:
        return [s.last_error for s in self.slots]

    def routable(self, idx: int) -> bool:
        """False for endpoints known to be down (their /metrics refuses connections)."""
        return not self.slots[idx].down

    # ------------------------------------------------------------------ scrapes
    def scraped(self, idx: int | str, metrics: ServerMetrics, now: float) -> None:
        """A successful scrape of endpoint ``idx`` (index or name) at ``now``."""
        slot = self._slot_of(idx)
        if slot is None:
            return
        st = slot.state
        eng = metrics.engines.get(slot.endpoint.engine_label)
        if eng is None:  # a server without an 'engine' label or with several: read it whole
            st.running, st.waiting, st.kv_usage = metrics.running, metrics.waiting, metrics.kv_usage
            caps = [e.kv_capacity_tokens for e in metrics.engines.values() if e.kv_capacity_tokens]
            cap = caps[0] if caps else None
        else:
            st.running, st.waiting, st.kv_usage = eng.running, eng.waiting, eng.kv_usage
            cap = eng.kv_capacity_tokens
        if cap:
            st.kv_capacity_tokens = cap
        note_scraped(st, now)
        slot.last_error = ""
        slot.down = False

    def scrape_failed(self, idx: int | str, error: str, now: float, *, unreachable: bool = False) -> None:
        """A failed scrape. ``unreachable`` (connection refused or reset) marks the endpoint
        down at once; otherwise it turns stale when its data is older than ``stale_after_s``."""
        slot = self._slot_of(idx)
        if slot is None:
            return
        slot.last_error = error
        st = slot.state
        if unreachable:
            slot.down = True
            st.stale = True
        elif now - st.scraped_at > self.stale_after_s:
            st.stale = True

    def _slot_of(self, idx: int | str) -> Slot | None:
        if isinstance(idx, str):
            return self._by_name.get(idx)
        return self.slots[idx]

    # ------------------------------------------------------------------ requests
    def assign(self, idx: int, request: Request, now: float) -> Flight:
        slot = self.slots[idx]
        epoch = note_assigned(slot.state, request.prompt_tokens, awaiting_first=request.stream)
        fl = Flight(request, slot, epoch, now)
        slot.flights[id(fl)] = fl
        return fl

    def progress(self, fl: Flight, generated: int, now: float) -> None:
        """``generated`` output tokens observed so far for ``fl`` (monotone)."""
        a = fl.active
        delta = generated - a.generated_tokens
        if delta > 0:
            if a.first_token_at is None:
                a.first_token_at = now
            if fl.awaiting_first:
                fl.awaiting_first = False
                note_first_token(fl.slot.state, fl.request.prompt_tokens)
            a.generated_tokens = generated
            fl.slot.state.inflight_output_tokens += delta

    def complete(self, fl: Flight) -> bool:
        """``fl`` finished, failed or was cancelled: every exit path calls this; idempotent.

        Returns True the first time."""
        slot = fl.slot
        if slot.flights.pop(id(fl), None) is None:
            return False
        st = slot.state
        note_finished(st, fl.request.prompt_tokens, fl.epoch, awaiting_first=fl.awaiting_first)
        st.inflight_output_tokens -= fl.active.generated_tokens
        return True

    def move(self, fl: Flight, slot: Slot) -> None:
        """``fl`` is really served by ``slot`` (the gateway retried down the fallback list)."""
        old = fl.slot
        if old is slot or old.flights.pop(id(fl), None) is None:
            return
        n = fl.request.prompt_tokens
        gen = fl.active.generated_tokens
        note_finished(old.state, n, fl.epoch, awaiting_first=fl.awaiting_first)
        old.state.inflight_output_tokens -= gen
        fl.slot = slot
        fl.epoch = note_assigned(slot.state, n, awaiting_first=fl.awaiting_first)
        slot.state.inflight_output_tokens += gen
        slot.flights[id(fl)] = fl

    def inflight_total(self) -> int:
        return sum(len(s.flights) for s in self.slots)


def _active_of(flights: dict[int, Flight]) -> Callable[[], Sequence[ActiveRequest]]:
    def build() -> Sequence[ActiveRequest]:
        return [f.active for f in flights.values()]

    return build
